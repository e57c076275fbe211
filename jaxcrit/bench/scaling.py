"""Scan throughput on 1, 2, 4, ... GPUs of one host (rows over 'data'), each mesh's losses against one's.

    python -m jaxcrit.bench scaling --shape 7b [--rows 2048 --chunk 128 --tokens 512 --loss auto]

A Qwen2.5-shaped model with random weights (--dtype, bf16) drawn on each mesh's devices
(replicated over 'data'), one text of random token ids, the down_proj output channels of every
layer: `rows` of them evenly spaced over the exhaustive scan, so the mix of start layers (prefix
sharing) is the full scan's and the rate stands for it. Each mesh of n devices runs chunks of
chunk x n rows (chunk per device), after one warm-up chunk that compiles. The fused loss kernel
runs under shard_map on a mesh (engine.loss auto). Reports ablations/s per device count, the
speed-up over one device, the largest |loss difference| against one device (bf16: rows meet
different chunk-mates, so their start layers and batched rounding differ), peak memory.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench.measure import header, line, peak_memory_gib
from jaxcrit.bench.model import SHAPES, add_model_arguments, random_params, random_text
from jaxcrit.dist.sharding import make_mesh


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_model_arguments(ap, "7b")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128, help="rows per device per compiled call")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--loss", default="auto", help="auto | xla | pallas")


def run(args: argparse.Namespace) -> dict:
    cfg = SHAPES[args.shape]
    full = E.single(cfg, "down_proj")
    abl = full.take(np.linspace(0, full.rows - 1, args.rows).astype(int))
    texts = random_text(cfg, args.tokens)
    res = {**header(), "devices": [d.device_kind for d in jax.devices()], "shape": args.shape,
           "tokens": args.tokens, "rows": args.rows, "chunk_per_device": args.chunk, "runs": []}
    first = None
    for n in (n for n in (1, 2, 4, 8, 16, 32) if n <= jax.device_count()):
        mesh = make_mesh((n, 1), jax.devices()[:n])
        params = random_params(cfg, args.dtype, mesh=mesh)
        eng = E.Engine(cfg, params, texts, mesh=mesh, chunk=args.chunk * n, loss=args.loss, progress=False)
        eng.losses(abl.take(np.arange(eng.chunk)))   # compiles
        t = time.perf_counter()
        out = eng.losses(abl)
        rate = abl.rows / (time.perf_counter() - t)
        first = (out, rate) if first is None else first
        res["runs"].append({"gpus": n, "ablations_per_s": rate, "speedup": rate / first[1],
                            "max_abs_loss_diff_vs_1": float(np.abs(out - first[0]).max()), **eng.kernels.names()})
        line(res["runs"][-1])
        del eng, params
    res["peak_memory_gib"] = peak_memory_gib()
    return res
