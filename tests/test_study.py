"""The study (issue 15): corpus evaluation, the learned mask, the study's stages and findings.md.

Corpus evaluation against one unbatched engine per text and the reference's weighting by hand;
the learned mask's gates against the engine (gates at 0/1 give the engine's loss for that set,
fractional gates its loss with scale 1 - z) and its gradient against finite differences of the
engine's losses; the study's stages end to end on a tiny llama, checked against the main run's
own files; the WikiText reader on the real test split where ../shared/data has it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import jaxcrit
from jaxcrit import engine as E
from jaxcrit import findings
from jaxcrit import main as M
from jaxcrit.critical import learned as LM
from jaxcrit.critical.evaluate import evaluate_sets
from jaxcrit.data.texts import read_paragraphs
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.sites import width
from jaxcrit.neurons import NeuronSet
from tiny_run import TEXT, WORDS, build_model, tiny_config

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext"
SET = NeuronSet.make(["down_proj", "act_fn", "o_proj"], [1, 0, 1], [5, 17, 3])
SITES = ("down_proj", "act_fn", "o_proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def model(model_dir):
    return jaxcrit.load(str(model_dir))


# ----------------------------------------------------------------------------- corpus

def test_read_paragraphs_keeps_the_references_rows(tmp_path):
    """Rows stripped, then kept if longer than 50 characters (a 49-character row padded with
    spaces to 53 is dropped); a directory is read through its one *.raw file; limit."""
    short = " " + "x" * 49 + "   "
    rows = [" = Heading = ", short, " " + "a" * 51 + " ", "", "b" * 60]
    (tmp_path / "c.raw").write_text("\n".join(rows) + "\n")
    (tmp_path / "SOURCE.md").write_text("about\n")
    assert read_paragraphs(tmp_path) == ["a" * 51, "b" * 60]
    assert read_paragraphs(tmp_path / "c.raw", limit=1) == ["a" * 51]
    (tmp_path / "d.txt").write_text("y" * 80)
    with pytest.raises(JaxcritError, match="exactly one"):
        read_paragraphs(tmp_path)


@pytest.mark.skipif(not (WIKITEXT / "wiki.test.raw").is_file(), reason="../shared/data/wikitext not here")
def test_wikitext_test_split():
    rows = read_paragraphs(WIKITEXT)
    assert len(rows) == 1940 and rows[0].startswith("Robert Boulter is an English film")
    assert all(len(r) > 50 and r == r.strip() for r in rows)


def test_corpus_evaluation_against_unbatched_engines(model):
    """Seven texts of 12-70 tokens in blocks of 3 (sorted by length, padded to buckets, the last
    block filled with copies) against one engine per text, and the reference's overall rule
    exp(sum_i mean_i * T_i / sum_i T_i) by hand."""
    rng = np.random.default_rng(3)
    seqs = [model.tokens(" ".join(f"w{i}" for i in rng.integers(0, WORDS, n))) for n in (40, 12, 60, 25, 33, 12, 51)]
    sets = {"three": SET, "one": SET[:1], "none": SET[:0]}
    kept = {}
    ev = evaluate_sets(model.cfg, model.params, seqs, sets, batch=3, memo=lambda k, f: kept.setdefault(k, f()))
    assert sorted(kept) == ["block-0", "block-3", "block-6"]
    means = {k: [] for k in ["base", *sets]}
    with jax.disable_jit():   # the reference: one plain forward per text and set, no compiling
        for i, s in enumerate(seqs):
            for k, ns in {"base": SET[:0], **sets}.items():
                masks = {site: np.ones((model.cfg.n_layers, width(model.cfg, site)), np.float32) for site in SITES}
                for site, layer, ch in ns.keys():
                    masks[site][layer, ch] = 0.0
                tok = jnp.asarray(s[None])
                h, _ = decoder.forward(model.cfg, model.params, decoder.embed(model.cfg, model.params, tok), masks=masks)
                logp = jax.nn.log_softmax(decoder.logits(model.cfg, model.params, h)[0, :-1].astype(jnp.float32))
                means[k].append(-float(jnp.take_along_axis(logp, tok[0, 1:, None], 1).mean()))
            assert ev["tokens"][i] == len(s) - 1
    for k in means:
        got = ev["base"] if k == "base" else ev["sets"][k]
        np.testing.assert_allclose(got, np.array(means[k]) / math.log(10), rtol=0, atol=2e-6)
        w = np.array([len(s) for s in seqs])
        assert abs(ev["overall"][k] - (np.array(means[k]) * w).sum() / w.sum() / math.log(10)) < 2e-6
    assert ev["sets"]["none"] == ev["base"]


# ----------------------------------------------------------------------------- learned mask

def test_gates_are_the_engines_masks(model):
    """gated_loss with gates at 0/1 is the engine's loss with that set zeroed; fractional gates
    are the engine's rows with scale 1 - z; its gradient matches central differences of the
    engine's losses."""
    cand = LM.candidates(NeuronSet.make(["down_proj", "down_proj", "act_fn", "down_proj", "q_proj"],
                                        [1, 1, 0, 1, 0], [5, 5, 17, 9, 2]), 4)
    assert cand.keys() == [("down_proj", 1, 5), ("act_fn", 0, 17), ("down_proj", 1, 9), ("q_proj", 0, 2)]
    tok = model.tokens(TEXT)
    eng = E.Engine(model.cfg, model.params, E.Texts.from_ids([tok.tolist()]), chunk=4, progress=False)
    site, layer, channel = cand.site_index()[None], cand.layer[None], cand.channel[None]
    loss = jax.jit(lambda z: LM.gated_loss(model.cfg, model.params, jnp.asarray(tok[None]), cand, z))
    for z in (np.array([1, 0, 1, 0.]), np.array([0, 1, 1, 1.]), np.zeros(4)):
        ref = eng.losses(E.make(site, layer, channel, 1 - z[None], cfg=model.cfg))[0]
        assert abs(float(loss(jnp.asarray(z, jnp.float32))) - ref) < 2e-5
    z0 = np.array([0.3, 0.6, 0.2, 0.8], np.float32)
    assert abs(float(loss(z0)) - eng.losses(E.make(site, layer, channel, 1 - z0[None], cfg=model.cfg))[0]) < 2e-5
    grad = np.asarray(jax.grad(loss)(z0))
    h = 1e-2
    rows = np.concatenate([z0 + h * np.eye(4), z0 - h * np.eye(4)])
    fd = eng.losses(E.make(np.repeat(site, 8, 0), np.repeat(layer, 8, 0), np.repeat(channel, 8, 0), 1 - rows,
                           cfg=model.cfg))
    np.testing.assert_allclose(grad, (fd[:4] - fd[4:]) / (2 * h), rtol=2e-2, atol=2e-4)
    assert np.abs(grad).max() > 1e-2


def test_learned_mask_verified_and_pruned(model):
    """The optimiser lowers its objective and resumes from its kept state with the same numbers;
    verify scores the gate ranking's prefixes exactly; prune's sets each reach epsilon (row by
    row) and the last loses it without any one of its neurons."""
    tok = model.tokens(TEXT)
    eng = E.Engine(model.cfg, model.params, E.Texts.from_ids([tok.tolist()]), chunk=16, progress=False)
    singles = E.single(model.cfg, "down_proj", [1])
    d = eng.deltas(singles)
    best = np.argsort(-d)[:10]
    cand = NeuronSet.make(["down_proj"] * 10, singles.layer[best, 0], singles.channel[best, 0])[::-1]
    eps = float(d[best[:3]].sum()) * 0.8
    run = lambda steps, keep: LM.optimise(model.cfg, model.params, tok, eng.base_loss, cand, target=2 * eps,
                                          sparsity=1e-3, steps=steps, lr=0.2, init=0.9, temperature=0.5, seed=0,
                                          block=2, memo_state=(lambda: keep.get("s"), lambda a: keep.update(s=a)))
    states = []
    z, hist = LM.optimise(model.cfg, model.params, tok, eng.base_loss, cand, target=2 * eps, sparsity=1e-3, steps=6,
                          lr=0.2, init=0.9, temperature=0.5, seed=0, block=2,
                          memo_state=(lambda: None, states.append))
    assert hist.shape == (6, 3) and hist[-1, 0] < hist[0, 0] and [len(s["history"]) for s in states] == [2, 4, 6]
    z2, hist2 = run(6, {"s": states[1]})                     # killed after 4 steps, resumed
    np.testing.assert_array_equal(z, z2)
    np.testing.assert_array_equal(hist, hist2)
    ranked, growth, _ = LM.verify(eng, cand, z, epsilon=eps)
    assert list(ranked.score) == sorted(z, reverse=True)
    one = lambda s: eng.deltas(E.make(s.site_index()[None], s.layer[None], s.channel[None], cfg=model.cfg))[0]
    for n, delta in zip(growth.ns, growth.deltas):
        assert abs(delta - one(ranked[:n])) < 1e-5
    assert growth.critical_n is not None
    path = LM.prune(eng, ranked[:growth.critical_n], epsilon=eps)
    assert path[0]["n"] == growth.critical_n
    for step in path:
        got = one(NeuronSet.of(step["neurons"]))
        assert got >= eps and abs(got - step["delta"]) < 1e-5
    last = NeuronSet.of(path[-1]["neurons"])
    assert len(last) == 1 or all(one(last[[j for j in range(len(last)) if j != i]]) < eps for i in range(len(last)))
