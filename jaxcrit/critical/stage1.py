"""Stage 1: importance by input perturbation, batched over noise samples on device.

importance(site, pos, channel) = mean_k |A_clean - A_noisy_k|, with A_noisy_k the site outputs
when alpha * N(0, I) is added to the input embeddings E(x). Noise sample k is drawn from
fold_in(key(seed), k), so the noise does not depend on the chunking and a resumed run is identical.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit.dist import processes
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES, width
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.progress import Progress


@dataclasses.dataclass
class Importance:
    """Per-site running sums and the number of samples they hold; scores = sums / k.

    The sums stay where they were computed (device arrays) until someone asks for host copies:
    all nine sites of a model are ~100 MB per copy at 113 tokens for SmolLM2-135M."""
    sums: dict[str, np.ndarray | jax.Array]  # site -> [L, T, C] f32
    k: int

    def scores(self) -> dict[str, np.ndarray]:
        return {s: v / max(self.k, 1) for s, v in self.sums.items()}


def noise(key: jax.Array, ks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Standard normal noise of samples ks [n] -> [n, *shape], f32; sample k depends on k alone."""
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32))(ks)


def batch_shapes(cfg: ModelConfig, T: int, n: int, sharding) -> tuple[jax.ShapeDtypeStruct, ...]:
    """`differences`' noise batch as shapes under this sharding: eps [n, T, D], alpha [] and
    weight [n], all f32 (what the memory plan compiles it with, beside params and tokens [1, T])."""
    f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
    return f32((n, T, cfg.d_model)), f32(()), f32((n,))


@partial(jax.jit, static_argnames=("cfg",), compiler_options=decoder.COMPILER_OPTIONS)
def differences(cfg: ModelConfig, params, tokens, eps, alpha, weight):
    """Sum over the rows of eps [n, T, D] f32 (weight 1; padding rows 0) of |A_clean - A_noisy|,
    site -> [L, T, C] f32, for tokens [1, T] and the noise scale alpha.

    One forward over n + 1 sequences: row 0 is the clean pass (zero noise), rows 1.. the noisy
    ones. The differences are reduced over the rows inside the layer scan (decoder's `observe`),
    so no [n, L, T, C] activations exist. The clean pass runs in the same program as the noisy
    ones; XLA may still round a row's elementwise ops differently by its place in the batch, so
    zero noise gives scores at f32 rounding level (~1e-7 of the activations), not exact zeros.
    """
    e = decoder.embed(cfg, params, tokens)                                  # [1, T, D]
    z = jnp.concatenate([jnp.zeros_like(eps[:1]), eps])                     # [n + 1, T, D]
    x = (e.astype(jnp.float32) + alpha * z).astype(e.dtype)

    def observe(sites):
        def one(a):   # a sum unrolled over the rows: XLA:CPU reduces a leading axis 2x slower
            a = a.astype(jnp.float32)
            return sum(jnp.abs(a[i + 1] - a[0]) * weight[i] for i in range(eps.shape[0]))
        return {s: one(a) for s, a in sites.items()}                        # [T, C]

    return decoder.forward(cfg, params, x, observe=observe)[1]["observed"]


@partial(jax.jit, donate_argnames=("sums",))
def _add(sums, diffs):
    return {s: sums[s] + diffs[s] for s in sums}


PROGRAMS = (differences, _add)   # compiled for this stage alone (runner.release_memory drops them after it)


def _accumulate(cfg: ModelConfig, params, tokens, sums, eps, alpha, weight):
    """sums + one batch's differences (a separate program, so the big one never sees the sums'
    changing placement and compiles once)."""
    return _add(sums, differences(cfg, params, tokens, eps, alpha, weight))


def importance(cfg: ModelConfig, params: dict, tokens: np.ndarray, *, alpha: float, samples: int,
               seed: int, chunk: int = 8, noise_array: np.ndarray | None = None,
               state: Importance | None = None, on_chunk: Callable[[Importance], None] | None = None,
               progress: bool = True) -> Importance:
    """Mean |A_clean - A_noisy| per (site, layer, position, channel) over `samples` noise draws.

    tokens [T]. noise_array [samples, T, D] replaces the seeded noise (to compare with another
    implementation on identical draws). state resumes a partial run; on_chunk is called after
    every chunk with the state so far (for checkpointing). chunk: samples per vmapped batch.
    """
    tok = jnp.asarray(np.asarray(tokens)[None], jnp.int32)
    T = tok.shape[1]
    zeros = jnp.zeros((chunk, T, cfg.d_model), jnp.float32)
    if state is None:
        state = Importance({s: np.zeros((cfg.n_layers, T, width(cfg, s)), np.float32) for s in SITE_NAMES}, 0)
    sums = {s: jnp.asarray(v) for s, v in state.sums.items()}
    key = jax.random.key(seed)
    bar = Progress(samples, "stage 1 noisy passes", unit="pass", enabled=progress, initial=state.k)
    k = state.k
    while k < samples:
        n = min(chunk, samples - k)
        if noise_array is not None:
            eps = jnp.asarray(noise_array[k:k + n], jnp.float32)
        else:
            eps = noise(key, jnp.arange(k, k + n), (T, cfg.d_model))
        # every batch has `chunk` rows (zero-noise padding, weight 0): one compiled program
        eps = jnp.concatenate([eps, zeros[:chunk - n]])
        weight = (jnp.arange(chunk) < n).astype(jnp.float32)
        sums = _accumulate(cfg, params, tok, sums, eps, jnp.float32(alpha), weight)
        k += n
        bar.update(n)
        if on_chunk is not None:
            on_chunk(Importance({s: processes.to_host(v) for s, v in sums.items()}, k))
    return Importance(sums, k)


@partial(jax.jit, static_argnames=("k",))
def _top_k(flat: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    return jax.lax.top_k(flat, k)


def rank(scores: dict[str, np.ndarray | jax.Array], top_n: int, threshold: float, per_position: bool) -> NeuronSet:
    """Top-N entries above threshold, descending; the selection runs on device.

    scores: site -> [L, T, C] for any subset of the sites (T may be 1 for channel scores).
    per_position: entries are (site, layer, position, channel), the reference's list (a channel
    can appear at several positions). Otherwise (site, layer, channel) scored by the max over
    positions, which is what masking acts on. Ties keep layer-major, then site, position and
    channel order (the reference's insertion order).
    """
    blocks, meta = [], []
    for s in (s for s in SITE_NAMES if s in scores):
        v = jnp.asarray(scores[s])          # [L, T, C]
        if not per_position:
            v = v.max(axis=1, keepdims=True)
        blocks.append(v.reshape(v.shape[0], -1))
        meta.append((s, v.shape[1], v.shape[2]))
    flat = jnp.concatenate(blocks, axis=1)  # [L, sum_s T_s * C_s], layer-major
    per_layer = flat.shape[1]
    vals, keep = (processes.to_host(x) for x in _top_k(flat.reshape(-1), min(top_n, flat.size)))
    above = vals > threshold
    vals, keep = vals[above], keep[above].astype(np.int64)
    order = np.lexsort((keep, -vals))
    keep, vals = keep[order], vals[order]
    layer, off = np.divmod(keep, per_layer)
    bounds = np.cumsum([0] + [t * c for _, t, c in meta])
    which = np.searchsorted(bounds, off, side="right") - 1
    off = off - bounds[which]
    Cs = np.array([c for _, _, c in meta])[which]
    seq, ch = np.divmod(off, Cs)
    if not per_position:
        seq = np.full_like(seq, -1)
    names = np.array([m[0] for m in meta])[which]
    return NeuronSet(names.astype(str), layer, ch, seq, vals.astype(np.float32))
