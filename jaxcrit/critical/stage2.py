"""Stage 2: grow the critical set along a ranking, every prefix scored through the engine."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxcrit import engine as E
from jaxcrit.models.sites import SITE_NAMES
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.progress import Memo, no_memo


@dataclasses.dataclass
class Growth:
    """delta for each evaluated prefix size n, and the first n with delta >= epsilon (None: never)."""
    ns: np.ndarray       # [M] int
    deltas: np.ndarray   # [M] f32
    critical_n: int | None

    @staticmethod
    def of(ns: np.ndarray, deltas: np.ndarray, epsilon: float) -> "Growth":
        """The curve with its critical n: the first n whose delta reaches epsilon."""
        hit = np.flatnonzero(np.asarray(deltas) >= epsilon)
        return Growth(np.asarray(ns), np.asarray(deltas), int(ns[hit[0]]) if len(hit) else None)

    @property
    def last_n(self) -> int:
        """The critical n, or the largest n scored when no prefix reached epsilon."""
        return self.critical_n if self.critical_n is not None else int(self.ns[-1])

    def delta(self, n: int) -> float:
        return float(self.deltas[list(self.ns).index(n)])

    def to_pandas(self):
        import pandas as pd
        return pd.DataFrame({"n": np.asarray(self.ns, int), "delta": np.asarray(self.deltas, np.float64)})


def grow(engine: E.Engine, ranking: NeuronSet, *, epsilon: float, max_steps: int, full_curve: bool,
         ns: np.ndarray | None = None, desc: str = "stage 2 prefixes", memo: Memo = no_memo,
         sites: tuple[str, ...] = SITE_NAMES) -> Growth:
    """Scores prefixes n = 1..min(max_steps, len(ranking)) (or the given ns) in engine-sized blocks.

    Stops after the block holding the first n with delta >= epsilon unless full_curve. memo(key,
    compute) may keep each block's deltas, so a resumed run scores only the blocks it lacks. Every
    block's rows have n_max entries (the largest prefix), so all blocks share one compiled program;
    it holds masks for `sites` (all nine: any ranking's, so the program is known before Stage 1
    ranks, and `Engine.compile` can build it while Stage 1 runs).
    """
    n_max = min(max_steps, len(ranking))
    todo = np.arange(1, n_max + 1) if ns is None else np.asarray([n for n in ns if 1 <= n <= n_max], int)
    block = max(engine.chunk, 1)
    got_n, got_d = [], []
    for lo in range(0, len(todo), block):
        part = todo[lo:lo + block]
        abl = lambda: E.prefixes(engine.cfg, ranking.site, ranking.layer, ranking.channel, part, width=n_max)
        got_n.append(part)
        got_d.append(memo(f"block-{lo}", lambda: engine.deltas(abl(), desc=desc, sites=sites)))
        if not full_curve and (got_d[-1] >= epsilon).any():
            break
    ns_done = np.concatenate(got_n) if got_n else np.zeros(0, int)
    deltas = np.concatenate(got_d) if got_d else np.zeros(0, np.float32)
    return Growth.of(ns_done, deltas, epsilon)


@dataclasses.dataclass
class Critical:
    """The critical set: the first n neurons of the ranking reaching epsilon (or all scored)."""
    neurons: NeuronSet
    n: int | None          # None: no prefix reached epsilon; neurons is then the largest prefix scored
    epsilon: float
    delta: float
    base_loss: float       # mean NLL of the text, nats/token

    @property
    def loss(self) -> float:
        return self.base_loss + self.delta * E.LN10

    def to_json(self) -> dict:
        return {"n": self.n, "epsilon": self.epsilon, "delta": self.delta, "base_loss": self.base_loss,
                "loss": self.loss, "neurons": self.neurons.records()}
