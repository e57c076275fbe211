"""The Python API the README shows: the same stage code as the CLI, results as DataFrames.

Each function is checked against what the CLI wrote for the same config (the CLI's stages are
checked against unbatched references in test_pipeline.py and test_engine.py) and against a
hand computation where one is short: scan deltas against single-row engine calls, evaluation
against the engine's clean and masked losses.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

import jaxcrit
from jaxcrit import engine as E
from jaxcrit import main as M
from jaxcrit.errors import JaxcritError
from jaxcrit.models.sites import neuron_name, site
from tiny_run import TEXT, build_model, tiny_config

FIELDS = dict(samples=4, batch=2, top_n=50)      # tiny_config's stage1 fields


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def cli(model_dir, tmp_path_factory):
    """The CLI's files of the stages compared here; the baselines and greedy search (no API
    function) and the map (jaxcrit.map: test_maps.py) are off."""
    wd = tmp_path_factory.mktemp("cli")
    M.run(tiny_config(model_dir, stage2__full_curve=True, baselines__names=(), scan__greedy_steps=0,
                      map__enabled=False), wd)
    return wd


@pytest.fixture(scope="module")
def model(model_dir):
    return jaxcrit.load(str(model_dir), "float32")


def test_importance_equals_the_cli_ranking(model, cli):
    ranking = jaxcrit.importance(model, TEXT, **FIELDS, progress=False)
    assert isinstance(ranking, pd.DataFrame)
    assert list(ranking.columns) == ["layer_name", "site", "layer", "channel", "position", "score"]
    ref = json.loads((cli / "importance.json").read_text())["neurons"]
    assert ranking[["layer_name", "channel"]].values.tolist() == [[r["layer_name"], r["channel"]] for r in ref]
    np.testing.assert_array_equal(ranking["score"].to_numpy(), np.array([r["score"] for r in ref], np.float32))


def test_grow_equals_the_cli_curve(model, cli):
    ranking = jaxcrit.importance(model, TEXT, **FIELDS, progress=False)
    curve = jaxcrit.grow(model, ranking, TEXT, max_steps=20, full_curve=True, chunk=8, progress=False)
    ref = pd.read_csv(cli / "curve.csv")
    np.testing.assert_array_equal(curve["n"], ref["n"])
    np.testing.assert_allclose(curve["delta"], ref["delta"], rtol=0, atol=1e-6)
    assert curve["delta"].max() < 1.0
    grown = jaxcrit.grow(model, ranking, TEXT, epsilon=1.0, max_steps=20, chunk=8, progress=False)
    assert grown.attrs["critical_n"] is None and list(grown["n"]) == list(range(1, 21))   # no n reaches 1


def test_find_critical_is_importance_then_grow(model, monkeypatch):
    """find_critical: Stage 2's curve along Stage 1's ranking, each field reaching its stage
    (samples: Stage 1's, max_steps: Stage 2's, chunk and progress: both); the critical set is
    the ranking's first critical_n neurons by name (none here: no prefix of the tiny model
    reaches epsilon; then a curve that reaches it at n = 3 is handed in)."""
    ranking = jaxcrit.importance(model, TEXT, **FIELDS, progress=False)
    want = jaxcrit.grow(model, ranking, TEXT, epsilon=1.0, max_steps=20, chunk=8, progress=False)
    critical, curve = jaxcrit.find_critical(model, TEXT, **FIELDS, max_steps=20, chunk=8, progress=False)
    assert curve.attrs["critical_n"] is None and len(critical) == 0 and "neuron" in critical.columns
    pd.testing.assert_frame_equal(curve, want)
    reached = want.head(3).copy()
    reached.attrs["critical_n"] = 3
    monkeypatch.setattr(jaxcrit.api, "grow", lambda *a, **k: reached)
    critical, _ = jaxcrit.find_critical(model, TEXT, **FIELDS, progress=False)
    assert list(critical["neuron"]) == [f"model.layers.{r.layer}.{site(r.site).module}[{r.channel}]"
                                        for r in ranking.head(3).itertuples()]


def test_scan_equals_single_rows_through_the_engine(model, cli):
    scan = jaxcrit.scan(model, TEXT, sites=["down_proj", "act_fn"], layers=[1], channels=range(3, 9), chunk=4,
                        progress=False)
    assert list(scan[["site", "layer", "channel"]].itertuples(index=False, name=None)) == (
        [("down_proj", 1, c) for c in range(3, 9)] + [("act_fn", 1, c) for c in range(3, 9)])
    eng = jaxcrit.engine_for(model, TEXT, chunk=1, progress=False)
    for s, l, c, d in scan[["site", "layer", "channel", "delta"]].itertuples(index=False, name=None):
        one = eng.deltas(E.make(np.array([s]), [l], [c], cfg=model.cfg))[0]
        assert abs(d - one) < 1e-5, (s, l, c)
    ref = pd.read_csv(cli / "scan.csv").set_index(["site", "layer", "channel"])["delta"]
    for s, l, c, d in scan[scan.site == "down_proj"][["site", "layer", "channel", "delta"]].itertuples(
            index=False, name=None):
        assert abs(d - ref[(s, l, c)]) < 1e-5


def test_evaluate_against_the_engines_losses(model, cli):
    crit = json.loads((cli / "critical.json").read_text())["neurons"]
    texts = [TEXT, " ".join(TEXT.split()[::-1])]
    ev = jaxcrit.evaluate(model, crit, texts, progress=False)
    assert list(ev["tokens"]) == [39, 39]
    for i, t in enumerate(texts):
        eng = jaxcrit.engine_for(model, t, chunk=1, progress=False)
        masked = eng.losses(E.make(np.array([[r["site"] for r in crit]]), [[r["layer"] for r in crit]],
                                   [[r["channel"] for r in crit]], cfg=model.cfg))[0]
        assert abs(ev["base_ppl_log10"][i] - eng.base_loss / math.log(10)) < 1e-5
        assert abs(ev["masked_ppl_log10"][i] - masked / math.log(10)) < 1e-5
    assert abs(ev.attrs["overall"]["masked_ppl_log10"] - ev["masked_ppl_log10"].mean()) < 1e-6
    tuples = jaxcrit.evaluate(model, [(r["site"], r["layer"], r["channel"]) for r in crit], texts[:1], progress=False)
    assert abs(tuples["masked_ppl_log10"][0] - ev["masked_ppl_log10"][0]) < 1e-6


def test_generate_equals_the_cli_generations(model, cli):
    """jaxcrit.generate, clean and with the critical set zeroed, gives the continuations the CLI's
    generations stage wrote (there both ran as one batch, the clean rows at scale 1)."""
    gen = json.loads((cli / "generations.json").read_text())
    crit = json.loads((cli / "critical.json").read_text())["neurons"]
    prompts = [g["prompt"] for g in gen["prompts"]]
    clean = jaxcrit.generate(model, prompts, max_new_tokens=6)
    masked = jaxcrit.generate(model, prompts, neurons=crit, max_new_tokens=6)
    assert list(clean.columns) == ["prompt", "text", "tokens", "logprobs"]
    assert list(clean["tokens"]) == [g["base_tokens"] for g in gen["prompts"]]
    assert list(masked["tokens"]) == [g["masked_tokens"] for g in gen["prompts"]]
    assert list(masked["text"]) == [g["masked"] for g in gen["prompts"]]
    assert gen["neurons"] == len(crit) and all(len(t) == 6 for t in clean["tokens"])


def test_the_api_keeps_its_names_over_the_subpackages():
    """jaxcrit.evaluate and jaxcrit.run are the API's functions even after the subpackages of the same
    names (jaxcrit/evaluate/, jaxcrit/run/) and their modules are imported."""
    import importlib
    for name in ("jaxcrit.evaluate.perplexity", "jaxcrit.run.runner", "jaxcrit.run.stages"):
        importlib.import_module(name)
    assert jaxcrit.evaluate is jaxcrit.api.evaluate and jaxcrit.run is jaxcrit.api.run
    assert callable(jaxcrit.evaluate) and callable(jaxcrit.run)


def test_bad_arguments(model):
    with pytest.raises(JaxcritError, match="unknown argument 'sampels' \\(did you mean 'samples'\\?\\); give a field"):
        jaxcrit.importance(model, TEXT, sampels=4)
    with pytest.raises(JaxcritError, match="unknown argument 'vocab_chunks' \\(did you mean 'vocab_chunk'\\?\\)"):
        jaxcrit.grow(model, [("down_proj", 0, 1)], TEXT, vocab_chunks=8)     # an engine field
    with pytest.raises(JaxcritError, match="unknown argument 'zzz'; give a field"):
        jaxcrit.importance(model, TEXT, zzz=4)
    with pytest.raises(JaxcritError, match=r"stage1\.samples must be an integer >= 1"):
        jaxcrit.importance(model, TEXT, samples=0)
    with pytest.raises(JaxcritError, match="scan.layers: layer 7 out of range"):
        jaxcrit.scan(model, TEXT, layers=[7])
    with pytest.raises(JaxcritError, match="at least one text"):
        jaxcrit.evaluate(model, [("down_proj", 0, 1)], [])
    with pytest.raises(JaxcritError, match=r"generate\.top_p must be in \(0, 1\]"):
        jaxcrit.generate(model, "w1 w2", top_p=0.0)


def test_neuron_names_are_taken_wherever_neurons_are(model, cli):
    """evaluate, grow and generate take the names result files write, one or a list, as they take
    (site, layer, channel) tuples."""
    crit = json.loads((cli / "critical.json").read_text())["neurons"]
    tuples = [(r["site"], r["layer"], r["channel"]) for r in crit]
    names = [neuron_name(*t) for t in tuples]
    by_name, by_tuple = jaxcrit.evaluate(model, names, [TEXT]), jaxcrit.evaluate(model, tuples, [TEXT])
    pd.testing.assert_frame_equal(by_name, by_tuple)
    assert (by_name["delta"].abs() > 1e-3).all()     # the names did mask something
    grow = lambda neurons: jaxcrit.grow(model, neurons, TEXT, chunk=8, progress=False)   # the chunk of the other tests
    pd.testing.assert_frame_equal(grow(names), grow(tuples))
    one = jaxcrit.generate(model, "w1 w2 w3", neurons=names[0], max_new_tokens=4)
    pd.testing.assert_frame_equal(one, jaxcrit.generate(model, "w1 w2 w3", neurons=tuples[:1], max_new_tokens=4))
    with pytest.raises(JaxcritError, match="names a whole site"):
        jaxcrit.evaluate(model, ["model.layers.1.mlp.down_proj"], [TEXT])


def test_model_repr_is_a_short_summary(model):
    r, c = repr(model), model.cfg
    gb = sum(np.prod(p.shape) * 4 for p in model.params.values()) / 1e9
    assert r == (f"Model({model.source!r}: llama, {c.n_layers} layers, d_model {c.d_model}, d_ff {c.d_ff}, "
                 f"vocab {c.vocab_size}, float32, mesh {{'data': 1, 'model': 1}}, {gb:.3g} GB of params)")


def test_load_and_the_cli_choose_the_same_dtype(model_dir):
    """dtype auto (the CLI's default, settled before a run) and jaxcrit.load's default are one table:
    bfloat16 for a HF dir, float32 for the embedded GGUF model."""
    from jaxcrit.convert.load import default_dtype
    from jaxcrit.run import validate
    for argv in (["--config=hf:" + str(model_dir)], ["--config=smollm2", f"--config.model={model_dir}"]):
        c = M.parse(["jaxcrit", *argv]).config
        assert c.dtype == "auto" and validate.settle(c).dtype == "bfloat16"
    assert jaxcrit.load(str(model_dir)).dtype == "bfloat16"
    assert validate.settle(M.parse(["jaxcrit", "--config=smollm2"]).config).dtype == default_dtype("smollm2") == "float32"
