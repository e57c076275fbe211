"""Ground truth by exhaustion: single-neuron deltas, and greedy growth on measured deltas."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from jaxcrit import engine as E
from jaxcrit.models.sites import SITE_INDEX, SITE_NAMES


def scan_rows(cfg, sites: Sequence[str], layers: Sequence[int], channels: Sequence[int] | None = None) -> E.Ablations:
    """One row per (site, layer, channel), deepest layers first (so chunks share the prefix);
    channels None: every channel of each site."""
    parts = [E.single(cfg, s, layers=sorted(layers, reverse=True), channels=channels) for s in sites]
    cat = lambda f: np.concatenate([getattr(p, f) for p in parts])
    return E.Ablations(cat("site"), cat("layer"), cat("channel"), cat("scale"), cat("value"))


def scan(engine: E.Engine, abl: E.Ablations, *, block: int, done: np.ndarray | None = None,
         on_block: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
    """[R] single-neuron deltas, computed in blocks of `block` rows; `done` resumes a partial
    result (the deltas of its first rows), on_block(deltas so far) checkpoints after each block."""
    out = np.asarray(done if done is not None else np.zeros(0, np.float32), np.float32)
    while len(out) < abl.rows:
        lo = len(out)
        idx = np.arange(lo, min(lo + block, abl.rows))
        out = np.concatenate([out, engine.deltas(abl.take(idx), desc=f"scan {lo}/{abl.rows}").astype(np.float32)])
        if on_block is not None:
            on_block(out)
    return out


def scan_records(abl: E.Ablations, deltas: np.ndarray) -> list[dict]:
    return [{"site": SITE_NAMES[s], "layer": int(l), "channel": int(c), "delta": float(d)}
            for s, l, c, d in zip(abl.site[:, 0], abl.layer[:, 0], abl.channel[:, 0], deltas)]


def greedy(engine: E.Engine, pool: Sequence[tuple[str, int, int]], *, steps: int, epsilon: float) -> list[dict]:
    """Adds, step by step, the pool neuron that raises delta most (measured, not predicted).

    Returns one record per step: the neuron added and the set's delta. Stops at epsilon.
    """
    chosen: list[tuple[str, int, int]] = []
    path = []
    for step in range(min(steps, len(pool))):
        cand = [c for c in pool if c not in chosen]
        sets = [chosen + [c] for c in cand]
        arr = np.array([[(SITE_INDEX[s], l, ch) for s, l, ch in row] for row in sets])
        d = engine.deltas(E.make(arr[..., 0], arr[..., 1], arr[..., 2], cfg=engine.cfg), desc=f"greedy step {step + 1}")
        best = int(np.argmax(d))
        chosen.append(cand[best])
        s, l, ch = cand[best]
        path.append({"step": step + 1, "site": s, "layer": l, "channel": ch, "delta": float(d[best])})
        if d[best] >= epsilon:
            break
    return path


def top_pool(abl: E.Ablations, deltas: np.ndarray, size: int) -> list[tuple[str, int, int]]:
    """The `size` neurons of a scan with the largest single deltas: the greedy search's pool."""
    idx = np.argsort(-deltas, kind="stable")[:size]
    return [(SITE_NAMES[abl.site[i, 0]], int(abl.layer[i, 0]), int(abl.channel[i, 0])) for i in idx]

