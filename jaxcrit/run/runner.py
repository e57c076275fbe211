"""The runner: one run's context, its resumable state, and the loop over the stage table.

A `Run` holds a config, an optional workdir and every stage's value, computed on first use
(`run["growth"]`). With a workdir, a stage whose result files all exist is loaded instead of
computed, a computed one is saved, and partial work inside a stage (Stage 1's running sums,
scan and Stage 2 blocks, each baseline repeat, greedy steps, map screens and rounds, evaluation
blocks) is kept under state/ so a killed run resumes where it stopped. Without a workdir (the
Python API) the same stages run in memory. The CLI and the API both go through here, each
handing the Run its stage table (jaxcrit/run/stages/).
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from ml_collections import ConfigDict

from jaxcrit.dist import processes
from jaxcrit.errors import JaxcritError
from jaxcrit.progress import Memo
from jaxcrit.report import io
from jaxcrit.report.summary import LN10

IGNORED_FOR_IDENTITY = ("overwrite", "progress", "engine.ahead")   # config fields that do not change any result
RUN_FILES = ("config.json", "manifest.json")
TEMPORARIES = (".*.tmp", ".*.tmp.npz")   # what io's writers and Store.put write before the rename onto the file


def release_memory(programs: Sequence[Callable] = ()) -> None:
    """Frees what a finished stage leaves behind, so the next stage's peak does not stack on it.

    programs: jitted functions whose compiled programs go too (on CPU they live in host memory:
    Stage 1's and the gradient baseline's are ~100 MB each for SmolLM2); the engine's programs,
    which every later stage reuses, stay. The freed heap is handed back to the OS (glibc keeps
    it otherwise).
    """
    import gc
    for f in programs:
        f.clear_cache()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to hand back this way
        pass


def few_heap_arenas(n: int = 2) -> None:
    """Caps glibc's heap arenas (M_ARENA_MAX) before XLA starts its thread pools: with one arena
    per thread, freed memory stays spread over them (the default run's peak RSS, measured with
    /usr/bin/time: 1.52 GB without the cap, 1.40 GB with 2). Call it before jax's first use."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, n)   # -8: M_ARENA_MAX
    except (OSError, AttributeError):   # not glibc
        pass


@dataclasses.dataclass(frozen=True)
class Stage:
    """One row of a stage table: what the runner needs to compute, save, load or skip a stage."""
    name: str
    files: tuple[str, ...]                      # result files it writes in the workdir
    compute: Callable[["Run"], Any]
    save: Callable[["Run", Any], None]
    load: Callable[["Run"], Any]
    enabled: Callable[[ConfigDict], bool] = lambda c: True
    cached: bool = True                         # False: recomputed on every run (the report)
    programs: tuple[Callable, ...] = ()         # jitted functions only this stage uses: the CLI drops them after it


class Store:
    """Partial results of stages as .npz files under `root` (in memory when root is None)."""

    def __init__(self, root: Path | None):
        self.root, self.mem = root, {}

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str, keys: Sequence[str] = ()) -> dict[str, np.ndarray] | None:
        """The kept arrays, on every process when process 0 has them (processes.py). A file that
        np.load cannot read whole, or that lacks one of `keys`, is not kept work (a machine that
        lost power before it reached the disk, a disk that filled up, a copy cut short): it is
        removed and None returned, so the unit is redone."""
        if self.root is None:
            return self.mem.get(key)
        p = self._path(key)
        if not processes.agree(p.exists()):
            return None
        got = _read(p, keys)
        if not processes.agree(got is not None):
            if processes.writer():
                p.unlink(missing_ok=True)
            return None
        return got

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            self.mem[key] = arrays
            return
        if not processes.writer():
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp.npz")   # np.savez adds .npz to a name without it
        np.savez(tmp, **arrays)
        tmp.replace(p)

    def memo(self, prefix: str) -> Memo:
        """memo(key, compute): the array kept under prefix/key, or compute() kept there."""
        def memo(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
            got = self.get(f"{prefix}/{key}", ("value",))
            if got is None:
                got = {"value": np.asarray(compute())}
                self.put(f"{prefix}/{key}", got)
            return got["value"]
        return memo


def _read(p: Path, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Every array of the .npz file p, or None when it is not whole or lacks one of keys."""
    try:
        with np.load(p) as z:
            got = {k: z[k] for k in z.files}
    except Exception:   # a damaged file raises zipfile's, numpy's or the OS's errors, whichever part it hits
        return None
    return got if set(keys) <= got.keys() else None


class Run:
    """One run: config, workdir (None: in memory), the stage table, the model and engine (built on
    first use), and every stage's value. `values` may be seeded with inputs a caller already has."""

    def __init__(self, config: ConfigDict, workdir: Path | None = None, *, stages: Mapping[str, Stage],
                 model=None, values: dict[str, Any] | None = None, single_use: bool = False):
        self.c = config
        self.stages = stages
        self.single_use = single_use   # the process runs this pipeline and exits (the CLI)
        self.workdir = Path(workdir) if workdir is not None else None
        self.values: dict[str, Any] = dict(values or {})
        self.store = Store(self.workdir / "state" if self.workdir else None)
        self.timings: dict[str, float] = {}
        self._ahead = None   # the engine being built by build_ahead's thread (a Future)
        if model is not None:
            self.model = model
        else:
            from jaxcrit.run.validate import settle
            settle(config)

    def say(self, msg: str) -> None:
        import jax
        who = f" {jax.process_index()}/{jax.process_count()}" if jax.process_count() > 1 else ""
        print(f"[jaxcrit{who}] {msg}", file=sys.stderr, flush=True)

    @functools.cached_property
    def model(self):
        from jaxcrit.convert.load import load
        from jaxcrit.dist.sharding import make_mesh, rules
        t = time.perf_counter()
        m = load(self.c.model, self.c.dtype, make_mesh(tuple(self.c.mesh.shape)), rules(self.c.mesh.params))
        release_memory()
        self._record("load", time.perf_counter() - t)
        return m

    @functools.cached_property
    def tokens(self) -> np.ndarray:
        """[T] the config text's token ids (at least 10)."""
        return self.model.tokens(self.c.text, self.c.max_tokens, min_tokens=10)

    def title(self, what: str) -> str:
        """A plot's title: the model's name and what the plot shows."""
        return f"{Path(str(self.c.model)).name}: {what}"

    def engine_options(self) -> dict:
        """Engine's keyword arguments as the config's engine section sets them."""
        from jaxcrit.run.engines import engine_options
        return engine_options(self.model, self.c.engine)

    @functools.cached_property
    def engine(self):
        """The engine scoring ablations on the config text (built by `build_ahead`'s thread when
        one was started)."""
        eng = self._ahead.result() if self._ahead else self._build_engine(compile_entries=0)
        self.say(f"base loss {eng.base_loss:.4f} nats/token (log10 PPL {eng.base_loss / LN10:.3f})")
        return eng

    def _build_engine(self, compile_entries: int):
        """The engine and its base loss; compile_entries > 0 also compiles Stage 2's chunk program
        (rows of that many entries, masks for every site: stage2.grow's)."""
        from jaxcrit.models.sites import SITE_NAMES
        from jaxcrit.run.engines import build_engine
        eng = build_engine(self.model, [self.tokens], self.c.engine, progress=self.c.progress)
        eng.base_loss
        if compile_entries:
            eng.compile(compile_entries, SITE_NAMES)
        return eng

    def ahead(self) -> bool:
        """Whether `build_ahead` applies (engine.ahead): auto builds ahead on GPUs and TPUs with one
        process and a given chunk. Several processes never do (collectives issued from two threads
        may reach the processes in different orders); a chunk planned from free memory (0) is
        planned after Stage 1, which holds memory while it runs."""
        import jax
        mode = self.c.engine.ahead
        return mode == "always" or (mode == "auto" and jax.default_backend() != "cpu"
                                    and jax.process_count() == 1 and self.c.engine.chunk > 0)

    def build_ahead(self) -> None:
        """Builds the engine and compiles Stage 2's chunk program in a thread while Stage 1 runs:
        on a GPU each compiles for seconds (the 32B shape: ~7 s each), XLA compiles without
        holding the GIL, and neither needs Stage 1's result. The model is loaded first, here."""
        from concurrent.futures import ThreadPoolExecutor
        self.model, self.tokens   # loaded by this thread, not by both
        k = min(self.c.stage2.max_steps, self.c.stage1.top_n)
        pool = ThreadPoolExecutor(1, thread_name_prefix="jaxcrit-engine")
        self._ahead = pool.submit(self._build_engine, k)
        pool.shutdown(wait=False)

    def computes(self, name: str) -> bool:
        """Whether an enabled stage is computed rather than loaded from its result files."""
        st = self.stages[name]
        return not processes.agree(bool(self.workdir) and st.cached and all((self.workdir / f).exists() for f in st.files))

    def __getitem__(self, name: str) -> Any:
        """A stage's value: seeded, loaded from its files, or computed (and saved)."""
        if name in self.values:
            return self.values[name]
        st = self.stages[name]
        if not st.enabled(self.c):
            self.values[name] = None
            return None
        if not self.computes(name):
            self.values[name] = st.load(self)
            return self.values[name]
        t = time.perf_counter()
        from jaxcrit.dist.sharding import placed
        with placed(self.model.mesh, self.model.params):   # FSDP's per-layer gathers (sharding.gathered) need it
            value = st.compute(self)
        if self.workdir and processes.writer():
            st.save(self, value)
        release_memory(st.programs if self.single_use else ())
        self._record(name, time.perf_counter() - t)
        self.values[name] = value
        return value

    def _record(self, step: str, seconds: float) -> None:
        """Wall time of a step that ran; kept in state/timings.json, so a stage loaded from its
        files on a resumed run keeps the time it took when it ran."""
        if self.workdir is not None and (self.workdir / "state" / "timings.json").exists():
            self.timings = {**io.read_json(self.workdir / "state" / "timings.json"), **self.timings}
        self.timings[step] = seconds
        if self.workdir is not None and processes.writer():
            io.write_json(self.workdir / "state" / "timings.json", self.timings)


def result_files(stages: Mapping[str, Stage], c: ConfigDict | None = None) -> tuple[str, ...]:
    """Every file a run may write in its workdir (with a config: a run of that config writes):
    the stage table's files and the run's own."""
    return tuple(f for st in stages.values() if c is None or st.enabled(c) for f in st.files) + RUN_FILES


def prepare_workdir(workdir: Path, c: ConfigDict, stages: Mapping[str, Stage]) -> None:
    """Creates the workdir; refuses one holding another config's results unless overwrite, which
    removes every result file of the stage table and the resume state. Temporary files a killed
    run left (TEMPORARIES) are removed: nothing reads them."""
    mine = identity(c)
    saved = workdir / "config.json"
    other = saved.is_file() and _plain(io.read_json(saved)) != mine
    if other and not c.overwrite:
        raise JaxcritError(f"workdir {workdir} holds results of a different config; use another --workdir "
                           "or pass --config.overwrite=True to replace them")
    try:
        (workdir / "state").mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise JaxcritError(f"workdir {workdir} is not writable ({e.strerror}); choose another --workdir") from None
    for pattern in TEMPORARIES:
        for leftover in [*workdir.glob(pattern), *(workdir / "state").rglob(pattern)]:
            leftover.unlink()
    if other:
        for name in result_files(stages):
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / "state", ignore_errors=True)
        (workdir / "state").mkdir()
    io.write_json(saved, mine)


def identity(c: ConfigDict) -> dict:
    """The config as JSON gives it back, less the fields that change no result."""
    d = c.to_dict()
    for key in IGNORED_FOR_IDENTITY:
        *path, last = key.split(".")
        section = d
        for k in path:
            section = section.get(k, {})
        section.pop(last, None)
    return _plain(d)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def run_all(run: Run) -> dict:
    """Every enabled stage in table order; returns the report stage's summary."""
    if run.ahead() and run.computes("importance") and run.stages["growth"].enabled(run.c):
        run.build_ahead()
    for name in run.stages:
        run[name]
    return run["report"]
