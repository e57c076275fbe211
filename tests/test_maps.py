"""The whole-model map: screens against PyTorch autograd, the stopping rule and audit on
synthetic screens with known exact deltas, verified deltas against the exhaustive scan."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_models
import jaxcrit
from jaxcrit import engine as E
from jaxcrit.convert.hf import load_hf
from jaxcrit.critical import maps
from jaxcrit.critical import scan as S
from jaxcrit.critical import screens as SC
from jaxcrit.models.sites import SITE_NAMES, site, width
from jaxcrit.models.neurons import NeuronSet
from tiny_run import TEXT, build_model


# ----------------------------------------------------------------------------- screens

def test_screens_match_torch_autograd(tmp_path):
    """first_order = -sum_t dL/dA_t * A_t / ln 10 and magnitude = max_t |A_t| at every site, layer
    and channel, against HF llama's module outputs and their .grad after loss.backward()
    (3 layers, 37 tokens, f32)."""
    model = hf_models.build("llama", tmp_path, 0, initializer_range=0.2)
    cfg, params = load_hf(tmp_path, np.float32)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 37)
    got = SC.gradient_screens(cfg, params, ids)

    outs = {}

    def keep(key):
        def hook(mod, args, out):
            out.retain_grad()
            outs[key] = out
        return hook
    for l in range(cfg.n_layers):
        for n in SITE_NAMES:
            model.get_submodule(f"model.layers.{l}.{site(n).module}").register_forward_hook(keep((n, l)))
    x = torch.tensor(ids[None])
    model(x, labels=x).loss.backward()
    for n in SITE_NAMES:
        a = [outs[(n, l)] for l in range(cfg.n_layers)]
        first = np.stack([(-(o * o.grad).sum((0, 1)) / E.LN10).detach().numpy() for o in a])
        mag = np.stack([o.abs().amax((0, 1)).detach().numpy() for o in a])
        assert np.abs(got["first_order"][n] - first).max() < 1e-5 * max(1.0, np.abs(first).max()), n
        assert np.abs(got["magnitude"][n] - mag).max() < 1e-5 * mag.max(), n
        assert np.abs(first).max() > 1e-3                      # the comparison is not of zeros


def test_flat_order_and_stage1_screen(tmp_path):
    cfg, _ = load_hf(build_model(tmp_path), np.float32)
    u = SC.universe(cfg)
    per_site = {s: np.random.default_rng(i).normal(size=(cfg.n_layers, width(cfg, s))).astype(np.float32)
                for i, s in enumerate(SITE_NAMES)}
    v = SC.flat(per_site)
    for i in np.random.default_rng(1).choice(len(u), 50):
        assert v[i] == per_site[u.site[i]][u.layer[i], u.channel[i]]
    assert all((SC.unflat(cfg, v)[s] == per_site[s]).all() for s in SITE_NAMES)
    ranking = NeuronSet.make(["down_proj", "act_fn", "down_proj"], [1, 0, 1], [5, 7, 5], [3, 0, 9], [2.0, 1.5, 4.0])
    imp = SC.from_ranking(cfg, ranking)                        # positions of one channel: their max
    assert imp["down_proj"][1, 5] == 4.0 and imp["act_fn"][0, 7] == 1.5
    assert np.isnan(SC.flat(imp)).sum() == len(u) - 2


# ----------------------------------------------------------------------------- rule and audit

def _synthetic(N: int = 3000, seed: int = 0):
    rng = np.random.default_rng(seed)
    exact = rng.standard_exponential(N).astype(np.float32)
    calls = []

    def measure(key, idx):
        calls.append((key, idx.copy()))
        return exact[idx]
    return exact, calls, measure


def _build(screens, measure, **kw):
    N = len(next(iter(screens.values())))
    neurons = NeuronSet.make(np.full(N, "down_proj"), np.zeros(N), np.arange(N))
    return maps.build(neurons, screens, measure, **{"top_k": 5, "block": 50, "max_rounds": 0, "audit": 200,
                                                    "seed": 3, **kw})


def test_rule_verifies_in_rank_order_and_finds_the_top_k():
    """A good screen (exact + small noise) and a useless one (random): rounds take 50, 100, 200, ...
    of each in rank order, never measure a neuron twice, stop by the rule once a round changes nothing in
    the exact top-k, which is then the true top-k; the audit is a seeded sample of the rest."""
    exact, calls, measure = _synthetic()
    rng = np.random.default_rng(1)
    good = exact + 0.05 * rng.normal(size=exact.size).astype(np.float32)
    mp = _build({"first_order": good, "magnitude": rng.normal(size=exact.size).astype(np.float32)}, measure)
    assert mp.stopped == "rule" and mp.rounds >= 2
    assert set(mp.top().tolist()) == set(np.argsort(-exact)[:5].tolist())
    rounds = [idx for key, idx in calls if key.startswith("round")]
    assert [key for key, _ in calls] == [f"round-{r}" for r in range(mp.rounds)] + ["audit"]
    seen = np.concatenate(rounds)
    assert len(seen) == len(set(seen.tolist())) == (mp.how == maps.ROUND).sum()
    depth = maps.depth_of(mp.rounds, 50)           # 50, 150, 350, ...: the depth doubles each round
    assert set(seen.tolist()) == set(maps.ranked(good)[:depth].tolist()) | set(
        maps.ranked(mp.screens["magnitude"])[:depth].tolist())
    verified = mp.how != maps.NOT
    assert np.array_equal(mp.delta[verified], exact[verified]) and np.isnan(mp.delta[~verified]).all()
    audit = calls[-1][1]
    assert len(audit) == 200 and not (set(audit.tolist()) & set(seen.tolist()))
    a = mp.audit()["screens"]
    assert a["first_order"]["recall"] == 1.0 and a["first_order"]["spearman"] > 0.9 > a["magnitude"]["spearman"]
    assert a["first_order"]["abs_error_max"] < 0.3 and "abs_error_max" not in a["magnitude"]   # not delta units
    again = _build({"first_order": good, "magnitude": mp.screens["magnitude"]}, _synthetic()[2])
    assert np.array_equal(np.flatnonzero(again.how == maps.AUDIT), audit)   # seeded


def test_audit_measures_what_the_rule_misses():
    """A screen right about every neuron but the true top-5, which it ranks last: the rule stops
    after two rounds with the wrong top-k (it is a heuristic), and an audit of every unverified
    neuron finds exactly those five."""
    exact, _, measure = _synthetic()
    best = np.argsort(-exact)[:5]
    bad = exact.copy()
    bad[best] = -1.0
    mp = _build({"first_order": bad}, measure, audit=len(exact))
    assert mp.stopped == "rule" and mp.rounds == 2
    a = mp.audit()
    assert a["kth_delta"] == pytest.approx(np.sort(exact)[::-1][9])          # the rounds' top-5: ranks 6..10
    assert a["missed"] == 5 and a["missed_estimate"] == pytest.approx(5)    # the whole rest was audited
    assert a["screens"]["first_order"]["recall"] == 0.0
    assert set(mp.top().tolist()) == set(best.tolist())                     # found by the audit, exact


def test_rule_stops_when_screens_run_out_or_at_max_rounds():
    exact, calls, measure = _synthetic(N=400)
    partial_screen = np.full(exact.size, np.nan, np.float32)
    partial_screen[:120] = exact[:120]                # like Stage 1's ranking: finite values for 120 only
    mp = _build({"importance": partial_screen}, measure, top_k=200, audit=0)
    assert mp.stopped == "exhausted" and mp.rounds == 2 and (mp.how == maps.ROUND).sum() == 120   # 50, then 100
    mp = _build({"first_order": exact}, measure, top_k=200, max_rounds=2, audit=0)
    assert mp.stopped == "max_rounds" and mp.rounds == 2 and (mp.how == maps.ROUND).sum() == 150
    partial_screen[:150] = exact[:150]                # used up exactly at round 2's first rank
    mp = _build({"importance": partial_screen}, measure, top_k=200, audit=0)
    assert mp.stopped == "exhausted" and mp.rounds == 2 and (mp.how == maps.ROUND).sum() == 150
    assert [key for key, _ in calls] == ["round-0", "round-1"] * 3   # audit 0: no audit call


def test_audit_counts_by_hand():
    """One round of 2 (top_k 2, so the k-th verified delta is the second one, 0.25), then the 10
    others audited: only a delta above it counts as missed (0.75 does, the tie 0.25 does not);
    the missed estimate scales 1 of 10 audited to the 10 unverified. Spearman needs 3 audited
    pairs: with 2 it is None."""
    exact = np.array([0.5, 0.25, 0.125, 0.25, 0.125, 0.75, 0.125, 0.125, 0.0625, 0.125, 0.125, 0.125], np.float32)
    screen = -np.arange(12, dtype=np.float32)        # ranks the neurons in index order by |value|: 11 first
    screen[:2] = [100.0, 50.0]                       # ... but these two before all
    measure = lambda key, idx: exact[idx]
    mp = _build({"first_order": screen}, measure, top_k=2, block=2, max_rounds=1, audit=10)
    assert (mp.how == maps.ROUND).tolist() == [True, True] + [False] * 10 and (mp.how == maps.AUDIT).sum() == 10
    a = mp.audit()
    assert (a["kth_delta"], a["missed"], a["missed_estimate"]) == (0.25, 1, 1.0)
    assert a["screens"]["first_order"]["spearman"] is not None
    t = mp.table()
    assert list(t.columns) == ["site", "layer", "channel", "first_order", "delta", "verified"]
    assert t.verified.tolist() == ["screen"] * 2 + ["audit"] * 10 and t.delta.tolist() == exact.tolist()
    s = mp.summary()
    assert (s["verified"], s["audited"], s["rounds"], s["stopped"]) == (2, 10, 1, "max_rounds")
    assert [(r["channel"], r["delta"], r["verified"]) for r in s["top"]] == [(5, 0.75, "audit"), (0, 0.5, "screen")]
    for n, spearman in ((3, True), (2, False)):
        a = _build({"first_order": screen}, measure, top_k=2, block=2, max_rounds=1, audit=n).audit()
        assert (a["screens"]["first_order"]["spearman"] is not None) == spearman, n


# ----------------------------------------------------------------------------- against the engine

def test_map_deltas_equal_the_exhaustive_scan(tmp_path):
    """jaxcrit.map on the tiny llama (map.block 0: rounds sized to the engine chunk): the verified deltas are the single-neuron scan's (scan.py on
    its own engine) for the same neurons; unverified rows have no delta; the first_order column
    is the gradient screen."""
    m = jaxcrit.load(str(build_model(tmp_path)), "float32")
    df = jaxcrit.map(m, TEXT, screens=("first_order", "magnitude"), top_k=3, audit=16, chunk=8, progress=False)
    summary = df.attrs["summary"]
    assert summary["block"] == 4                                 # block 0: one engine chunk of 8 per round
    done = df[df.verified != "no"]
    assert len(done) == summary["verified"] + summary["audited"] and summary["audited"] == 16
    assert df[df.verified == "no"].delta.isna().all() and done.delta.notna().all()
    todo = NeuronSet.of(done)    # one block: one program for every site
    ref = S.scan(jaxcrit.engine_for(m, TEXT, chunk=8, progress=False), todo, block=len(todo))
    np.testing.assert_allclose(done.delta.to_numpy(), ref.score, atol=1e-6)
    assert [(t["site"], t["layer"], t["channel"]) for t in summary["top"]] == S.top(ref, 3).keys()
    first = SC.flat(SC.gradient_screens(m.cfg, m.params, m.tokens(TEXT, 512))["first_order"])
    np.testing.assert_array_equal(df.first_order.to_numpy(), first)
