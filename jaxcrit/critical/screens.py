"""Cheap per-neuron screens of every site, layer and channel, for the whole-model map.

A screen gives each neuron a value that ranks it as a candidate for exact verification
(critical/maps.py); none of them is a measured delta.

    first_order  the attribution-patching estimate of zeroing the neuron, in delta units:
                 (L(mask = 0) - L(mask = 1)) / ln 10 ~ -dL/dm / ln 10 = sum_t g_t (0 - a_t) / ln 10,
                 with m the site's [L, C] mask (zeroing acts at every position, so the
                 derivative w.r.t. the mask sums g_t * a_t over positions t), L the mean token NLL.
    magnitude    max over positions of |A| (the massive-activation detector, every site).
    importance   Stage 1's score (max over positions); NaN where the ranking does not hold it.

first_order and magnitude come from one forward and one backward pass (layers rematerialised):
the gradient w.r.t. all-ones masks, and |A| reduced inside the layer scan (decoder's observe).
Screens are per-site [L, C] arrays, or one flat [N] vector over `universe` order.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.dist import processes
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES, width
from jaxcrit.models.neurons import NeuronSet

SiteArrays = dict[str, np.ndarray]

# screen -> the units of its values (only a screen in delta units has an error against the exact delta)
SCREENS = {"first_order": "delta", "magnitude": "activation", "importance": "stage 1 score"}


@partial(jax.jit, static_argnames=("cfg",))
def _gradient_pass(cfg: ModelConfig, params, tokens) -> tuple[dict, dict]:
    """(first-order delta estimates, max |A|): two dicts site -> [L, C] f32; tokens [1, T]."""
    def loss(masks):
        h, ys = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), masks=masks, remat=True,
                                observe=lambda sites: {s: jnp.abs(a.astype(jnp.float32)).max((0, 1))
                                                       for s, a in sites.items()})
        return E.token_nll(cfg, params, h[:, :-1], tokens[:, 1:]).mean(), ys["observed"]

    ones = {s: jnp.ones((cfg.n_layers, width(cfg, s)), jnp.float32) for s in SITE_NAMES}
    grads, magnitude = jax.grad(loss, has_aux=True)(ones)
    return {s: -g / E.LN10 for s, g in grads.items()}, magnitude


PROGRAMS = (_gradient_pass,)   # compiled for this stage alone (pipeline.release_memory drops them after it)


def gradient_screens(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> dict[str, SiteArrays]:
    """{"first_order": site -> [L, C], "magnitude": site -> [L, C]} of the text tokens [T]."""
    tok = jnp.asarray(np.asarray(tokens)[None], jnp.int32)
    first, mag = _gradient_pass(cfg, params, tok)
    as_np = lambda d: {s: processes.to_host(v).astype(np.float32) for s, v in d.items()}
    return {"first_order": as_np(first), "magnitude": as_np(mag)}


def from_ranking(cfg: ModelConfig, ranking: NeuronSet) -> SiteArrays:
    """Stage 1's scores as site -> [L, C], the max over a channel's positions; NaN where unranked."""
    out = {s: np.full((cfg.n_layers, width(cfg, s)), -np.inf, np.float32) for s in SITE_NAMES}
    for s in np.unique(ranking.site):
        mine = ranking.site == s
        np.maximum.at(out[str(s)], (ranking.layer[mine], ranking.channel[mine]), ranking.score[mine])
    return {s: np.where(np.isneginf(v), np.nan, v) for s, v in out.items()}


# ----------------------------------------------------------------------------- flat order

def universe(cfg: ModelConfig) -> NeuronSet:
    """Every neuron of the model, site by site (SITE_NAMES order), then layer, then channel: the
    order of flat [N] screen vectors."""
    parts = [np.meshgrid(np.arange(cfg.n_layers), np.arange(width(cfg, s)), indexing="ij") for s in SITE_NAMES]
    return NeuronSet.make(np.concatenate([np.full(l.size, s) for s, (l, _) in zip(SITE_NAMES, parts)]),
                          np.concatenate([l.ravel() for l, _ in parts]), np.concatenate([c.ravel() for _, c in parts]))


def flat(per_site: SiteArrays) -> np.ndarray:
    """site -> [L, C] arrays as one [N] f32 vector in universe order."""
    return np.concatenate([np.asarray(per_site[s], np.float32).ravel() for s in SITE_NAMES])


def unflat(cfg: ModelConfig, v: np.ndarray) -> SiteArrays:
    """Inverse of flat."""
    sizes = [cfg.n_layers * width(cfg, s) for s in SITE_NAMES]
    return {s: part.reshape(cfg.n_layers, -1) for s, part in zip(SITE_NAMES, np.split(v, np.cumsum(sizes)[:-1]))}
