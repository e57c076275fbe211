"""The engine's compiled programs, described once: the Engine runs them, the memory plan
(run/plan.py) compiles them from shapes before any weight is read.

* `clean_pass`: the clean run's cache (what rows start from) and its max logits (the loss's shift).
* `ChunkProgram`: the loss of each row of one chunk; its fields are the program's static
  arguments (one compile each), its `lower` takes shapes or arrays.
* `MetricProgram`: another number of each row (log-probs and logits at chosen positions, or a
  function of the logits), from the same rows and start points.
* How many rows a chunk holds: `round_chunk` (whole rows per device), `fit_chunk` (the largest
  that fits MEMORY_SHARE of the free memory, from two compiled sizes) and `planned_chunk` (the
  same from a function giving a chunk size's bytes, which the memory plan passes).
* The memory they fit in: `memory(device)` (a device's limit and bytes in use, where the
  backend reports them) and `host_free()` (the host's available memory, for CPU devices).
"""
from __future__ import annotations

import dataclasses
import os
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcrit.engine.ablations import FIELDS, entries, row_masks
from jaxcrit.engine.loss import logsumexp_vocab, rows_logsumexp, target_logit
from jaxcrit.engine.prefix import Cache, clean_cache, resume
from jaxcrit.errors import JaxcritError
from jaxcrit.kernels.selection import Kernels
from jaxcrit.models import decoder
from jaxcrit.models import edits as slot_edits
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES

MEMORY_SHARE = 0.7   # the share of the free device memory a planned chunk fills
MAX_CHUNK = 1024     # rows per device a planned chunk holds at most


@partial(jax.jit, static_argnames=("cfg", "vocab_chunk"), compiler_options=decoder.COMPILER_OPTIONS)
def clean_pass(cfg: ModelConfig, params, tokens, valid, vocab_chunk: int) -> tuple[Cache, jax.Array]:
    """The clean run of tokens [B, T] (valid [B, T] or None): its cache (what rows start from) and
    its max logit per predicting position [B, T-1] (the loss's shift)."""
    h, cache = clean_cache(cfg, params, tokens, valid)
    _, m = logsumexp_vocab(cfg, params, h[:, :-1], vocab_chunk)
    return cache, m


@dataclasses.dataclass(frozen=True)
class Program:
    """What every program over a chunk of rows is compiled for (its static arguments, one compiled
    program per distinct value): sites, the sites it holds masks for (rows may edit only these);
    with_values, whether the rows add values; first, the earliest position any row edits
    (rounded down to its bucket, `first_positions`): positions before it run in no row."""
    cfg: ModelConfig
    mesh: Mesh
    kernels: Kernels
    vocab_chunk: int
    sites: tuple[str, ...] = SITE_NAMES
    with_values: bool = False
    first: int = dataclasses.field(default=0, kw_only=True)


@dataclasses.dataclass(frozen=True)
class ChunkProgram(Program):
    """The chunk program, the loss of each row: per_token, it returns [R, B, T-1] per-token NLL,
    else [R] means; exact, the two-pass logsumexp (the redo of rows the one pass flagged)."""
    per_token: bool = False
    exact: bool = False

    def __call__(self, params, cache: Cache, valid, targets, tmask, shift, rows: dict, start,
                 edits: slot_edits.Slots | None = None) -> jax.Array:
        """Loss of each row of one chunk: [R] mean NLL (or [R, B, T-1] per-token NLL).

        rows: {field: [R, K]} of Ablations (R a multiple of the mesh's 'data' rows); start [2]:
        the chunk's start point (layer, entry), the earliest of its rows'; edits: the rows' edit
        slots ([R, K2] fields) or None. The rest: the clean pass's cache and shift [B, T-1], the
        texts' valid [B, T] (or None), targets [B, T-1] and their weights tmask [B, T-1] (f32)."""
        return _chunk_nll(params, cache, valid, targets, tmask, shift, rows, start, edits, program=self)

    def lower(self, params, cache: Cache, valid, targets, tmask, shift, rows: int, k: int) -> jax.stages.Lowered:
        """The program for `rows` rows of k entries (padded to `entries(k)`, as the engine pads
        them), lowered for these arguments: arrays or shapes."""
        return _chunk_nll.lower(params, cache, valid, targets, tmask, shift, *chunk_shapes(self.mesh, rows, entries(k)),
                                None, program=self)


def chunk_shapes(mesh: Mesh, rows: int, width: int) -> tuple[dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """The chunk program's rows ({field: [rows, width]}, over 'data') and start point ([2]) as
    shapes, placed as the Engine places them."""
    rows_sharding = NamedSharding(mesh, P("data"))
    spec = {k: jax.ShapeDtypeStruct((rows, width), dt, sharding=rows_sharding) for k, dt in FIELDS.items()}
    return spec, jax.ShapeDtypeStruct((2,), jnp.int32, sharding=NamedSharding(mesh, P()))


def chunk_hidden(params, cache: Cache, valid, rows, start, edits, program) -> jax.Array:
    """The final-normed hidden states [R, B, T, D] of a chunk's rows (ChunkProgram's arguments;
    program: a ChunkProgram or MetricProgram, for its cfg, sites, with_values and kernels).

    Tail layers after the last one any row of the chunk edits run without masks (prefix.tail's
    `edited`): in an exhaustive scan every row's edits sit at its start layer, so the tail runs
    clean. Positions before program.first run in no row: they are the clean run's."""
    cfg = program.cfg
    active = (rows["scale"] != 1) | (rows["value"] != 0)
    edited = (active[..., None] & (rows["layer"][..., None] == jnp.arange(cfg.n_layers))).any((0, 1))  # [L]
    P = program.first
    if edits is not None:
        edited = edited | slot_edits.layers_edited(edits, cfg.n_layers)
        edits = slot_edits.from_position(edits, P)

    def hidden(row, slots):
        masks, values = row_masks(cfg, program.sites, row, program.with_values)
        return resume(cfg, params, cache, valid, start, masks=masks, values=values, edited=edited,
                      kernels=program.kernels.layer, edits=slots, first=P)

    axes = None if edits is None else slot_edits.batch_axes(edits)
    hs = jax.vmap(hidden, in_axes=(0, axes))(rows, edits)
    if not P:
        return hs
    clean = decoder.final_norm(cfg, params, cache.resid[-1, :, :P])          # [B, P, D]
    return jnp.concatenate([jnp.broadcast_to(clean, (hs.shape[0], *clean.shape)), hs], axis=2)


@partial(jax.jit, static_argnames=("program",), compiler_options=decoder.COMPILER_OPTIONS)
def _chunk_nll(params, cache: Cache, valid, targets, tmask, shift, rows, start, edits, *, program: ChunkProgram):
    """ChunkProgram's program (the rows' hidden states: `chunk_hidden`).

    The logsumexp takes one pass over the logits, shifted by the clean run's max logit; positions
    where that over- or underflows come back NaN and the engine redoes their rows with `exact`.
    No branch on the result inside the program: it would hold the exact form's [R, B, T,
    vocab_chunk] f32 temporaries (the bench's peak: 17.7 GiB with them, 7.6 without), and the
    host, which reads a cond's predicate, would wait for each chunk's end before launching the next.
    """
    cfg = program.cfg
    hs = chunk_hidden(params, cache, valid, rows, start, edits, program)[:, :, :-1]
    lse = rows_logsumexp(cfg, params, hs, shift, vocab_chunk=program.vocab_chunk, kernels=program.kernels,
                         mesh=program.mesh, exact=program.exact)
    nll = (lse - jax.vmap(lambda h: target_logit(cfg, params, h, targets))(hs)) * tmask
    return nll if program.per_token else nll.sum((1, 2)) / tmask.sum()


class Readout(NamedTuple):
    """What a MetricProgram reads of each row's logits: at position pos[b, p] of text b, the
    log-prob (weight w_logprob) and the logit (weight w_logit) of token tokens[b, p]; a row's
    value is the weighted sum. All [B, P]."""
    pos: jax.Array        # int32
    tokens: jax.Array     # int32
    w_logprob: jax.Array  # f32
    w_logit: jax.Array    # f32


@dataclasses.dataclass(frozen=True)
class MetricProgram(Program):
    """A chunk program scoring each row by its logits. fn: None reads a `Readout`; else a jittable
    fn(logits [T, V] f32) -> scalar applied to each text's full logits, the row's value their mean
    over texts."""
    fn: Callable | None = None

    def __call__(self, params, cache: Cache, valid, readout: Readout, rows: dict, start,
                 edits: slot_edits.Slots | None = None) -> jax.Array:
        """[R] the value of each row of one chunk (arguments as ChunkProgram's)."""
        return _chunk_metric(params, cache, valid, readout, rows, start, edits, program=self)


@partial(jax.jit, static_argnames=("program",), compiler_options=decoder.COMPILER_OPTIONS)
def _chunk_metric(params, cache: Cache, valid, readout: Readout, rows, start, edits, *, program: MetricProgram):
    """MetricProgram's program."""
    cfg = program.cfg
    hs = chunk_hidden(params, cache, valid, rows, start, edits, program)        # [R, B, T, D]
    if program.fn is not None:
        logits = jax.vmap(lambda h: decoder.logits(cfg, params, h))(hs)          # [R, B, T, V]
        return jax.vmap(jax.vmap(program.fn))(logits).mean(1)
    at = jax.vmap(lambda h: jnp.take_along_axis(h, readout.pos[..., None], axis=1))(hs)   # [R, B, P, D]
    logit = jax.vmap(lambda h: target_logit(cfg, params, h, readout.tokens))(at)
    lse = jax.vmap(lambda h: logsumexp_vocab(cfg, params, h, program.vocab_chunk)[0])(at)
    return (readout.w_logit * logit + readout.w_logprob * (logit - lse)).sum((1, 2))


def round_chunk(chunk: int, data: int) -> int:
    """Rows per compiled call for a chunk of about `chunk` rows on `data` devices: rounded up to
    whole rows per device, at least one each."""
    return max(data, -(-chunk // data) * data)


def memory(device) -> tuple[int, int] | None:
    """(bytes the device holds, bytes in use now) as it reports them; None where it reports none
    (XLA:CPU: its memory is the host's, `host_free`)."""
    stats = device.memory_stats() or {}
    return (int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))) if "bytes_limit" in stats else None


def host_free() -> int:
    """Bytes of the host's memory free now."""
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fit_chunk(ma: int, mb: int, data: int, free: float, cap: int = MAX_CHUNK) -> int:
    """The largest chunk (a multiple of 8 per device, at most cap per device) whose program fits in
    `free` bytes, from its bytes at 8 and 16 rows per device (ma, mb; a line through them)."""
    a, b = 8 * data, 16 * data
    per_row = max((mb - ma) / (b - a), 1.0)
    rows = int((free - (ma - a * per_row)) / per_row) // (8 * data) * (8 * data)
    if rows < data:
        raise JaxcritError(f"out of device memory: one chunk of {data} rows needs {per_row * data / 2**30:.1f} GiB "
                           "more than is free; use fewer tokens, a smaller vocab_chunk, or more devices")
    return min(rows, cap * data)


def planned_chunk(bytes_at: Callable[[int], int], data: int, free: float, share: float = MEMORY_SHARE) -> int:
    """The largest chunk whose program fits `share` of `free` bytes (`fit_chunk`), from its
    bytes_at(rows) (temporaries and outputs per device) at 8 and 16 rows per device."""
    return fit_chunk(bytes_at(8 * data), bytes_at(16 * data), data, share * free)
