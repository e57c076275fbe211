"""Interventions (jaxcrit.forward, intervene, patch) against transformers with forward hooks.

Reference: the transformers model of hf_models.build (eager attention, f32) with each edit made
by a forward hook on the HF module the site is named after, in the edit set's order: zero,
scale and set write out[..., positions, channels]; mean writes the site's mean output over the
reference run's positions; patch writes the source run's output there (both captured by hooks).
Two families: Qwen2 (q/k/v biases, tied embeddings) and Gemma (plus-one norms, tanh GELU, one
KV head). Logits are compared with test_parity's tolerance; every case must move them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_models
import jaxcrit
from jaxcrit.errors import JaxcritError
from jaxcrit.bench.interventions import random_edit
from jaxcrit.engine import prefix
from jaxcrit.engine.edits import OPS
from jaxcrit.interventions import batch
from jaxcrit.interventions.forward import checked_edits, parsed
from jaxcrit.models.sites import parse_neuron_name, width
from jaxcrit.report.patching import patch_heatmap
from test_parity import TOL, rel_err, torch_logits

T = 31   # tokens of the edited run (RoPE past its first turns, not a power of two)


def build(arch: str, directory: Path):
    """(the transformers model, jaxcrit's Model) of a 3-layer random model with a word-level tokenizer."""
    torch_model = hf_models.build(arch, directory, layers=3, initializer_range=0.2)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(60)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return torch_model, jaxcrit.load(str(directory), "float32")


@pytest.fixture(scope="module", autouse=True)
def torch_on_one_thread():
    with hf_models.one_thread():
        yield


@pytest.fixture(autouse=True)
def positions_shared(monkeypatch):
    """Every batch here, however small, runs its rows from their first edited position (as large
    batches do), so the references below check that path."""
    monkeypatch.setattr(prefix, "POSITION_ROWS", 0)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return "qwen2", *build("qwen2", tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return "gemma", *build("gemma", tmp_path_factory.mktemp("gemma"))


@pytest.fixture(params=["qwen2", "gemma"])
def family(request):
    return request.getfixturevalue(request.param)


def ids_of(seed: int, vocab: int = 211, n: int = T) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (1, n))


def hf_outputs(model, arch, cfg, ids: np.ndarray, names: set[tuple[str, int]]) -> dict[tuple[str, int], torch.Tensor]:
    """Outputs [B, T, C] of (site, layer)s in transformers' clean run of ids."""
    got, handles = {}, []
    if not names:
        return got
    for site, layer in names:
        mod, offset = hf_models.hf_site(model, arch, cfg, site, layer)
        C = width(cfg, site)
        handles.append(mod.register_forward_hook(
            lambda m, a, out, key=(site, layer), o=offset, C=C: got.__setitem__(key, out[..., o:o + C].detach().clone())))
    try:
        torch_logits(model, ids, np.ones_like(ids, bool))
    finally:
        for h in handles:
            h.remove()
    return got


@contextlib.contextmanager
def hooked(model, arch, cfg, edits: list[dict], source=None, reference=None):
    """transformers with the edits made by forward hooks, in order; mean over reference's positions."""
    names = [(*parse_neuron_name(e["neuron"]), e) for e in edits]
    src = hf_outputs(model, arch, cfg, source, {(s, l) for s, l, _, e in names if e["op"] == "patch"}) \
        if source is not None else {}
    means = {k: v.mean((0, 1)) for k, v in hf_outputs(model, arch, cfg, reference,
                                                        {(s, l) for s, l, _, e in names if e["op"] == "mean"}).items()}

    def hook(site, layer, channel, e, offset):
        C = width(cfg, site)
        ch = slice(offset, offset + C) if channel is None else offset + channel
        pos = e.get("position", slice(None))

        def edit(mod, args, out):
            out = out.clone()
            view = out[..., ch]
            new = {"zero": lambda: 0.0 * view, "scale": lambda: view * e.get("value", 1.0),
                   "set": lambda: torch.as_tensor(np.asarray(e.get("value", 0.0), np.float32)).expand_as(view),
                   "mean": lambda: means[site, layer][slice(None) if channel is None else channel].expand_as(view),
                   "patch": lambda: src.get((site, layer), torch.zeros(1))[..., slice(None) if channel is None
                                                                           else channel].expand_as(view)}[e["op"]]()
            if isinstance(pos, slice):
                out[..., ch] = new
            else:
                idx = torch.as_tensor(np.atleast_1d(pos))
                out[:, idx, ch] = new[:, idx]
            return out
        return edit

    handles = []
    for site, layer, channel, e in names:
        mod, offset = hf_models.hf_site(model, arch, cfg, site, layer)
        handles.append(mod.register_forward_hook(hook(site, layer, channel, e, offset)))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def cases(cfg) -> dict[str, list[dict]]:
    """Every op, at every position and at chosen ones, on whole sites and single channels."""
    D, F = cfg.d_model, cfg.d_ff
    vec = np.linspace(-1.0, 1.0, D).astype(np.float32)
    L = "model.layers"
    return {
        "zero channel": [{"neuron": f"{L}.1.mlp.down_proj[{D - 3}]", "op": "zero"}],
        "zero site at one position": [{"neuron": f"{L}.0.mlp.act_fn", "op": "zero", "position": 5}],
        "scale channel at two positions": [{"neuron": f"{L}.1.self_attn.q_proj[7]", "op": "scale", "value": -3.0,
                                            "position": [2, 19]}],
        "scale site": [{"neuron": f"{L}.2.self_attn.v_proj", "op": "scale", "value": 1.7}],
        "set site to a scalar": [{"neuron": f"{L}.0.self_attn.o_proj", "op": "set", "value": 0.3}],
        "set site to a vector at the last position": [{"neuron": f"{L}.1.post_attention_layernorm", "op": "set",
                                                       "value": vec, "position": -1}],
        "set channel at one position": [{"neuron": f"{L}.0.self_attn.k_proj[3]", "op": "set", "value": 2.5,
                                         "position": 9}],
        "mean channel": [{"neuron": f"{L}.1.mlp.up_proj[{F - 2}]", "op": "mean"}],
        "mean site at two positions": [{"neuron": f"{L}.0.mlp.down_proj", "op": "mean", "position": [0, 13]}],
        "patch site at one position": [{"neuron": f"{L}.0.mlp.down_proj", "op": "patch", "source": "SRC",
                                        "position": 4}],
        "patch channel": [{"neuron": f"{L}.1.mlp.gate_proj[11]", "op": "patch", "source": "SRC"}],
        "patch site": [{"neuron": f"{L}.2.self_attn.o_proj", "op": "patch", "source": "SRC"}],
        "in order on one site": [{"neuron": f"{L}.1.mlp.down_proj", "op": "scale", "value": 2.0, "position": 3},
                                 {"neuron": f"{L}.1.mlp.down_proj[5]", "op": "set", "value": -1.0},
                                 {"neuron": f"{L}.1.mlp.down_proj[5]", "op": "scale", "value": 3.0}],
    }


def with_source(edits: list[dict], source: np.ndarray) -> list[dict]:
    return [{**e, "source": source} if e.get("source") == "SRC" else e for e in edits]


def test_every_op_matches_transformers_hooks(family):
    arch, tm, m = family
    ids, src, ref = ids_of(1), ids_of(2), ids_of(3)
    clean = torch_logits(tm, ids, np.ones_like(ids, bool))
    batch_of = {label: with_source(edits, src) for label, edits in cases(m.cfg).items()}
    got = jaxcrit.forward(m, ids, list(batch_of.values()), reference=ref).logits   # one vmapped program
    wrong, still = [], []
    for (label, edits), a in zip(batch_of.items(), got):
        with hooked(tm, arch, m.cfg, edits, src, ref):
            want = torch_logits(tm, ids, np.ones_like(ids, bool))
        if rel_err(want, clean) <= 10 * TOL:
            still.append(label)
        if (err := rel_err(a, want)) > TOL:
            wrong.append(f"{label}: {err:.2e}")
    assert not still, f"{arch}: cases that barely moved transformers' logits: {still}"
    assert not wrong, f"{arch}: relative errors against transformers above {TOL}: {wrong}"


def test_activations_and_logprobs_are_the_edited_runs(family):
    arch, tm, m = family
    ids = ids_of(4)
    edits = [{"neuron": "model.layers.1.mlp.down_proj", "op": "scale", "value": 0.5, "position": [1, 2]}]
    r = jaxcrit.forward(m, ids, edits, capture=["model.layers.1.mlp.down_proj", "model.layers.2.mlp.act_fn"])
    with hooked(tm, arch, m.cfg, edits):
        want = hf_outputs(tm, arch, m.cfg, ids, {("down_proj", 1), ("act_fn", 2)})
    for name, key in (("model.layers.1.mlp.down_proj", ("down_proj", 1)), ("model.layers.2.mlp.act_fn", ("act_fn", 2))):
        assert rel_err(r.activations[name], want[key].numpy()) < TOL, name
    targets = ids_of(5)[0]
    lp = jaxcrit.forward(m, ids, edits, targets=targets).logprobs
    logp = torch.log_softmax(torch.tensor(r.logits), -1).numpy()
    np.testing.assert_allclose(lp, np.take_along_axis(logp, targets[None, :, None], -1)[..., 0], rtol=1e-5, atol=1e-5)


SITES = ("down_proj", "o_proj", "act_fn")


def mixed_sets(cfg, n: int, seed: int, source: np.ndarray) -> list[list[dict]]:
    """n random edit sets, each a random edit (the bench's `random_edit`: every op, random layers,
    channels or whole sites, every position or one or two) of each of three sites in a random
    order (one set of sites: the sets run one by one share a compiled program)."""
    rng = np.random.default_rng(seed)
    return [[random_edit(rng, cfg, SITES[i], T, source) for i in rng.permutation(len(SITES))] for _ in range(n)]


def nll(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token NLL of ids [1, T] under logits [1, T, V]."""
    logp = torch.log_softmax(torch.tensor(logits[0, :-1], dtype=torch.float64), -1).numpy()
    return float(-logp[np.arange(ids.shape[1] - 1), ids[0, 1:]].mean())


def test_a_batch_equals_its_sets_one_by_one(qwen2):
    arch, tm, m = qwen2
    ids, src = ids_of(6), ids_of(7)
    sets = mixed_sets(m.cfg, 100, 0, src)   # every op, channel or whole site, at every position or some
    assert len({(e["op"], "[" in e["neuron"], "position" in e) for s in sets for e in s}) == len(OPS) * 2 * 2
    got = jaxcrit.intervene(m, ids, sets, chunk=16, progress=False)
    assert list(got.columns) == ["set", "edits", "value"] and len(got) == 100
    logits = [jaxcrit.forward(m, ids, s).logits for s in sets]
    one_by_one = np.array([nll(z, ids) for z in logits])
    np.testing.assert_allclose(got["value"], one_by_one, rtol=1e-5, atol=1e-5)
    assert got.attrs["clean"] == pytest.approx(nll(jaxcrit.forward(m, ids).logits, ids), rel=1e-5)
    assert np.isfinite(one_by_one).all() and np.ptp(one_by_one) > 1e-2   # the sets differ
    # the same sets as DataFrame rows grouped by a `set` column (empty cells: absent keys)
    frame = pd.DataFrame([{"set": f"s{i}", **e} for i, s in enumerate(sets) for e in s])
    np.testing.assert_array_equal(jaxcrit.intervene(m, ids, frame, chunk=16)["value"], got["value"])
    # the log-prob of a token at the last position, a logit difference (a function: the patch sweep's)
    lp = jaxcrit.intervene(m, ids, sets[:20], metric="logprob", targets=9, chunk=16)["value"]
    ld = jaxcrit.intervene(m, ids, sets[:20], metric="logit_diff", tokens=(9, 4), chunk=16)["value"]
    last = np.stack([z[0, -1] for z in logits[:20]])
    logp = torch.log_softmax(torch.tensor(last), -1).numpy()
    np.testing.assert_allclose(lp, logp[:, 9], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ld, last[:, 9] - last[:, 4], rtol=1e-5, atol=1e-5)


def test_patch_sweep_equals_a_hook_loop(gemma):
    """The sweep of down_proj over every layer and position, its metric a function of the logits
    (the log-prob of the clean run's top token at the last position), against a hook loop."""
    arch, tm, m = gemma
    clean, corrupted = ids_of(8, n=12), ids_of(8, n=12)
    corrupted[0, :3] = ids_of(9, n=3)[0]
    clean_last = torch.tensor(torch_logits(tm, clean, np.ones_like(clean, bool))[0, -1])
    target = int(clean_last.argmax())
    got = batch.patch(m, clean, corrupted, metric=lambda z: jax.nn.log_softmax(z[-1])[target], chunk=16)
    assert len(got) == m.cfg.n_layers * 12 and got.attrs["metric"] == "<lambda>"
    assert got.attrs["clean"] == pytest.approx(torch.log_softmax(clean_last, -1)[target].item(), abs=1e-5)
    src = hf_outputs(tm, arch, m.cfg, clean, {("down_proj", layer) for layer in range(m.cfg.n_layers)})
    want = []
    corrupted_last = torch.tensor(torch_logits(tm, corrupted, np.ones_like(corrupted, bool))[0, -1])
    assert got.attrs["corrupted"] == pytest.approx(torch.log_softmax(corrupted_last, -1)[target].item(), abs=1e-5)
    for layer in range(m.cfg.n_layers):
        for p in range(12):
            def put(mod, args, out, layer=layer, p=p):
                out = out.clone()
                out[:, p] = src["down_proj", layer][:, p]
                return out
            h = tm.get_submodule(f"model.layers.{layer}.mlp.down_proj").register_forward_hook(put)
            try:
                z = torch_logits(tm, corrupted, np.ones_like(corrupted, bool))[0, -1]
            finally:
                h.remove()
            want.append(torch.log_softmax(torch.tensor(z), -1)[target].item())
    assert got[["layer", "position"]].values.tolist() == [[layer, p] for layer in range(m.cfg.n_layers) for p in range(12)]
    np.testing.assert_allclose(got["value"], want, rtol=1e-5, atol=1e-5)
    assert np.ptp(want) > 1e-2
    fig = patch_heatmap(got)
    assert "down_proj" in fig.axes[0].get_title()


def test_rows_run_from_their_first_edited_position(qwen2):
    """Single-position patches run in chunks of one position bucket each, from the bucket's first
    position (the values they equal are checked against hooks above); every-position edits from 0."""
    arch, tm, m = qwen2
    ids, src = ids_of(10), ids_of(11)
    sets = [[{"neuron": f"model.layers.{layer}.mlp.down_proj", "op": "patch", "source": src, "position": p}]
            for layer in range(m.cfg.n_layers) for p in range(T)]
    sets += [[{"neuron": "model.layers.2.mlp.down_proj[3]", "op": "zero"}]]
    checked, sources = checked_edits(m, sets, ids)
    abl, slots = parsed(m, checked, sources, ids)
    plan = batch.engine_for(m, ids, {"chunk": 32, "progress": False}).plan(abl, slots)
    g = -(-T // prefix.POSITION_BUCKETS)
    assert sorted(set(plan.firsts.tolist())) == list(range(0, T, g))
    assert sorted(plan.order[plan.order >= 0].tolist()) == list(range(len(sets)))
    for rows, first in zip(plan.order.reshape(-1, plan.chunk), plan.firsts):
        pos = [sets[i][0].get("position", 0) for i in rows if i >= 0]
        assert min(pos) // g * g == first and max(pos) < first + g


def test_small_batches_run_every_position(qwen2, monkeypatch):
    monkeypatch.setattr(prefix, "POSITION_ROWS", 8)
    arch, tm, m = qwen2
    ids = ids_of(10)
    sets = [[{"neuron": "model.layers.1.mlp.down_proj", "op": "zero", "position": p}] for p in range(T - 7, T)]
    checked, sources = checked_edits(m, sets, ids)
    abl, slots = parsed(m, checked, sources, ids)
    assert (prefix.first_positions(abl, slots.site, slots.position, T) == 0).all()
    checked, sources = checked_edits(m, sets + sets[:1], ids)
    abl, slots = parsed(m, checked, sources, ids)
    assert (prefix.first_positions(abl, slots.site, slots.position, T) > 0).all()


def test_calls_on_one_text_share_an_engine(qwen2):
    arch, tm, m = qwen2
    ids = ids_of(12)
    one = batch.engine_for(m, ids, {"chunk": 8})
    assert batch.engine_for(m, ids.copy(), {"chunk": 8}) is one
    assert batch.engine_for(m, ids, {"chunk": 16}) is not one
    assert batch.engine_for(m, ids_of(13), {"chunk": 16}) is not batch.engine_for(m, ids, {"chunk": 16})
    copy = dataclasses.replace(m)   # another model: its own engine, dropped with it
    assert batch.engine_for(copy, ids, {"chunk": 16}) is not batch.engine_for(m, ids, {"chunk": 16})
    batch.engine_for(copy, ids, {"chunk": 16})
    del copy
    gc.collect()
    assert not batch.LAST


BAD = [
    ({"neuron": "model.layers.1.mlp.down_projj[3]", "op": "zero"}, "names no site"),
    ({"neuron": "model.layers.1.mlp.down_proj[64]", "op": "zero"}, "channel 64 out of range"),
    ({"neuron": "model.layers.3.mlp.down_proj", "op": "zero"}, "layer 3 out of range"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "zero", "position": 31}, "position 31 out of range"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "patch"}, "patch needs a 'source'"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "patch", "source": np.zeros(30, int)}, "shape [1, 30]"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "set", "value": np.ones(5)}, "has 64 values"),
    ({"neuron": "model.layers.1.mlp.down_proj[2]", "op": "set", "value": np.ones(64)}, "takes a scalar"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "scale"}, "needs a 'value'"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "ablate"}, "unknown op 'ablate'"),
    ({"neuron": "model.layers.1.mlp.down_proj", "op": "zero", "valu": 1}, "unknown key 'valu'"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[m for _, m in BAD])
def test_bad_edits_are_refused_before_any_work(qwen2, monkeypatch, edit, message):
    arch, tm, m = qwen2

    def no_work(*a, **k):
        raise AssertionError("work started before the edits were checked")
    monkeypatch.setattr(batch, "build_engine", no_work)
    monkeypatch.setattr(batch, "parsed", no_work)
    with pytest.raises(JaxcritError) as err:
        jaxcrit.intervene(m, ids_of(1), [[], [{"neuron": "model.layers.0.mlp.down_proj", "op": "zero"}, edit]])
    text = str(err.value)
    assert "\n" not in text and message in text and text.startswith("edit set 1, edit 1:"), text
