"""Heatmaps of a run: layers x sites grids (neuron counts, the map's largest deltas) and the
study's overlap matrices, annotated cell by cell; on jaxcrit.report.plots' Agg figures.

A grid whose values span decades gets a symmetric-log colour scale (colour_norm); a matrix that
would draw as one colour is not drawn (constant), its caller says why instead.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from matplotlib.colors import Normalize, SymLogNorm
from matplotlib.figure import Figure

from jaxcrit.report.plots import figure

# ----------------------------------------------------------------------------- site heatmap

def colour_norm(values: np.ndarray, vmin: float, decades: float = 2.0):
    """The colour scale of a heatmap: linear, or symmetric-log (linear within +-linthresh, the
    smallest nonzero |value| or a 10^-4 of the largest, whichever is larger) when the finite
    nonzero |values| span more than `decades` decades."""
    fin = values[np.isfinite(values)]
    vmax = max(float(fin.max()) if fin.size else vmin, vmin)
    mag = np.abs(fin[fin != 0])
    if mag.size and mag.max() / mag.min() > 10 ** decades:
        return SymLogNorm(linthresh=max(float(mag.min()), float(mag.max()) * 1e-4), vmin=vmin, vmax=vmax, base=10)
    return Normalize(vmin=vmin, vmax=vmax)


def _layer_site_grid(matrix: np.ndarray, sites: Sequence[str], label: Callable[[float], str], cbar: str,
                     title: str, norm, integer: bool) -> tuple[Figure, Any]:
    """A layers x sites matrix drawn as an annotated heatmap in the colour scale `norm`; NaN cells blank."""
    masked = np.ma.masked_invalid(matrix)
    h = min(max(3.0, 0.28 * matrix.shape[0] + 1.6), 26.0)
    w = min(max(4.5, 0.85 * len(sites) + 2.2), 16.0)
    fig = figure(w, h)
    ax = fig.add_subplot()
    im = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest", norm=norm)
    ax.set_facecolor("white")
    fs = 8 if matrix.shape[0] <= 40 else 6
    for (i, j), c in np.ndenumerate(matrix):
        if np.isfinite(c):
            ax.text(j, i, label(c), ha="center", va="center", fontsize=fs,
                    color="white" if norm(c) < 0.6 else "black")
    ax.set_xticks(range(len(sites)))
    ax.set_xticklabels(sites, rotation=40, ha="right", fontsize=8)
    step = max(1, matrix.shape[0] // 40)
    ax.set_yticks(range(0, matrix.shape[0], step))
    ax.set_ylabel("layer")
    ax.set_xlabel("site")
    ax.set_xticks(np.arange(-0.5, len(sites), 1), minor=True)
    ax.set_yticks(np.arange(-0.5, matrix.shape[0], 1), minor=True)
    ax.grid(which="minor", color="0.9", lw=0.5)
    ax.tick_params(which="minor", length=0)
    from matplotlib.ticker import MaxNLocator
    cb = fig.colorbar(im, ax=ax, label=cbar, shrink=0.8)
    if integer:
        cb.locator = MaxNLocator(integer=True)
        cb.update_ticks()
    ax.set_title(title, fontsize=10)
    return fig, ax


def site_heatmap(neurons: Sequence[Mapping[str, Any]], n_layers: int, sites: Sequence[str],
                 title: str = "") -> Figure:
    """Counts of top neurons per (layer, site): layers on rows, sites on columns, annotated."""
    sites = list(sites)
    col = {s: j for j, s in enumerate(sites)}
    counts = np.zeros((max(int(n_layers), 1), len(sites)), dtype=np.int64)
    skipped = 0
    for r in neurons:
        s, layer = r.get("site"), r.get("layer")
        if s in col and isinstance(layer, (int, np.integer)) and 0 <= layer < n_layers:
            counts[int(layer), col[s]] += 1
        else:
            skipped += 1
    total = int(counts.sum())
    grid = np.where(counts > 0, counts, np.nan)
    fig, ax = _layer_site_grid(grid, sites, lambda c: str(int(c)), "neurons",
                               f"{title}\n{total} neurons" if title else f"{total} neurons",
                               Normalize(1, max(1, int(counts.max()))), True)
    if skipped:
        ax.set_xlabel(f"site ({skipped} neuron(s) outside layers/sites not counted)")
    return fig


def max_heatmap(matrix: np.ndarray, sites: Sequence[str], title: str = "", what: str = "largest exact delta"
                ) -> Figure:
    """The largest value per (layer, site), matrix [layers, sites] (NaN: nothing measured there), on a
    symmetric-log colour scale where the values span decades (colour_norm)."""
    norm = colour_norm(matrix, min(float(np.nanmin(matrix)), 0.0) if np.isfinite(matrix).any() else 0.0)
    fig, ax = _layer_site_grid(matrix, list(sites), lambda c: f"{c:.2g}",
                               what + (" (symmetric log scale)" if isinstance(norm, SymLogNorm) else ""),
                               title, norm, False)
    if np.isnan(matrix).any():   # below the grid, not over a cell
        ax.set_xlabel(f"site ({int(np.isnan(matrix).sum())} blank cell(s): no neuron measured)")
    return fig


# ----------------------------------------------------------------------------- study overlaps

def constant(matrix: np.ndarray) -> float | None:
    """The one value every cell holds, or None: a matrix that would draw as one colour is not drawn."""
    m = np.asarray(matrix, float)
    return float(m.flat[0]) if m.size and np.all(m == m.flat[0]) else None


def overlap_matrix(matrix: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """A symmetric [n, n] matrix of overlaps in [0, 1] (e.g. Jaccard indices), annotated."""
    n = len(labels)
    fig = figure(max(4.0, 0.55 * n + 2.0), max(3.5, 0.5 * n + 1.6))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=9)
    return fig
