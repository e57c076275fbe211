"""Prefix sharing at the site: a perturbed row starts inside its first perturbed layer.

The clean pass caches, per layer, the residual entering it and its o_proj and down_proj outputs
(`Cache`); the post-attention residual, the MLP's input and the layer's output follow from these
by the layer's own ops, so every entry gives the numbers the full layer gives. A row whose first
perturbed layer is S starts at the latest entry of S its edits there allow (each site's
`Site.entry`; `start_points`):
  layer: the residual entering S; all of layer S runs (q/k/v edits change the attention).
  mlp:   the post-attention residual, o_proj's edit applied; layer S's MLP runs.
  out:   layer S's output from the clean MLP: down_proj's output edited in place, plus the exact
         rank-1 change of one MLP hidden channel j (gate/up/act edits of that channel:
         (m'_j - m_j) * down_w[j], where m_j = act(gate_j) * up_j); nothing of layer S runs.
A start point is data (`resume`'s traced `start`): one compiled program serves all. Edit slots
(models/edits.py) ride along: a slot at an MLP hidden site needs its layer's MLP run ("mlp").

Positions share the same way: an edit at position t changes nothing before t, so a row whose
earliest edit is at t runs positions t.. alone (`first_positions`, rounded down to one of
POSITION_BUCKETS starts, one program each, in batches of POSITION_ROWS rows or more), attending
over the clean keys and values of the positions before, which follow from the cached residual
entering each layer.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit.engine.ablations import Ablations
from jaxcrit.models import decoder
from jaxcrit.models.edits import Slots
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITES, SITE_NAMES

Array = jax.Array

ENTRIES = ("layer", "mlp", "out")
LAYER, MLP, OUT = range(len(ENTRIES))
SITE_ENTRY: dict[str, int] = {s.name: ENTRIES.index(s.entry) for s in SITES}
HIDDEN = tuple(s.name for s in SITES if s.axis == "mlp")   # the MLP hidden axis's sites ("out" holds one channel)

_SITE_ENTRY = np.array([SITE_ENTRY[n] for n in SITE_NAMES], np.int32)   # by site index
_HIDDEN = np.array([n in HIDDEN for n in SITE_NAMES])


def start_points(abl: Ablations, n_layers: int) -> np.ndarray:
    """[R, 2] where each row can start: (its first perturbed layer S, entry index into ENTRIES),
    the latest start that still runs everything its edits at S change.

    The entry is the earliest any of its edits at S needs (SITE_ENTRY); "out" holds one MLP
    hidden channel, so edits of two hidden channels at S start at "mlp". A row with no edit starts
    after the last layer's MLP (layer L-1, "out": the clean output).
    """
    first = abl.first_layer()
    at = abl.active & (abl.layer == first[:, None])
    entry = np.where(at, _SITE_ENTRY[abl.site], OUT).min(axis=1)
    hid = at & _HIDDEN[abl.site]
    several = np.where(hid, abl.channel, -1).max(1) > np.where(hid, abl.channel, np.iinfo(np.int32).max).min(1)
    entry = np.where(several, np.minimum(entry, MLP), entry)
    none = first == np.iinfo(np.int32).max
    return np.stack([np.where(none, n_layers - 1, first), np.where(none, OUT, entry)], 1).astype(np.int32)


def edit_start_points(abl: Ablations, site: np.ndarray, layer: np.ndarray, n_layers: int) -> np.ndarray:
    """start_points of rows that hold edit slots too (site, layer [R, K] of Slots; site -1 empty):
    each row's earliest of its Ablations' start and its slots' (a slot's entry is its site's, but
    "mlp" for an MLP hidden site: the rank-1 "out" start holds dense edits of one channel only)."""
    E = len(ENTRIES)
    starts = start_points(abl, n_layers)
    key = starts[:, 0] * E + starts[:, 1]
    s = np.maximum(site, 0)
    entry = np.where(_HIDDEN[s], np.minimum(_SITE_ENTRY[s], MLP), _SITE_ENTRY[s])
    slot_key = np.where(site >= 0, layer * E + entry, np.iinfo(np.int32).max).min(1, initial=np.iinfo(np.int32).max)
    return np.stack(np.divmod(np.minimum(key, slot_key), E), 1).astype(np.int32)


POSITION_BUCKETS = 4   # a batch's rows run from at most this many first positions (one compiled program each)
POSITION_ROWS = 512    # batches of fewer rows run every position: the extra programs' compiles would cost more


def first_positions(abl: Ablations, slot_site: np.ndarray | None, slot_position: np.ndarray | None, T: int
                    ) -> np.ndarray:
    """[R] the first position each row runs from (prefix.resume's `first`): its earliest edited
    position rounded down to a multiple of ceil(T / POSITION_BUCKETS). Ablations edit every
    position (0); a slot edits its position (-1: every one); a row without edits runs from the
    last bucket. slot_site, slot_position: [R, K] of the rows' Slots, or None. A batch of fewer
    than POSITION_ROWS rows runs every position (all 0)."""
    if abl.rows < POSITION_ROWS:
        return np.zeros(abl.rows, np.int32)
    earliest = np.where(abl.active.any(1), 0, T - 1)
    if slot_site is not None:
        earliest = np.minimum(earliest, np.where(slot_site >= 0, np.maximum(slot_position, 0), T - 1).min(1))
    g = -(-T // POSITION_BUCKETS)
    return (earliest // g * g).astype(np.int32)


class Cache(NamedTuple):
    """What the clean pass keeps for rows to start at any entry of any layer."""
    resid: Array   # [L + 1, B, T, D] the residual entering each layer, and the last layer's output
    attn: Array    # [L, B, T, D] each layer's o_proj output (the attention branch, bias included)
    mlp: Array     # [L, B, T, D] each layer's down_proj output


def clean_cache(cfg: ModelConfig, params: decoder.Params, tokens: Array, valid: Array | None) -> tuple[Array, Cache]:
    """The clean forward of tokens [B, T]: (final-normed hidden state [B, T, D], the Cache)."""
    h, ys = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), valid,
                            capture=("o_proj", "down_proj", decoder.RESID))
    return h, Cache(ys[decoder.RESID], ys["o_proj"], ys["down_proj"])


def hidden_change(cfg: ModelConfig, p: decoder.Params, mid: Array, masks: decoder.SiteArrays,
                  values: decoder.SiteArrays | None) -> Array:
    """The change of down_proj's output [B, T, D] (f32) when the layer's edits of the MLP hidden
    sites touch one channel j alone (j found from the [F] masks/values; any j when none); mid
    [B, T, D]: the post-attention residual."""
    edited = [masks[n] != 1 for n in HIDDEN if n in masks]
    edited += [values[n] != 0 for n in HIDDEN if values is not None and n in values]
    j = jnp.argmax(functools.reduce(jnp.logical_or, edited))
    x = decoder.norm(cfg, mid, p["post_norm"])
    column = lambda w: jnp.einsum("btd,d->bt", x, w[:, j], precision=decoder.precision(x.dtype))
    g, u = column(p["gate_w"]), column(p["up_w"])
    at_j = lambda arrs: None if arrs is None else {n: arrs[n][j] for n in HIDDEN if n in arrs}

    def m(site) -> Array:   # channel j of the MLP's hidden activations, as the layer computes it
        return decoder.hidden(cfg, site("gate_proj", g), site("up_proj", u), site)

    edited_j = m(decoder.editor(at_j(masks), at_j(values))).astype(jnp.float32)
    change = edited_j - m(decoder.editor(None, None)).astype(jnp.float32)
    return change[..., None] * p["down_w"][j].astype(jnp.float32)


def resume(cfg: ModelConfig, params: decoder.Params, cache: Cache, valid: Array | None, start: Array, *,
           masks: decoder.SiteArrays, values: decoder.SiteArrays | None = None, edited: Array | None = None,
           kernels: decoder.LayerKernels = decoder.XLA, edits: Slots | None = None, first: int = 0) -> Array:
    """The perturbed forward of one row from a start point: the final-normed hidden state [B, T', D]
    of positions first..T-1 (T' = T - first).

    start: int32 [2], (layer S, entry index into ENTRIES), traced: one compiled program serves
    every start point (the entry is a `lax.switch` on it, which stays a real branch under vmap as
    long as start is not batched). masks/values: site -> [L, C]; the row's edits at layers below
    S must be none, and at S only of sites its entry allows (SITE_ENTRY; "out": one hidden channel).
    edited: [L] bool, unbatched, as in `tail` (the layers above S that any row edits).
    edits: the row's edit slots (none below S; at S, as `edit_start_points` allows), their
    positions counted from `first` and their tables holding positions first.. alone.
    first: static; the row edits no position before it, so those positions keep the clean run's
    values in every layer: only positions first.. run, over the clean keys and values before them.
    """
    S, entry = start[0], start[1]
    at = lambda arrs: None if arrs is None else {k: v[S] for k, v in arrs.items()}
    take = lambda a: jax.lax.dynamic_index_in_dim(a, S, keepdims=False)
    p = decoder.layer_params(cfg, {k: take(v) for k, v in decoder.stacked_params(params).items()})
    h, o, d = (take(a)[:, first:] for a in (cache.resid, cache.attn, cache.mlp))
    earlier = cache.resid[:-1, :, :first] if first else None
    m, vals = at(masks), at(values)
    site = decoder.editor(m, vals, edits=edits, layer=S)

    def whole() -> Array:
        cos, sin = decoder.rope_tables(cfg, first + h.shape[1])
        before = None if earlier is None else decoder.Earlier(take(earlier), cos[:first], sin[:first])
        return decoder.block(cfg, p, h, valid, cos[first:], sin[first:], m, vals, kernels, edits, S, before)[0]

    def mlp() -> Array:
        mid = h + site("o_proj", o)
        return mid + decoder.mlp_out(cfg, p, mid, site)

    def out() -> Array:
        mid = h + o
        if any(n in m for n in HIDDEN):
            change = hidden_change(cfg, p, mid, m, vals)
            return mid + site("down_proj", (d.astype(jnp.float32) + change).astype(d.dtype))
        return mid + site("down_proj", d)

    h = jax.lax.switch(entry, (whole, mlp, out))
    return tail(cfg, params, h, valid, S + 1, masks=masks, values=values, edited=edited, kernels=kernels, edits=edits,
                earlier=earlier)


def tail(cfg: ModelConfig, params: decoder.Params, h: Array, valid: Array | None, start: Array, *,
         masks: decoder.SiteArrays | None = None, values: decoder.SiteArrays | None = None,
         edited: Array | None = None, kernels: decoder.LayerKernels = decoder.XLA, edits: Slots | None = None,
         earlier: Array | None = None) -> Array:
    """Layers start..L-1 of the residual h [B, T', D] entering layer `start` (may be traced: loops
    with a traced lower bound, so one program serves every start); the final-normed hidden state.

    edited: [L] bool, unbatched under vmap: the layers whose masks/values (or edit slots) hold an
    edit in any row. The layers up to the last of them run with the edits; the layers after it
    run without masks, as fast as the clean forward and on the kernels' fused paths (a mask
    product after down_proj keeps cuBLAS from adding the residual in its epilogue).
    earlier: the residual entering each layer at the positions before h's, [L, B, P, D] (h holds
    positions P..; decoder.Earlier), or None: h holds every position.
    """
    P = 0 if earlier is None else earlier.shape[2]
    cos, sin = decoder.rope_tables(cfg, P + h.shape[1])
    layer_p = decoder.stacked_params(params)

    def layers(m, vals, slots):
        def layer(i, h):
            at = lambda tree: {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in tree.items()}
            before = None if earlier is None else decoder.Earlier(
                jax.lax.dynamic_index_in_dim(earlier, i, keepdims=False), cos[:P], sin[:P])
            return decoder.block(cfg, at(layer_p), h, valid, cos[P:], sin[P:], at(m) or None, at(vals) or None, kernels,
                                 slots, i, before)[0]
        return layer

    edit = layers(masks or {}, values or {}, edits)
    if edited is None or not (masks or values or edits is not None):
        h = jax.lax.fori_loop(start, cfg.n_layers, edit, h)
    else:
        end = jnp.maximum(start, jnp.max(jnp.where(edited, jnp.arange(cfg.n_layers) + 1, 0)))
        h = jax.lax.fori_loop(start, end, edit, h)
        h = jax.lax.fori_loop(end, cfg.n_layers, layers({}, {}, None), h)
    return decoder.final_norm(cfg, params, h)
