"""NeuronSet: one record schema, round trips through records, DataFrames and tuples."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hf_models
from jaxcrit.errors import JaxcritError
from jaxcrit.models.neurons import NeuronSet


def test_records_round_trip_and_reference_fields():
    ns = NeuronSet.make(["down_proj", "q_proj"], [11, 0], [507, 3], position=[-1, 4], score=[4.5, 0.25])
    recs = ns.records()
    assert recs[0] == {"layer_name": "model.layers.11.mlp.down_proj", "site": "down_proj", "layer": 11,
                       "channel": 507, "position": -1, "score": 4.5}
    assert recs[1]["layer_name"] == "model.layers.0.self_attn.q_proj"
    ref = ns.records(reference=True)[1]
    assert (ref["seq_idx"], ref["hidden_idx"], ref["activation_diff"]) == (4, 3, 0.25)
    back = NeuronSet.from_records(recs)
    assert back.records() == recs
    only_path = NeuronSet.from_records([{"layer_name": "model.layers.2.mlp.act_fn", "channel": 9}])
    assert only_path.keys() == [("act_fn", 2, 9)] and only_path.score is None


def test_dataframe_and_tuples():
    ns = NeuronSet.make(["down_proj", "act_fn", "down_proj"], [3, 1, 0], [1, 2, 3], score=[3.0, 2.0, 1.0])
    df = ns.to_pandas()
    assert list(df.columns) == ["layer_name", "site", "layer", "channel", "position", "score"]
    assert NeuronSet.of(df).records() == ns.records()
    assert NeuronSet.of(df.iloc[:2]).keys() == [("down_proj", 3, 1), ("act_fn", 1, 2)]
    assert NeuronSet.of([("down_proj", 3, 1)]).records()[0]["position"] == -1
    sub = ns[np.array([2, 0])]
    assert sub.keys() == [("down_proj", 0, 3), ("down_proj", 3, 1)] and list(sub.score) == [1.0, 3.0]


def test_bad_records():
    with pytest.raises(JaxcritError, match="neither site and layer nor layer_name"):
        NeuronSet.from_records([{"channel": 1}])
    with pytest.raises(JaxcritError, match="names no site"):
        NeuronSet.from_records([{"layer_name": "model.layers.1.mlp.nope", "channel": 1}])
    with pytest.raises(JaxcritError, match=r"\(site, layer, channel\) tuples"):
        NeuronSet.of([("down_proj", 1)])


def test_neuron_names_round_trip_and_bad_names_are_refused():
    from jaxcrit.models.sites import SITE_NAMES, neuron_name, parse_neuron_name
    for i, s in enumerate(SITE_NAMES):
        assert parse_neuron_name(neuron_name(s, i + 3, 17 * i)) == (s, i + 3, 17 * i)
        assert parse_neuron_name(neuron_name(s, i)) == (s, i, None)
    got = NeuronSet.of(["model.layers.11.mlp.down_proj[507]", "model.layers.0.self_attn.q_proj[2]"])
    assert got.keys() == [("down_proj", 11, 507), ("q_proj", 0, 2)]
    assert NeuronSet.of(got.to_pandas()["layer_name"] + "[" + got.to_pandas()["channel"].astype(str) + "]").keys() \
        == got.keys()
    for bad in ("model.layers.11.mlp.down_proj[x]", "model.layers.11.mlp.down_proj[5", "layers.1.mlp.down_proj[1]",
                "model.layers.1.mlp.nothing[1]"):
        with pytest.raises(JaxcritError):
            parse_neuron_name(bad)
    with pytest.raises(JaxcritError, match="whole site"):
        NeuronSet.of(["model.layers.1.mlp.down_proj"])


def test_site_table_and_widths():
    """Each site's channel count, by hand for a config whose widths all differ; the table is frozen."""
    from jaxcrit.models.sites import SITE_NAMES, site, width
    cfg = hf_models.shapes_config()
    want = {"q_proj": 24, "k_proj": 12, "v_proj": 12, "o_proj": 10, "gate_proj": 14, "up_proj": 14, "act_fn": 14,
            "down_proj": 10, "post_attention_layernorm": 10}
    assert {s: width(cfg, s) for s in SITE_NAMES} == want
    with pytest.raises(JaxcritError, match="unknown site 'mlp'"):
        width(cfg, "mlp")
    with pytest.raises(dataclasses.FrozenInstanceError):
        site("q_proj").width = "d_ff"


@pytest.mark.parametrize("path", ["model.layers.1", "model.blocks.1.mlp.down_proj", "layers.1.mlp.down_proj.x",
                                  "model.layers.x.mlp.down_proj", "model.layers.-1.mlp.down_proj"])
def test_paths_that_are_not_site_paths(path):
    from jaxcrit.models.sites import parse_module_path
    with pytest.raises(JaxcritError, match="is not a site path"):
        parse_module_path(path)
