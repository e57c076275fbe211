"""Progress bars on stderr (tqdm): done/total, rate and ETA from the work done so far.

The rate is measured from the first update on, so a first chunk that pays for compilation does
not make the ETA absurd; work resumed from a checkpoint is shown as done without counting toward
the rate.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


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
