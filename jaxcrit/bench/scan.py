"""Exhaustive single-neuron scans of a Qwen2.5-shaped model, against the physical limit.

    python -m jaxcrit.bench scan --out bench.json [--seq 512 --max-chunk 640 --sites down_proj,act_fn]

Weights are random, generated on the device. Each site's chunk is the largest divisor of its
channel count <= --max-chunk (so a layer's rows fill whole chunks, as the PyTorch peer picks its
batch): 448 for down_proj, 608 for act_fn at the default. Reports ablations/s; the FLOPs
actually run (matmuls and causal attention of the layers each row runs from its start point,
plus the lm head), as TFLOP/s; the physical limit (those FLOPs at the bf16 matmul peak measured
in the same process) and the % of it reached; peak device memory. Run the PyTorch peer on the
same machine for the ratio.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench.measure import header, line, matmul_peak, peak_memory_gib, row_flops
from jaxcrit.bench.model import SHAPES, add_model_arguments, random_params, random_text


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_model_arguments(ap)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-chunk", type=int, default=640)
    ap.add_argument("--vocab-chunk", type=int, default=16384)
    ap.add_argument("--loss", default="auto", help="auto | xla | pallas")
    ap.add_argument("--sites", default="down_proj,act_fn")
    ap.add_argument("--layers", type=int, default=0, help="scan only the first N layers (0: all)")
    ap.add_argument("--peak-size", type=int, default=8192, help="n of the n^3 matmul that measures the peak")


def chunk_for(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def run(args: argparse.Namespace) -> dict:
    cfg = SHAPES[args.shape]
    res = {**header(), "shape": args.shape, "seq": args.seq, "vocab_chunk": args.vocab_chunk, "dtype": args.dtype}
    peak = res["matmul_peak_tflops"] = matmul_peak(args.peak_size)
    params = random_params(cfg, args.dtype)
    texts = random_text(cfg, args.seq)
    layers = range(args.layers or cfg.n_layers)
    for site in args.sites.split(","):
        abl = E.single(cfg, site, layers=layers)
        chunk = chunk_for(abl.rows // len(layers), args.max_chunk)
        t = time.perf_counter()
        eng = E.Engine(cfg, params, texts, chunk=chunk, vocab_chunk=args.vocab_chunk, loss=args.loss,
                       progress=False)
        eng.losses(abl.take(np.arange(eng.chunk)))   # compile outside the timing
        setup = time.perf_counter() - t
        t = time.perf_counter()
        losses = eng.losses(abl, desc=f"{site} scan")
        dt = time.perf_counter() - t
        fl = float(row_flops(cfg, args.seq, E.start_points(abl, cfg.n_layers)).sum())
        res[site] = {"ablations": abl.rows, "chunk": eng.chunk, **eng.kernels.names(),
                     "setup_s": setup, "seconds": dt, "abl_per_s": abl.rows / dt,
                     "gflop_per_abl": fl / abl.rows / 1e9, "tflops": fl / dt / 1e12,
                     "limit_abl_per_s": abl.rows / (fl / (peak * 1e12)), "pct_of_limit": 100 * fl / dt / 1e12 / peak,
                     "finite": bool(np.isfinite(losses).all()), "base_loss": eng.base_loss,
                     "mean_loss": float(losses.mean()), "max_effect": float(np.abs(losses - eng.base_loss).max())}
        line({site: res[site]})
    res["peak_memory_gib"] = peak_memory_gib()
    return res
