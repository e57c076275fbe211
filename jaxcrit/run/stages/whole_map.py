"""The whole-model map: every neuron screened, the top candidates verified through the engine."""
from __future__ import annotations

import functools

import numpy as np

from jaxcrit import engine as E
from jaxcrit.critical import maps
from jaxcrit.critical import screens as SC
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.report import heatmaps, io
from jaxcrit.run.runner import Run


def map_of(run: Run) -> maps.Map:
    """Every neuron's screens (map.screens), the candidates verified through the engine round by
    round until the stopping rule, and the audit sample (critical/maps.py). Each screen and each
    round is one unit of resume state."""
    c, m = run.c.map, run.model
    memo = run.store.memo("map")
    grads = functools.cache(lambda: SC.gradient_screens(m.cfg, m.params, run.tokens))
    source = {"first_order": lambda: grads()["first_order"], "magnitude": lambda: grads()["magnitude"],
              "importance": lambda: SC.from_ranking(m.cfg, run["importance"])}
    values = {name: memo(f"screen-{name}", lambda name=name: SC.flat(source[name]())) for name in c.screens}
    everyone = SC.universe(m.cfg)

    def measure(key: str, idx: np.ndarray) -> np.ndarray:
        part = everyone[idx]
        return memo(key, lambda: run.engine.deltas(E.make(part.site, part.layer, part.channel, cfg=m.cfg),
                                                   desc=f"map {key}", sites=SITE_NAMES))   # one program
    block = maps.round_block(c.block, run.engine.chunk, len(values), c.top_k)
    return maps.build(everyone, values, measure, top_k=c.top_k, block=block, max_rounds=c.max_rounds, audit=c.audit,
                      seed=run.c.seed)


def save_map(run: Run, mp: maps.Map) -> None:
    df = mp.table()
    io.write_csv(run.workdir / "map.csv", df.to_dict("records"), list(df.columns))
    io.write_json(run.workdir / "map.json", mp.summary())
    cfg, everyone = run.model.cfg, mp.neurons
    best = np.full((cfg.n_layers, len(SITE_NAMES)), np.nan)
    done = mp.how != maps.NOT
    np.fmax.at(best, (everyone.layer[done], everyone.site_index()[done]), mp.delta[done])
    io.write_png(run.workdir / "map.png", heatmaps.max_heatmap(best, SITE_NAMES, run.title("whole-model map: largest exact delta of one neuron zeroed, per layer and site")),
                 close=True)


def load_map(run: Run) -> maps.Map:
    import pandas as pd
    df = pd.read_csv(run.workdir / "map.csv", keep_default_na=False, na_values=["nan"])
    meta = io.read_json(run.workdir / "map.json")
    return maps.Map(NeuronSet.make(df["site"], df["layer"], df["channel"]),
                    {name: df[name].to_numpy(np.float32) for name in run.c.map.screens},
                    df["delta"].to_numpy(np.float32), df["verified"].map(maps.HOW.index).to_numpy(np.int8),
                    meta["rounds"], meta["stopped"], meta["top_k"], meta["block"])
