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
from jaxcrit.critical.stage1 import rank
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES, width
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.progress import Memo, no_memo

@partial(jax.jit, static_argnames=("cfg",))
def _activations(cfg: ModelConfig, params, tokens):
    _, acts = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), capture=SITE_NAMES)
    return {s: a[:, 0].astype(jnp.float32) for s, a in acts.items()}   # [L, T, C]


@partial(jax.jit, static_argnames=("cfg",))
def _gradients(cfg: ModelConfig, params, tokens):
    def loss(values):
        h, _ = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), values=values, remat=True)
        return E.token_nll(cfg, params, h[:, :-1], tokens[:, 1:]).mean()
    zeros = {s: jnp.zeros((cfg.n_layers, width(cfg, s)), jnp.float32) for s in SITE_NAMES}
    return jax.grad(loss)(zeros)


PROGRAMS = (_activations, _gradients)   # compiled for this stage alone (pipeline.release_memory drops them after it)


def _random(cfg: ModelConfig, params: dict, tok: jax.Array, top_n: int, seed: int) -> NeuronSet:
    total = sum(cfg.n_layers * width(cfg, s) for s in SITE_NAMES)
    r = E.random_sets(cfg, SITE_NAMES, 1, min(top_n, total), seed)
    return NeuronSet.make(np.array(SITE_NAMES)[r.site[0]], r.layer[0], r.channel[0])


def _activation(cfg: ModelConfig, params: dict, tok: jax.Array, top_n: int, seed: int) -> NeuronSet:
    return rank(_activations(cfg, params, tok), top_n, -np.inf, per_position=False)


def _gradient(cfg: ModelConfig, params: dict, tok: jax.Array, top_n: int, seed: int) -> NeuronSet:
    grads = _gradients(cfg, params, tok)
    return rank({s: g[:, None, :] for s, g in grads.items()}, top_n, -np.inf, per_position=False)


def _massive(cfg: ModelConfig, params: dict, tok: jax.Array, top_n: int, seed: int) -> NeuronSet:
    return rank({"down_proj": jnp.abs(_activations(cfg, params, tok)["down_proj"])}, top_n, -np.inf,
                per_position=False)


BASELINES = {"random": _random, "activation": _activation, "gradient": _gradient, "massive": _massive}


def ranking(name: str, cfg: ModelConfig, params: dict, tokens: np.ndarray, top_n: int, seed: int) -> NeuronSet:
    """The baseline's ranked channels (top_n of them); seed matters to random only."""
    tok = jnp.asarray(np.asarray(tokens)[None], jnp.int32)
    return BASELINES[name](cfg, params, tok, top_n, seed)


def score_packed(engine: E.Engine, units: dict[str, E.Ablations], *, desc: str,
                 memo: Memo = no_memo) -> dict[str, np.ndarray]:
    """Deltas of each unit's rows. Units are packed in order into batches of about one engine
    chunk (a unit is never split), so small units do not each pay for a padded chunk; memo keeps
    each batch's deltas as one unit ("batch-i"). The plan depends on the units alone, so a resumed
    run scores the missing batches with the same rows (and the same rounding)."""
    batches: list[list[tuple[str, E.Ablations]]] = [[]]
    for k, abl in units.items():   # fill each batch up to one chunk; a unit larger than that goes alone
        if batches[-1] and sum(a.rows for _, a in batches[-1]) + abl.rows > engine.chunk:
            batches.append([])
        batches[-1].append((k, abl))
    out = {}
    for i, batch in enumerate(batches):
        done = memo(f"batch-{i}", lambda: engine.deltas(_concat([a for _, a in batch]),
                                                        desc=f"{desc} {', '.join(k for k, _ in batch)}"))
        out.update(zip((k for k, _ in batch), np.split(done, np.cumsum([a.rows for _, a in batch])[:-1])))
    return out


def _concat(parts: list[E.Ablations]) -> E.Ablations:
    """Rows of several batches in one; shorter rows padded with inactive entries (scale 1, value 0)."""
    K = max(p.site.shape[1] for p in parts)
    cols = {f: np.concatenate([np.pad(getattr(p, f), ((0, 0), (0, K - p.site.shape[1])), constant_values=v)
                               for p in parts]) for f, v in E.INACTIVE.items()}
    return E.Ablations(**cols)
