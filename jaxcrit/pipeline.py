"""The runner: one run's context, its resumable state, and the loop over the stage table.

A `Run` holds a config, an optional workdir and every stage's value, computed on first use
(`run["growth"]`). With a workdir, a stage whose result files all exist is loaded instead of
computed, a computed one is saved, and partial work inside a stage (Stage 1's running sums,
scan and Stage 2 blocks, each baseline repeat, greedy steps, map screens and rounds, evaluation
blocks) is kept under state/ so a killed run resumes where it stopped. Without a workdir (the
Python API) the same stages run in memory. The CLI and the API both go through here;
jaxcrit/stages.py is the table.
"""
from __future__ import annotations

import ctypes
import functools
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ml_collections import ConfigDict

from jaxcrit import processes
from jaxcrit.errors import JaxcritError
from jaxcrit.report import io

IGNORED_FOR_IDENTITY = ("overwrite", "progress")   # config fields that do not change any result
RUN_FILES = ("config.json", "manifest.json")


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


class Store:
    """Partial results of stages as .npz files under `root` (in memory when root is None)."""

    def __init__(self, root: Path | None):
        self.root, self.mem = root, {}

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        """The kept arrays, on every process when process 0 has them (processes.py)."""
        if self.root is None:
            return self.mem.get(key)
        p = self._path(key)
        if not processes.agree(p.exists()):
            return None
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    def put(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        if self.root is None:
            self.mem[key] = arrays
            return
        if not processes.writer():
            return
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(p)

    def memo(self, prefix: str) -> Callable[[str, Callable[[], np.ndarray]], np.ndarray]:
        """memo(key, compute): the array kept under prefix/key, or compute() kept there."""
        def memo(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
            got = self.get(f"{prefix}/{key}")
            if got is None:
                got = {"value": np.asarray(compute())}
                self.put(f"{prefix}/{key}", got)
            return got["value"]
        return memo


class Run:
    """One run: config, workdir (None: in memory), the model and engine (built on first use), and
    every stage's value. `values` may be seeded with inputs a caller already has."""

    def __init__(self, config: ConfigDict, workdir: Path | None = None, model=None,
                 values: dict[str, Any] | None = None, single_use: bool = False):
        self.c = config
        self.single_use = single_use   # the process runs this pipeline and exits (the CLI)
        self.workdir = Path(workdir) if workdir is not None else None
        self.values: dict[str, Any] = dict(values or {})
        self.store = Store(self.workdir / "state" if self.workdir else None)
        self.timings: dict[str, float] = {}
        if model is not None:
            self.model = model

    def say(self, msg: str) -> None:
        import jax
        who = f" {jax.process_index()}/{jax.process_count()}" if jax.process_count() > 1 else ""
        print(f"[jaxcrit{who}] {msg}", file=sys.stderr, flush=True)

    @functools.cached_property
    def model(self):
        from jaxcrit.convert.load import load
        from jaxcrit.sharding import make_mesh, rules
        t = time.perf_counter()
        m = load(self.c.model, self.c.dtype, make_mesh(tuple(self.c.mesh.shape)), rules(self.c.mesh.params))
        release_memory()
        self._record("load", time.perf_counter() - t)
        return m

    @functools.cached_property
    def tokens(self) -> np.ndarray:
        """[T] the config text's token ids (at least 10)."""
        return self.model.tokens(self.c.text, self.c.max_tokens, min_tokens=10)

    def engine_kw(self) -> dict:
        e = self.c.engine
        return dict(mesh=self.model.mesh, vocab_chunk=e.vocab_chunk, prefix_sharing=e.prefix_sharing,
                    attention=e.attention, loss=e.loss, sites=e.sites)

    @functools.cached_property
    def engine(self):
        """The engine scoring ablations on the config text."""
        from jaxcrit import engine as E
        eng = E.Engine(self.model.cfg, self.model.params, E.Texts.from_ids([self.tokens.tolist()]),
                       chunk=self.c.engine.chunk, progress=self.c.progress, **self.engine_kw())
        self.say(f"base loss {eng.base_loss:.4f} nats/token (log10 PPL {eng.base_loss / E.LN10:.3f})")
        return eng

    def __getitem__(self, name: str) -> Any:
        """A stage's value: seeded, loaded from its files, or computed (and saved)."""
        from jaxcrit.stages import STAGES
        if name in self.values:
            return self.values[name]
        st = STAGES[name]
        if not st.enabled(self.c):
            self.values[name] = None
            return None
        if processes.agree(bool(self.workdir) and st.cached and all((self.workdir / f).exists() for f in st.files)):
            self.values[name] = st.load(self)
            return self.values[name]
        t = time.perf_counter()
        import jax
        with jax.set_mesh(self.model.mesh):   # FSDP's per-layer gathers (sharding.gathered) need it
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


def result_files(c: ConfigDict | None = None) -> tuple[str, ...]:
    """Every file a run may write in its workdir (with a config: a run of that config writes):
    the stage table's files and the run's own."""
    from jaxcrit.stages import STAGES
    return tuple(f for st in STAGES.values() if c is None or st.enabled(c) for f in st.files) + RUN_FILES


def prepare_workdir(workdir: Path, c: ConfigDict) -> None:
    """Creates the workdir; refuses one holding another config's results unless overwrite, which
    removes every result file of the stage table and the resume state."""
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
    if other:
        for name in result_files():
            (workdir / name).unlink(missing_ok=True)
        shutil.rmtree(workdir / "state", ignore_errors=True)
        (workdir / "state").mkdir()
    io.write_json(saved, mine)


def identity(c: ConfigDict) -> dict:
    """The config as JSON gives it back, less the fields that change no result."""
    return _plain({k: v for k, v in c.to_dict().items() if k not in IGNORED_FOR_IDENTITY})


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def run_all(run: Run) -> dict:
    """Every enabled stage in table order; returns the report stage's summary."""
    from jaxcrit.stages import STAGES
    for name in STAGES:
        run[name]
    return run["report"]
