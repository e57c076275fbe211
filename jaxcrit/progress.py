"""Long runs: progress bars, and the units of work a run keeps so that a killed one resumes.

Progress bars go to stderr (tqdm): done/total, rate and ETA from the work done so far. The rate
is measured from the first update on, so a first chunk that pays for compilation does not make
the ETA absurd; work resumed from a checkpoint is shown as done without counting toward the rate.

A memo(key, compute) returns the array kept under key, or computes and keeps it: the loops of
Stage 2, the scan, the evaluation and the study take one and pass each block through it. The
runner's memos keep units in the workdir (run/runner.py Store.memo); `no_memo` keeps nothing.
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

Memo = Callable[[str, Callable[[], np.ndarray]], np.ndarray]


def no_memo(key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """The in-memory memo: always computes."""
    return compute()


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "abl", enabled: bool = True, initial: int = 0):
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1, leave=True)

    def update(self, n: int) -> None:
        self.bar.update(n)
        if self.bar.n >= (self.bar.total or 0):
            self.bar.close()

    def close(self) -> None:
        self.bar.close()
