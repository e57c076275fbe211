"""Resume under real faults: the CLI killed with SIGKILL inside each resumable stage, and workdirs
holding leftover temporaries and damaged state files.

One chain of CLI processes on a tiny llama (jaxcrit.main.main, each in a process forked from a
driver that imported jaxcrit once): each resumes the previous one's workdir and is killed with
SIGKILL inside the next resumable stage, either halfway through writing a unit of partial work
(its temporary file) or right after the stage kept its first unit. A last process finishes the
run; its result files must be byte-identical to those of an uninterrupted run. After every kill:
the kill fell inside the stage (its state files exist, its result files do not), every state
file that exists is whole, and the process that resumes it computes exactly the units that were
not kept. A copy of the finished workdir with planted faults (a truncated state file, an empty
one, one lacking its arrays, temporaries holding wrong values) must redo the damaged units and
read no temporary.

The processes share a JAX compilation cache, so each program is compiled once for the whole file.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.run.stages import STAGES
from tiny_run import COMPARED, build_model, config_file, files, paragraphs

# the resumable stages' state prefixes (state/<prefix>.npz or state/<prefix>/*.npz), in table order,
# and where each is killed: "write" halfway through writing its second unit, "kept" right after its first
KILLS = {"stage1": "write", "growth": "kept", "baselines": "write", "scan": "kept", "greedy": "write",
         "map": "kept", "evaluation": "write"}
STAGE = {"stage1": "importance"}   # a prefix's stage, where the names differ
WRITTEN = tuple(f for f in COMPARED if f != "generations.json")   # the generations stage is off (not resumable)

# Every stage has two or more units: 2 Stage 1 batches, 2 Stage 2 blocks (full curve of 8, chunk 4),
# 3 baseline batches (3 random repeats of 3 rows), 2 scan blocks (64 rows of 32), 2 greedy steps, the
# map's screen, rounds and audit, 3 evaluation blocks. One engine program serves every stage (all sites).
FIELDS = dict(stage1__batch=2, stage1__top_n=50, stage2__full_curve=True, stage2__max_steps=8,
              baselines__names=("random",), baselines__ns=(1, 2, 5), baselines__random_repeats=3,
              scan__layers=(1,), scan__greedy_steps=2, scan__greedy_pool=3, map__screens=("importance",),
              map__top_k=3, map__block=8, map__audit=16, engine__chunk=4, engine__sites=SITE_NAMES,
              evaluate__batch=2, generate__enabled=False)

# A process that imports jaxcrit once and forks a child for each run (the imports are most of a small
# run's CPU; jax starts no thread of XLA's before its first computation, in the child). Each line on
# its stdin, [prefix, at, log, output, argv], is a run of the CLI, jaxcrit.main.main(argv), with its
# output in `output`, every Store.put logged to `log` (one key a line, before it writes) and, for a
# state prefix, SIGKILL halfway through writing the prefix's second unit ("write") or right after its
# first unit is kept ("kept"). It answers each line with the child's exit code (-9: killed).
DRIVER = r"""
import io, json, os, signal, sys, traceback
import flax, numpy as np
from jaxcrit import main
from jaxcrit.run import runner as pipeline, stages, validate   # with flax, hf, tokenize: what every run imports
from jaxcrit.convert import hf
from jaxcrit.convert import tokenizer as tokenize

put, savez = pipeline.Store.put, np.savez


def cli(prefix, at, log, argv):
    mine = []

    def half_then_die(file, **arrays):
        buf = io.BytesIO()
        savez(buf, **arrays)
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else file as f:
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def logged_put(self, key, arrays):
        with open(log, "a") as f:
            f.write(key + "\n")
        mine.append(key.split("/")[0] == prefix)
        np.savez = half_then_die if mine[-1] and at == "write" and sum(mine) == 2 else savez
        put(self, key, arrays)
        if mine[-1] and at == "kept":
            os.kill(os.getpid(), signal.SIGKILL)

    pipeline.Store.put = logged_put
    return main.main(["jaxcrit", *argv])


for line in sys.stdin:
    prefix, at, log, output, argv = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(out, 1)
        os.dup2(out, 2)
        try:
            code = cli(prefix, at, log, argv)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@dataclasses.dataclass
class Runs:
    """The tiny run's config file, the driver process, and an uninterrupted run (workdir, puts)."""
    config: Path
    driver: subprocess.Popen
    reference: Path = Path()
    reference_puts: list[str] = dataclasses.field(default_factory=list)

    def __call__(self, wd: Path, log: Path, prefix: str = "", at: str = "") -> tuple[int, str]:
        """The CLI on workdir wd (killed inside prefix's stage, as `at` says): exit code, output."""
        out = log.with_suffix(".out")
        argv = [f"--config={self.config}", f"--workdir={wd}"]
        self.driver.stdin.write(json.dumps([prefix, at, str(log), str(out), argv]) + "\n")
        self.driver.stdin.flush()
        code = self.driver.stdout.readline()
        assert code, "the driver process died"
        return int(code), out.read_text()[-3000:]


def _puts(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _arrays(p: Path) -> dict[str, tuple] | None:
    """The shapes of an .npz file's arrays, read whole by numpy; None when it cannot be."""
    try:
        with np.load(p) as z:
            return {k: z[k].shape for k in z.files}
    except Exception:
        return None


def _state(wd: Path) -> dict[str, dict | None]:
    """Every state file (not a temporary) by key, e.g. growth/block-0, with its arrays' shapes."""
    root = wd / "state"
    return {p.relative_to(root).with_suffix("").as_posix(): _arrays(p)
            for p in root.rglob("*.npz") if not p.name.startswith(".")}


def _temporaries(wd: Path) -> list[str]:
    return sorted(p.relative_to(wd).as_posix() for p in wd.rglob(".*") if ".tmp" in p.name)


def _key_of_temporary(path: str) -> str:
    """state/growth/.block-4.npz.tmp.npz -> growth/block-4 (Store.put's temporary of that key)."""
    *folders, name = Path(path).relative_to("state").parts
    return "/".join([*folders, name.removeprefix(".").removesuffix(".npz.tmp.npz")])


def _prefix(key: str) -> str:
    return key.split("/")[0]


def _files_of(prefix: str) -> tuple[str, ...]:
    return STAGES[STAGE.get(prefix, prefix)].files


def _files_before(prefix: str) -> tuple[str, ...]:
    names = list(STAGES)
    return tuple(f for name in names[:names.index(STAGE.get(prefix, prefix))] for f in STAGES[name].files)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The driver, sharing one JAX compilation cache among its runs, and the uninterrupted run."""
    d = tmp_path_factory.mktemp("faults")
    model = build_model(d / "model")
    cfg = config_file(d / "cfg.py", model, evaluate__file=str(paragraphs(d / "paragraphs.txt")), **FIELDS)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(d / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    runs = Runs(cfg, driver, d / "reference")
    code, out = runs(runs.reference, d / "reference-puts.txt")
    assert code == 0, out
    runs.reference_puts = _puts(d / "reference-puts.txt")
    yield runs
    driver.stdin.close()
    driver.wait(timeout=60)


@pytest.fixture(scope="module")
def chain(runs, tmp_path_factory):
    """One workdir, killed inside each resumable stage in turn, then finished: per prefix what the
    kill left (result files, state files, temporaries) and the keys the process resuming it put."""
    d = tmp_path_factory.mktemp("chain")
    wd, left = d / "run", {}
    for i, (prefix, at) in enumerate([*KILLS.items(), ("", "")]):
        log = d / f"puts-{i}.txt"
        code, out = runs(wd, log, prefix, at)
        if i:
            left[list(KILLS)[i - 1]]["resumed"] = _puts(log)
        if not prefix:
            assert code == 0, out
            break
        assert code == -signal.SIGKILL, f"not killed inside {prefix}: {out}"
        left[prefix] = {"results": {f for f in (*_files_before(prefix), *_files_of(prefix)) if (wd / f).exists()},
                        "state": _state(wd), "temporaries": {t: _arrays(wd / t) for t in _temporaries(wd)}}
    return wd, left


@pytest.mark.parametrize("prefix", list(KILLS))
def test_sigkill_falls_inside_the_stage_and_leaves_only_whole_state(chain, runs, prefix):
    """The stage's result files do not exist, every earlier stage's do; the stage kept one unit;
    every state file is whole (killed halfway through a write, only its temporary is partial)."""
    _, left = chain
    got = left[prefix]
    assert got["results"] == set(_files_before(prefix))
    mine = [k for k in got["state"] if _prefix(k) == prefix]
    assert len(mine) == 1, mine
    assert all(shapes for shapes in got["state"].values()), got["state"]
    if KILLS[prefix] == "write":   # beside them, the stage's second unit half-written in its temporary
        second = [k for k in runs.reference_puts if _prefix(k) == prefix][1]
        assert [_key_of_temporary(t) for t in got["temporaries"]] == [second]
        assert list(got["temporaries"].values()) == [None]   # cut short: numpy cannot read it
    else:
        assert got["temporaries"] == {}


@pytest.mark.parametrize("prefix", list(KILLS))
def test_resumed_run_computes_exactly_the_units_not_kept(chain, runs, prefix):
    """The process resuming a kill puts each of the stage's units the kill did not keep once (Stage 1:
    the batches after the kept sums), none it kept, and nothing of an earlier stage."""
    _, left = chain
    got = left[prefix]
    resumed = got["resumed"]
    nxt = list(KILLS)[list(KILLS).index(prefix) + 1:][:1]
    assert {_prefix(k) for k in resumed} <= {prefix, *nxt}, resumed
    kept = collections.Counter(k for k in got["state"] if _prefix(k) == prefix)
    expected = collections.Counter(k for k in runs.reference_puts if _prefix(k) == prefix) - kept
    assert collections.Counter(k for k in resumed if _prefix(k) == prefix) == expected


def test_resumed_chain_gives_the_uninterrupted_runs_files(chain, runs):
    wd, ref = chain[0], runs.reference
    assert set(files(ref, WRITTEN)) == set(WRITTEN)   # every resumable stage ran
    assert files(wd, WRITTEN) == files(runs.reference, WRITTEN)
    assert _temporaries(wd) == [] and all(_state(wd).values())


def test_planted_temporaries_and_damaged_state_are_redone_never_read(chain, runs, tmp_path):
    """A finished workdir less Stage 1's and the evaluation's results, with Stage 1's sums lacking
    their count, one evaluation block truncated and one empty, and temporaries beside them holding
    whole files of wrong values (and io's temporaries of result files): the damaged units are
    redone, the whole one is not, no temporary is read or left, the files equal the reference's."""
    wd = tmp_path / "run"
    shutil.copytree(chain[0], wd)
    for f in (*STAGES["importance"].files, *STAGES["evaluation"].files):
        (wd / f).unlink()
    state = wd / "state"
    with np.load(state / "stage1.npz") as z:
        sums = {k: z[k] for k in z.files}
    np.savez(state / "stage1.npz", **{k: v for k, v in sums.items() if k != "_k"})
    np.savez(state / ".stage1.npz.tmp.npz", **{k: v + 1 for k, v in sums.items()})
    blocks = sorted((state / "evaluation").glob("*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    assert len(blocks) == 3
    first, whole, last = blocks
    first.write_bytes(first.read_bytes()[:len(first.read_bytes()) // 2])
    last.write_bytes(b"")
    with np.load(whole) as z:
        wrong = np.zeros_like(z["value"])
    for p in blocks:
        np.savez(p.with_name(f".{p.name}.tmp.npz"), value=wrong)
    (wd / ".evaluation.json.x1y2z3.tmp").write_text("{}")
    (state / ".timings.json.a1b2c3.tmp").write_text("{")
    log = tmp_path / "puts.txt"
    code, out = runs(wd, log)
    assert code == 0, out
    redone = [f"evaluation/{first.stem}", f"evaluation/{last.stem}"]
    assert collections.Counter(_puts(log)) == collections.Counter(["stage1", "stage1", *redone])
    assert _temporaries(wd) == [] and all(_state(wd).values())
    assert files(wd, WRITTEN) == files(runs.reference, WRITTEN)
