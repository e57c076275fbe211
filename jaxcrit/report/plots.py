"""Figures of a run, built on matplotlib's object API with the Agg canvas (no pyplot state).

Every plot returns a `matplotlib.figure.Figure` (`figure` makes one; `note` writes a small note in
an axes corner); save it with `jaxcrit.report.io.write_png`. Deltas are log10(PPL_masked /
PPL_base). Non-finite values never crash a plot: +inf and NaN are drawn as markers on the top edge
of the axes (-inf on the bottom edge) and a note counts them. Legends sit outside the axes, titles
say what the data show (curve_title); the heatmaps are jaxcrit/report/heatmaps.py's.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from jaxcrit.models.sites import neuron_name

Curve = Sequence[Mapping[str, Any]]


def figure(w: float, h: float) -> Figure:
    """A w x h inch figure with constrained layout on its own Agg canvas."""
    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _arr(rows: Curve, key: str, default: float = math.nan) -> np.ndarray:
    out = np.empty(len(rows), dtype=np.float64)
    for i, r in enumerate(rows):
        v = r.get(key, default)
        try:
            out[i] = float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            out[i] = math.nan
    return out


def _curve_xy(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """(n, delta) sorted by n; rows with n < 1 or non-finite n are dropped (log x axis)."""
    n, d = _arr(curve, "n"), _arr(curve, "delta")
    keep = np.isfinite(n) & (n >= 1)
    n, d = n[keep], d[keep]
    order = np.argsort(n, kind="stable")
    return n[order], d[order]


def _is_repeats(v: Any) -> bool:
    """True for list[list[dict]] (repeats), False for list[dict] (one curve)."""
    if not isinstance(v, Sequence) or isinstance(v, (str, bytes)) or len(v) == 0:
        return False
    return not isinstance(v[0], Mapping)


def _edge_markers(ax, x: np.ndarray, y: np.ndarray, color, label_note: list[str], what: str):
    """Draw non-finite y at the axes' top (+inf, NaN) or bottom (-inf) edge; count them."""
    bad = ~np.isfinite(y)
    if not bad.any():
        return
    tr = ax.get_xaxis_transform()  # x in data, y in axes fraction
    top = bad & ~(np.isneginf(y))
    bot = np.isneginf(y)
    if top.any():
        ax.plot(x[top], np.full(top.sum(), 0.985), ls="none", marker="^", ms=7, color=color,
                mec="k", mew=0.5, transform=tr, clip_on=False, zorder=5)
    if bot.any():
        ax.plot(x[bot], np.full(bot.sum(), 0.015), ls="none", marker="v", ms=7, color=color,
                mec="k", mew=0.5, transform=tr, clip_on=False, zorder=5)
    n_inf = int(np.isposinf(y).sum())
    n_nan = int(np.isnan(y).sum())
    parts = []
    if n_inf:
        parts.append(f"{n_inf} +inf")
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if bot.any():
        parts.append(f"{int(bot.sum())} -inf")
    label_note.append(f"{what}: {', '.join(parts)} drawn at edge")


def _maybe_symlog(ax, finite: np.ndarray, threshold: float = 50.0) -> None:
    """Linear y unless the finite values reach past +-threshold; then symlog around 1."""
    if finite.size and np.nanmax(np.abs(finite)) > threshold:
        ax.set_yscale("symlog", linthresh=1.0)


def note(ax, lines: list[str]) -> None:
    """Small grey lines right of the axes, under the legend, off the data (what a plot could not
    draw, and why)."""
    if lines:
        ax.text(1.01, 0.0, "\n".join(lines), transform=ax.transAxes, fontsize=7,
                va="bottom", ha="left", color="0.3",
                bbox=dict(boxstyle="round,pad=0.2", fc="white", ec="0.8", alpha=0.85))


# ----------------------------------------------------------------------------- phase curve

def first_crossing(curve: Curve, epsilon: float) -> int | None:
    """Smallest n whose delta >= epsilon (+inf counts, NaN does not), or None."""
    n, d = _curve_xy(curve)
    with np.errstate(invalid="ignore"):
        hit = np.flatnonzero(d >= epsilon)
    return int(n[hit[0]]) if hit.size else None


# the other series' looks: each a colour, a line style and a hollow marker of its own (at most one
# marker per 1.2% of the axes, so a long curve is not a wall of markers), so a series drawn exactly
# on top of another (a dtype that changes nothing) still shows
STYLES = (("tab:blue", "--", "s"), ("tab:orange", "-.", "^"), ("tab:green", ":", "D"), ("tab:purple", "--", "v"),
          ("tab:brown", "-.", "P"), ("tab:pink", ":", "X"), ("tab:olive", "--", "<"), ("tab:cyan", "-.", ">"))


def phase_curve(curve: Curve, epsilon: float,
                baselines: Mapping[str, Curve | Sequence[Curve]] | None = None,
                title: str = "", critical_n: int | None = None, label: str = "ranked (critical)") -> Figure:
    """delta vs number of zeroed neurons n (log x), epsilon line, baselines, critical n marked.

    `baselines` maps a name to one curve (list of {n, delta}) or to repeats (list of curves); for
    repeats the mean is drawn with a min-max band over the repeats that have a finite value at
    each n, its edges drawn as lines so a band near 0 still shows. `critical_n` defaults to the
    first n of `curve` with delta >= epsilon. The legend sits right of the axes, off the data.
    """
    fig = figure(9.0, 4.2)
    ax = fig.add_subplot()
    notes: list[str] = []
    finite_all: list[np.ndarray] = []
    styles = iter(STYLES * 2)
    dropped = sum(1 for r in curve if not (isinstance(r.get("n"), (int, float))
                                           and r.get("n") >= 1))

    n, d = _curve_xy(curve)
    if n.size:
        fin = np.isfinite(d)
        finite_all.append(d[fin])
        ax.plot(n[fin], d[fin], "-o", color="tab:red", ms=3, lw=1.6, label=label, zorder=3)
        _edge_markers(ax, n, d, "tab:red", notes, "ranked")
    else:
        notes.append("ranked curve: no points with n >= 1")
    if dropped:
        notes.append(f"{dropped} point(s) with n < 1 not shown (log x)")

    for name, val in (baselines or {}).items():
        color, ls, marker = next(styles)
        reps = list(val) if _is_repeats(val) else [val]
        reps = [r for r in reps if r]
        if not reps:
            continue
        if len(reps) == 1:
            bn, bd = _curve_xy(reps[0])
            fin = np.isfinite(bd)
            finite_all.append(bd[fin])
            ax.plot(bn[fin], bd[fin], ls=ls, marker=marker, ms=5, mfc="none", markevery=0.012, lw=1.2, color=color,
                    label=name, zorder=4)
            _edge_markers(ax, bn, bd, color, notes, name)
            continue
        grid = np.unique(np.concatenate([_curve_xy(r)[0] for r in reps]))
        mat = np.full((len(reps), grid.size), np.nan)
        nonfinite = np.zeros(grid.size, dtype=bool)
        for i, r in enumerate(reps):
            rn, rd = _curve_xy(r)
            idx = np.searchsorted(grid, rn)
            mat[i, idx] = rd
            nonfinite[idx[~np.isfinite(rd) & ~np.isnan(rd)]] = True
        with np.errstate(all="ignore"):
            fm = np.where(np.isfinite(mat), mat, np.nan)
            have = np.isfinite(fm).any(axis=0)
            mean = np.full(grid.size, np.nan)
            lo = mean.copy()
            hi = mean.copy()
            mean[have] = np.nanmean(fm[:, have], axis=0)
            lo[have] = np.nanmin(fm[:, have], axis=0)
            hi[have] = np.nanmax(fm[:, have], axis=0)
        finite_all.append(fm[np.isfinite(fm)])
        ax.fill_between(grid[have], lo[have], hi[have], color=color, alpha=0.2, lw=0.8, edgecolor=color)
        ax.plot(grid[have], mean[have], ls=ls, marker=marker, ms=5, mfc="none", markevery=0.012, lw=1.2, color=color,
                label=f"{name} (mean of {len(reps)}; min-max band, {_span(lo[have], hi[have])})", zorder=4)
        if nonfinite.any():
            _edge_markers(ax, grid[nonfinite], np.full(nonfinite.sum(), np.inf), color, notes,
                          f"{name} (some repeats)")

    ax.axhline(epsilon, ls="--", color="k", lw=1.0, label=f"epsilon = {epsilon:g}")
    crit = critical_n if critical_n is not None else first_crossing(curve, epsilon)
    if crit is not None and crit >= 1:
        ax.axvline(crit, ls=":", color="tab:red", lw=1.2, label=f"n* = {crit}")   # named in the legend, off the data
    else:
        notes.append(f"no n reaches epsilon = {epsilon:g}")

    fin = np.concatenate(finite_all) if finite_all else np.empty(0)
    _maybe_symlog(ax, np.append(fin, epsilon))
    if fin.size == 0 and not n.size:
        ax.set_xlim(1, 10)
    ax.set_xscale("log")
    ax.set_xlabel("neurons zeroed n")
    ax.set_ylabel(r"$\Delta$ = log$_{10}$(PPL$_{masked}$ / PPL$_{base}$)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    note(ax, notes)
    return fig


def _span(lo: np.ndarray, hi: np.ndarray) -> str:
    """The band's range in words, so a band too thin to see at the axes' scale is still read."""
    return f"{float(lo.min()):.2g} to {float(hi.max()):.2g}" if lo.size else "empty"


def curve_title(curve: Curve, epsilon: float) -> str:
    """What a Stage 2 curve shows, in words its data bear out: a jump across epsilon in one step
    is named as such; otherwise where delta first reaches epsilon, or that it never does."""
    crit = first_crossing(curve, epsilon)
    if crit is None:
        return f"delta vs number of neurons zeroed: no n reaches epsilon {epsilon:g}"
    n, d = _curve_xy(curve)
    i = int(np.flatnonzero(n == crit)[0])
    before = d[i - 1] if i else 0.0          # no neuron zeroed: delta 0
    if before < epsilon / 10 and (not np.isfinite(d[i]) or d[i] >= 2 * epsilon):
        return (f"delta vs number of neurons zeroed: jumps from {before:.2g} to {d[i]:.2g} at n = {crit} "
                f"(epsilon {epsilon:g})")
    return f"delta vs number of neurons zeroed: first reaches epsilon {epsilon:g} at n = {crit}"


# ----------------------------------------------------------------------------- scan

def scan_distribution(scan: Sequence[Mapping[str, Any]], n_layers: int, title: str = "",
                      top_k: int = 5, max_points: int = 50_000) -> Figure:
    """Per-layer distribution of single-neuron deltas on a log y axis.

    Each row is {layer, site, delta[, channel]}. Points are jittered per layer and coloured by
    site; deltas <= 0 go on the bottom edge; the per-layer maximum is drawn as a line; the
    top `top_k` rows are numbered beside their points and listed by name (sites.neuron_name) and delta
    in the legend, right of the axes with the sites, off the data. Above `max_points` rows a sample is drawn (each layer's 50
    largest kept); maxima and labels always use every row.
    """
    fig = figure(max(6.5, min(16.0, 0.18 * n_layers + 5.0)), 4.5)
    ax = fig.add_subplot()
    notes: list[str] = []
    layer = _arr(scan, "layer")
    delta = _arr(scan, "delta")
    sites = np.array([str(r.get("site", "?")) for r in scan], dtype=object)
    ok = np.isfinite(layer)
    if (~ok).any():
        notes.append(f"{int((~ok).sum())} row(s) without a layer skipped")
    idx_all = np.flatnonzero(ok)

    if idx_all.size == 0:
        notes.append("no scan rows")
        ax.set_xlim(-0.5, max(n_layers, 1) - 0.5)
        ax.set_title(title)
        note(ax, notes)
        return fig

    # ranking (for labels): +inf first, then finite descending; NaN last
    key = np.where(np.isnan(delta), -np.inf, delta)
    order = idx_all[np.argsort(-key[idx_all], kind="stable")]
    top = [i for i in order[:top_k] if not np.isnan(delta[i])]

    shown = idx_all
    if idx_all.size > max_points:
        rng = np.random.default_rng(0)
        keep = set()
        for L in np.unique(layer[idx_all]):
            li = idx_all[layer[idx_all] == L]
            li = li[np.argsort(-key[li], kind="stable")][:50]
            keep.update(li.tolist())
        rest = np.setdiff1d(idx_all, np.fromiter(keep, dtype=np.int64))
        k = max(0, max_points - len(keep))
        sample = rng.choice(rest, size=min(k, rest.size), replace=False) if k else []
        shown = np.union1d(np.fromiter(keep, dtype=np.int64), np.asarray(sample, np.int64))
        notes.append(f"showing {shown.size:,} of {idx_all.size:,} rows (per-layer top 50 kept)")

    rng = np.random.default_rng(1)
    jitter = rng.uniform(-0.28, 0.28, size=layer.size)
    uniq_sites = list(dict.fromkeys(sites[idx_all]))
    cmap = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
            "tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
    for si, s in enumerate(uniq_sites):
        sel = shown[(sites[shown] == s) & np.isfinite(delta[shown])
                     & (delta[shown] > 0)]
        if sel.size:
            ax.scatter(layer[sel] + jitter[sel], delta[sel], s=6, alpha=0.55, lw=0,
                       color=cmap[si % len(cmap)], label=s, rasterized=True)

    # per-layer max over finite values (all rows)
    fin = idx_all[np.isfinite(delta[idx_all])]
    if fin.size:
        ls = np.unique(layer[fin])
        mx = np.array([delta[fin][layer[fin] == L].max() for L in ls])
        pos_mx = mx > 0
        ax.plot(ls[pos_mx], mx[pos_mx], "-", color="k", lw=1.0, marker="_", ms=10,
                label="layer max", zorder=4)
    # log y; deltas <= 0 (masking did not hurt) go on the bottom edge, counted in the note
    nonpos = fin[delta[fin] <= 0]
    ax.set_yscale("log")
    if nonpos.size:
        ax.plot(layer[nonpos] + jitter[nonpos], np.full(nonpos.size, 0.015), ls="none",
                marker="v", ms=4, color="0.5", transform=ax.get_xaxis_transform(),
                clip_on=False, zorder=3)
        notes.append(f"{nonpos.size} delta <= 0 drawn at bottom edge")
    if not (delta[fin] > 0).any():
        ax.set_ylim(1e-6, 1.0)
    _edge_markers(ax, layer[idx_all], delta[idx_all], "k", notes, "scan")

    named = []   # the top rows: a rank number beside each point, its name and delta in the legend
    for rank, i in enumerate(top, 1):
        ch = scan[i].get("channel")
        xy, coords = ((layer[i] + jitter[i], delta[i]), "data") if np.isfinite(delta[i]) else \
            ((layer[i], 0.985), ax.get_xaxis_transform())
        ax.annotate(str(rank), xy=xy, xycoords=coords, xytext=(4 if rank % 2 else -4, 2), textcoords="offset points",
                    ha="left" if rank % 2 else "right", fontsize=7, fontweight="bold", color="0.15")
        name = neuron_name(str(sites[i]), int(layer[i]), None if ch is None else int(ch))
        named.append(ax.plot([], [], ls="none", label=f"{rank}. {name}  ({delta[i]:.3g})")[0])

    ax.set_xlim(-0.6, max(n_layers, int(np.nanmax(layer)) + 1) - 0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel(r"single-neuron $\Delta$ (log$_{10}$ PPL ratio)")
    ax.set_title(title)
    ax.grid(True, axis="y", which="major", alpha=0.25)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, handlelength=1.5)
    note(ax, notes)
    return fig
