"""The Engine: scores perturbation batches against fixed texts, chunk by chunk, on a device mesh."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcrit.dist import processes
from jaxcrit.dist.sharding import make_mesh, placed
from jaxcrit.engine.ablations import INACTIVE, Ablations, entries
from jaxcrit.engine.loss import LN10
from jaxcrit.engine.prefix import ENTRIES, LAYER, edit_start_points, first_positions, start_points
from jaxcrit.engine.program import (MEMORY_SHARE, ChunkProgram, MetricProgram, Readout, clean_pass, host_free, memory,
                                    planned_chunk, round_chunk)
from jaxcrit.engine.texts import Texts
from jaxcrit.errors import JaxcritError
from jaxcrit.kernels.selection import Kernels, select
from jaxcrit.models import edits as slot_edits
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.progress import Progress

# A chunk program's bytes (temporaries and outputs per device) by (program, rows, texts' shape, unpadded,
# params' dtype): the plan of an engine over texts of a shape already planned compiles nothing, so a
# notebook's repeated calls on one text pay the two compiles of `plan_chunk` once.
CHUNK_BYTES: dict[tuple, int] = {}


CHUNK_COST = 16   # a chunk's fixed cost (launches, the layer loops' bounds) in rows of a whole forward, for `cost`


class Plan(NamedTuple):
    """How a batch runs: its rows in chunks of `chunk`, each chunk one program call."""
    order: np.ndarray    # [n * chunk] the batch row in each chunk slot, -1 a padding row
    starts: np.ndarray   # [n, 2] each chunk's start point (layer, entry), its rows' earliest
    firsts: np.ndarray   # [n] each chunk's first position (Program.first), its rows' (one) first position
    chunk: int


def chunked(key: np.ndarray, first: np.ndarray, chunk: int) -> Plan:
    """The Plan of rows with start keys [R] (layer * len(ENTRIES) + entry) and first positions [R]
    in chunks of `chunk`: grouped by first position, latest first, each group sorted by key,
    latest first, and padded to whole chunks."""
    groups = []
    for f in np.unique(first)[::-1]:
        rows = np.flatnonzero(first == f)
        rows = rows[np.argsort(-key[rows], kind="stable")]
        groups.append(np.concatenate([rows, np.full((-len(rows)) % chunk, -1)]))
    order = np.concatenate(groups)
    slots = order.reshape(-1, chunk)
    keys = np.where(slots >= 0, key[slots], np.iinfo(np.int32).max).min(1)
    return Plan(order, np.stack(np.divmod(keys, len(ENTRIES)), 1).astype(np.int32),
                first[slots[:, 0]].astype(np.int32), chunk)


def cost(plan: Plan, n_layers: int, T: int) -> float:
    """A plan's work in row-layer-positions: each chunk's rows run the layers from its start and
    the positions from its first, plus CHUNK_COST whole rows."""
    layers = n_layers - plan.starts[:, 0]
    return float((plan.chunk * layers * (T - plan.firsts)).sum() + len(plan.firsts) * CHUNK_COST * n_layers * T)


def padded(a: np.ndarray, order: np.ndarray, fill) -> np.ndarray:
    """Rows [R, K] of a batch in `order` (-1: a padding row of `fill`), padded with `fill` to `entries(K)` columns."""
    rows = np.where((order >= 0)[:, None], a[np.maximum(order, 0)], np.asarray(fill, a.dtype))
    return np.pad(rows, ((0, 0), (0, entries(a.shape[1]) - a.shape[1])), constant_values=fill)


class Engine:
    """Scores perturbation batches against a fixed set of texts on a device mesh.

    chunk: rows per compiled call; rows are padded to it. One compile per site set and
    `entries` bucket: the program holds masks for the sites a batch touches plus `sites`, so
    giving all nine lets every batch share one program (compiles dominate a short CPU run; on a
    GPU each site without edits costs a pass over its activations in every layer).
    0 plans it from memory: XLA's memory analysis of two small compiled chunks gives the bytes
    per row, and the chunk fills `memory_fraction` of the free device memory (host memory on CPU).
    attention, mlp, norms, loss: the implementation of each hot spot, "auto" or a name of
    jaxcrit.kernels.selection.CHOICES (its docstring says what each is and where it applies).
    prefix_sharing: chunks start at their rows' start points (prefix.start_points, `plan`); False
    starts every chunk at layer 0 and recomputes everything (the reference path).
    """

    def __init__(self, cfg: ModelConfig, params: dict, texts: Texts, *, mesh: Mesh | None = None,
                 chunk: int = 64, prefix_sharing: bool = True, vocab_chunk: int = 16384,
                 attention: str = "auto", mlp: str = "auto", norms: str = "auto", loss: str = "auto",
                 memory_fraction: float = MEMORY_SHARE, sites: Sequence[str] = (), progress: bool = True):
        self.cfg, self.params, self.texts, self.sites = cfg, params, texts, tuple(sites)
        self.mesh = mesh or make_mesh()
        self.prefix_sharing, self.vocab_chunk, self.progress = prefix_sharing, vocab_chunk, progress
        rep = self.replicated = NamedSharding(self.mesh, P())
        self.valid = None if texts.valid.all() else jax.device_put(texts.valid, rep)   # None: no padding
        self.targets = jax.device_put(texts.tokens[:, 1:], rep)
        self.tmask = jax.device_put((texts.valid[:, 1:] & texts.valid[:, :-1]).astype(np.float32), rep)
        self.rows_sharding = NamedSharding(self.mesh, P("data"))
        tokens = jax.device_put(texts.tokens, rep)
        self.kernels = select(cfg, params["embed"].dtype, self.mesh, attention=attention, mlp=mlp, norms=norms,
                              loss=loss)
        with placed(self.mesh, params):   # FSDP's per-layer gathers (sharding.gathered) need it
            self.cache, self.shift = clean_pass(cfg, params, tokens, self.valid, vocab_chunk)
            if chunk == 0:
                chunk = self.plan_chunk(memory_fraction)
        self.chunk = round_chunk(chunk, self.mesh.shape["data"])

    @functools.cached_property
    def base_loss(self) -> float:
        """The clean run's mean token NLL (computed on first use: an engine that only scores
        per-token losses never compiles the mean's program)."""
        return float(self.losses(None)[0])

    def program(self, sites: Sequence[str] = (), with_values: bool = False, per_token: bool = False,
                exact: bool = False, kernels: Kernels | None = None) -> ChunkProgram:
        """The chunk program holding masks for `sites` and the engine's (in SITE_NAMES order), with
        the engine's kernels unless others are given."""
        return ChunkProgram(self.cfg, self.mesh, kernels or self.kernels, self.vocab_chunk, self._held(sites),
                            with_values, per_token, exact)

    def _held(self, sites: Sequence[str]) -> tuple[str, ...]:
        """The sites a program holds masks for: these and the engine's, in SITE_NAMES order."""
        held = set(sites) | set(self.sites)
        return tuple(n for n in SITE_NAMES if n in held)

    def plan(self, abl: Ablations, edits: slot_edits.Slots | None = None) -> Plan:
        """How a batch runs (`Plan`); edits: the rows' edit slots, whose start points and
        positions count too.

        With prefix sharing, rows are grouped by first position (prefix.first_positions), latest
        first, and sorted by start point within a group, latest first; a chunk holds rows of one
        group and starts at its rows' earliest start point. Where rows have several first
        positions, the chunk size is the one of the engine's chunk, its half, quarter, ... whose
        plan costs least (`cost`). Without prefix sharing, chunks hold the rows in order and start
        at (0, "layer") and position 0.
        """
        L, T = self.cfg.n_layers, self.texts.tokens.shape[1]
        R, C = abl.rows, self.chunk
        if not self.prefix_sharing:   # every row at (0, "layer") and position 0: in order, from the start
            return chunked(np.full(R, LAYER), np.zeros(R, np.int32), C)
        starts = start_points(abl, L) if edits is None else edit_start_points(abl, edits.site, edits.layer, L)
        key = starts[:, 0] * len(ENTRIES) + starts[:, 1]
        first = first_positions(abl, *((None, None) if edits is None else (edits.site, edits.position)), T)
        data = self.mesh.shape["data"]
        sizes = {C} if len(np.unique(first)) == 1 else {round_chunk(C >> i, data) for i in range(C.bit_length())
                                                         if C >> i >= data}
        return min((chunked(key, first, c) for c in sorted(sizes, reverse=True)), key=lambda p: cost(p, L, T))

    def compiled(self, rows: int, k: int, sites: Sequence[str] = (), kernels: Kernels | None = None):
        """The chunk program (`program(sites, kernels=kernels)`, no values) for `rows` rows of k
        entries, compiled from shapes (jax keeps it for the calls); it takes the engine's params,
        cache, valid, targets, tmask and shift, then a chunk's rows and start point."""
        with placed(self.mesh, self.params):
            return self.program(sites, kernels=kernels).lower(self.params, self.cache, self.valid, self.targets,
                                                                self.tmask, self.shift, rows, k).compile()

    def plan_chunk(self, fraction: float = MEMORY_SHARE) -> int:
        """The largest chunk (a multiple of 8 per device) whose program fits `fraction` of the free
        memory: XLA's plan of single-neuron rows over all nine sites."""
        def size(rows: int) -> int:
            key = (self.program(SITE_NAMES), rows, self.texts.tokens.shape, self.valid is None,
                   self.params["embed"].dtype)
            if key not in CHUNK_BYTES:
                m = self.compiled(rows, 1, SITE_NAMES).memory_analysis()
                CHUNK_BYTES[key] = int(m.temp_size_in_bytes + m.output_size_in_bytes)
            return CHUNK_BYTES[key]
        held = memory(self.mesh.devices.flat[0])
        free = held[0] - held[1] if held else host_free()
        return planned_chunk(size, self.mesh.shape["data"], free, fraction)

    def compile(self, k: int, sites: Sequence[str] = ()) -> None:
        """Compiles the chunk program for rows of k entries (and no values) before their first
        batch, which then runs without compiling; the runner calls it from a thread while Stage 1
        runs (XLA compiles without holding the GIL)."""
        self.compiled(self.chunk, k, sites)

    def losses(self, abl: Ablations | None, per_token: bool = False, desc: str = "ablations",
               sites: Sequence[str] | None = None, edits: slot_edits.Slots | None = None) -> np.ndarray:
        """[R] mean token NLL per row (f32), or [R, B, T-1] per-token NLL; abl None: the clean run.

        sites: more sites for the compiled program's masks, beside the batch's and the engine's.
        edits: the rows' edit slots beside their Ablations (numpy Slots, fields [R, K2])."""
        if abl is None:
            abl = Ablations(*(np.zeros((1, 1), dt) for dt in (np.int32,) * 3),
                            np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32))
        if abl.rows == 0:
            raise JaxcritError("empty perturbation batch: give at least one row")
        program = self.program(set(abl.sites()) | set(sites or ()), bool((abl.value != 0).any()), per_token)
        with placed(self.mesh, self.params):   # FSDP's per-layer gathers (sharding.gathered) need it
            out = self._run(abl, program, desc, edits)
            redo = np.flatnonzero(np.isnan(out.reshape(abl.rows, -1)).any(1))
            if redo.size:   # the one-pass logsumexp over- or underflowed there (or the row is NaN itself)
                out[redo] = self._run(abl.take(redo), dataclasses.replace(program, exact=True),
                                      f"{desc} (exact logsumexp)", None if edits is None else slot_edits.take(edits, redo))
        return out

    def metric(self, abl: Ablations, edits: slot_edits.Slots | None, readout: Readout, fn=None,
               desc: str = "edit sets") -> np.ndarray:
        """[R] each row's value of a MetricProgram: the `readout` of its logits, or fn(logits [T, V])
        averaged over the texts (fn: None reads the readout); rows and edits as in `losses`."""
        program = MetricProgram(self.cfg, self.mesh, self.kernels, self.vocab_chunk, self._held(abl.sites()),
                                bool((abl.value != 0).any()), fn)
        readout = Readout(*(jax.device_put(a, self.replicated) for a in readout))
        with placed(self.mesh, self.params):
            return self._run(abl, program, desc, edits, (self.params, self.cache, self.valid, readout))

    def _run(self, abl: Ablations, program: ChunkProgram | MetricProgram, desc: str,
             edits: slot_edits.Slots | None = None, args: tuple | None = None) -> np.ndarray:
        """The rows' results by a chunk program, in the caller's order: program(*args, rows, start,
        edits) per chunk; args default to ChunkProgram's (the engine's params, cache, valid,
        targets, tmask and shift)."""
        args = args or (self.params, self.cache, self.valid, self.targets, self.tmask, self.shift)
        plan = self.plan(abl, edits)
        order, C = plan.order, plan.chunk
        cols = {f.name: padded(getattr(abl, f.name), order, INACTIVE[f.name]) for f in dataclasses.fields(abl)}
        slots = None if edits is None else {k: padded(getattr(edits, k), order, v) for k, v in slot_edits.EMPTY.items()}
        tables = None if edits is None else jax.device_put(edits.tables, self.replicated)
        bar = Progress(abl.rows, desc, enabled=self.progress and abl.rows > C)
        outs, pending = [], []
        for i, (start, first) in enumerate(zip(plan.starts, plan.firsts)):
            lo = i * C
            rows = {k: jax.device_put(v[lo:lo + C], self.rows_sharding) for k, v in cols.items()}
            chunk_edits = None if slots is None else slot_edits.Slots(
                **{k: jax.device_put(v[lo:lo + C], self.rows_sharding) for k, v in slots.items()}, tables=tables)
            call = dataclasses.replace(program, first=int(first)) if first else program
            out = call(*args, rows, jax.device_put(start, self.replicated), chunk_edits)
            outs.append(out)
            pending.append((out, int((order[lo:lo + C] >= 0).sum())))
            if len(pending) > 2:  # keep two chunks in flight; wait (no transfer) to report progress
                done, n = pending.pop(0)
                done.block_until_ready()
                bar.update(n)
        for done, n in pending:
            done.block_until_ready()
            bar.update(n)
        res = processes.to_host(jnp.concatenate(outs))
        out = np.empty((abl.rows, *res.shape[1:]), res.dtype)
        out[order[order >= 0]] = res[order >= 0]
        return out

    def deltas(self, abl: Ablations, desc: str = "ablations", sites: Sequence[str] | None = None) -> np.ndarray:
        """[R] delta = log10(PPL_masked / PPL_base) = (loss - base) / ln 10; sites as in losses."""
        return (self.losses(abl, desc=desc, sites=sites) - self.base_loss) / LN10
