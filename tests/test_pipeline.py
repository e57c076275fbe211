"""Stage 1 and Stage 2 against straightforward, unbatched references.

Stage 1 reference: the transformers PyTorch model (eager attention), one forward per noise
sample, forward hooks on the nine sites of every layer (q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, mlp.act_fn's output, down_proj, post_attention_layernorm), inputs_embeds =
embed_tokens(ids) + alpha * noise with the SAME noise array jaxcrit gets through `noise_array`;
importance = mean_k |clean - noisy|, then the ranked list built the reference way: a Python
list of (layer_name, seq_idx, hidden_idx, diff) for every entry with diff > threshold, sorted
descending (stable), top N. The channel ranking is that list reduced by max over positions.

Tie rule for comparing rankings: two implementations in f32 can order entries whose scores
differ by less than their rounding differently. The reference list is cut into groups of
consecutive entries whose scores are within TIE = 1e-5 (relative) of their neighbour; each group lying wholly inside the top N must hold the same entries (as a
set) at the same positions of jaxcrit's list, and the group straddling the cut at N must
contain the entries jaxcrit put there. Entries with a clear gap on both sides are thus
compared position by position.

Stage 2 reference: for n = 1..N, decoder.forward with dense [layers, channels] masks zeroing the
top-n (site, layer, channel) of the ranking, full logits, float64 log-softmax in numpy, mean
NLL; delta = (loss - base) / ln 10. grow() must give the same deltas (1e-5) and the same first
n with delta >= epsilon, in both ranking modes; full_curve=True returns every n.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from jaxcrit.convert.hf import load_hf
from jaxcrit.critical import stage1, stage2
from jaxcrit.engine import Engine, Texts
from jaxcrit.models import decoder as dec
from jaxcrit.models.sites import SITE_NAMES, module_path, width
from jaxcrit.models.neurons import NeuronSet

ALPHA = 5.0
K = 4          # noise samples
T = 12         # tokens
CHUNK = 3      # stage 1 samples per vmapped batch: 4 = 3 + 1, a partial last chunk
TOP_N = 200
N_GROW = 20    # stage 2 prefixes
TIE = 1e-5


def build_llama(directory, layers: int = 2, seed: int = 0):
    return hf_models.build("llama", directory, seed, layers=layers, initializer_range=0.2)


# ----------------------------------------------------------------------------- references

def ref_ranked(scores: dict[str, np.ndarray], threshold: float) -> list[tuple[str, int, int, float]]:
    """The reference's list: every (layer_name, seq_idx, hidden_idx, diff) with diff > threshold,
    sorted descending (stable, insertion order layer-major). Not cut at N (the tie rule needs the
    entries after the cut)."""
    out = []
    for name, v in scores.items():
        for q in range(v.shape[0]):
            for h in range(v.shape[1]):
                d = float(v[q, h])
                if d > threshold:
                    out.append((name, q, h, d))
    out.sort(key=lambda r: -r[3])
    return out


def ref_channels(scores: dict[str, np.ndarray], threshold: float) -> list[tuple[str, int, int, float]]:
    """The reference list reduced by max over positions (seq_idx -1)."""
    best: dict[tuple[str, int], float] = {}
    for name, q, h, d in ref_ranked(scores, threshold):
        best[(name, h)] = max(best.get((name, h), -math.inf), d)
    out = [(name, -1, h, d) for (name, h), d in best.items()]
    out.sort(key=lambda r: -r[3])
    return out


def assert_same_ranking(got: NeuronSet, ref: list[tuple[str, int, int, float]], top_n: int) -> None:
    """got equals ref[:top_n] up to ties (module docstring): scores to 1e-4, entries by group."""
    n = min(top_n, len(ref))
    assert len(got) == n
    recs = got.records(reference=True)
    keys = [(r["layer_name"], r["seq_idx"], r["hidden_idx"]) for r in recs]
    ref_scores = np.array([r[3] for r in ref])
    np.testing.assert_allclose(got.score, ref_scores[:n], rtol=1e-4, atol=1e-6 * ref_scores.max())
    lo, compared = 0, 0
    while lo < n:
        hi = lo + 1
        while hi < len(ref) and ref_scores[hi - 1] - ref_scores[hi] <= TIE * ref_scores[hi - 1]:
            hi += 1
        group = {r[:3] for r in ref[lo:hi]}
        mine = set(keys[lo:min(hi, n)])
        if hi <= n:
            assert mine == group, f"ranks {lo}..{hi - 1}: {sorted(mine)} != {sorted(group)}"
        else:
            assert mine <= group, f"ranks {lo}..{n - 1} (cut at N): {sorted(mine - group)} not in the tied group"
        compared += hi - lo == 1
        lo = hi
    assert compared >= n // 4, "too many ties for the comparison to mean anything"


@functools.partial(jax.jit, static_argnums=0)
def _masked_logits(cfg, params, tokens, masks):
    h, _ = dec.forward(cfg, params, dec.embed(cfg, params, tokens), masks=masks)
    return dec.logits(cfg, params, h)


def ref_loss(cfg, params, ids: np.ndarray, zeroed: list[tuple[str, int, int]]) -> float:
    """Mean next-token NLL with the given (site, layer, channel) zeroed: dense masks, full logits,
    float64 log-softmax."""
    masks = {s: np.ones((cfg.n_layers, width(cfg, s)), np.float32) for s in SITE_NAMES}
    for s, l, c in zeroed:
        masks[s][l, c] = 0.0
    z = np.asarray(_masked_logits(cfg, params, jnp.asarray(ids[None]), masks), np.float64)[0, :-1]
    m = z.max(-1, keepdims=True)
    logp = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


# ----------------------------------------------------------------------------- fixtures

class Setup:
    def __init__(self, directory):
        self.torch = build_llama(directory)
        self.cfg, self.params = load_hf(directory, np.float32)
        self.ids = np.random.default_rng(3).integers(0, self.cfg.vocab_size, T).astype(np.int32)
        self.noise = np.random.default_rng(4).standard_normal((K, T, self.cfg.d_model)).astype(np.float32)
        self.imp = stage1.importance(self.cfg, self.params, self.ids, alpha=ALPHA, samples=K, seed=0,
                                     chunk=CHUNK, noise_array=self.noise, progress=False)
        self.ref = hf_models.hooked_importance(self.torch, self.ids, self.noise, ALPHA)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("llama"))


# ----------------------------------------------------------------------------- Stage 1

def test_importance_scores_match_reference(setup):
    assert setup.imp.k == K
    scores = setup.imp.scores()
    top = max(v.max() for v in setup.ref.values())
    for s in SITE_NAMES:
        assert scores[s].shape == (setup.cfg.n_layers, T, width(setup.cfg, s))
        for l in range(setup.cfg.n_layers):
            np.testing.assert_allclose(scores[s][l], setup.ref[module_path(s, l)], rtol=1e-4, atol=1e-6 * top,
                                       err_msg=f"{s} layer {l}")


def test_importance_chunking_and_resume_do_not_change_scores(setup):
    """Other chunk sizes give the same sums up to f32 rounding (each chunk is one batched forward,
    and GEMMs of other row counts round differently); a run resumed from a partial state with
    the same chunk gives identical sums."""
    kw = dict(alpha=ALPHA, samples=K, seed=0, noise_array=setup.noise, progress=False)
    whole = stage1.importance(setup.cfg, setup.params, setup.ids, chunk=K, **kw)
    seen = []
    stage1.importance(setup.cfg, setup.params, setup.ids, chunk=1, on_chunk=seen.append, **kw)
    assert [s.k for s in seen] == [1, 2, 3, 4]
    resumed = stage1.importance(setup.cfg, setup.params, setup.ids, chunk=1, state=seen[1], **kw)
    for s in SITE_NAMES:
        np.testing.assert_allclose(whole.sums[s], setup.imp.sums[s], rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(resumed.sums[s], seen[-1].sums[s])


def test_zero_noise_gives_zero_importance(setup):
    """With alpha 0 every noisy pass is the clean pass (row 0 of the same batched program): the
    scores are zero up to f32 rounding of the activations, and none passes the 1e-6 threshold."""
    imp = stage1.importance(setup.cfg, setup.params, setup.ids, alpha=0.0, samples=K, seed=0, chunk=CHUNK,
                            progress=False)
    noisy = max(v.max() for v in setup.imp.scores().values())
    assert max(v.max() for v in imp.scores().values()) < 1e-6 < 1e-3 * noisy
    assert len(stage1.rank(imp.scores(), TOP_N, 1e-6, per_position=True)) == 0


@pytest.mark.parametrize("top_n,threshold", [(TOP_N, 1e-6), (10 ** 7, None)])
def test_position_ranking_matches_reference(setup, top_n, threshold):
    """threshold None: the median score, so the threshold (not N) decides the list's end."""
    if threshold is None:
        threshold = float(np.median(np.concatenate([v.ravel() for v in setup.ref.values()])))
    ref = ref_ranked(setup.ref, threshold)
    got = stage1.rank(setup.imp.scores(), top_n, threshold, per_position=True)
    assert_same_ranking(got, ref, top_n)


@pytest.mark.parametrize("top_n,threshold", [(TOP_N, 1e-6), (10 ** 7, None)])
def test_channel_ranking_is_reference_max_over_positions(setup, top_n, threshold):
    if threshold is None:
        threshold = float(np.median(np.concatenate([v.max(0) for v in setup.ref.values()])))
    ref = ref_channels(setup.ref, threshold)
    got = stage1.rank(setup.imp.scores(), top_n, threshold, per_position=False)
    assert (got.position == -1).all()
    assert_same_ranking(got, ref, top_n)


def test_rank_by_hand():
    """Hand-made channel scores: only scores strictly above the threshold are kept; ties keep
    layer-major, then site (SITE_NAMES order), then channel order; per position, each position is
    an entry."""
    scores = {"down_proj": np.array([[[0.5, 0.25, 0.5]], [[0.75, 0.5, 0.125]]], np.float32),
              "q_proj": np.array([[[0.5, 0.0]], [[0.0, 0.875]]], np.float32)}
    got = stage1.rank(scores, 10, 0.25, per_position=False)
    assert got.keys() == [("q_proj", 1, 1), ("down_proj", 1, 0), ("q_proj", 0, 0), ("down_proj", 0, 0),
                          ("down_proj", 0, 2), ("down_proj", 1, 1)]
    assert got.score.tolist() == [0.875, 0.75, 0.5, 0.5, 0.5, 0.5] and (got.position == -1).all()
    assert stage1.rank(scores, 10, 0.5, per_position=False).keys() == [("q_proj", 1, 1), ("down_proj", 1, 0)]
    assert stage1.rank(scores, 3, 0.0, per_position=False).keys() == [("q_proj", 1, 1), ("down_proj", 1, 0),
                                                                       ("q_proj", 0, 0)]
    two = {"act_fn": np.array([[[0.25, 1.0], [0.5, 0.125], [0.75, 0.0]]], np.float32)}   # [L 1, T 3, C 2]
    got = stage1.rank(two, 10, 0.2, per_position=True)
    assert list(zip(got.keys(), got.position.tolist())) == [
        (("act_fn", 0, 1), 0), (("act_fn", 0, 0), 2), (("act_fn", 0, 0), 1), (("act_fn", 0, 0), 0)]


# ----------------------------------------------------------------------------- Stage 2

@pytest.fixture(scope="module")
def engine(setup):
    return Engine(setup.cfg, setup.params, Texts.from_ids([setup.ids.tolist()]), chunk=4, vocab_chunk=50,
                  progress=False)


@pytest.mark.parametrize("per_position", [False, True], ids=["channel", "position"])
def test_grow_matches_reference(setup, engine, per_position):
    rk = stage1.rank(setup.imp.scores(), TOP_N, 1e-6, per_position=per_position)
    base = ref_loss(setup.cfg, setup.params, setup.ids, [])
    assert abs(engine.base_loss - base) < 1e-5
    entries = list(zip(rk.site.tolist(), rk.layer.tolist(), rk.channel.tolist()))
    ref = np.array([(ref_loss(setup.cfg, setup.params, setup.ids, entries[:n]) - base) / math.log(10)
                    for n in range(1, N_GROW + 1)])

    full = stage2.grow(engine, rk, epsilon=1e9, max_steps=N_GROW, full_curve=True)
    np.testing.assert_array_equal(full.ns, np.arange(1, N_GROW + 1))
    np.testing.assert_allclose(full.deltas, ref, rtol=0, atol=1e-5)
    assert full.critical_n is None

    # epsilon: half the largest delta, moved to the middle of a clear gap between deltas
    assert ref.max() > 1e-3, f"ranking {per_position}: the prefixes barely move the loss ({ref.max()})"
    vals = np.unique(ref)
    cand = [(a + b) / 2 for a, b in zip(vals[:-1], vals[1:]) if b - a > 1e-3 and (a + b) / 2 > 0]
    eps = min(cand, key=lambda e: abs(e - ref.max() / 2))
    first = int(np.flatnonzero(ref >= eps)[0]) + 1
    g = stage2.grow(engine, rk, epsilon=eps, max_steps=N_GROW, full_curve=False)
    assert g.critical_n == first
    block_end = lambda n: min(-(-n // engine.chunk) * engine.chunk, N_GROW)   # the end of n's block
    stop = block_end(first)
    np.testing.assert_array_equal(g.ns, np.arange(1, stop + 1))
    np.testing.assert_allclose(g.deltas, ref[:stop], rtol=0, atol=1e-5)

    g = stage2.grow(engine, rk, epsilon=eps, max_steps=N_GROW, full_curve=True)
    np.testing.assert_array_equal(g.ns, np.arange(1, N_GROW + 1))
    assert g.critical_n == first

    # epsilon equal to a delta that beats every earlier one: reached there, and the growth ends
    # with that n's block (the deltas of the same blocks are the same numbers in every call)
    d = full.deltas
    n = max(n for n in range(2, N_GROW + 1) if d[n - 1] > d[:n - 1].max() and block_end(n) < N_GROW)
    g = stage2.grow(engine, rk, epsilon=float(d[n - 1]), max_steps=N_GROW, full_curve=False)
    assert g.critical_n == n
    np.testing.assert_array_equal(g.ns, np.arange(1, block_end(n) + 1))

    # given ns (the baselines' way), out-of-range ones (0, above max_steps) dropped, both ends kept
    g = stage2.grow(engine, rk, epsilon=1e9, max_steps=N_GROW, full_curve=True,
                    ns=np.array([0, 1, 3, 7, N_GROW, N_GROW + 5]))
    np.testing.assert_array_equal(g.ns, [1, 3, 7, N_GROW])
    np.testing.assert_allclose(g.deltas, ref[[0, 2, 6, N_GROW - 1]], rtol=0, atol=1e-5)


class PrefixEngine:
    """A stand-in engine: the delta of a prefix row is its number of zeroed neurons / 8."""
    chunk = 4

    def __init__(self, cfg):
        self.cfg = cfg

    def deltas(self, abl, desc, sites):
        return abl.active.sum(1) / 8


def test_grow_blocks_by_hand():
    """Blocks of 4 prefixes (1-4, 5-8, ...) up to the ranking's 14 neurons (max_steps 20): without
    full_curve the growth ends with the block holding the first n whose delta reaches epsilon
    (n = 7 for epsilon 7/8, a delta equal to it), which is not the first block; memo sees one key
    per block."""
    ranking = NeuronSet.make(["gate_proj"] * 14, [0] * 14, range(14))
    eng = PrefixEngine(hf_models.shapes_config())
    g = stage2.grow(eng, ranking, epsilon=0.875, max_steps=20, full_curve=False)
    assert (g.critical_n, g.ns.tolist(), g.deltas.tolist()) == (7, list(range(1, 9)), [n / 8 for n in range(1, 9)])
    keys = []
    g = stage2.grow(eng, ranking, epsilon=0.875, max_steps=20, full_curve=True,
                    memo=lambda key, compute: keys.append(key) or compute())
    assert (g.critical_n, g.ns.tolist()) == (7, list(range(1, 15)))
    assert keys == ["block-0", "block-4", "block-8", "block-12"]


def test_growth_and_critical_by_hand():
    """Growth.of on a hand-made curve: critical n is the first n whose delta reaches epsilon (a
    delta equal to epsilon counts), None when none does; last_n, delta(n) and the table follow.
    Critical's loss is base_loss + delta * ln 10 (delta is in log10 units, the loss in nats)."""
    ns, deltas = np.array([2, 4, 6, 8]), np.array([0.125, 0.5, 0.25, 0.75], np.float32)
    g = stage2.Growth.of(ns, deltas, 0.5)
    assert (g.critical_n, g.last_n, g.delta(6)) == (4, 4, 0.25)
    never = stage2.Growth.of(ns, deltas, 0.875)
    assert (never.critical_n, never.last_n) == (None, 8)
    df = g.to_pandas()
    assert df.n.tolist() == [2, 4, 6, 8] and df.delta.tolist() == [0.125, 0.5, 0.25, 0.75]
    crit = stage2.Critical(NeuronSet.make(["down_proj", "q_proj"], [1, 0], [5, 2]), 2, 0.5, 0.75, 2.0)
    assert crit.loss == pytest.approx(2.0 + 0.75 * math.log(10), rel=1e-12)
    assert crit.to_json() == {"n": 2, "epsilon": 0.5, "delta": 0.75, "base_loss": 2.0, "loss": crit.loss,
                              "neurons": crit.neurons.records()}
