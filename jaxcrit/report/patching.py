"""The activation-patching heatmap: one panel per site, layers down and positions across.

Built as report/plots.py builds its figures (matplotlib's object API, Agg canvas); save it with
`jaxcrit.report.io.write_png`. Values are a metric (a log-prob, a logit difference, a loss):
already on a log or linear scale of their own, so the colours are linear in them, diverging
around the corrupted run's value when the sweep knows it (red: patching raised the metric).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure


def patch_heatmap(sweep: pd.DataFrame, title: str = "", tokens: Sequence[str] | None = None) -> Figure:
    """A heatmap of a patch sweep (jaxcrit.patch: site, layer, position, value; attrs metric,
    target, clean, corrupted): each site's [layers, positions] grid of the value. tokens: labels
    of the positions (default: their indices)."""
    sites = list(dict.fromkeys(sweep["site"]))
    attrs = sweep.attrs
    metric = attrs.get("metric", "value")
    fig = Figure(figsize=(max(4.0, 0.35 * sweep["position"].nunique() + 2.5), 1.2 + 2.6 * len(sites)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    for i, site in enumerate(sites):
        ax = fig.add_subplot(len(sites), 1, i + 1)
        grid = sweep[sweep["site"] == site].pivot(index="layer", columns="position", values="value")
        z = grid.to_numpy(np.float64)
        finite = z[np.isfinite(z)]
        center = attrs.get("corrupted")
        norm = None
        if center is not None and finite.size and finite.min() < center < finite.max():
            norm = TwoSlopeNorm(vcenter=center, vmin=finite.min(), vmax=finite.max())
        im = ax.imshow(z, aspect="auto", origin="lower", cmap="RdBu_r" if norm else "viridis", norm=norm,
                       interpolation="nearest")
        ax.set_xticks(range(len(grid.columns)))
        ax.set_xticklabels([tokens[p] for p in grid.columns] if tokens is not None else grid.columns,
                           rotation=90 if tokens is not None else 0, fontsize=7)
        ax.set_yticks(range(len(grid.index)))
        ax.set_yticklabels(grid.index, fontsize=7)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        what = f"{metric} of token {attrs['target']}" if attrs.get("target") is not None else metric
        ax.set_title(f"{site}: {what} after patching the clean run's output at (layer, position) "
                     f"into the corrupted run", fontsize=9)
        cb = fig.colorbar(im, ax=ax)
        base = [f"{k} {attrs[k]:.3g}" for k in ("clean", "corrupted") if attrs.get(k) is not None]
        cb.set_label(metric + (f" ({', '.join(base)})" if base else ""))
    if title:
        fig.suptitle(title)
    return fig
