"""The whole-model map: every neuron screened cheaply, the candidates verified exactly.

Candidates come from the screens' rankings (critical/screens.py), in rank order, with a depth
that doubles each round: round r takes ranks [block (2^r - 1), block (2^(r+1) - 1)) of each
screen; a round verifies the union of its blocks not yet verified
through the engine (one resumable unit). The stopping rule is a heuristic, not a bound (a
first-order estimate bounds nothing):

    stop after round r >= 1 when round r's blocks (doubling the depth) added no member to the
    exact top-k,
    or when every screen's finite values are used up, or after max_rounds rounds.

Then a seeded random sample of `audit` neurons no round verified is verified too; it measures
what the rule may miss (how many audited neurons beat the k-th verified delta, extrapolated to
all unverified ones) and each screen's error against the exact deltas. Exact deltas are only
ever the engine's; screen values stay estimates.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxcrit.critical.screens import SCREENS
from jaxcrit.models.neurons import NeuronSet

Measure = Callable[[str, np.ndarray], np.ndarray]   # (unit key, flat neuron indices [n]) -> exact deltas [n]

NOT, ROUND, AUDIT = 0, 1, 2                    # how a neuron's exact delta was obtained
HOW = ("no", "screen", "audit")                # ... as map.csv's verified column writes it
RULE = ("stop after round r >= 1 when its blocks (ranks block (2^r - 1) to block (2^(r+1) - 1) of each screen, "
        "doubling the depth) added no "
        "member to the exact top-k; a heuristic, not a bound")


@dataclasses.dataclass
class Map:
    """Every neuron with its screen values and, where verified, its exact delta."""
    neurons: NeuronSet              # [N] the model's neurons (screens.universe order)
    screens: dict[str, np.ndarray]  # name -> [N] f32 screen values (NaN: the screen has none)
    delta: np.ndarray               # [N] f32 exact delta (engine); NaN where not verified
    how: np.ndarray                 # [N] int8: NOT, ROUND (verified by the rounds), AUDIT (audit sample)
    rounds: int                     # rounds verified
    stopped: str                    # rule | exhausted | max_rounds
    top_k: int
    block: int

    def top(self, k: int | None = None) -> np.ndarray:
        """Flat indices of the k (default top_k) largest exact deltas, largest first."""
        return _top(self.delta, self.how != NOT, self.top_k if k is None else k)

    def table(self):
        """One row per neuron: site, layer, channel, each screen's value, delta, verified."""
        df = self.neurons.to_pandas().drop(columns=["layer_name", "position"])
        for name, v in self.screens.items():
            df[name] = v
        df["delta"] = self.delta
        df["verified"] = np.array(HOW)[self.how]
        return df

    def summary(self) -> dict:
        """What summary.md shows: the rule, the counts, the exact top-k and the audit's findings."""
        top = self.top()
        records = self.neurons[top].records()
        for r, i in zip(records, top):
            r.pop("position")
            r["delta"] = float(self.delta[i])
            r.update({name: float(v[i]) for name, v in self.screens.items()})
            r["verified"] = HOW[self.how[i]]
        return {"neurons": len(self.delta), "verified": int((self.how == ROUND).sum()),
                "audited": int((self.how == AUDIT).sum()), "rounds": self.rounds, "block": self.block,
                "top_k": self.top_k, "stopped": self.stopped, "rule": RULE, "top": records, "audit": self.audit()}

    def audit(self) -> dict:
        """The audit sample against the rounds' exact top-k, and each screen against the exact deltas.

        missed: audited neurons whose delta beats the k-th delta the rounds verified;
        missed_estimate: that count scaled to every neuron the rounds left unverified.
        Per screen: recall (share of the exact top-k inside the screen's verified depth,
        depth(rounds, block) ranks), spearman (rank correlation with the exact delta on the audit
        sample), and for screens in delta units the median and max |estimate - exact| there.
        """
        rounds_top = _top(self.delta, self.how == ROUND, self.top_k)
        kth = float(self.delta[rounds_top[-1]]) if len(rounds_top) >= self.top_k else -np.inf
        aud = np.flatnonzero(self.how == AUDIT)
        missed = int((self.delta[aud] > kth).sum())
        unverified = int((self.how != ROUND).sum())
        out = {"sample": len(aud), "kth_delta": kth, "missed": missed,
               "missed_estimate": missed / len(aud) * unverified if len(aud) else None, "screens": {}}
        top = set(self.top().tolist())
        for name, v in self.screens.items():
            depth = set(ranked(v)[:depth_of(self.rounds, self.block)].tolist())
            s = {"recall": len(top & depth) / len(top) if top else None,
                 "spearman": _spearman(v[aud], self.delta[aud])}
            if SCREENS[name] == "delta":
                err = np.abs(v[aud] - self.delta[aud])
                s.update(abs_error_median=float(np.median(err)) if len(aud) else None,
                         abs_error_max=float(err.max()) if len(aud) else None)
            out["screens"][name] = s
        return out


def round_block(block: int, chunk: int, screens: int, top_k: int) -> int:
    """Candidates per screen and round: `block`, or with 0 the engine chunk shared among the
    screens (a round fills about one compiled chunk; overlaps leave it short), but at least
    top_k: on SmolLM2 rounds of 2 per screen (8-row CPU chunks) stopped after 45 neurons with 8
    of the exact top-20 unseen (docs/benchmarks.md)."""
    return block or max(top_k, chunk // screens)


def depth_of(rounds: int, block: int) -> int:
    """Ranks of each screen verified after `rounds` rounds (the depth doubles each round)."""
    return block * (2 ** rounds - 1)


def ranked(v: np.ndarray) -> np.ndarray:
    """Flat indices of a screen's finite values, largest |value| first (ties: lower index first).
    By magnitude because a first-order estimate's sign is not to be trusted: on SmolLM2 three of
    the exact top-20 had the most negative estimates of all 218,880 neurons (saturation)."""
    idx = np.flatnonzero(np.isfinite(v))
    return idx[np.argsort(-np.abs(v[idx]), kind="stable")]


def _top(delta: np.ndarray, among: np.ndarray, k: int) -> np.ndarray:
    """The k indices with the largest delta among `among` [N] bool (NaN counts as -inf)."""
    idx = np.flatnonzero(among)
    key = np.where(np.isnan(delta[idx]), -np.inf, delta[idx])
    return idx[np.argsort(-key, kind="stable")[:k]]


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x[ok], kind="stable")) for x in (a, b))
    c = np.corrcoef(ra, rb)[0, 1]
    return float(c) if np.isfinite(c) else None


def build(neurons: NeuronSet, screens: dict[str, np.ndarray], measure: Measure, *, top_k: int, block: int,
          max_rounds: int, audit: int, seed: int) -> Map:
    """Verifies candidates round by round until the stopping rule (module docstring), then audits.

    screens: name -> [N] values over `neurons`; measure(key, idx) -> exact deltas [len(idx)]
    (key "round-r" or "audit": a resumable unit). The rounds' neurons depend on the screens
    alone, so a resumed run verifies the same neurons.
    """
    N = len(neurons)
    delta = np.full(N, np.nan, np.float32)
    how = np.zeros(N, np.int8)
    orders = [ranked(v) for v in screens.values()]
    rounds, stopped = 0, "max_rounds"
    while not max_rounds or rounds < max_rounds:
        lo, hi = depth_of(rounds, block), depth_of(rounds + 1, block)
        if all(lo >= len(o) for o in orders):
            stopped = "exhausted"
            break
        cand = np.unique(np.concatenate([o[lo:hi] for o in orders]))
        new = cand[how[cand] == NOT]
        before = set(_top(delta, how == ROUND, top_k).tolist())
        if len(new):
            delta[new] = measure(f"round-{rounds}", new)
            how[new] = ROUND
        rounds += 1
        if rounds > 1 and set(_top(delta, how == ROUND, top_k).tolist()) == before:
            stopped = "rule"
            break
    pool = np.flatnonzero(how == NOT)
    if audit and len(pool):
        sample = np.sort(np.random.default_rng(seed).choice(pool, min(audit, len(pool)), replace=False))
        delta[sample] = measure("audit", sample)
        how[sample] = AUDIT
    return Map(neurons, screens, delta, how, rounds, stopped, top_k, block)
