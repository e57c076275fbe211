"""The command line: the paper's experiment end to end, resumable from its workdir.

    python -m jaxcrit.main --config=configs/smollm2.py --workdir=runs/smollm2 [--config.stage2.epsilon=3]
    python -m jaxcrit.main --config=smollm2 ...          # a packaged config, from any directory
    python -m jaxcrit.main --config=hf:/path/to/checkpoint ...
    python -m jaxcrit.main --config=hf:ORG/NAME[@REVISION] ...   # a Hugging Face Hub id, fetched into the hub cache
    python -m jaxcrit.main --config=smollm2 --print_config   # the config a run would use, and stop

The stages and their files are the table in jaxcrit/run/stages/; jaxcrit/run/runner.py runs it.
Bad input is one `jaxcrit: error:` line and exit code 2, before any weight is read.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from jaxcrit import configs
from jaxcrit.errors import JaxcritError


class Args(NamedTuple):
    config: ConfigDict
    workdir: Path
    print_config: bool   # print the config (overrides applied, validated, auto dtype settled) and stop


def parse(argv: list[str]) -> Args:
    """The config, workdir and --print_config from the command line; every parse failure as one
    JaxcritError.

    The flags live in a FlagValues of their own, so parse() can run more than once in a process.
    """
    argv = [_packaged(a) for a in argv]
    fv = flags.FlagValues()
    config = config_flags.DEFINE_config_file(
        "config", None, f"a config file, or a packaged config name ({', '.join(configs.NAMES)}); "
        "':arg' after it is passed to get_config", flag_values=fv, lock_config=True, sys_argv=argv)
    workdir = flags.DEFINE_string("workdir", "runs/default", "where results, plots and resume state go",
                                  flag_values=fv)
    show = flags.DEFINE_bool("print_config", False, "print the config the run would use (after --config and the "
                             "overrides, validated) and exit without running", flag_values=fv)
    try:
        fv(argv)
        c = config.value
        c = c if c is None else ConfigDict(c.to_dict(), type_safe=True)  # a file that failed to load raises here
    except JaxcritError:
        raise
    except flags.UnrecognizedFlagError as e:
        raise JaxcritError(f"{e}; the flags are --config, --config.<field>=<value>, --workdir and "
                           "--print_config") from None
    except flags.Error as e:
        raise JaxcritError(_one_line(e)) from None
    except (KeyError, AttributeError) as e:   # config_flags' unknown or misspelt --config.<field>
        from jaxcrit.run.fields import FIELDS, unknown_field
        given = [a[len("--config."):].partition("=")[0] for a in argv if a.startswith("--config.")]
        bad = next((k for k in given if k not in FIELDS), None)
        raise JaxcritError(unknown_field(bad) if bad else _one_line(e)) from None
    except OSError:
        given = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
        raise JaxcritError(f"config file '{given.split(':')[0]}' not found; give a path such as "
                           f"configs/smollm2.py or a packaged name ({', '.join(configs.NAMES)})") from None
    except Exception as e:  # anything a config file's own code raises
        raise JaxcritError(f"the config file could not be loaded: {type(e).__name__}: {_one_line(e)}") from None
    if c is None:
        raise JaxcritError(f"give --config=configs/smollm2.py (or a packaged name: {', '.join(configs.NAMES)})")
    return Args(c, Path(workdir.value), show.value)


def _packaged(arg: str) -> str:
    """--config=NAME[:arg] for a packaged config name becomes that file's path."""
    if arg.startswith("--config="):
        name, sep, rest = arg[len("--config="):].partition(":")
        if name in configs.NAMES:
            return f"--config={configs.path(name)}{sep}{rest}"
    return arg


def _one_line(e: BaseException) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def field_flags(config: dict, reference: dict) -> list[str]:
    """The --config.<field>=<value> arguments that turn the reference config into config (both as
    JSON gives them back, runner.identity), in config's order."""
    ref = _flat(reference)
    return [f"--config.{k}={_arg(v)}" for k, v in _flat(config).items() if ref.get(k) != v]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _arg(v) -> str:
    """A config value as the shell argument --config.<field>= takes."""
    if isinstance(v, list):
        return '"(' + ",".join(repr(x) for x in v) + ("," if len(v) == 1 else "") + ')"'
    return repr(v) if isinstance(v, str) and (" " in v or not v) else str(v)


def run(c: ConfigDict, workdir: Path, single_use: bool = False) -> dict:
    """The pipeline on a validated config: every stage, resumable in workdir; returns the summary.

    With several processes every one runs this; process 0 alone claims the workdir and writes.
    single_use: this process exits after the run (the command line): compiled programs need not
    outlive their stage.
    """
    import jax

    from jaxcrit.dist import compile_cache, processes
    from jaxcrit.report import io, summary
    from jaxcrit.run import validate
    from jaxcrit.run.runner import Run, prepare_workdir, run_all
    from jaxcrit.run.stages import STAGES

    # --- check the config, join the other processes, check against the model, plan the memory
    validate.fields(c)
    validate.settle(c)
    compile_cache.use(c.compile_cache)
    processes.start(c)
    validate.against_model(c)
    if c.dry_run or c.plan == "always" or (c.plan == "auto" and jax.default_backend() != "cpu"):
        from jaxcrit.run.plan import plan
        p = plan(c)
        if processes.writer():
            print("\n".join(p.lines()), file=sys.stderr if not c.dry_run else sys.stdout, flush=True)
        if c.dry_run:
            return {"plan": p}
        if not p.fits:
            raise JaxcritError(f"the run would not fit: {p.verdict()} (--config.dry_run=True prints the plan)")

    # --- claim the workdir
    refused = None
    if processes.writer():
        try:
            prepare_workdir(workdir, c, STAGES)
        except JaxcritError as e:
            refused = e
    if not processes.agree(refused is None):
        raise refused or JaxcritError("process 0 refused the workdir (its error line says why)")

    # --- mesh, model
    r = Run(c, workdir, stages=STAGES, single_use=single_use)
    cfg = r.model.cfg
    r.say(f"{r.model.source}: {cfg.model_type}, {cfg.n_layers} layers, {len(r.tokens)} tokens, {c.dtype}, "
          f"mesh {dict(r.model.mesh.shape)}")
    if processes.writer():
        io.write_json(workdir / "manifest.json", io.manifest(c.to_dict()))

    # --- the stages, then the summary
    result = run_all(r)
    if processes.writer():
        print(summary.terminal_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    from jaxcrit.dist import processes
    from jaxcrit.run.runner import few_heap_arenas
    few_heap_arenas()
    logging.set_verbosity(logging.WARNING)
    argv = list(sys.argv if argv is None else argv)
    if {"-h", "--help"} & set(argv[1:]):
        from jaxcrit.run.fields import help_text
        print(__doc__.strip() + "\n\n" + help_text())
        return 0
    try:
        c, workdir, show = parse(argv)
        if show:
            from jaxcrit.run import validate
            from jaxcrit.run.fields import config_text
            validate.fields(c)
            print(config_text(validate.settle(c)))
            return 0
        run(c, workdir, single_use=True)
    except JaxcritError as e:
        return processes.fail(f"jaxcrit: error: {e}", 2)
    except Exception as e:  # device out of memory reaches us as an XLA runtime error
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            return processes.fail("jaxcrit: error: out of device memory; lower --config.engine.chunk or "
                                  "--config.stage1.batch (--config.dry_run=True prints the memory plan)", 3)
        if processes.several():   # a collective that lost a dead peer: the watchdog names it and exits
            import traceback
            processes.wait_for_peers()
            traceback.print_exc()
            return processes.fail(f"jaxcrit: error: [process {processes.who()}] {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''}", 1)
        raise
    processes.done()
    return 0


if __name__ == "__main__":
    sys.exit(main())
