"""What the figures of jaxcrit/report/plots.py draw, read back from the matplotlib Figure.

Each plot is built from known input and its artists are read: the heatmaps' AxesImage arrays and
cell labels, the curves' Line2D data, the scan's scatter offsets, tick labels and legend entries.
References are hand counts and plain numpy reductions of the same input. The pipeline's wiring
(the importance stage's save cuts the ranking at 100 before counting; the map stage's save reduces the map
to the largest verified delta per (layer, site)) is read from the figure it hands to write_png.
"""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.text import Annotation

from jaxcrit.report import io
from jaxcrit.run.stages import ranking as ranking_stages, whole_map as map_stages
from jaxcrit.critical import maps
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.report import heatmaps, plots
from jaxcrit.run.stages import study as study_stages
from jaxcrit.models.sites import neuron_name

L = 5   # layers: not the 9 sites, so a transposed grid has the wrong shape


def main_axes(fig):
    """The figure's main axes (the heatmaps' colorbar is the second)."""
    return fig.axes[0]


def grid(ax) -> np.ma.MaskedArray:
    (im,) = ax.get_images()
    return np.ma.masked_invalid(im.get_array())


def cell_labels(ax) -> dict[tuple[int, int], str]:
    """(row, column) -> text of the labels drawn in data coordinates (the heatmaps' cells)."""
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
            for t in ax.texts if t.get_transform() == ax.transData}


def notes(ax) -> str:
    return "\n".join(t.get_text() for t in ax.texts if t.get_transform() == ax.transAxes)


def stage_figures(monkeypatch) -> dict:
    """The figures the stages hand to write_png, by file name; its other writers do nothing."""
    figs: dict = {}
    for writer in ("write_json", "write_csv"):
        monkeypatch.setattr(io, writer, lambda *a, **k: None)
    monkeypatch.setattr(io, "write_png", lambda path, fig, **k: figs.__setitem__(Path(path).name, fig))
    return figs


def fake_run(**config) -> SimpleNamespace:
    """What a stage's save function reads of a Run: config, workdir, the model's layer count, titles."""
    return SimpleNamespace(c=SimpleNamespace(model="org/tiny", **config), workdir=Path("unused"),
                           tokens=np.arange(40), model=SimpleNamespace(cfg=SimpleNamespace(n_layers=L)),
                           title=lambda what: f"tiny: {what}")


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def assert_grid(ax, expected: np.ndarray, label) -> None:
    """The image is `expected` [layers, sites] (NaN: blank cell), each finite cell labelled."""
    got = grid(ax)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(np.ma.getmaskarray(got), np.isnan(expected))
    np.testing.assert_allclose(got.filled(np.nan), expected)
    assert cell_labels(ax) == {(i, j): label(v) for (i, j), v in np.ndenumerate(expected) if np.isfinite(v)}
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SITE_NAMES)
    np.testing.assert_array_equal(ax.get_yticks(), np.arange(expected.shape[0]))


# ----------------------------------------------------------------------------- site heatmap

def hand_counts(keys: list[tuple[str, int]]) -> np.ndarray:
    """[L, 9] neurons per (layer, site), NaN where none; keys outside the grid not counted."""
    out = np.full((L, len(SITE_NAMES)), np.nan)
    for (s, layer), n in Counter(keys).items():
        if s in SITE_NAMES and 0 <= layer < L:
            out[layer, SITE_NAMES.index(s)] = n
    return out


def some_neurons(seed: int, n: int) -> list[tuple[str, int]]:
    """n (site, layer), skewed toward a few cells so counts differ between cells."""
    rng = np.random.default_rng(seed)
    site = rng.choice(len(SITE_NAMES), n, p=np.arange(1, 10) / 45)
    layer = rng.choice(L, n, p=[0.05, 0.1, 0.15, 0.3, 0.4])
    return [(SITE_NAMES[s], int(l)) for s, l in zip(site, layer)]


def test_site_heatmap_counts_per_layer_and_site():
    keys = some_neurons(0, 60)
    neurons = NeuronSet.make([s for s, _ in keys], [l for _, l in keys], np.arange(60)).records()
    neurons += [{"site": "down_proj", "layer": L}, {"site": "lm_head", "layer": 1}]   # outside the grid
    ax = main_axes(heatmaps.site_heatmap(neurons, L, SITE_NAMES, "top"))
    expected = hand_counts(keys)
    filled = np.isfinite(expected)
    assert filled.any(1).sum() >= 4 and filled.any(0).sum() >= 6 and np.nanmax(expected) >= 3
    assert_grid(ax, expected, lambda v: str(int(v)))
    assert ax.get_title().endswith("60 neurons")
    assert ax.get_xlabel() == "site (2 neuron(s) outside layers/sites not counted)" and not notes(ax)


def test_importance_stage_maps_its_top_100(monkeypatch):
    """save_importance draws the first 100 neurons of the ranking (the rest are piled into one cell)."""
    keys = some_neurons(1, 100) + [("q_proj", 0)] * 30
    ranking = NeuronSet.make([s for s, _ in keys], [l for _, l in keys], np.arange(130), score=-np.arange(130.0))
    figs = stage_figures(monkeypatch)
    ranking_stages.save_importance(fake_run(stage1=SimpleNamespace(ranking="channel", alpha=1.0, samples=2)), ranking)
    assert_grid(main_axes(figs["heatmap.png"]), hand_counts(keys[:100]), lambda v: str(int(v)))


# ----------------------------------------------------------------------------- max heatmap

def test_max_heatmap_draws_the_matrix():
    rng = np.random.default_rng(2)
    m = rng.normal(0, 1, (L, len(SITE_NAMES))) ** 3
    m[rng.random(m.shape) < 0.3] = np.nan
    ax = main_axes(heatmaps.max_heatmap(m, SITE_NAMES, "map"))
    assert_grid(ax, m, lambda v: f"{v:.2g}")
    assert ax.get_xlabel() == f"site ({int(np.isnan(m).sum())} blank cell(s): no neuron measured)" and not notes(ax)


def test_map_stage_draws_the_largest_verified_delta(monkeypatch):
    """save_map's cell (layer, site) is the largest delta over that cell's verified neurons."""
    rng = np.random.default_rng(3)
    n = 80
    site = rng.choice(len(SITE_NAMES), n)
    layer = rng.choice(L, n)
    neurons = NeuronSet.make(np.array(SITE_NAMES)[site], layer, rng.integers(0, 32, n))
    how = rng.choice([maps.NOT, maps.ROUND, maps.AUDIT], n, p=[0.4, 0.4, 0.2]).astype(np.int8)
    delta = np.where(how != maps.NOT, rng.normal(0, 1, n), np.nan).astype(np.float32)
    mp = maps.Map(neurons, {}, delta, how, rounds=1, stopped="rule", top_k=3, block=4)
    expected = np.full((L, len(SITE_NAMES)), np.nan)
    for i in range(n):
        if how[i] != maps.NOT:
            old = expected[layer[i], site[i]]
            expected[layer[i], site[i]] = delta[i] if np.isnan(old) else max(old, delta[i])
    figs = stage_figures(monkeypatch)
    map_stages.save_map(fake_run(), mp)
    assert np.isfinite(expected).sum() >= 10
    assert_grid(main_axes(figs["map.png"]), expected, lambda v: f"{v:.2g}")


# ----------------------------------------------------------------------------- phase curve

def curve(points) -> list[dict]:
    return [{"n": n, "delta": d} for n, d in points]


def test_phase_curve_draws_every_series():
    main = curve([(8, 2.5), (1, 0.01), (4, 3.4), (2, 0.3), (0, 9.0), (16, math.inf), (32, 5.0)])
    activation = curve([(10, 0.2), (1, 0.02), (100, 0.9)])
    gradient = curve([(3, 0.5), (30, 1.5), (300, 2.5)])
    repeats = [curve([(1, 0.1), (10, 0.3), (100, 0.4)]), curve([(1, 0.2), (10, 0.1)]),
               curve([(1, 0.6), (10, 0.2), (100, 0.8)])]
    fig = plots.phase_curve(main, 3.0, {"activation": activation, "random": repeats, "gradient": gradient}, "t")
    ax = main_axes(fig)

    ranked = line(ax, "ranked (critical)")
    np.testing.assert_array_equal(ranked.get_xdata(), [1, 2, 4, 8, 32])
    np.testing.assert_array_equal(ranked.get_ydata(), [0.01, 0.3, 3.4, 2.5, 5.0])
    (inf,) = [ln for ln in ax.get_lines() if ln.get_marker() == "^" and ln.get_linestyle() == "None"]   # +inf, top edge
    np.testing.assert_array_equal(inf.get_xdata(), [16])
    for name, c in (("activation", activation), ("gradient", gradient)):
        xy = sorted((p["n"], p["delta"]) for p in c)
        np.testing.assert_array_equal(line(ax, name).get_xdata(), [x for x, _ in xy])
        np.testing.assert_array_equal(line(ax, name).get_ydata(), [y for _, y in xy])

    mean = line(ax, "random (mean of 3; min-max band, 0.1 to 0.8)")
    np.testing.assert_array_equal(mean.get_xdata(), [1, 10, 100])
    np.testing.assert_allclose(mean.get_ydata(), [0.3, 0.2, 0.6])
    (band,) = ax.collections
    xy = band.get_paths()[0].vertices
    for x, lo, hi in [(1, 0.1, 0.6), (10, 0.1, 0.3), (100, 0.4, 0.8)]:
        ys = xy[np.isclose(xy[:, 0], x), 1]
        assert ys.min() == pytest.approx(lo) and ys.max() == pytest.approx(hi), x

    np.testing.assert_array_equal(line(ax, "epsilon = 3").get_ydata(), [3.0, 3.0])
    crit = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":" and ln.get_color() == "tab:red"]
    assert [tuple(ln.get_xdata()) for ln in crit] == [(4, 4)]   # first n with delta >= epsilon
    assert all(t.get_text() != "n* = 4" for t in ax.texts)   # in the legend, not over the data
    assert "1 point(s) with n < 1 not shown" in notes(ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "ranked (critical)", "activation", "random (mean of 3; min-max band, 0.1 to 0.8)", "gradient", "epsilon = 3",
        "n* = 4"]


def test_phase_curve_marks_the_given_critical_n():
    ax = main_axes(plots.phase_curve(curve([(1, 0.5), (2, 4.0), (3, 5.0)]), 3.0, None, critical_n=3))
    crit = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":" and ln.get_color() == "tab:red"]
    assert [tuple(ln.get_xdata()) for ln in crit] == [(3, 3)]


# ----------------------------------------------------------------------------- scan

def test_scan_distribution_points_maxima_and_labels():
    rng = np.random.default_rng(4)
    sites = ["down_proj", "act_fn", "o_proj"]
    rows = [{"site": sites[int(s)], "layer": int(l), "channel": int(c), "delta": float(d)}
            for s, l, c, d in zip(rng.integers(0, 3, 90), rng.integers(0, L, 90), rng.integers(0, 64, 90),
                                  10 ** rng.uniform(-5, 0, 90))]
    rows += [{"site": "act_fn", "layer": 2, "channel": 7, "delta": -1e-3},
             {"site": "o_proj", "layer": 4, "channel": 9, "delta": 0.0}]
    ax = main_axes(plots.scan_distribution(rows, L, "scan", top_k=4))

    drawn = {c.get_label(): c.get_offsets() for c in ax.collections}
    assert set(drawn) == set(sites)
    for s in sites:
        xy = drawn[s]
        layer = np.round(xy[:, 0])
        assert np.abs(xy[:, 0] - layer).max() <= 0.28   # jitter stays inside the layer's slot
        want = sorted((r["layer"], r["delta"]) for r in rows if r["site"] == s and r["delta"] > 0)
        got = sorted(zip(layer.astype(int).tolist(), xy[:, 1].tolist()))
        assert [g[0] for g in got] == [w[0] for w in want], s
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-12)

    top = line(ax, "layer max")
    per_layer = {l: max(r["delta"] for r in rows if r["layer"] == l) for l in range(L)}
    np.testing.assert_array_equal(top.get_xdata(), list(per_layer))
    np.testing.assert_allclose(top.get_ydata(), list(per_layer.values()), rtol=1e-12)

    (low,) = [ln for ln in ax.get_lines() if ln.get_marker() == "v"]   # deltas <= 0, on the bottom edge
    assert sorted(np.round(low.get_xdata()).astype(int).tolist()) == [2, 4]
    assert "2 delta <= 0 drawn at bottom edge" in notes(ax)

    best = sorted(rows, key=lambda r: -r["delta"])[:4]
    numbers = [(t.get_text(), t.xy[1]) for t in ax.texts if isinstance(t, Annotation)]
    assert numbers == [(str(i), r["delta"]) for i, r in enumerate(best, 1)]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-4:] == [f"{i}. {neuron_name(r['site'], r['layer'], r['channel'])}  ({r['delta']:.3g})"
                           for i, r in enumerate(best, 1)]
    assert ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted()).x0 > 1.0   # off the data


# ----------------------------------------------------------------------------- study

def test_overlap_matrix_draws_the_matrix_with_labels():
    labels = ["main", "text a", "text b", "text c"]
    m = np.array([[1.0, 0.25, 0.5, 0.0], [0.25, 1.0, 0.125, 0.75], [0.5, 0.125, 1.0, 0.375],
                  [0.0, 0.75, 0.375, 1.0]])
    ax = main_axes(heatmaps.overlap_matrix(m, labels, "overlaps"))
    np.testing.assert_array_equal(grid(ax), m)
    assert cell_labels(ax) == {(i, j): f"{v:.2f}" for (i, j), v in np.ndenumerate(m)}
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels


def test_overlap_matrix_of_one_value_is_not_drawn_and_stability_says_why(monkeypatch, tmp_path):
    figs = stage_figures(monkeypatch)
    written = {}
    monkeypatch.setattr(io, "write_json", lambda path, v, **k: written.__setitem__(Path(path).name, v))
    run = fake_run()
    run.workdir = tmp_path
    (tmp_path / "texts.png").write_bytes(b"an older run's")
    v = {"epsilon": 1.0, "variants": [], "texts": {"labels": ["main", "a", "b"], "jaccard": np.ones((3, 3)).tolist()}}
    study_stages.save_stability(run, v)
    assert "texts.png" not in figs and not (tmp_path / "texts.png").exists()
    assert written["stability.json"]["texts"]["plot"] == ("not drawn: every pair of the 3 texts' critical sets has "
                                                          "Jaccard index 1.00")
    v["texts"]["jaccard"][0][1] = v["texts"]["jaccard"][1][0] = 0.5
    study_stages.save_stability(run, v)
    assert "texts.png" in figs and written["stability.json"]["texts"]["plot"] == "texts.png"
    assert heatmaps.constant(np.full((2, 2), 0.25)) == 0.25 and heatmaps.constant(np.eye(2)) is None


def test_max_heatmap_colours_decades_on_a_log_scale():
    """Values over five decades (and a negative one): symmetric-log colours, so 1e-3 and 1e-1 differ in
    colour; values within a decade or two keep a linear scale."""
    from matplotlib.colors import SymLogNorm
    m = np.full((L, len(SITE_NAMES)), np.nan)
    m[0, :4] = [1e-5, 1e-3, 1e-1, 4.7]
    m[1, 0] = -2e-3
    im = main_axes(heatmaps.max_heatmap(m, SITE_NAMES)).get_images()[0]
    assert isinstance(im.norm, SymLogNorm) and im.norm.vmin == pytest.approx(-2e-3) and im.norm.vmax == 4.7
    colours = [im.norm(v) for v in (1e-5, 1e-3, 1e-1, 4.7)]
    assert all(b - a > 0.1 for a, b in zip(colours, colours[1:])), colours
    assert "symmetric log" in main_axes(heatmaps.max_heatmap(m, SITE_NAMES)).figure.axes[1].get_ylabel()
    m2 = np.where(np.isfinite(m), np.abs(m) + 1.0, np.nan)
    assert not isinstance(main_axes(heatmaps.max_heatmap(m2, SITE_NAMES)).get_images()[0].norm, SymLogNorm)


def test_phase_curve_series_on_top_of_each_other_stay_distinguishable():
    """dtypes.png: a dtype that changes nothing draws exactly on the main curve; each other series has
    its own line style and hollow marker and sits above it; the legend is outside the axes."""
    c = curve([(1, 4.7), (2, 4.5), (4, 4.6)])
    ax = main_axes(plots.phase_curve(c, 1.0, {"bfloat16": c, "float16": c}, label="float32"))
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    looks = {(ln.get_linestyle(), ln.get_marker()) for k, ln in lines.items() if k in ("float32", "bfloat16", "float16")}
    assert len(looks) == 3
    assert all(lines[k].get_markerfacecolor() == "none" and lines[k].get_zorder() > lines["float32"].get_zorder()
               for k in ("bfloat16", "float16"))
    box = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert box.x0 > 1.0     # right of the axes


def test_random_band_near_zero_has_visible_edges():
    reps = [curve([(1, 0.0), (10, 0.001)]), curve([(1, 0.002), (10, 0.003)])]
    ax = main_axes(plots.phase_curve(curve([(1, 4.0)]), 1.0, {"random": reps}))
    (band,) = ax.collections
    assert band.get_linewidth()[0] > 0 and band.get_edgecolor()[0][3] > 0.1
    assert line(ax, "random (mean of 2; min-max band, 0 to 0.003)")


@pytest.mark.parametrize("points, title", [
    ([(1, 4.68), (2, 4.5)], "jumps from 0 to 4.7 at n = 1 (epsilon 1)"),
    ([(1, 0.01), (2, 0.05), (3, 3.0)], "jumps from 0.05 to 3 at n = 3 (epsilon 1)"),
    ([(1, 0.3), (2, 0.8), (3, 1.2)], "first reaches epsilon 1 at n = 3"),
    ([(1, 0.5), (2, 3.0)], "first reaches epsilon 1 at n = 2"),      # from half of epsilon: no jump
    ([(1, 0.3), (2, 0.5)], "no n reaches epsilon 1")])
def test_curve_title_says_what_the_curve_shows(points, title):
    assert plots.curve_title(curve(points), 1.0) == f"delta vs number of neurons zeroed: {title}"
