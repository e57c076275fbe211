"""The batched perturbation engine: many ablations as one compiled, sharded XLA program.

A batch of perturbations is data (`Ablations`): row r multiplies channel `channel[r, k]` of
site `site[r, k]` in layer `layer[r, k]` by `scale[r, k]` and adds `value[r, k]` (entries with
scale 1 and value 0 are padding). Each chunk of rows becomes dense per-site masks inside the
jitted program and runs as `vmap(forward)`; the loss is computed in vocabulary chunks, so the
[rows, batch, seq, vocab] logits never exist.

Prefix sharing at the site: the clean pass caches, per layer, the residual entering it and its
attention and MLP outputs (decoder.Cache). A row starts inside its first perturbed layer S at the
latest entry its edits there allow (`start_points`): the whole layer (q/k/v), the MLP (o_proj,
post_attention_layernorm, several hidden channels), or after it (down_proj channels and one MLP
hidden channel: the clean output plus the exact rank-1 change, so nothing of layer S runs). A
chunk starts at its rows' earliest start point, passed as data: one compiled program serves all.
Rows are sorted by start point so chunks share it; results come back in the caller's order.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcrit.dist import processes
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.kernels import fused_loss, fused_mlp
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_INDEX, SITE_NAMES, site as site_info, width
from jaxcrit.progress import Progress
from jaxcrit.dist.sharding import make_mesh, placed

LN10 = math.log(10.0)


INACTIVE = {"site": 0, "layer": 0, "channel": 0, "scale": 1.0, "value": 0.0}   # an entry that changes nothing
FIELDS = {"site": jnp.int32, "layer": jnp.int32, "channel": jnp.int32, "scale": jnp.float32, "value": jnp.float32}


def entries(k: int) -> int:
    """Entries per row a compiled program holds for rows of k: the next power of two, at least 8,
    so batches of nearby sizes (a scan's 1, a greedy step's 4, Stage 2's first 8) share one."""
    return max(8, 1 << (k - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Ablations:
    """rows x entries of (site index, layer, channel, scale, value); numpy, built on the host."""
    site: np.ndarray     # [R, K] int32, index into SITE_NAMES
    layer: np.ndarray    # [R, K] int32
    channel: np.ndarray  # [R, K] int32
    scale: np.ndarray    # [R, K] float32: 0 ablates, 1 leaves the channel as it is
    value: np.ndarray    # [R, K] float32: added after the scale (mean-ablation style)

    @property
    def rows(self) -> int:
        return self.site.shape[0]

    @property
    def active(self) -> np.ndarray:
        return (self.scale != 1) | (self.value != 0)

    def take(self, idx: np.ndarray) -> "Ablations":
        return Ablations(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def sites(self) -> tuple[str, ...]:
        """Sites any active entry touches: only these get masks in the compiled program."""
        return tuple(SITE_NAMES[i] for i in sorted(set(self.site[self.active].tolist())))

    def first_layer(self) -> np.ndarray:
        """[R] the lowest layer each row touches (int32 max for a row that touches none)."""
        return np.where(self.active, self.layer, np.iinfo(np.int32).max).min(axis=1)


def make(site, layer, channel, scale=0.0, value=0.0, *, cfg: ModelConfig) -> Ablations:
    """Ablations from broadcastable [R, K] (or [R]) arrays; checks every index against cfg.

    site may hold names or indices. Raises JaxcritError on an unknown site, a layer or channel
    out of range, or an empty batch.
    """
    s = np.asarray(site)
    if s.dtype.kind in "US":
        for n in np.unique(s):
            site_info(str(n))
        s = np.vectorize(SITE_INDEX.__getitem__, otypes=[np.int32])(s)
    as2d = lambda a: np.asarray(a).reshape(-1, 1) if np.ndim(a) == 1 else np.atleast_2d(a)
    arrs = np.broadcast_arrays(*map(as2d, (s, layer, channel, scale, value)))
    s, l, c, sc, v = (np.ascontiguousarray(a, dt) for a, dt in
                      zip(arrs, (np.int32, np.int32, np.int32, np.float32, np.float32)))
    if s.size == 0:
        raise JaxcritError("empty perturbation batch: give at least one neuron")
    if s.min() < 0 or s.max() >= len(SITE_NAMES):
        raise JaxcritError(f"site index out of range 0..{len(SITE_NAMES) - 1}")
    if l.min() < 0 or l.max() >= cfg.n_layers:
        bad = l[(l < 0) | (l >= cfg.n_layers)][0]
        raise JaxcritError(f"layer {bad} out of range: the model has layers 0..{cfg.n_layers - 1}")
    widths = np.array([width(cfg, n) for n in SITE_NAMES])
    over = (c < 0) | (c >= widths[s])
    if over.any():
        r = np.argwhere(over)[0]
        name = SITE_NAMES[s[tuple(r)]]
        raise JaxcritError(f"channel {c[tuple(r)]} out of range for {name}: it has channels "
                           f"0..{width(cfg, name) - 1}")
    return Ablations(s, l, c, sc, v)


def single(cfg: ModelConfig, site: str, layers: Sequence[int] | None = None,
           channels: Sequence[int] | None = None, scale: float = 0.0) -> Ablations:
    """One row per (layer, channel) of one site: the exhaustive single-neuron scan by default."""
    layers = np.arange(cfg.n_layers) if layers is None else np.asarray(layers)
    channels = np.arange(width(cfg, site)) if channels is None else np.asarray(channels)
    l, c = np.meshgrid(layers, channels, indexing="ij")
    return make(np.full(l.size, site), l.ravel(), c.ravel(), scale, cfg=cfg)


def prefixes(cfg: ModelConfig, site, layer, channel, ns: Sequence[int], width: int = 0) -> Ablations:
    """Row i zeroes the first ns[i] entries of a ranking (the paper's Stage 2 sets).

    width: entries per row (at least max(ns); the rest inactive), so batches of different prefix
    sizes share one compiled program; 0: max(ns)."""
    site, layer, channel = (np.asarray(a) for a in (site, layer, channel))
    ns = np.asarray(ns, int)
    if ns.size == 0:
        raise JaxcritError("empty perturbation batch: give at least one prefix size")
    K = max(int(ns.max()), width)
    if K > len(site) or ns.min() < 0:
        raise JaxcritError(f"prefix sizes must lie in 0..{len(site)} (the ranking's length); got {ns.min()}..{K}")
    keep = np.arange(K)[None, :] < ns[:, None]
    return make(np.broadcast_to(site[None, :K], keep.shape), layer[None, :K], channel[None, :K],
                np.where(keep, 0.0, 1.0), cfg=cfg)


def random_sets(cfg: ModelConfig, sites: Sequence[str], n_rows: int, k: int, seed: int) -> Ablations:
    """n_rows random sets of k distinct (site, layer, channel) neurons, uniform over the given sites."""
    if n_rows < 1 or k < 1:
        raise JaxcritError(f"empty perturbation batch: random_sets needs n_rows >= 1 and k >= 1 (got {n_rows}, {k})")
    rng = np.random.default_rng(seed)
    sizes = np.array([cfg.n_layers * width(cfg, s) for s in sites])
    total = sizes.sum()
    flat = np.stack([rng.choice(total, size=k, replace=False) for _ in range(n_rows)])
    which = np.searchsorted(np.cumsum(sizes), flat, side="right")
    off = flat - np.concatenate([[0], np.cumsum(sizes)])[which]
    w = np.array([width(cfg, s) for s in sites])[which]
    names = np.array(sites)[which]
    return make(names, off // w, off % w, cfg=cfg)


@dataclasses.dataclass(frozen=True)
class Texts:
    """A right-padded batch of token sequences and what the loss is taken over."""
    tokens: np.ndarray   # [B, T] int32
    valid: np.ndarray    # [B, T] bool

    @staticmethod
    def from_ids(seqs: Sequence[Sequence[int]]) -> "Texts":
        if not seqs:
            raise JaxcritError("no text given")
        short = [len(s) for s in seqs if len(s) < 2]
        if short:
            raise JaxcritError(f"a text has {short[0]} token(s); the loss needs at least 2 tokens per text")
        T = max(len(s) for s in seqs)
        tok = np.zeros((len(seqs), T), np.int32)
        val = np.zeros((len(seqs), T), bool)
        for i, s in enumerate(seqs):
            tok[i, :len(s)] = s
            val[i, :len(s)] = True
        return Texts(tok, val)

    @property
    def n_tokens(self) -> int:
        """Predicted tokens (each text's first token is context only)."""
        return int((self.valid[:, 1:] & self.valid[:, :-1]).sum())


def row_masks(cfg: ModelConfig, sites: tuple[str, ...], row: dict, with_values: bool):
    """Dense per-site [L, C] masks (and values, or None) of one row ({field: [K]} of Ablations),
    for the sites given (a superset of the row's: the others get all-ones masks)."""
    masks, values = {}, {}
    for s in sites:
        mine = row["site"] == SITE_INDEX[s]
        shape = (cfg.n_layers, width(cfg, s))
        idx = (row["layer"], row["channel"])
        masks[s] = jnp.ones(shape, jnp.float32).at[idx].multiply(
            jnp.where(mine, row["scale"], 1.0), mode="drop")
        if with_values:
            values[s] = jnp.zeros(shape, jnp.float32).at[idx].add(
                jnp.where(mine, row["value"], 0.0), mode="drop")
    return masks, (values or None)


def start_points(abl: Ablations, n_layers: int) -> np.ndarray:
    """[R, 2] where each row can start: (its first perturbed layer S, entry index into
    decoder.ENTRIES), the latest start that still runs everything its edits at S change.

    The entry is the earliest any of its edits at S needs (decoder.SITE_ENTRY); "out" holds one
    MLP hidden channel, so edits of two hidden channels at S start at "mlp". A row with no edit
    starts after the last layer's MLP (layer L-1, "out": the clean output).
    """
    first = abl.first_layer()
    at = abl.active & (abl.layer == first[:, None])
    entry = np.where(at, _SITE_ENTRY[abl.site], decoder.OUT).min(axis=1)
    hid = at & _HIDDEN[abl.site]
    several = np.where(hid, abl.channel, -1).max(1) > np.where(hid, abl.channel, np.iinfo(np.int32).max).min(1)
    entry = np.where(several, np.minimum(entry, decoder.MLP), entry)
    none = first == np.iinfo(np.int32).max
    return np.stack([np.where(none, n_layers - 1, first), np.where(none, decoder.OUT, entry)], 1).astype(np.int32)


_SITE_ENTRY = np.array([decoder.SITE_ENTRY[n] for n in SITE_NAMES], np.int32)
_HIDDEN = np.array([n in decoder.HIDDEN for n in SITE_NAMES])


@partial(jax.jit, static_argnames=("cfg", "sites", "with_values", "per_token", "vocab_chunk", "kernels", "mesh",
                                   "exact"), compiler_options=decoder.COMPILER_OPTIONS)
def _chunk_nll(params, cache: decoder.Cache, valid, targets, tmask, shift, rows, start, *, cfg: ModelConfig,
               sites: tuple[str, ...], with_values: bool, per_token: bool, vocab_chunk: int, kernels: Kernels,
               mesh: Mesh, exact: bool = False):
    """Loss of each row of one chunk: [R] mean NLL (or [R, B, T-1] per-token NLL).

    start [2]: the chunk's start point (layer, entry), the earliest of its rows' (unbatched).
    Tail layers that no row of the chunk edits run without masks (decoder.forward's `edited`):
    in an exhaustive scan every row's edits sit at its start layer, so the whole tail runs clean.
    The logsumexp takes one pass over the logits, shifted by the clean run's max logit; positions
    where that over- or underflows come back NaN and the engine redoes their rows with `exact`:
    the two-pass form, each device's rows one at a time (the rare path holds one row's logits
    chunk, so it fits wherever the fast program does). No branch on the result inside the
    program: it would hold the exact form's [R, B, T, vocab_chunk] f32 temporaries (the bench's
    peak: 17.7 GiB with them, 7.6 without), and the host, which reads a cond's predicate, would
    wait for each chunk's end before launching the next.
    """
    active = (rows["scale"] != 1) | (rows["value"] != 0)
    edited = (active[..., None] & (rows["layer"][..., None] == jnp.arange(cfg.n_layers))).any((0, 1))  # [L]

    def hidden(row):
        masks, values = row_masks(cfg, sites, row, with_values)
        h = decoder.resume(cfg, params, cache, valid, start, masks=masks, values=values, edited=edited,
                           attn_impl=kernels.attention, mlp_impl=kernels.mlp)
        return h[:, :-1]

    hs = jax.vmap(hidden)(rows)
    lse_of = lambda h, sh=None: decoder.logsumexp_vocab(cfg, params, h, vocab_chunk, sh)[0]
    if exact:   # [data, rows per device, ...]: a map over each device's own rows
        local = hs.reshape(mesh.shape["data"], -1, *hs.shape[1:])
        lse = jax.vmap(lambda h: jax.lax.map(lse_of, h))(local).reshape(hs.shape[:-1])
    elif kernels.loss == "pallas":
        s = fused_loss.expsum_sharded(hs, decoder.unembed(cfg, params), shift, mesh)
        lse = jnp.where(jnp.isfinite(s) & (s > 1e-30), shift + jnp.log(s), jnp.nan)
    else:
        lse = jax.vmap(lambda h: lse_of(h, shift))(hs)
    nll = (lse - jax.vmap(lambda h: decoder.target_logit(cfg, params, h, targets))(hs)) * tmask
    return nll if per_token else nll.sum((1, 2)) / tmask.sum()


class Kernels(NamedTuple):
    """Which implementation runs each hot spot of the chunk program (see `kernels`)."""
    attention: str   # "xla" | "cudnn"
    mlp: str         # "xla" | "pallas": models/fused_mlp.py in the layers no row edits
    loss: str        # "xla" | "pallas": models/fused_loss.py


def kernels(cfg: ModelConfig, dtype, attention: str, mlp: str, loss: str, devices: int) -> Kernels:
    """The implementations for params of this dtype on this backend and a mesh of `devices`;
    "auto" picks cuDNN attention and the fused kernels where they apply. Raises JaxcritError on
    an unknown name or a kernel asked for where it does not apply."""
    half_gpu = dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "gpu"
    fused = {   # hot spot: (its fused kernel, whether it applies here, what it needs)
        "attention": ("cudnn", half_gpu, "GPUs and dtype bfloat16 or float16"),
        "mlp": ("pallas", fused_mlp.supported(cfg.family.act, cfg.d_model, cfg.d_ff, dtype) and devices == 1,
                f"one Hopper GPU, dtype bfloat16 or float16, a SiLU MLP, d_model a multiple of "
                f"{fused_mlp.TILES.tk} and d_ff of {fused_mlp.TILES.tn // 2}"),
        "loss": ("pallas", fused_loss.supported(cfg.d_model, dtype),
                 f"GPUs, dtype bfloat16 or float16 and d_model a multiple of {fused_loss.TILES.bk}")}
    chosen = {"attention": attention, "mlp": mlp, "loss": loss}
    for name, (kernel, ok, needs) in fused.items():
        if chosen[name] == "auto":
            chosen[name] = kernel if ok else "xla"
        if chosen[name] not in ("xla", kernel):
            raise JaxcritError(f"engine.{name} '{chosen[name]}' unknown: use auto, xla or {kernel}")
        if chosen[name] == kernel and not ok:
            raise JaxcritError(f"engine.{name} {kernel} needs {needs}; use auto or xla")
    return Kernels(**chosen)


def fit_chunk(ma: int, mb: int, data: int, free: float, cap: int = 1024) -> int:
    """The largest chunk (a multiple of 8 per device, at most cap per device) whose program fits in
    `free` bytes, from its bytes at 8 and 16 rows per device (ma, mb; a line through them)."""
    a, b = 8 * data, 16 * data
    per_row = max((mb - ma) / (b - a), 1.0)
    rows = int((free - (ma - a * per_row)) / per_row) // (8 * data) * (8 * data)
    if rows < data:
        raise JaxcritError(f"out of device memory: one chunk of {data} rows needs {per_row * data / 2**30:.1f} GiB "
                           "more than is free; use fewer tokens, a smaller vocab_chunk, or more devices")
    return min(rows, cap * data)


def chunk_shapes(mesh: Mesh, rows: int, entries: int) -> tuple[dict[str, jax.ShapeDtypeStruct], jax.ShapeDtypeStruct]:
    """The chunk program's rows ({field: [rows, entries]}, over 'data') and start point ([2]) as
    shapes: what `Engine.losses` passes it, for compiling from shapes."""
    rows_sharding = NamedSharding(mesh, P("data"))
    spec = {k: jax.ShapeDtypeStruct((rows, entries), dt, sharding=rows_sharding) for k, dt in FIELDS.items()}
    return spec, jax.ShapeDtypeStruct((2,), jnp.int32, sharding=NamedSharding(mesh, P()))


class Engine:
    """Scores perturbation batches against a fixed set of texts on a device mesh.

    chunk: rows per compiled call; rows are padded to it. One compile per site set and
    `entries` bucket: the program holds masks for the sites a batch touches plus `sites`, so
    giving all nine lets every batch share one program (compiles dominate a short CPU run; on a
    GPU each site without edits costs a pass over its activations in every layer).
    0 plans it from memory: XLA's memory analysis of two small compiled chunks gives the bytes
    per row, and the chunk fills `memory_fraction` of the free device memory (host memory on CPU).
    attention: "xla" (exact f32 softmax), "cudnn" (fused flash attention, GPU with bf16/fp16), or
    "auto" (cudnn where it applies).
    mlp: "xla" (cuBLAS gate and up, then SiLU·mul), "pallas" (the fused gate|up kernel of
    models/fused_mlp.py in the layers no row of a chunk edits, which also run both RMSNorms
    folded into the GEMMs after them, `decoder.folded`: one Hopper GPU, bf16/fp16, SiLU), or
    "auto" (pallas where it applies).
    loss: "xla" (vocabulary-chunked einsum + logsumexp), "pallas" (the fused kernel of
    models/fused_loss.py: GPUs, bf16/fp16; on a mesh under shard_map), or "auto" (pallas where
    it applies).
    prefix_sharing: chunks start at their rows' start points (`start_points`, `plan`); False
    starts every chunk at layer 0 and recomputes everything (the reference path).
    """

    def __init__(self, cfg: ModelConfig, params: dict, texts: Texts, *, mesh: Mesh | None = None,
                 chunk: int = 64, prefix_sharing: bool = True, vocab_chunk: int = 16384,
                 attention: str = "auto", mlp: str = "auto", loss: str = "auto", memory_fraction: float = 0.7,
                 sites: Sequence[str] = (), progress: bool = True):
        self.cfg, self.params, self.texts, self.sites = cfg, params, texts, tuple(sites)
        self.mesh = mesh or make_mesh()
        data = self.mesh.shape["data"]
        self.prefix_sharing, self.vocab_chunk, self.progress = prefix_sharing, vocab_chunk, progress
        rep = self.replicated = NamedSharding(self.mesh, P())
        self.valid = None if texts.valid.all() else jax.device_put(texts.valid, rep)   # None: no padding
        self.targets = jax.device_put(texts.tokens[:, 1:], rep)
        self.tmask = jax.device_put((texts.valid[:, 1:] & texts.valid[:, :-1]).astype(np.float32), rep)
        self.rows_sharding = NamedSharding(self.mesh, P("data"))
        tokens = jax.device_put(texts.tokens, rep)
        self.kernels = kernels(cfg, params["embed"].dtype, attention, mlp, loss, self.mesh.size)
        with placed(self.mesh, params):   # FSDP's per-layer gathers (sharding.gathered) need it
            self.cache, self.shift = _clean_pass(cfg, params, tokens, self.valid, vocab_chunk)
            if chunk == 0:
                chunk = self.plan_chunk(memory_fraction)
        self.chunk = max(data, -(-chunk // data) * data)

    @functools.cached_property
    def base_loss(self) -> float:
        """The clean run's mean token NLL (computed on first use: an engine that only scores
        per-token losses never compiles the mean's program)."""
        return float(self.losses(None)[0])

    def _static(self, sites: tuple[str, ...], with_values: bool, per_token: bool, exact: bool = False) -> dict:
        """_chunk_nll's static arguments."""
        return dict(cfg=self.cfg, sites=sites, with_values=with_values, per_token=per_token,
                    vocab_chunk=self.vocab_chunk, kernels=self.kernels, mesh=self.mesh, exact=exact)

    def plan(self, abl: Ablations) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """How a batch runs: (order [R], its rows in that order padded to whole chunks and to
        `entries(K)` (Ablations' fields as [n * chunk, entries(K)] arrays), each chunk's start point
        [n, 2] as (layer, entry)).

        With prefix sharing, rows are sorted by start point, latest first, and a chunk starts at
        its rows' earliest; without, every chunk starts at (0, "layer").
        """
        starts = start_points(abl, self.cfg.n_layers)
        E = len(decoder.ENTRIES)
        key = starts[:, 0] * E + starts[:, 1]
        order = np.argsort(-key, kind="stable") if self.prefix_sharing else np.arange(abl.rows)
        C, K = self.chunk, abl.site.shape[1]
        pad = (-abl.rows) % C
        cols = {f.name: np.pad(getattr(abl, f.name)[order], ((0, pad), (0, entries(K) - K)),
                               constant_values=INACTIVE[f.name]) for f in dataclasses.fields(abl)}
        key = np.concatenate([key[order], np.full(pad, key.max())]).reshape(-1, C).min(1)
        if not self.prefix_sharing:
            key = np.full_like(key, decoder.LAYER)
        return order, cols, np.stack(np.divmod(key, E), 1).astype(np.int32)

    def _compiled(self, rows: int, k: int, sites: tuple[str, ...]):
        """The chunk program for `rows` rows of k entries (padded as `plan` pads them), no values,
        with masks for `sites` and the engine's, compiled from shapes (jax keeps it for the calls)."""
        static = self._static(self._held(sites), False, False)
        with placed(self.mesh, self.params):
            return _chunk_nll.lower(self.params, self.cache, self.valid, self.targets, self.tmask, self.shift,
                                    *chunk_shapes(self.mesh, rows, entries(k)), **static).compile()

    def _held(self, sites) -> tuple[str, ...]:
        """The sites a program holds masks for: these and the engine's, in SITE_NAMES order."""
        held = set(sites) | set(self.sites)
        return tuple(n for n in SITE_NAMES if n in held)

    def _chunk_bytes(self, rows: int) -> int:
        """Device bytes one chunk of `rows` single-neuron rows over all nine sites needs (XLA's plan)."""
        m = self._compiled(rows, 1, SITE_NAMES).memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)

    def plan_chunk(self, fraction: float, cap: int = 1024) -> int:
        """The largest chunk (a multiple of 8 per device) whose program fits the free memory."""
        data = self.mesh.shape["data"]
        a, b = 8 * data, 16 * data
        stats = self.mesh.devices.flat[0].memory_stats()
        if stats and "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        else:
            import os
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return fit_chunk(self._chunk_bytes(a), self._chunk_bytes(b), data, fraction * free, cap)

    def compile(self, k: int, sites: tuple[str, ...] = ()) -> None:
        """Compiles the chunk program for rows of k entries (and no values) before their first
        batch, which then runs without compiling; `pipeline.Run` calls it from a thread while
        Stage 1 runs (XLA compiles without holding the GIL)."""
        self._compiled(self.chunk, k, sites)

    def losses(self, abl: Ablations | None, per_token: bool = False, desc: str = "ablations",
               sites: tuple[str, ...] | None = None) -> np.ndarray:
        """[R] mean token NLL per row (f32), or [R, B, T-1] per-token NLL; abl None: the clean run.

        sites: more sites for the compiled program's masks, beside the batch's and the engine's."""
        with placed(self.mesh, self.params):   # FSDP's per-layer gathers (sharding.gathered) need it
            return self._losses(abl, per_token, desc, sites)

    def _losses(self, abl: Ablations | None, per_token: bool, desc: str, sites: tuple[str, ...] | None) -> np.ndarray:
        if abl is None:
            abl = Ablations(*(np.zeros((1, 1), dt) for dt in (np.int32,) * 3),
                            np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32))
        if abl.rows == 0:
            raise JaxcritError("empty perturbation batch: give at least one row")
        static = self._static(self._held(set(abl.sites()) | set(sites or ())), bool((abl.value != 0).any()), per_token)
        out = self._run(abl, static, desc)
        redo = np.flatnonzero(np.isnan(out.reshape(abl.rows, -1)).any(1))
        if redo.size:   # the one-pass logsumexp over- or underflowed there (or the row is NaN itself)
            out[redo] = self._run(abl.take(redo), {**static, "exact": True}, f"{desc} (exact logsumexp)")
        return out

    def _run(self, abl: Ablations, static: dict, desc: str) -> np.ndarray:
        """The rows' losses from _chunk_nll with these static arguments, in the caller's order."""
        order, cols, starts = self.plan(abl)
        R, C = abl.rows, self.chunk
        bar = Progress(R, desc, enabled=self.progress and R > C)
        outs, pending = [], []
        for i, start in enumerate(starts):
            lo = i * C
            rows = {k: jax.device_put(v[lo:lo + C], self.rows_sharding) for k, v in cols.items()}
            out = _chunk_nll(self.params, self.cache, self.valid, self.targets, self.tmask, self.shift, rows,
                             jax.device_put(start, self.replicated), **static)
            outs.append(out)
            pending.append((out, min(C, R - lo)))
            if len(pending) > 2:  # keep two chunks in flight; wait (no transfer) to report progress
                done, n = pending.pop(0)
                done.block_until_ready()
                bar.update(n)
        for done, n in pending:
            done.block_until_ready()
            bar.update(n)
        res = processes.to_host(jnp.concatenate(outs))[:R]
        out = np.empty_like(res)
        out[order] = res
        return out

    def deltas(self, abl: Ablations, desc: str = "ablations", sites: tuple[str, ...] | None = None) -> np.ndarray:
        """[R] delta = log10(PPL_masked / PPL_base) = (loss - base) / ln 10; sites as in losses."""
        return (self.losses(abl, desc=desc, sites=sites) - self.base_loss) / LN10


@partial(jax.jit, static_argnames=("cfg", "vocab_chunk"), compiler_options=decoder.COMPILER_OPTIONS)
def _clean_pass(cfg: ModelConfig, params, tokens, valid, vocab_chunk: int) -> tuple[decoder.Cache, jax.Array]:
    """The clean run's cache (decoder.Cache: what rows start from) and its max logit per
    predicting position [B, T-1] (the loss's shift)."""
    h, cache = decoder.clean_cache(cfg, params, tokens, valid)
    _, m = decoder.logsumexp_vocab(cfg, params, h[:, :-1], vocab_chunk)
    return cache, m
