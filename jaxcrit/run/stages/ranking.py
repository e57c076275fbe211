"""Stage 1's ranking, Stage 2's growth along it, and the critical set: the paper's method."""
from __future__ import annotations

import numpy as np

from jaxcrit.critical import stage1, stage2
from jaxcrit.critical.stage2 import Critical
from jaxcrit.errors import JaxcritError
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.report import heatmaps, io
from jaxcrit.run.runner import Run


def importance_scores(run: Run) -> stage1.Importance:
    """Stage 1's mean |A_clean - A_noisy|; the running sums are kept after every batch of noisy
    passes (a finished run's sums are found there again)."""
    c, m = run.c.stage1, run.model
    got = run.store.get("stage1", ("_k", *SITE_NAMES))
    state = stage1.Importance({k: v for k, v in got.items() if k != "_k"}, int(got["_k"])) if got else None
    if state is not None and state.k < c.samples:
        run.say(f"stage 1: resuming after {state.k} of {c.samples} noisy passes")
    keep = (lambda s: run.store.put("stage1", {**s.sums, "_k": np.asarray(s.k)})) if run.workdir else None
    return stage1.importance(m.cfg, m.params, run.tokens, alpha=c.alpha, samples=c.samples, seed=run.c.seed,
                             chunk=c.batch, state=state, on_chunk=keep, progress=run.c.progress)


def importance(run: Run, ranking: str | None = None) -> NeuronSet:
    """Stage 1's ranking (stage1.ranking, or the mode given)."""
    c = run.c.stage1
    ranked = stage1.rank(importance_scores(run).scores(), c.top_n, c.threshold,
                         (ranking or c.ranking) == "position")
    if not len(ranked):
        raise JaxcritError(f"stage 1 ranked no neuron: no importance score is above stage1.threshold "
                           f"({c.threshold}); lower stage1.threshold or raise stage1.alpha")
    return ranked


def save_importance(run: Run, ranking: NeuronSet) -> None:
    c = run.c.stage1
    io.write_json(run.workdir / "importance.json",
                  {"ranking": c.ranking, "alpha": c.alpha, "samples": c.samples, "tokens": int(len(run.tokens)),
                   "neurons": ranking.records(reference=True)})
    io.write_png(run.workdir / "heatmap.png", heatmaps.site_heatmap(
        ranking[:100].records(), run.model.cfg.n_layers, SITE_NAMES, run.title("where Stage 1's top 100 neurons are, per layer and site")), close=True)


def load_importance(run: Run) -> NeuronSet:
    return NeuronSet.from_records(io.read_json(run.workdir / "importance.json")["neurons"])


def growth_of(run: Run, ranking: NeuronSet) -> stage2.Growth:
    """Prefixes of a ranking scored until delta >= stage2.epsilon (every n with full_curve)."""
    c = run.c.stage2
    return stage2.grow(run.engine, ranking, epsilon=c.epsilon, max_steps=c.max_steps, full_curve=c.full_curve,
                       memo=run.store.memo("growth"))


def save_growth(run: Run, g: stage2.Growth) -> None:
    io.write_csv(run.workdir / "curve.csv", g.to_pandas().to_dict("records"), ["n", "delta"])


def load_growth(run: Run) -> stage2.Growth:
    import pandas as pd
    df = pd.read_csv(run.workdir / "curve.csv")
    ns, deltas = df["n"].to_numpy(int), df["delta"].to_numpy(np.float32)
    return stage2.Growth.of(ns, deltas, run.c.stage2.epsilon)


def critical(run: Run) -> Critical:
    g = run["growth"]
    return Critical(run["importance"][:g.last_n], g.critical_n, run.c.stage2.epsilon, g.delta(g.last_n),
                    run.engine.base_loss)


def save_critical(run: Run, crit: Critical) -> None:
    io.write_json(run.workdir / "critical.json", crit.to_json())


def load_critical(run: Run) -> Critical:
    d = io.read_json(run.workdir / "critical.json")
    return Critical(NeuronSet.from_records(d["neurons"]), d["n"], d["epsilon"], d["delta"], d["base_loss"])
