"""A dependency-free progress line on stderr: done/total, rate, eta."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "abl", enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.t0, self._last = 0, time.perf_counter(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.5 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total} {rate:,.1f} {self.unit}/s eta {eta:,.0f}s ")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
