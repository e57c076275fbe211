"""jaxcrit.report: atomic writers, manifest, plots and summaries (no jax computation needed)."""
import csv
import math
import os

import numpy as np
import pytest

from jaxcrit.report import io as rio
from jaxcrit.report import heatmaps, plots, summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "act_fn", "down_proj",
         "post_attention_layernorm"]


def _no_temps(d):
    return [p for p in os.listdir(d) if p.endswith(".tmp")]


def _assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000


# ----------------------------------------------------------------------------- io

def test_write_json_atomic_keeps_previous_on_failure(tmp_path):
    p = tmp_path / "r.json"
    rio.write_json(p, {"a": 1, "x": np.float32(0.5), "v": np.arange(3)})
    assert rio.read_json(p) == {"a": 1, "x": 0.5, "v": [0, 1, 2]}
    before = p.read_bytes()
    with pytest.raises(TypeError):
        rio.write_json(p, {"a": 2, "bad": object()})  # fails mid-dump, after "a" is written
    assert p.read_bytes() == before
    assert _no_temps(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


def test_failed_first_write_leaves_nothing(tmp_path):
    p = tmp_path / "sub" / "new.json"
    with pytest.raises(TypeError):
        rio.write_json(p, [1, 2, {3}.__iter__()])
    assert not p.exists()
    assert os.listdir(tmp_path / "sub") == []


def test_write_text_and_mode(tmp_path):
    p = tmp_path / "s.md"
    rio.write_text(p, "hello\n")
    rio.write_text(p, "world\n")
    assert p.read_text() == "world\n"
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert _no_temps(tmp_path) == []


def test_csv_roundtrip(tmp_path):
    p = tmp_path / "t.csv"
    rows = [{"layer": 0, "site": "down_proj", "channel": 7, "delta": 5.25},
            {"layer": 23, "site": "act_fn", "channel": 4863, "delta": float("inf")},
            {"layer": 1, "site": 'we"ird,site', "channel": 0, "delta": -1e-7}]
    rio.write_csv(p, rows, ["layer", "site", "channel", "delta"])
    with open(p, newline="") as f:
        back = list(csv.DictReader(f))
    assert [r["site"] for r in back] == [r["site"] for r in rows]
    assert [int(r["channel"]) for r in back] == [7, 4863, 0]
    assert [float(r["delta"]) for r in back] == [5.25, math.inf, -1e-7]
    with pytest.raises(ValueError):
        rio.write_csv(p, [{"nope": 1}], ["layer"])
    with open(p, newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    assert _no_temps(tmp_path) == []


def test_manifest(tmp_path):
    m = rio.manifest({"alpha": 5.0, "K": 100})
    assert m["config"] == {"alpha": 5.0, "K": 100}
    assert isinstance(m["jaxcrit"], str) and m["jaxcrit"]
    assert m["python"].count(".") == 2
    assert "T" in m["timestamp"]
    assert m["git_commit"] is None or len(m["git_commit"]) == 40
    assert "count" in m["devices"]
    rio.write_json(tmp_path / "manifest.json", m)
    assert rio.read_json(tmp_path / "manifest.json")["config"]["K"] == 100


# ----------------------------------------------------------------------------- plots

def test_phase_curve_png(tmp_path):
    curve = [{"n": n, "delta": d} for n, d in
             [(1, 0.01), (2, 0.4), (3, 4.9), (4, 1e6), (5, float("inf")), (6, float("nan"))]]
    rng = np.random.default_rng(0)
    reps = [[{"n": n, "delta": float(rng.uniform(0, 0.1))} for n in (100, 300, 1000)]
            for _ in range(4)]
    reps[1][2]["delta"] = float("inf")
    fig = plots.phase_curve(curve, 3.0, {"random": reps,
                                         "activation": [{"n": 10, "delta": 0.02},
                                                        {"n": 100, "delta": 0.2}]},
                            "Qwen2.5-0.5B")
    rio.write_png(tmp_path / "phase.png", fig)
    _assert_png(tmp_path / "phase.png")
    assert plots.first_crossing(curve, 3.0) == 3
    assert plots.first_crossing(curve, 1e9) == 5  # +inf counts, NaN does not
    # degenerate inputs do not crash
    for c, b in [([], None), ([{"n": 0, "delta": 0.0}], {"r": []}),
                 ([{"n": 1, "delta": float("nan")}], {"r": [[{"n": 1, "delta": math.inf}]]})]:
        rio.write_png(tmp_path / "d.png", plots.phase_curve(c, 1.0, b, "x"))
        _assert_png(tmp_path / "d.png")
    assert _no_temps(tmp_path) == []


def test_site_heatmap_png(tmp_path):
    neurons = [{"layer": 0, "site": "down_proj"}] * 3 + [{"layer": 23, "site": "act_fn"},
                                                         {"layer": 99, "site": "down_proj"},
                                                         {"layer": 1, "site": "lm_head"}]
    fig = heatmaps.site_heatmap(neurons, 24, SITES, "top neurons")
    rio.write_png(tmp_path / "heat.png", fig)
    _assert_png(tmp_path / "heat.png")
    rio.write_png(tmp_path / "empty.png", heatmaps.site_heatmap([], 2, SITES, ""))
    _assert_png(tmp_path / "empty.png")


def test_scan_distribution_png(tmp_path):
    rng = np.random.default_rng(0)
    scan = [{"layer": int(L), "site": SITES[int(s)], "channel": int(c), "delta": float(d)}
            for L, s, c, d in zip(rng.integers(0, 24, 600), rng.integers(0, 9, 600),
                                  rng.integers(0, 896, 600), 10 ** rng.uniform(-6, 0, 600))]
    scan += [{"layer": 0, "site": "down_proj", "channel": 11, "delta": 1.2e6},
             {"layer": 23, "site": "down_proj", "channel": 5, "delta": float("inf")},
             {"layer": 5, "site": "act_fn", "channel": 2, "delta": float("nan")},
             {"layer": 7, "site": "o_proj", "channel": 3, "delta": -3e-4}]
    fig = plots.scan_distribution(scan, 24, "single-neuron scan")
    rio.write_png(tmp_path / "scan.png", fig)
    _assert_png(tmp_path / "scan.png")
    # subsampling path and empty input
    fig = plots.scan_distribution(scan, 24, "sampled", max_points=200)
    rio.write_png(tmp_path / "scan2.png", fig)
    _assert_png(tmp_path / "scan2.png")
    rio.write_png(tmp_path / "scan3.png", plots.scan_distribution([], 4, "empty"))
    _assert_png(tmp_path / "scan3.png")


# ----------------------------------------------------------------------------- summary

def _result(huge=False):
    base_loss = 2.9
    masked_loss = (3000 * math.log(10)) if huge else 14.38
    return {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "text_tokens": 115,
        "base_loss": base_loss,
        "critical": {"n": 3, "delta": masked_loss / math.log(10) - base_loss / math.log(10),
                     "loss": masked_loss,
                     "neurons": [{"layer_name": f"model.layers.{L}.mlp.down_proj",
                                  "site": "down_proj", "layer": L, "channel": c, "score": s}
                                 for L, c, s in [(0, 3, 120.5), (23, 811, 88.0), (0, 47, 9.1)]]},
        "epsilon": 3.0,
        "baselines": {"random": {"n_max": 1000, "delta_at_n_max": 0.04},
                      "gradient": {"n_max": 1000, "delta_at_n_max": float("inf")}},
        "scan": {"rows": 442368, "top": [{"site": "down_proj", "layer": 0, "channel": 3,
                                          "delta": 4.1}]},
        "map": {"neurons": 442368, "verified": 641, "audited": 256, "rounds": 3, "block": 256, "top_k": 2,
                "stopped": "rule", "rule": "R", "top": [
                    {"site": "down_proj", "layer": 21, "channel": 62, "delta": 0.31, "first_order": 2.5,
                     "verified": "screen"},
                    {"site": "act_fn", "layer": 3, "channel": 7, "delta": 0.2, "first_order": float("nan"),
                     "verified": "audit"}],
                "audit": {"sample": 256, "kth_delta": 0.2, "missed": 1, "missed_estimate": 1725.0,
                          "screens": {"first_order": {"recall": 0.5, "spearman": 0.61, "abs_error_median": 0.01,
                                                      "abs_error_max": 2.2}}}},
        "evaluation": [{"text": "Later reviews were | more positive. " * 5, "tokens": 115,
                        "base_ppl_log10": 1.26, "masked_ppl_log10": 6.25},
                       {"text": "x", "tokens": 12, "base_ppl_log10": 1.0,
                        "masked_ppl_log10": 3000.0}],
        "timings": {"load": 3.2, "stage1": 75.0, "stage2": 4000.0},
    }


def test_summary_markdown_huge_ppl():
    r = _result(huge=True)
    md = summary.summary_markdown(r)
    assert "10^3000.00 (1.00e3000)" in md
    assert "10^1.26 (18.17)" in md  # base: 2.9 nats -> log10 1.2594
    for L, c in [(0, 3), (23, 811), (0, 47)]:
        assert f"model.layers.{L}.mlp.down_proj" in md
    assert "| 1 | `model.layers.0.mlp.down_proj[3]` | down_proj | 0 |" in md
    assert "random" in md and "gradient" in md and "442368" in md
    assert "\\|" in md  # pipes in evaluation text escaped
    assert "442368 neurons screened (first_order); 641 verified exactly in 3 rounds of 256" in md
    assert "| 1 | `model.layers.21.mlp.down_proj[62]` | 0.31 | 2.5 | screen |" in md
    assert "| 2 | `model.layers.3.mlp.act_fn[7]` | 0.2 | NaN | audit |" in md
    assert "1 beat the k-th verified Δ (0.2), about 1.72e+03 over all unverified" in md
    assert "| first_order | 0.50 | 0.61 | 0.01 | 2.2 |" in md
    assert summary.fmt_ppl_log10(6.2455) == "10^6.25 (1.76e6)"
    assert summary.fmt_ppl_log10(float("inf")) == "10^inf (inf)"


def test_summary_no_critical_and_minimal():
    r = {"model": "m", "text_tokens": 10, "base_loss": 1.0,
         "critical": {"n": None, "delta": 0.3, "loss": 1.7, "neurons": []},
         "epsilon": 1.0, "timings": {}}
    md = summary.summary_markdown(r)
    assert "none found" in md
    t = summary.terminal_table(r)
    assert "none" in t and len(t.splitlines()) <= 20


def test_terminal_table_short_and_aligned():
    r = _result(huge=True)
    r["critical"]["neurons"] = r["critical"]["neurons"] * 20  # 60 neurons: must truncate
    t = summary.terminal_table(r)
    lines = t.splitlines()
    assert len(lines) <= 20
    assert "10^3000.00" in t
    assert "model.layers.0.mlp.down_proj[3]" in t
    assert "more" in t
    assert all(len(l) <= 100 for l in lines)
    # the label column is aligned: values of the header rows start at the same column
    assert lines[0].index("Qwen/") == lines[1].index("115") == lines[2].index("10^")
    t3 = summary.terminal_table(_result())
    assert "more" not in t3 and len(t3.splitlines()) <= 20
