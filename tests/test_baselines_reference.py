"""The baseline rankings (jaxcrit/critical/baselines.py) against independent references.

Model: a random qwen2 (q/k/v biases) from hf_models.build, run by transformers in float64 on one
text of T = 37 tokens; the site outputs are read with forward hooks on the HF modules the sites
are named after.

References:
  activation  signed activation, max over positions, ranked over all nine sites (numpy);
  massive     largest |down_proj output| over positions, ranked over down_proj (numpy);
  gradient    d loss / d shift, where a zero shift [C] requiring grad is added by a forward hook
              to every site output of every layer (so the gradient is summed over positions) and
              the loss is the mean next-token NLL of the text (torch autograd);
  random      k distinct valid neurons, fixed by the seed, each site drawn in proportion to its
              number of neurons (counts checked against the hypergeometric spread).

Rankings are compared as in test_pipeline: scores to f32 tolerance position by position, and
entries by groups of reference scores within TIE of each other (order inside a group is free;
a group straddling the cut at top_n must contain what jaxcrit put there).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import hf_models
from jaxcrit import engine as E
from jaxcrit.convert.hf import load_hf
from jaxcrit.critical import baselines
from jaxcrit.models.sites import SITE_NAMES, module_path, width
from jaxcrit.models.neurons import NeuronSet

T = 37
TOP_N = 120
TIE = 1e-4   # relative: reference scores closer than this may come out in either order in f32

Ranked = list[tuple[tuple[str, int, int], float]]   # ((site, layer, channel), score), best first


class Setup:
    def __init__(self, directory):
        self.torch = hf_models.build("qwen2", directory).double()
        self.cfg, self.params = load_hf(directory, np.float32)
        self.ids = np.random.default_rng(7).integers(0, self.cfg.vocab_size, T).astype(np.int32)
        self.paths = {(s, l): module_path(s, l) for l in range(self.cfg.n_layers) for s in SITE_NAMES}

    def activations(self) -> dict[tuple[str, int], np.ndarray]:
        """(site, layer) -> [T, C] float64 output of the HF module, clean forward."""
        out: dict[tuple[str, int], np.ndarray] = {}
        mods = dict(self.torch.named_modules())
        hooks = [mods[p].register_forward_hook(
            (lambda k: lambda m, a, o: out.__setitem__(k, o[0].detach().numpy()))(k)) for k, p in self.paths.items()]
        try:
            with torch.no_grad():
                self.torch(torch.tensor(self.ids[None], dtype=torch.long))
        finally:
            for h in hooks:
                h.remove()
        return out

    def gradients(self) -> dict[tuple[str, int], np.ndarray]:
        """(site, layer) -> [C] d mean-NLL / d (a shift added to that site's output at every position)."""
        mods = dict(self.torch.named_modules())
        shifts = {k: torch.zeros(width(self.cfg, k[0]), dtype=torch.float64, requires_grad=True) for k in self.paths}
        hooks = [mods[p].register_forward_hook((lambda k: lambda m, a, o: o + shifts[k])(k))
                 for k, p in self.paths.items()]
        try:
            ids = torch.tensor(self.ids[None], dtype=torch.long)
            logp = torch.log_softmax(self.torch(ids).logits[0, :-1], -1)
            loss = -logp[torch.arange(T - 1), ids[0, 1:]].mean()
            loss.backward()
        finally:
            for h in hooks:
                h.remove()
        return {k: v.grad.numpy() for k, v in shifts.items()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with hf_models.one_thread():   # a tiny model: more threads only spin against each other
        yield Setup(tmp_path_factory.mktemp("qwen2"))


def ranked(scores: dict[tuple[str, int], np.ndarray]) -> Ranked:
    """Every (site, layer, channel) with its score, descending (a plain Python sort)."""
    rows = [((s, l, c), float(v[c])) for (s, l), v in scores.items() for c in range(len(v))]
    return sorted(rows, key=lambda r: -r[1])


def assert_same_ranking(got: NeuronSet, ref: Ranked, top_n: int) -> None:
    n = min(top_n, len(ref))
    assert len(got) == n
    assert (got.position == -1).all()
    keys, ref_scores = got.keys(), np.array([r[1] for r in ref])
    scale = np.abs(ref_scores).max()
    np.testing.assert_allclose(got.score, ref_scores[:n], rtol=1e-4, atol=1e-6 * scale)
    lo, alone = 0, 0
    while lo < n:
        hi = lo + 1
        while hi < len(ref) and ref_scores[hi - 1] - ref_scores[hi] <= TIE * scale:
            hi += 1
        group, mine = {r[0] for r in ref[lo:hi]}, set(keys[lo:min(hi, n)])
        if hi <= n:
            assert mine == group, f"ranks {lo}..{hi - 1}: {sorted(mine)} != {sorted(group)}"
        else:
            assert mine <= group, f"ranks {lo}..{n - 1} (cut at top_n): {sorted(mine - group)} not in the tied group"
        alone += hi - lo == 1
        lo = hi
    assert alone >= n // 2, "too many ties for the comparison to mean anything"


def test_activation_is_signed_max_over_positions(setup):
    acts = setup.activations()
    ref = ranked({k: a.max(0) for k, a in acts.items()})
    got = baselines.ranking("activation", setup.cfg, setup.params, setup.ids, TOP_N, seed=0)
    assert_same_ranking(got, ref, TOP_N)
    # signed: the top entries differ from a ranking by magnitude (some channels' largest |a| is negative)
    by_abs = ranked({k: np.abs(a).max(0) for k, a in acts.items()})
    assert {r[0] for r in by_abs[:TOP_N]} != set(got.keys())


def test_massive_is_largest_abs_down_proj(setup):
    acts = setup.activations()
    ref = ranked({k: np.abs(a).max(0) for k, a in acts.items() if k[0] == "down_proj"})
    n = len(ref) // 2
    got = baselines.ranking("massive", setup.cfg, setup.params, setup.ids, n, seed=0)
    assert set(got.site) == {"down_proj"}
    assert_same_ranking(got, ref, n)


def test_gradient_is_autograd_of_a_channel_shift(setup):
    grads = setup.gradients()
    ref = ranked(grads)
    assert ref[0][1] > 0 > ref[-1][1]   # both signs present, so a sign error reorders the list
    got = baselines.ranking("gradient", setup.cfg, setup.params, setup.ids, TOP_N, seed=0)
    assert_same_ranking(got, ref, TOP_N)


def all_neurons(cfg) -> set[tuple[str, int, int]]:
    return {(s, l, c) for s in SITE_NAMES for l in range(cfg.n_layers) for c in range(width(cfg, s))}


def test_random_is_seeded_distinct_and_valid(setup):
    cfg, params, ids = setup.cfg, setup.params, setup.ids
    draw = lambda k, seed: baselines.ranking("random", cfg, params, ids, k, seed).keys()
    a, b, c = draw(50, 1), draw(50, 1), draw(50, 2)
    assert a == b
    assert len(set(a) & set(c)) < 10
    everyone = all_neurons(cfg)
    assert len(set(a)) == 50 and set(a) <= everyone
    # asking for more than there are gives every neuron once
    assert sorted(draw(10 ** 6, 3)) == sorted(everyone)


def test_random_is_uniform_over_neurons(setup):
    """k of N neurons without replacement: the count in a group of M neurons is hypergeometric,
    mean k M / N, variance k (M/N)(1 - M/N)(N - k)/(N - 1). Every site and every layer must lie
    within 5 standard deviations (fixed seed: deterministic)."""
    cfg = setup.cfg
    N = len(all_neurons(cfg))
    k = N // 2
    got = baselines.ranking("random", cfg, setup.params, setup.ids, k, seed=11)
    groups = {f"site {s}": (got.site == s, cfg.n_layers * width(cfg, s)) for s in SITE_NAMES}
    groups |= {f"layer {l}": (got.layer == l, N // cfg.n_layers) for l in range(cfg.n_layers)}
    for name, (hit, M) in groups.items():
        p = M / N
        mean, sd = k * p, np.sqrt(k * p * (1 - p) * (N - k) / (N - 1))
        assert abs(hit.sum() - mean) <= 5 * sd, f"{name}: {hit.sum()} drawn, expected {mean:.1f} +- {sd:.1f}"
    # channels within a site: the lower and upper halves equally often
    low = sum(((got.site == s) & (got.channel < width(cfg, s) // 2)).sum() for s in SITE_NAMES)
    assert abs(low - k / 2) <= 5 * np.sqrt(k / 4)


class RowEngine:
    """An engine whose delta of a row is its first entry's channel (so each row is known by its
    number); it keeps every batch it scores."""
    chunk = 5

    def __init__(self):
        self.batches = []

    def deltas(self, abl: E.Ablations, desc: str) -> np.ndarray:
        self.batches.append((abl, desc))
        return abl.channel[:, 0].astype(np.float32)


def test_units_are_packed_into_chunks_in_order():
    """Units of 2, 3, 1, 6 and 2 rows with chunk 5: batches [2 + 3], [1], [6] (larger than a
    chunk: alone), [2]; shorter rows padded with inactive entries; each unit gets its own rows'
    deltas back; memo sees one key per batch."""
    cfg = hf_models.shapes_config()   # gate_proj: 14 channels, one per row below
    sizes, widths = (2, 3, 1, 6, 2), (1, 2, 1, 3, 1)
    units, first = {}, 0
    for i, (n, k) in enumerate(zip(sizes, widths)):
        units[f"u{i}"] = E.make(np.full((n, k), "gate_proj"), np.zeros((n, k), int),
                                first + np.arange(n)[:, None] + np.zeros(k, int), cfg=cfg)
        first += n
    eng, keys = RowEngine(), []
    out = baselines.score_packed(eng, units, desc="baselines", memo=lambda key, compute: keys.append(key) or compute())
    assert [(a.rows, a.site.shape[1]) for a, _ in eng.batches] == [(5, 2), (1, 1), (6, 3), (2, 1)]
    assert [d for _, d in eng.batches] == ["baselines u0, u1", "baselines u2", "baselines u3", "baselines u4"]
    assert keys == ["batch-0", "batch-1", "batch-2", "batch-3"]
    padded = eng.batches[0][0]
    assert padded.active.tolist() == [[True, False]] * 2 + [[True, True]] * 3
    assert (padded.scale[:2, 1] == 1).all() and (padded.value[:2, 1] == 0).all()
    starts = np.cumsum((0,) + sizes)
    assert {k: v.tolist() for k, v in out.items()} == {
        f"u{i}": list(range(starts[i], starts[i + 1])) for i in range(len(sizes))}
