"""Ground truth by exhaustion: the single-neuron scan and greedy growth on its measured deltas."""
from __future__ import annotations

import numpy as np

from jaxcrit.critical import scan as S
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.report import io, plots
from jaxcrit.run.runner import Run

SCAN_COLUMNS = ["site", "layer", "channel", "delta"]


def scan_targets(run: Run) -> NeuronSet:
    """The neurons the scan covers: scan.sites x scan.layers (default: the critical set's layers,
    at most scan.max_layers) x scan.channels (default: all), or with scan.top the channels of
    each site and layer that Stage 1 ranks highest."""
    c = run.c.scan
    layers = list(c.layers) or list(dict.fromkeys(int(x) for x in run["critical"].neurons.layer))[:c.max_layers or None]
    return S.targets(run.model.cfg, c.sites, layers, list(c.channels) or None,
                     top=c.top, ranking=run["importance"] if c.top else None)


def scan_of(run: Run, targets: NeuronSet) -> NeuronSet:
    """Single-neuron deltas (as scores) of the targets, in resumable blocks of 8 engine chunks."""
    return S.scan(run.engine, targets, block=run.engine.chunk * 8, memo=run.store.memo("scan"))


def save_scan(run: Run, scanned: NeuronSet) -> None:
    rows = [{"site": r["site"], "layer": r["layer"], "channel": r["channel"], "delta": r["score"]}
            for r in scanned.records()]
    io.write_csv(run.workdir / "scan.csv", rows, SCAN_COLUMNS)
    io.write_png(run.workdir / "scan.png", plots.scan_distribution(rows, run.model.cfg.n_layers,
                                                                   run.title("delta of each neuron zeroed alone, by layer")), close=True)


def load_scan(run: Run) -> NeuronSet:
    import pandas as pd
    df = pd.read_csv(run.workdir / "scan.csv")
    return NeuronSet.make(df["site"], df["layer"], df["channel"], score=df["delta"].to_numpy(np.float32))


def greedy(run: Run) -> list[dict]:
    c = run.c.scan
    return S.greedy(run.engine, S.top(run["scan"], c.greedy_pool), steps=c.greedy_steps,
                    epsilon=run.c.stage2.epsilon, memo=run.store.memo("greedy"))
