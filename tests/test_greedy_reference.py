"""Greedy growth (jaxcrit/critical/scan.py `greedy`) against an unbatched reference loop.

Model: a random qwen2 with initializer_range 0.2 (single channels move the loss visibly), one
text of T = 37 tokens. The scan covers channels 0-3 of SITES in every layer; the pool is its top
POOL neurons, as the pipeline takes it.

Reference: transformers in float64, one forward per candidate set, the set's outputs zeroed by
forward hooks (hf_models.zeroed); delta = (mean next-token NLL - clean NLL) / ln 10. The loop
adds, step by step, the pool neuron whose delta together with the earlier picks is largest, and
stops at the first step whose delta reaches epsilon. Each step's best must beat the runner-up
by MARGIN, so the picks are compared exactly and the deltas to f32 tolerance.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import hf_models
from jaxcrit.convert.hf import load_hf
from jaxcrit.critical import scan as S
from jaxcrit.engine import Engine, Texts
from jaxcrit.models.neurons import NeuronSet

T = 37
POOL = 6
SITES = ("v_proj", "o_proj", "down_proj")
MARGIN = 1e-3   # delta between a step's best and runner-up; f32 errors are ~1e-6
TOL = 2e-5

Key = tuple[str, int, int]


class Step(NamedTuple):
    key: Key        # the neuron added
    delta: float    # the set's delta with it
    margin: float   # its delta minus the runner-up's (inf when it was the only candidate)


class Setup:
    def __init__(self, directory):
        self.torch = hf_models.build("qwen2", directory, initializer_range=0.2).double()
        cfg, params = load_hf(directory, np.float32)
        self.ids = np.random.default_rng(5).integers(0, cfg.vocab_size, T).astype(np.int32)
        self.engine = Engine(cfg, params, Texts.from_ids([self.ids.tolist()]), chunk=8, vocab_chunk=64,
                             sites=SITES, progress=False)   # one compiled program for every batch here
        self.scanned = S.scan(self.engine, S.neurons(cfg, SITES, range(cfg.n_layers), range(4)), block=16)
        self.pool = S.top(self.scanned, POOL)
        self.base = self.loss([])

    def loss(self, zeroed: list[Key]) -> float:
        """Mean next-token NLL with these (site, layer, channel) zeroed, float64."""
        ids = torch.tensor(self.ids[None], dtype=torch.long)
        with hf_models.zeroed(self.torch, zeroed), torch.no_grad():
            logp = torch.log_softmax(self.torch(ids).logits[0, :-1], -1)
        return float(-logp[torch.arange(T - 1), ids[0, 1:]].mean())

    def delta(self, zeroed: list[Key]) -> float:
        return (self.loss(zeroed) - self.base) / math.log(10)

    def reference(self, steps: int, epsilon: float) -> list[Step]:
        """The unbatched greedy loop, one Step per step."""
        chosen: list[Key] = []
        out = []
        for _ in range(min(steps, POOL)):
            cand = [k for k in self.pool.keys() if k not in chosen]
            d = np.array([self.delta(chosen + [k]) for k in cand])
            order = np.argsort(-d)
            margin = d[order[0]] - d[order[1]] if len(cand) > 1 else math.inf
            chosen.append(cand[order[0]])
            out.append(Step(cand[order[0]], float(d[order[0]]), margin))
            if d[order[0]] >= epsilon:
                break
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with hf_models.one_thread():   # a tiny model: more threads only spin against each other
        yield Setup(tmp_path_factory.mktemp("qwen2"))


def picks(path: list[dict]) -> list[Key]:
    return [(p["site"], p["layer"], p["channel"]) for p in path]


def test_scan_deltas_match_reference(setup):
    """The scan's scores are the single-neuron deltas, and the pool is their top POOL."""
    keys = setup.scanned.keys()
    ref = np.array([setup.delta([k]) for k in keys])
    np.testing.assert_allclose(setup.scanned.score, ref, rtol=0, atol=TOL)
    top = np.sort(ref)[::-1][:POOL + 1]
    assert top[-2] > 10 * MARGIN, "the pool's neurons barely move the loss"
    assert (-np.diff(top)).min() > MARGIN, f"near-tied single deltas: {top}"
    assert setup.pool.keys() == [keys[i] for i in np.argsort(-ref)[:POOL]]


def test_greedy_steps_are_the_reference_picks(setup):
    ref = setup.reference(POOL, math.inf)
    assert min(s.margin for s in ref) > MARGIN, f"near-tied step in the reference: {ref}"
    assert [s.key for s in ref] != setup.pool.keys(), "greedy order equals scan order: the pool tests nothing"
    path = S.greedy(setup.engine, setup.pool, steps=POOL, epsilon=math.inf)
    assert [p["step"] for p in path] == list(range(1, POOL + 1))
    assert picks(path)[0] == setup.pool.keys()[0]   # the first step is the scan's best single neuron
    assert picks(path) == [s.key for s in ref]
    np.testing.assert_allclose([p["delta"] for p in path], [s.delta for s in ref], rtol=0, atol=TOL)
    # fewer steps than the pool: the same first picks
    short = S.greedy(setup.engine, setup.pool, steps=3, epsilon=math.inf)
    assert picks(short) == [s.key for s in ref[:3]]
    np.testing.assert_allclose([p["delta"] for p in short], [s.delta for s in ref[:3]], rtol=0, atol=TOL)


def test_greedy_stops_at_epsilon(setup):
    """epsilon midway between a step's delta and the largest before it: greedy stops there."""
    full = [s.delta for s in setup.reference(POOL, math.inf)]
    stops = [j for j in range(1, POOL - 1) if full[j] > max(full[:j]) + MARGIN]
    assert stops, f"no step rises clearly above the earlier ones: {full}"
    j = stops[len(stops) // 2]
    eps = (full[j] + max(full[:j])) / 2
    ref = setup.reference(POOL, eps)
    assert len(ref) == j + 1
    path = S.greedy(setup.engine, setup.pool, steps=POOL, epsilon=eps)
    assert picks(path) == [s.key for s in ref]
    assert path[-1]["delta"] >= eps > max(p["delta"] for p in path[:-1])
    # epsilon equal to that step's own delta (the same numbers in every call): reached there
    whole = S.greedy(setup.engine, setup.pool, steps=POOL, epsilon=math.inf)
    assert picks(S.greedy(setup.engine, setup.pool, steps=POOL, epsilon=whole[j]["delta"])) == picks(whole)[:j + 1]


def test_scan_targets_by_hand():
    """The neurons a scan covers: per site, deepest layer first, channels in the order given (all
    when None); with `top`, the first `top` distinct channels of each site and layer in the
    ranking (a channel met again at another position counts once)."""
    cfg = hf_models.shapes_config()   # 3 layers, o_proj 10 channels
    assert S.neurons(cfg, ["v_proj", "down_proj"], [0, 2], [3, 1]).keys() == [
        ("v_proj", 2, 3), ("v_proj", 2, 1), ("v_proj", 0, 3), ("v_proj", 0, 1),
        ("down_proj", 2, 3), ("down_proj", 2, 1), ("down_proj", 0, 3), ("down_proj", 0, 1)]
    assert S.targets(cfg, ["o_proj"], [1, 2]).keys() == [("o_proj", l, c) for l in (2, 1) for c in range(10)]
    ranking = NeuronSet.make(["down_proj", "q_proj", "down_proj", "down_proj", "down_proj", "down_proj", "up_proj"],
                             [1, 1, 0, 1, 1, 1, 2], [7, 2, 4, 7, 3, 5, 0], position=[0, 0, 0, 1, 0, 0, 0])
    got = S.targets(cfg, ["down_proj", "q_proj"], [0, 1], top=2, ranking=ranking)
    assert got.keys() == [("down_proj", 1, 7), ("down_proj", 1, 3), ("down_proj", 0, 4), ("q_proj", 1, 2)]
