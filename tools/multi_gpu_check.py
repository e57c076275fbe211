"""Several GPUs: the same engine results on a 1-device and an all-device ('data') mesh, and the
scan throughput of each, with the XLA loss and with the fused loss kernel (shard_map over rows).
Qwen2.5-0.5B-shaped, random bf16 weights, 512 tokens.

    PYTHONPATH=. python tools/multi_gpu_check.py [--rows 4096]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench import QWEN_05B
from jaxcrit.models import decoder
from jaxcrit.models.params import shard
from jaxcrit.sharding import make_mesh


def run(mesh, raw, tokens, abl, chunk, loss):
    cfg = QWEN_05B
    params = shard(cfg, raw, mesh)
    eng = E.Engine(cfg, params, E.Texts.from_ids([tokens]), mesh=mesh, chunk=chunk, loss=loss, progress=False)
    eng.losses(abl.take(np.arange(eng.chunk)))
    t = time.perf_counter()
    out = eng.losses(abl)
    return out, abl.rows / (time.perf_counter() - t), eng.loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    n = jax.device_count()
    raw = decoder.random_params(QWEN_05B, jax.random.key(1), jnp.bfloat16)
    tokens = np.random.default_rng(0).integers(0, QWEN_05B.vocab_size, 512).tolist()
    abl = E.single(QWEN_05B, "down_proj", layers=range(8, 24)).take(np.arange(args.rows))
    res = {"devices": [d.device_kind for d in jax.devices()]}
    single = {}
    for loss in ("xla", "pallas"):   # pallas: the fused loss kernel, under shard_map on the n-device mesh
        one, r1, _ = run(make_mesh((1, 1), jax.devices()[:1]), raw, tokens, abl, args.chunk, loss)
        many, rn, _ = run(make_mesh((n, 1)), raw, tokens, abl, args.chunk * n, loss)
        single[loss] = one
        res[loss] = {"abl_per_s_1gpu": r1, f"abl_per_s_{n}gpu": rn, "scaling": rn / r1,
                     "max_abs_loss_diff_1_vs_n": float(np.abs(one - many).max())}
    res["max_abs_loss_diff_fused_vs_xla"] = float(np.abs(single["xla"] - single["pallas"]).max())
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
