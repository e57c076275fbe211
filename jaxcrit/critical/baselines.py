"""Baseline rankings, grown with the same Stage 2 machinery as the paper's ranking.

random: uniformly drawn channels of the nine sites (lm_head is not a site here);
activation: signed activation, max over positions; gradient: signed dLoss/dA summed over
positions (the gradient of a channel-wide shift, one jax.grad); massive: largest |down_proj
output| over positions (the one-pass massive-activation detector).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.critical.stage1 import Ranking
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES, width

BASELINES = ("random", "activation", "gradient", "massive")


def _top(scores: dict[str, np.ndarray], top_n: int) -> Ranking:
    """Channel-level top-N of site -> [L, C] scores, descending (ties: layer-major order)."""
    flat = [v.reshape(-1) for v in scores.values()]
    names = np.concatenate([np.full(v.size, s) for s, v in scores.items()])
    layers = np.concatenate([np.repeat(np.arange(v.shape[0]), v.shape[1]) for v in scores.values()])
    chans = np.concatenate([np.tile(np.arange(v.shape[1]), v.shape[0]) for v in scores.values()])
    flat = np.concatenate(flat)
    order = np.argsort(-flat, kind="stable")[:top_n]
    return Ranking(names[order], layers[order], np.full(len(order), -1), chans[order], flat[order].astype(np.float32))


@partial(jax.jit, static_argnames=("cfg",))
def _activations(cfg: ModelConfig, params, tokens):
    _, acts = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), capture=SITE_NAMES)
    return {s: a[:, 0].astype(jnp.float32) for s, a in acts.items()}   # [L, T, C]


@partial(jax.jit, static_argnames=("cfg",))
def _gradients(cfg: ModelConfig, params, tokens):
    def loss(values):
        h, _ = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), values=values)
        return decoder.token_nll(cfg, params, h[:, :-1], tokens[:, 1:]).mean()
    zeros = {s: jnp.zeros((cfg.n_layers, width(cfg, s)), jnp.float32) for s in SITE_NAMES}
    return jax.grad(loss)(zeros)


def ranking(name: str, cfg: ModelConfig, params: dict, tokens: np.ndarray, top_n: int, seed: int) -> Ranking:
    """The baseline's ranked channels (top_n of them)."""
    tok = jnp.asarray(np.asarray(tokens)[None], jnp.int32)
    if name == "random":
        total = sum(cfg.n_layers * width(cfg, s) for s in SITE_NAMES)
        r = E.random_sets(cfg, SITE_NAMES, 1, min(top_n, total), seed)
        return Ranking(np.array(SITE_NAMES)[r.site[0]], r.layer[0], np.full(r.site.shape[1], -1), r.channel[0],
                       np.zeros(r.site.shape[1], np.float32))
    if name == "activation":
        acts = _activations(cfg, params, tok)
        return _top({s: np.asarray(a).max(axis=1) for s, a in acts.items()}, top_n)
    if name == "gradient":
        grads = _gradients(cfg, params, tok)
        return _top({s: np.asarray(g) for s, g in grads.items()}, top_n)
    if name == "massive":
        acts = _activations(cfg, params, tok)
        return _top({"down_proj": np.abs(np.asarray(acts["down_proj"])).max(axis=1)}, top_n)
    raise ValueError(name)
