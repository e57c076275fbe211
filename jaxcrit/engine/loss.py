"""The loss head: next-token NLL from final hidden states without the [B, T, vocab] logits.

The vocabulary is processed in chunks (`vocab_split`); each chunk's weights are gathered over
'data' under FSDP as a layer's are (sharding.gathered; else XLA gathers the rows and sums partial
logits across devices). The engine's chunks take the one-pass form: exp(z - shift) summed, shift
the clean run's max logit, its over- and underflows flagged NaN for an exact redo (`rows_logsumexp`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxcrit.dist.sharding import gathered
from jaxcrit.kernels.selection import Kernels
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.decoder import Params, precision, unembed
from jaxcrit.report.summary import LN10

Array = jax.Array


def vocab_split(V: int, chunk: int) -> tuple[int, int]:
    """(chunk size, count) covering V; an exact divisor near `chunk` when there is one."""
    n0 = -(-V // chunk)
    for n in range(n0, 2 * n0 + 1):
        if V % n == 0:
            return V // n, n
    return -(-V // n0), n0


def from_expsum(s: Array, shift: Array) -> Array:
    """logsumexp = shift + log(s) from s = sum_v exp(z_v - shift); NaN where s over- or
    underflowed, so the caller can redo those positions exactly."""
    ok = jnp.isfinite(s) & (s > 1e-30)
    return jnp.where(ok, shift + jnp.log(s), jnp.nan)


def logsumexp_vocab(cfg: ModelConfig, params: Params, h: Array, chunk: int = 16384,
                    shift: Array | None = None) -> tuple[Array, Array]:
    """(logsumexp, max) of the logits [B, T], f32, of hidden states h [B, T, D], the vocabulary
    processed in chunks.

    Without `shift`: online logsumexp (two passes over each chunk). With `shift` [B, T] (e.g. the
    clean run's max logit): one pass, exp(z - shift) summed (`from_expsum`; the max returned is
    the shift). The last chunk is shifted back to stay in range and its already-counted columns masked.
    """
    W = unembed(cfg, params)
    V = W.shape[0]
    c, n = vocab_split(V, chunk)
    exact = c * n == V

    def chunk_logits(i):
        lo = jnp.minimum(i * c, V - c)
        w = gathered({"w": jax.lax.dynamic_slice_in_dim(W, lo, c, axis=0)}, {"w": ("vocab", "embed")})["w"]
        z = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32, precision=precision(h.dtype))
        return z if exact else jnp.where(lo + jnp.arange(c) >= i * c, z, -jnp.inf)

    zeros = jnp.zeros(h.shape[:2], jnp.float32)
    if shift is not None:
        def one_pass(s, i):
            return s + jnp.exp(chunk_logits(i) - shift[..., None]).sum(-1), None
        s, _ = jax.lax.scan(one_pass, zeros, jnp.arange(n))
        return from_expsum(s, shift), shift

    def online(carry, i):
        m, s = carry
        z = chunk_logits(i)
        m2 = jnp.maximum(m, z.max(-1))
        return (m2, s * jnp.exp(m - m2) + jnp.exp(z - m2[..., None]).sum(-1)), None

    (m, s), _ = jax.lax.scan(online, (zeros - jnp.inf, zeros), jnp.arange(n))
    return m + jnp.log(s), m


def target_logit(cfg: ModelConfig, params: Params, h: Array, targets: Array) -> Array:
    """logit of each target token [B, T], f32."""
    w = gathered({"w": jnp.take(unembed(cfg, params), targets, axis=0)}, {"w": ("tokens", "tokens", "embed")})["w"]
    return jnp.einsum("btd,btd->bt", h, w, preferred_element_type=jnp.float32, precision=precision(h.dtype))


def token_nll(cfg: ModelConfig, params: Params, h: Array, targets: Array, chunk: int = 16384) -> Array:
    """-log p(target) [B, T] in f32 of hidden states h [B, T, D], without materialising the logits."""
    return logsumexp_vocab(cfg, params, h, chunk)[0] - target_logit(cfg, params, h, targets)


def rows_logsumexp(cfg: ModelConfig, params: Params, hs: Array, shift: Array, *, vocab_chunk: int,
                   kernels: Kernels, mesh: Mesh, exact: bool) -> Array:
    """The logsumexp [R, B, T] of a chunk's rows of hidden states hs [R, B, T, D].

    One pass shifted by the clean run's max logit shift [B, T] (the fused kernel's, `kernels.expsum`,
    or XLA's), NaN where that over- or underflows. exact: the two-pass form instead, each
    device's rows one at a time (it holds one row's logits chunk, so it fits wherever the one
    pass does).
    """
    lse_of = lambda h, sh=None: logsumexp_vocab(cfg, params, h, vocab_chunk, sh)[0]
    if exact:   # [data, rows per device, ...]: a map over each device's own rows
        local = hs.reshape(mesh.shape["data"], -1, *hs.shape[1:])
        return jax.vmap(lambda h: jax.lax.map(lse_of, h))(local).reshape(hs.shape[:-1])
    if kernels.expsum is not None:
        return from_expsum(kernels.expsum(hs, unembed(cfg, params), shift, mesh), shift)
    return jax.vmap(lambda h: lse_of(h, shift))(hs)
