"""The command line: the paper's experiment end to end, resumable from its workdir.

    python -m jaxcrit.main --config=configs/smollm2.py --workdir=runs/smollm2 [--config.stage2.epsilon=3]

Steps: config -> mesh -> model -> Stage 1 (importance.json) -> Stage 2 (curve.csv, critical.json)
-> baselines -> scan (scan.csv, greedy) -> evaluation -> plots and summary.md. Every result file
is written atomically; a killed run started again with the same workdir picks up where it stopped.
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from jaxcrit.errors import JaxcritError

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "where results, plots and resume state go")

RESULT_FILES = ("importance.json", "critical.json", "curve.csv", "scan.csv", "baselines.json",
                "evaluation.json", "summary.md", "curve.png", "heatmap.png", "scan.png", "manifest.json")
IGNORED_FOR_IDENTITY = ("overwrite", "progress")


def validate(c: ConfigDict) -> None:
    """Refuses values the pipeline cannot run with, one line each, before any work."""
    from jaxcrit.api import DTYPES
    from jaxcrit.critical.baselines import BASELINES
    from jaxcrit.models.sites import site
    checks = [
        (c.stage2.epsilon > 0, f"stage2.epsilon must be > 0 (got {c.stage2.epsilon})"),
        (c.stage1.samples >= 1, f"stage1.samples (K) must be >= 1 (got {c.stage1.samples})"),
        (c.stage1.batch >= 1, f"stage1.batch must be >= 1 (got {c.stage1.batch})"),
        (c.stage1.alpha >= 0, f"stage1.alpha must be >= 0 (got {c.stage1.alpha})"),
        (c.stage1.top_n >= 1, f"stage1.top_n must be >= 1 (got {c.stage1.top_n})"),
        (c.stage1.ranking in ("channel", "position"), f"stage1.ranking must be channel or position (got '{c.stage1.ranking}')"),
        (c.stage2.max_steps >= 1, f"stage2.max_steps must be >= 1 (got {c.stage2.max_steps})"),
        (c.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)} (got '{c.dtype}')"),
        (c.engine.chunk >= 0, f"engine.chunk must be >= 0 (0: planned from memory; got {c.engine.chunk})"),
        (c.engine.attention in ("auto", "xla", "cudnn"), f"engine.attention must be auto, xla or cudnn (got '{c.engine.attention}')"),
        (c.engine.loss in ("auto", "xla", "pallas"), f"engine.loss must be auto, xla or pallas (got '{c.engine.loss}')"),
        (c.max_tokens >= 10, f"max_tokens must be >= 10 (got {c.max_tokens})"),
        (all(b in BASELINES for b in c.baselines.names), f"baselines.names: each one of {', '.join(BASELINES)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise JaxcritError(msg)
    for s in c.scan.sites:
        site(s)


def prepare_workdir(workdir: Path, c: ConfigDict) -> None:
    """Creates the workdir; refuses one holding another config's results unless overwrite."""
    from jaxcrit.report.io import read_json, write_json
    try:
        (workdir / "state").mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise JaxcritError(f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir") from None
    mine = {k: v for k, v in c.to_dict().items() if k not in IGNORED_FOR_IDENTITY}
    mine = _plain(mine)
    saved = workdir / "config.json"
    if saved.exists() and _plain(read_json(saved)) != mine:
        if not c.overwrite:
            raise JaxcritError(f"workdir {workdir} holds results of a different config; use another --workdir "
                               "or pass --config.overwrite=True to replace them")
        for name in RESULT_FILES + ("config.json",):
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / "state", ignore_errors=True)
        (workdir / "state").mkdir()
    write_json(saved, mine)


def _plain(x):
    """Config values as JSON would give them back (tuples -> lists), for comparison."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def run(c: ConfigDict, workdir: Path) -> dict:
    """The pipeline. Returns the summary result dict (also written to summary.md)."""
    import jax

    from jaxcrit import api
    from jaxcrit import engine as E
    from jaxcrit.critical import baselines as B
    from jaxcrit.critical import scan as S
    from jaxcrit.critical import stage1, stage2
    from jaxcrit.critical.evaluate import evaluate
    from jaxcrit.data.texts import read_paragraphs
    from jaxcrit.report import io, plots, summary
    from jaxcrit.sharding import make_mesh

    validate(c)
    prepare_workdir(workdir, c)
    state = workdir / "state"
    tpath = state / "timings.json"
    timings: dict[str, float] = io.read_json(tpath) if tpath.exists() else {}

    def took(stage: str, t0: float, ran: bool) -> None:
        """Records a stage's wall time when it ran (a resumed stage keeps its first time)."""
        if ran or stage not in timings:
            timings[stage] = time.perf_counter() - t0
            io.write_json(tpath, timings)
    say = lambda m: print(f"[jaxcrit] {m}", file=sys.stderr, flush=True)

    # --- mesh and model
    t = time.perf_counter()
    if c.mesh.distributed:
        jax.distributed.initialize()
    if jax.process_count() > 1:
        say(f"process {jax.process_index()} of {jax.process_count()}")
    mesh = make_mesh(tuple(c.mesh.shape))
    model = api.load(c.model, c.dtype, mesh)
    cfg = model.cfg
    tok = model.tokens(c.text, c.max_tokens, min_tokens=10)
    took("load", t, True)
    say(f"{model.source}: {cfg.model_type}, {cfg.n_layers} layers, {len(tok)} tokens, {c.dtype}, mesh {dict(mesh.shape)}")
    io.write_json(workdir / "manifest.json", io.manifest(c.to_dict()))
    ekw = dict(chunk=c.engine.chunk, vocab_chunk=c.engine.vocab_chunk, prefix_sharing=c.engine.prefix_sharing,
               attention=c.engine.attention, loss=c.engine.loss)
    eng = E.Engine(cfg, model.params, E.Texts.from_ids([tok.tolist()]), mesh=mesh, progress=c.progress, **ekw)
    say(f"base loss {eng.base_loss:.4f} nats/token (log10 PPL {eng.base_loss / E.LN10:.3f})")

    # --- Stage 1: importance, checkpointed after every batch of noisy passes
    t = time.perf_counter()
    imp_path = workdir / "importance.json"
    ran = not imp_path.exists()
    if not ran:
        records = io.read_json(imp_path)["neurons"]
        ranking = stage1.Ranking(*(np.array([r[k] for r in records]) for k in
                                   ("site", "layer", "seq_idx", "hidden_idx", "activation_diff")))
        say(f"stage 1: resumed {len(ranking)} ranked entries from {imp_path.name}")
    else:
        ck = state / "stage1.npz"
        resume = None
        if ck.exists():
            z = np.load(ck)
            resume = stage1.Importance({k: z[k] for k in z.files if k != "_k"}, int(z["_k"]))
            say(f"stage 1: resuming after {resume.k} of {c.stage1.samples} noisy passes")
        imp = stage1.importance(cfg, model.params, tok, alpha=c.stage1.alpha, samples=c.stage1.samples,
                                seed=c.seed, chunk=c.stage1.batch, state=resume, progress=c.progress,
                                on_chunk=lambda s: _save_npz(ck, {**s.sums, "_k": np.asarray(s.k)}))
        ranking = stage1.rank(imp.scores(), c.stage1.top_n, c.stage1.threshold, c.stage1.ranking == "position")
        if not len(ranking):
            raise JaxcritError(f"stage 1 ranked no neuron: no importance score is above stage1.threshold "
                               f"({c.stage1.threshold}); lower stage1.threshold or raise stage1.alpha")
        io.write_json(imp_path, {"ranking": c.stage1.ranking, "alpha": c.stage1.alpha, "samples": c.stage1.samples,
                                 "tokens": int(len(tok)), "neurons": ranking.records()})
    took("stage1", t, ran)

    # --- Stage 2: prefixes of the ranking
    t = time.perf_counter()
    crit_path = workdir / "critical.json"
    ran = not crit_path.exists()
    if not ran:
        crit = io.read_json(crit_path)
        curve = [{"n": int(r["n"]), "delta": float(r["delta"])} for r in _read_csv(workdir / "curve.csv")]
    else:
        g = stage2.grow(eng, ranking, epsilon=c.stage2.epsilon, max_steps=c.stage2.max_steps,
                        full_curve=c.stage2.full_curve)
        curve = g.curve()
        n = g.critical_n
        last = n if n is not None else int(g.ns[-1])
        top = ranking.records()[:last]
        crit = {"n": n, "epsilon": c.stage2.epsilon, "delta": float(g.deltas[list(g.ns).index(last)]),
                "base_loss": eng.base_loss,
                "loss": eng.base_loss + float(g.deltas[list(g.ns).index(last)]) * E.LN10,
                "neurons": [{"layer_name": r["layer_name"], "site": r["site"], "layer": r["layer"],
                             "channel": r["hidden_idx"], "seq_idx": r["seq_idx"], "score": r["activation_diff"]}
                            for r in top]}
        io.write_csv(workdir / "curve.csv", [{"n": r["n"], "delta": r["delta"]} for r in curve], ["n", "delta"])
        io.write_json(crit_path, crit)
    took("stage2", t, ran)
    say(f"stage 2: critical n = {crit['n']} (delta {crit['delta']:.3f} at epsilon {c.stage2.epsilon})")

    # --- baselines, grown at fixed set sizes
    t = time.perf_counter()
    base_path = workdir / "baselines.json"
    ran = not base_path.exists()
    if not ran:
        base = io.read_json(base_path)
    else:
        base = {}
        for name in c.baselines.names:
            repeats = c.baselines.random_repeats if name == "random" else 1
            curves = []
            for r in range(repeats):
                rk = B.ranking(name, cfg, model.params, tok, max(c.baselines.ns), c.seed + r)
                g = stage2.grow(eng, rk, epsilon=c.stage2.epsilon, max_steps=max(c.baselines.ns),
                                full_curve=True, ns=np.asarray(c.baselines.ns), desc=f"baseline {name}")
                curves.append(g.curve())
            base[name] = curves
        io.write_json(base_path, base)
    took("baselines", t, ran)

    # --- scan: exhaustive single neurons, then greedy on measured deltas
    t = time.perf_counter()
    scan_top, greedy_path = None, []
    scan_rows: list[dict] = []
    ran = not (workdir / "scan.csv").exists()
    if c.scan.sites:
        layers = list(c.scan.layers) or list(dict.fromkeys(int(x["layer"]) for x in crit["neurons"]))
        if not c.scan.layers and c.scan.max_layers:
            layers = layers[:c.scan.max_layers]
        abl = S.scan_rows(cfg, c.scan.sites, layers)
        ck = state / "scan.npz"
        done = np.load(ck)["deltas"] if ck.exists() else None
        deltas = S.scan(eng, abl, block=eng.chunk * 8, done=done,
                        on_block=lambda d: _save_npz(ck, {"deltas": d}))
        scan_rows = S.scan_records(abl, deltas)
        io.write_csv(workdir / "scan.csv", scan_rows, ["site", "layer", "channel", "delta"])
        if c.scan.greedy_steps:
            gpath = workdir / "greedy.json"
            if gpath.exists():
                greedy_path = io.read_json(gpath)
            else:
                greedy_path = S.greedy(eng, S.top_pool(abl, deltas, c.scan.greedy_pool),
                                       steps=c.scan.greedy_steps, epsilon=c.stage2.epsilon)
                io.write_json(gpath, greedy_path)
        scan_top = sorted(scan_rows, key=lambda r: -r["delta"])[:5]
    took("scan", t, ran)

    # --- evaluation of the found set
    t = time.perf_counter()
    texts = read_paragraphs(c.evaluate.file, limit=c.evaluate.limit) if c.evaluate.file else [c.text]
    neurons = crit["neurons"]
    abl = E.make(np.array([x["site"] for x in neurons])[None], np.array([x["layer"] for x in neurons])[None],
                 np.array([x["channel"] for x in neurons])[None], cfg=cfg)
    ev = evaluate(cfg, model.params, [model.tokens(x, c.max_tokens) for x in texts], texts, abl, **ekw)
    io.write_json(workdir / "evaluation.json", ev)
    took("evaluate", t, True)

    # --- plots and summary
    name = Path(str(c.model)).name
    io.write_png(workdir / "curve.png", plots.phase_curve(curve, c.stage2.epsilon, base,
                                                          f"{name}: phase transition", crit["n"]), close=True)
    io.write_png(workdir / "heatmap.png", plots.site_heatmap(ranking.records()[:100], cfg.n_layers,
                                                             list(_site_names()), f"{name}: top-100 neurons"), close=True)
    if scan_rows:
        io.write_png(workdir / "scan.png", plots.scan_distribution(scan_rows, cfg.n_layers, f"{name}: single-neuron scan"),
                     close=True)
    result = {
        "model": str(c.model), "text_tokens": int(len(tok)), "base_loss": eng.base_loss, "epsilon": c.stage2.epsilon,
        "critical": {"n": crit["n"], "delta": crit["delta"], "loss": crit["loss"], "neurons": neurons},
        "baselines": {k: {"n_max": int(v[0][-1]["n"]), "delta_at_n_max": float(np.mean([x[-1]["delta"] for x in v]))}
                      for k, v in base.items() if v and v[0]},
        "evaluation": ev["texts"][:20],
        "timings": timings,
    }
    if scan_top is not None:
        result["scan"] = {"rows": len(scan_rows), "top": scan_top}
    if greedy_path:
        result["greedy"] = greedy_path
    io.write_text(workdir / "summary.md", summary.summary_markdown(result))
    print(summary.terminal_table(result))
    return result


def _site_names():
    from jaxcrit.models.sites import SITE_NAMES
    return SITE_NAMES


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _read_csv(path: Path) -> list[dict]:
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    if c is None:
        raise app.UsageError("give --config=configs/<name>.py")
    try:
        run(c, Path(_WORKDIR.value))
    except JaxcritError as e:
        print(f"jaxcrit: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # device out of memory reaches us as an XLA runtime error
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            print("jaxcrit: error: out of device memory; lower --config.engine.chunk or --config.stage1.batch",
                  file=sys.stderr)
            sys.exit(3)
        raise


if __name__ == "__main__":
    app.run(main)
