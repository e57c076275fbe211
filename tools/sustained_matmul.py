"""The bf16 matmul rate in a burst and sustained (the card at its power cap), for the limits in
docs/benchmarks.md.

    nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.sw_power_cap \
        --format=csv -lms 1000 > smi.csv &
    python tools/sustained_matmul.py [--seconds 45]

Prints one JSON line per 400 products of two random 8192 x 8192 bf16 matrices: the first is the
burst rate (what jaxcrit.bench's matmul_peak measures), the later ones the rate at the power cap.
"""
from __future__ import annotations

import argparse
import json
import time

from jaxcrit.bench import matmul_peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=45.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        tflops = matmul_peak(8192, 400)
        print(json.dumps({"t_s": round(time.perf_counter() - t0, 1), "tflops": round(tflops, 1)}), flush=True)


if __name__ == "__main__":
    main()
