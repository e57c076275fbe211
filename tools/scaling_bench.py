"""Scan throughput on 1, 2, 4, ... GPUs of one host (rows over 'data'), and the results of every
mesh against the 1-device run's.

    PYTHONPATH=. python tools/scaling_bench.py --shape 7b [--rows 2048 --chunk 128 --tokens 512 --loss auto]

A Qwen2.5-shaped model (bench.SHAPES) with random bf16 weights drawn on each mesh's devices
(replicated over 'data'), one text of random token ids, the down_proj output channels of every
layer: `rows` of them evenly spaced over the exhaustive scan, so the mix of start layers (prefix
sharing) is the full scan's and the rate stands for it. Each mesh of n devices runs chunks of
chunk x n rows (chunk per device), after one warm-up chunk that compiles. The fused loss kernel
runs under shard_map on a mesh (engine.loss auto). Prints JSON: ablations/s per device count,
the speed-up over one device, the largest |loss difference| against one device (bf16: rows meet
different chunk-mates, so their start layers and batched rounding differ), peak memory.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench import SHAPES, device_params, peak_memory
from jaxcrit.dist.sharding import make_mesh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="7b", choices=SHAPES)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=128, help="rows per device per compiled call")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--loss", default="auto", help="auto | xla | pallas")
    args = ap.parse_args()
    cfg = SHAPES[args.shape]
    full = E.single(cfg, "down_proj")
    abl = full.take(np.linspace(0, full.rows - 1, args.rows).astype(int))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens).tolist()
    counts = [n for n in (1, 2, 4, 8, 16, 32) if n <= jax.device_count()]
    res = {"devices": [d.device_kind for d in jax.devices()], "shape": args.shape, "tokens": args.tokens,
           "rows": args.rows, "chunk_per_device": args.chunk, "runs": []}
    first = None
    for n in counts:
        mesh = make_mesh((n, 1), jax.devices()[:n])
        params = device_params(cfg, jax.random.key(1), jnp.bfloat16, mesh)
        eng = E.Engine(cfg, params, E.Texts.from_ids([tokens]), mesh=mesh, chunk=args.chunk * n, loss=args.loss,
                       progress=False)
        eng.losses(abl.take(np.arange(eng.chunk)))   # compiles
        t = time.perf_counter()
        out = eng.losses(abl)
        rate = abl.rows / (time.perf_counter() - t)
        first = (out, rate) if first is None else first
        res["runs"].append({"gpus": n, "ablations_per_s": rate, "speedup": rate / first[1],
                            "max_abs_loss_diff_vs_1": float(np.abs(out - first[0]).max()), **eng.kernels._asdict()})
        del eng, params
    res["peak_memory_gib"] = (peak_memory() or 0) / 2**30
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
