"""The baselines: random, activation, gradient and massive rankings grown at baselines.ns."""
from __future__ import annotations

import numpy as np

from jaxcrit import engine as E
from jaxcrit.critical import baselines as B
from jaxcrit.critical import stage2
from jaxcrit.report import io
from jaxcrit.run.runner import Run


def baselines(run: Run) -> dict[str, list[stage2.Growth]]:
    """Each baseline's ranking (random: seeded repeats) grown at baselines.ns. The prefixes of
    all baselines and repeats are scored together in engine-sized batches (B.score_packed); each
    batch's deltas are kept as soon as it is done."""
    c, m = run.c.baselines, run.model
    ns = np.asarray(c.ns, int)
    units = {(name, r): B.ranking(name, m.cfg, m.params, run.tokens, int(ns.max()), run.c.seed + r)
             for name in c.names for r in range(c.random_repeats if name == "random" else 1)}
    sizes = {k: ns[ns <= len(rk)] for k, rk in units.items()}
    deltas = B.score_packed(run.engine, {
        f"{name}-{r}": E.prefixes(m.cfg, rk.site, rk.layer, rk.channel, sizes[(name, r)])
        for (name, r), rk in units.items()}, memo=run.store.memo("baselines"), desc="baselines")
    out: dict[str, list[stage2.Growth]] = {}
    for (name, r), n in sizes.items():
        out.setdefault(name, []).append(stage2.Growth.of(n, deltas[f"{name}-{r}"], run.c.stage2.epsilon))
    return out


def save_baselines(run: Run, value: dict[str, list[stage2.Growth]]) -> None:
    io.write_json(run.workdir / "baselines.json",
                  {name: [g.to_pandas().to_dict("records") for g in gs] for name, gs in value.items()})


def load_baselines(run: Run) -> dict[str, list[stage2.Growth]]:
    eps = run.c.stage2.epsilon
    out = {}
    for name, curves in io.read_json(run.workdir / "baselines.json").items():
        out[name] = []
        for curve in curves:
            n = np.array([r["n"] for r in curve], int)
            d = np.array([r["delta"] for r in curve], np.float32)
            out[name].append(stage2.Growth.of(n, d, eps))
    return out
