"""Ground truth by exhaustion: single-neuron deltas, and greedy growth on measured deltas."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxcrit import engine as E
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import width
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.progress import Memo, no_memo


def neurons(cfg: ModelConfig, sites: Sequence[str], layers: Sequence[int],
            channels: Sequence[int] | None = None) -> NeuronSet:
    """Every (site, layer, channel) to scan, deepest layers first (so chunks share the prefix);
    channels None: every channel of each site."""
    parts = []
    for s in sites:
        l, c = np.meshgrid(sorted(layers, reverse=True),
                           np.arange(width(cfg, s)) if channels is None else np.asarray(channels), indexing="ij")
        parts.append((np.full(l.size, s), l.ravel(), c.ravel()))
    return NeuronSet.make(*(np.concatenate([p[i] for p in parts]) if parts else [] for i in range(3)))


def targets(cfg: ModelConfig, sites: Sequence[str], layers: Sequence[int], channels: Sequence[int] | None = None, *,
            top: int = 0, ranking: NeuronSet | None = None) -> NeuronSet:
    """The neurons a scan covers: sites x layers x channels (None: all), or with `top` the first
    `top` distinct channels of each site and layer in the ranking (deepest layers first)."""
    if not top:
        return neurons(cfg, sites, layers, channels)
    parts = []
    for site in sites:
        for layer in sorted(layers, reverse=True):
            mine = ranking[(ranking.site == site) & (ranking.layer == layer)]
            parts.append(neurons(cfg, [site], [layer], list(dict.fromkeys(int(x) for x in mine.channel))[:top]))
    return NeuronSet.make(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("site", "layer", "channel")))


def scan(engine: E.Engine, todo: NeuronSet, *, block: int, memo: Memo = no_memo) -> NeuronSet:
    """The neurons with their single-neuron deltas as scores, computed in blocks of `block` rows;
    memo(key, compute) may keep each block's deltas, so a resumed run scores only what it lacks."""
    deltas = []
    for lo in range(0, len(todo), block):
        part = todo[lo:lo + block]
        deltas.append(memo(f"block-{lo}", lambda: engine.deltas(
            E.make(part.site, part.layer, part.channel, cfg=engine.cfg), desc=f"scan {lo}/{len(todo)}")))
    d = np.concatenate(deltas).astype(np.float32) if deltas else np.zeros(0, np.float32)
    return NeuronSet(todo.site, todo.layer, todo.channel, todo.position, d)


def top(scanned: NeuronSet, size: int) -> NeuronSet:
    """The `size` neurons with the largest scores (deltas), largest first."""
    return scanned[np.argsort(-scanned.score, kind="stable")[:size]]


def greedy(engine: E.Engine, pool: NeuronSet, *, steps: int, epsilon: float, memo: Memo = no_memo) -> list[dict]:
    """Adds, step by step, the pool neuron that raises delta most (measured, not predicted).

    Returns one record per step: the neuron added and the set's delta. Stops at epsilon. memo
    keeps each step's [pool index, delta].
    """
    chosen: list[int] = []
    path = []
    width_ = min(steps, len(pool))   # every step's rows padded to this many entries: one compiled shape
    for step in range(width_):
        cand = [i for i in range(len(pool)) if i not in chosen]

        def best() -> np.ndarray:
            sets = np.array([chosen + [i] + [i] * (width_ - step - 1) for i in cand])
            live = np.arange(width_) <= step
            d = engine.deltas(E.make(pool.site[sets], pool.layer[sets], pool.channel[sets], np.where(live, 0.0, 1.0)[None],
                                     cfg=engine.cfg), desc=f"greedy step {step + 1}")
            return np.array([cand[int(np.argmax(d))], d.max()], np.float64)

        i, d = memo(f"step-{step}", best)
        chosen.append(int(i))
        (rec,) = pool[[int(i)]].records()
        path.append({"step": step + 1, **{k: rec[k] for k in ("layer_name", "site", "layer", "channel")},
                     "delta": float(d)})
        if d >= epsilon:
            break
    return path
