"""The study's measurements: the paper's claims checked on one model and its texts.

Overlaps of neuron sets (Jaccard), the steps where a Stage 2 curve falls, Stage 1 and Stage 2
again with one setting changed, a ranking's prefixes scored by an engine of another dtype, and the
largest down_proj outputs and residual values. Pure functions of a model's config and params, an
engine and arrays; jaxcrit/run/stages/study.py runs them as stages and keeps their units.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.critical import stage1, stage2
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.models.sites import module_path
from jaxcrit.progress import Memo, no_memo

DROP = 0.5            # a step of the main curve lowering delta by more than this is analysed (modes)
DTYPE_PREFIXES = 32   # prefixes of the ranking scored in every dtype
KEPT = 100            # ranked neurons kept per stability variant (overlaps of the top 10 and top 100)

Key = tuple[str, int, int]


def jaccard(a: Iterable, b: Iterable) -> float:
    """|A & B| / |A | B| of two collections of neuron keys (1 for two empty sets)."""
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return len(a & b) / len(a | b) if a | b else 1.0


def critical_keys(ranking: NeuronSet, g: stage2.Growth) -> list[Key]:
    """The distinct neurons of the first prefix reaching epsilon (none if no prefix did)."""
    return list(dict.fromkeys(ranking[:g.critical_n].keys())) if g.critical_n else []


# ----------------------------------------------------------------------------- modes

def drops(engine: E.Engine, ranked: NeuronSet, main: stage2.Growth, memo: Memo = no_memo) -> list[dict]:
    """Each step of the main curve (of the first ten) where delta falls by more than DROP: the
    neuron added there, its own delta, and the delta of the ranking's first neuron together with
    it. memo keeps both rows of deltas [2, steps] under "drops"."""
    steps = [int(n) for n, d0, d1 in zip(main.ns[1:], main.deltas[:-1], main.deltas[1:]) if d1 < d0 - DROP][:10]
    if not steps:
        return []
    added, first = ranked[np.array(steps) - 1], ranked[[0] * len(steps)]
    both = lambda f: np.stack([getattr(added, f), getattr(first, f)], 1)
    alone = E.make(added.site_index(), added.layer, added.channel, cfg=engine.cfg)
    pair = E.make(np.stack([added.site_index(), first.site_index()], 1), both("layer"), both("channel"), cfg=engine.cfg)
    d = memo("drops", lambda: np.stack([engine.deltas(alone), engine.deltas(pair)]))
    return [{"n": n, "before": main.delta(n - 1), "after": main.delta(n), "added": added[[i]].records()[0],
             "alone": float(d[0, i]), "with_first": float(d[1, i])} for i, n in enumerate(steps)]


# ----------------------------------------------------------------------------- stability

def variant(cfg: ModelConfig, params: dict, engine: E.Engine, tokens: np.ndarray, critical: NeuronSet | None, *,
            alpha: float, samples: int, seed: int, batch: int, top_n: int, threshold: float, position: bool,
            epsilon: float, max_steps: int, progress: bool, desc: str) -> dict[str, np.ndarray]:
    """Stage 1 on tokens [T] and Stage 2 (to epsilon) through an engine on the same tokens; with a
    critical set (the main run's, on another text), also its delta here. Arrays: the top KEPT
    neurons (site index, layer, channel, score), the curve (ns, deltas), tokens, transfer [1]."""
    imp = stage1.importance(cfg, params, tokens, alpha=alpha, samples=samples, seed=seed, chunk=min(batch, samples),
                            progress=progress)
    ranked = stage1.rank(imp.scores(), top_n, threshold, position)
    g = stage2.grow(engine, ranked, epsilon=epsilon, max_steps=max_steps, full_curve=False, desc=desc)
    transfer = np.full(1, np.nan) if critical is None else engine.deltas(E.make(
        critical.site_index()[None], critical.layer[None], critical.channel[None], cfg=cfg))
    top = ranked[:KEPT]
    return {"site": top.site_index(), "layer": top.layer, "channel": top.channel, "score": top.score,
            "ns": g.ns, "deltas": g.deltas, "tokens": np.asarray(len(tokens)), "transfer": transfer.astype(np.float64)}


def compare(top_keys: list[Key], g: stage2.Growth, main_top: list[Key], main_keys: list[Key]) -> tuple[dict, list[Key]]:
    """A variant's critical n and set (its first critical_n ranked keys, if within the KEPT kept),
    and its overlaps with the main run: shared top 10, Jaccard of the top KEPT and of the critical
    sets. Returns the record and the variant's critical keys."""
    crit = list(dict.fromkeys(top_keys[:g.critical_n])) if g.critical_n and g.critical_n <= KEPT else []
    return {"critical_n": g.critical_n, "delta": float(g.deltas[-1]) if len(g.deltas) else None,
            "critical": [{"layer_name": module_path(s, l), "channel": ch} for s, l, ch in crit],
            "top10_overlap": len(set(top_keys[:10]) & set(main_top[:10])),
            "top100_jaccard": jaccard(top_keys[:KEPT], main_top[:KEPT]),
            "critical_jaccard": jaccard(crit, main_keys)}, crit


# ----------------------------------------------------------------------------- dtypes

def dtype_prefixes(main: stage2.Growth) -> np.ndarray:
    """The prefix sizes scored in every dtype: the main curve's first DTYPE_PREFIXES and its last n."""
    return np.unique(np.concatenate([main.ns[:DTYPE_PREFIXES], [main.last_n]])).astype(int)


def prefix_losses(engine: E.Engine, ranking: NeuronSet, ns: np.ndarray, desc: str) -> np.ndarray:
    """[1 + len(ns)] float64: the engine's base loss, then the delta of each prefix of the ranking."""
    d = engine.deltas(E.prefixes(engine.cfg, ranking.site, ranking.layer, ranking.channel, ns), desc=desc)
    return np.concatenate([[engine.base_loss], d]).astype(np.float64)


def dtype_record(losses: np.ndarray, main: stage2.Growth, ns: np.ndarray) -> dict:
    """One dtype's base loss and log10 PPL, the delta at the main critical n, and the curve over ns."""
    return {"base_loss": float(losses[0]), "base_ppl_log10": float(losses[0] / E.LN10),
            "critical_n": main.critical_n, "critical_delta": float(losses[1:][list(ns).index(main.last_n)]),
            "curve": [{"n": int(n), "delta": float(d)} for n, d in zip(ns, losses[1:])]}


# ----------------------------------------------------------------------------- relations

@partial(jax.jit, static_argnames=("cfg",))
def magnitudes(cfg: ModelConfig, params: dict, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """|down_proj output| [L, T, C] and |residual stream| entering each layer and leaving the last
    [L + 1, T, D] of tokens [1, T]."""
    _, ys = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), capture=("down_proj", decoder.RESID))
    return jnp.abs(ys["down_proj"][:, 0]).astype(jnp.float32), jnp.abs(ys[decoder.RESID][:, 0]).astype(jnp.float32)


def relations(cfg: ModelConfig, params: dict, tokens: np.ndarray, critical: NeuronSet, top: int,
              decode: Callable[[list[int]], str]) -> dict:
    """The `top` largest down_proj output channels by max |A| over positions (with the position
    and token of the max), each critical neuron's rank among all down_proj channels, and per layer
    the largest |residual| value (the massive activations of Sun et al. 2024). tokens: [T]."""
    down, resid = (np.asarray(x) for x in magnitudes(cfg, params, jnp.asarray(tokens[None])))
    L, T, C = down.shape
    peak, where = down.max(1), down.argmax(1)                                # [L, C]
    order = np.argsort(-peak.ravel(), kind="stable")
    rank = np.empty(L * C, int)
    rank[order] = np.arange(1, L * C + 1)
    token = lambda t: decode([int(tokens[t])])

    def row(l: int, ch: int) -> dict:
        t = int(where[l, ch])
        return {"layer_name": module_path("down_proj", l), "layer": l, "channel": ch, "max_abs": float(peak[l, ch]),
                "position": t, "token": token(t), "rank": int(rank[l * C + ch]),
                "median_abs": float(np.median(down[l, :, ch]))}

    res = []
    for l in range(resid.shape[0]):
        t, d = np.unravel_index(int(resid[l].argmax()), resid[l].shape)
        res.append({"entering_layer": l, "max_abs": float(resid[l, t, d]), "position": int(t), "token": token(t),
                    "dim": int(d), "median_abs": float(np.median(resid[l]))})
    return {"down_proj_channels": L * C, "top": [row(int(i) // C, int(i) % C) for i in order[:top]],
            "critical": [row(int(l), int(ch)) if s == "down_proj" else {"layer_name": module_path(s, int(l)),
                                                                          "channel": int(ch), "rank": None}
                         for s, l, ch in critical.keys()],
            "residual": res}
