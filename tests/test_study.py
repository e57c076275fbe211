"""The study: corpus evaluation, the learned mask, the study's stages and findings.md.

Corpus evaluation against one unbatched engine per text and the reference's weighting by hand;
the learned mask's gates against the engine (gates at 0/1 give the engine's loss for that set,
fractional gates its loss with scale 1 - z) and its gradient against finite differences of the
engine's losses; the study's stages end to end on a tiny llama, checked against the main run's
own files; the WikiText reader on a corpus in its raw layout (tests/data/wikitext).
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
from jaxcrit.evaluate.perplexity import evaluate_sets
from jaxcrit.data.texts import read_paragraphs
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.sites import width
from jaxcrit.models.neurons import NeuronSet
from tiny_run import TEXT, WORDS, build_model, tiny_config

WIKITEXT = Path(__file__).resolve().parent / "data" / "wikitext"   # a corpus in WikiText's raw layout
SET = NeuronSet.make(["down_proj", "act_fn", "o_proj"], [1, 0, 1], [5, 17, 3])
SITES = ("down_proj", "act_fn", "o_proj")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def model(model_dir):
    return jaxcrit.load(str(model_dir), "float32")


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


def test_wikitext_layout():
    """WikiText's raw layout (headings, UTF-8 dashes, a row that is long only with its spaces),
    read through the folder beside its SOURCE.md: the rows counted there by hand."""
    rows = read_paragraphs(WIKITEXT)
    assert len(rows) == 9 and rows[0].startswith("Lighthouse keeping on the northern coast")
    assert rows[-1] == "Wheelwright — repairs , carpentry , gearing , ironwork , millstones , sluices"
    assert not any(r.startswith("Credits adapted from") for r in rows)     # 52 characters, 50 stripped
    assert not any(r.startswith("=") for r in rows)                         # headings are short
    assert all(len(r) > 50 and r == r.strip() for r in rows)


def test_corpus_evaluation_against_unbatched_forwards(model, tmp_path):
    """Seven rows of a corpus file, 18-51 tokens, in blocks of 3 (sorted by length, padded to a
    bucket, the last block filled with copies) against one plain forward per text and set, and
    the reference's overall rule exp(sum_i mean_i * T_i / sum_i T_i) by hand."""
    rng = np.random.default_rng(3)
    (tmp_path / "corpus.raw").write_text("\n".join(" " + " ".join(f"w{i}" for i in rng.integers(0, WORDS, n)) + " "
                                                   for n in (40, 18, 51, 25, 40, 18, 25)))
    seqs = [model.tokens(t) for t in read_paragraphs(tmp_path)]
    assert sorted(map(len, seqs)) == [18, 18, 25, 25, 40, 40, 51]
    sets = {"three": SET, "one": SET[:1], "none": SET[:0], "again": SET[[2, 0, 1]]}   # "again" is "three"
    kept = {}
    ev = evaluate_sets(model.cfg, model.params, seqs, sets, batch=3, memo=lambda k, f: kept.setdefault(k, f()))
    assert sorted(kept) == ["block-0", "block-3", "block-6"]

    @jax.jit
    def nll(tok, masks):   # the reference: one plain forward per text and set (a program per length)
        h, _ = decoder.forward(model.cfg, model.params, decoder.embed(model.cfg, model.params, tok), masks=masks)
        logp = jax.nn.log_softmax(decoder.logits(model.cfg, model.params, h)[0, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, tok[0, 1:, None], 1).mean()

    means = {k: [] for k in ["base", *sets]}
    for i, s in enumerate(seqs):
        for k, ns in {"base": SET[:0], **sets}.items():
            masks = {site: np.ones((model.cfg.n_layers, width(model.cfg, site)), np.float32) for site in SITES}
            for site, layer, ch in ns.keys():
                masks[site][layer, ch] = 0.0
            means[k].append(float(nll(jnp.asarray(s[None]), masks)))
        assert ev["tokens"][i] == len(s) - 1
    for k in means:
        got = ev["base"] if k == "base" else ev["sets"][k]
        np.testing.assert_allclose(got, np.array(means[k]) / math.log(10), rtol=0, atol=2e-6)
        w = np.array([len(s) for s in seqs])
        assert abs(ev["overall"][k] - (np.array(means[k]) * w).sum() / w.sum() / math.log(10)) < 2e-6
    assert ev["sets"]["none"] == ev["base"] and ev["sets"]["again"] == ev["sets"]["three"]


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
    rows = np.arange(len(ranked))[None] < growth.ns[:, None]          # prefix n: its first n entries zeroed
    full = lambda a: np.broadcast_to(a, rows.shape)
    by_hand = eng.deltas(E.make(full(ranked.site_index()), full(ranked.layer), full(ranked.channel),
                                np.where(rows, 0.0, 1.0), cfg=model.cfg))
    np.testing.assert_allclose(growth.deltas, by_hand, rtol=0, atol=1e-5)
    assert growth.critical_n is not None
    path = LM.prune(eng, ranked[:growth.critical_n], epsilon=eps)
    assert path[0]["n"] == growth.critical_n
    last = NeuronSet.of(path[-1]["neurons"])
    sets = [NeuronSet.of(step["neurons"]) for step in path] + [last[[j for j in range(len(last)) if j != i]]
                                                              for i in range(len(last)) if len(last) > 1]
    K = max(map(len, sets))
    pad = lambda a, fill: np.array([np.pad(a(x), (0, K - len(x)), constant_values=fill) for x in sets])
    d = eng.deltas(E.make(pad(NeuronSet.site_index, 0), pad(lambda x: x.layer, 0), pad(lambda x: x.channel, 0),
                          pad(lambda x: np.zeros(len(x)), 1.0), cfg=model.cfg))
    for step, got in zip(path, d):
        assert got >= eps and abs(got - step["delta"]) < 1e-5       # every set on the path collapses
    assert (d[len(path):] < eps).all()                               # the last loses it without any one neuron


# ----------------------------------------------------------------------------- the study end to end

def test_study_stages_and_findings(model_dir, tmp_path):
    """Every study stage on the tiny llama, checked against the main run's own files: a variant
    equal to the main run is the main run, float32's dtype curve is curve.csv, the main mode's
    curve in modes.json is curve.csv; the evaluation's prefix@E is the curve's first prefix
    reaching E; findings.md answers every question from these files. The other text is cut to the
    main text's 40 tokens (max_tokens), so its engine runs the programs the main run compiled."""
    from jaxcrit.run.runner import result_files
    from jaxcrit.run.stages import STAGES
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(1)
    (corpus / "c.raw").write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, WORDS, n)) for n in (20, 9, 30)))
    c = tiny_config(model_dir, stage2__full_curve=True, stage2__epsilon=0.02, stage2__max_steps=8,
                    evaluate__file=str(corpus), evaluate__sets=("prefix@0.01", "greedy", "learned"),
                    baselines__names=(), map__enabled=False, scan__greedy_steps=1,
                    study__other_ranking=True, study__seeds=(42, 7),
                    study__texts=("en_story",), max_tokens=40, study__dtypes=("float32", "bfloat16"), study__massive=5,
                    learned__candidates=8, learned__steps=2)
    wd = tmp_path / "study"
    M.run(c, wd)
    for name in ("modes.json", "modes.png", "stability.json", "dtypes.json", "dtypes.png", "learned.json",
                 "relations.json"):
        assert (wd / name).is_file() and name in result_files(STAGES), name
    texts = json.loads((wd / "stability.json").read_text())["texts"]
    assert (wd / "texts.png").is_file() == (texts["plot"] == "texts.png"), texts   # drawn unless constant
    curve = pd.read_csv(wd / "curve.csv")
    modes = json.loads((wd / "modes.json").read_text())
    assert [r["delta"] for r in modes["curves"]["channel"]] == pytest.approx(curve["delta"].tolist(), abs=1e-7)
    assert modes["top"]["position"][0]["position"] >= 0 and len(modes["curves"]["position"]) == 8
    st = json.loads((wd / "stability.json").read_text())
    by = {(v["kind"], v["value"]): v for v in st["variants"]}
    assert set(by) == {("seed", 42), ("seed", 7), ("text", "en_story")}
    assert by[("seed", 42)]["top10_overlap"] == 10 and by[("seed", 42)]["critical_jaccard"] == 1.0
    assert by[("seed", 7)]["top100_jaccard"] < 1.0 and math.isfinite(by[("text", "en_story")]["main_set_delta"])
    assert st["texts"]["labels"] == ["main", "en_story"] and st["texts"]["jaccard"][0][0] == 1.0
    dt = json.loads((wd / "dtypes.json").read_text())
    f32 = {r["n"]: r["delta"] for r in dt["float32"]["curve"]}
    for n, d in zip(curve["n"], curve["delta"]):
        assert abs(f32[n] - d) < 1e-5
    assert set(dt) == {"float32", "bfloat16"} and dt["bfloat16"]["base_loss"] != dt["float32"]["base_loss"]
    ev = json.loads((wd / "evaluation.json").read_text())
    assert list(ev["sets"]) == ["critical", "prefix@0.01", "greedy", "learned"] and len(ev["texts"]) == 2
    hit = next((int(n) for n, d in zip(curve["n"], curve["delta"]) if d >= 0.01), int(curve["n"].iloc[-1]))
    assert ev["sets"]["prefix@0.01"]["n"] == hit
    assert ev["overall"]["masked_ppl_log10"] == ev["sets"]["critical"]["overall_ppl_log10"]
    rel = json.loads((wd / "relations.json").read_text())
    assert [t["max_abs"] for t in rel["top"]] == sorted((t["max_abs"] for t in rel["top"]), reverse=True)
    assert [t["rank"] for t in rel["top"]] == [1, 2, 3, 4, 5] and len(rel["residual"]) == 3
    lm = json.loads((wd / "learned.json").read_text())
    assert len(lm["gates"]) == 8 and len(lm["history"]) == 2

    page = findings.write(wd, tmp_path / "docs" / "findings.md").read_text()
    for q in range(1, 9):
        assert f"## ({q})" in page
    assert "python -m jaxcrit.main --config=configs/study.py:" in page and "--config.learned.steps=2" in page
    assert (tmp_path / "docs" / "findings" / "modes.png").is_file() and "does not run" not in page
    assert "The whole-model map did not run" in page and "baselines did not run" in page
