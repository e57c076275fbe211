"""Stage 1 + Stage 2 wall time on a Qwen2.5-0.5B-shaped model (random bf16 weights on the device).

    PYTHONPATH=. python tools/pipeline_bench.py [--tokens 115 --samples 100 --steps 1000]

The default text is 113-115 tokens for these tokenizers; random ids of that length stand in
for it (timing does not depend on values). Stage 2 runs the full curve n = 1..steps, the cost
when no prefix collapses the model. Run the PyTorch peer with SEQ=<tokens> in the same call: its
sequential forward is the reference's cost per Stage 2 step and per noisy pass.
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
from jaxcrit.critical import stage1, stage2
from jaxcrit.models import decoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=115)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    cfg = QWEN_05B
    params = decoder.random_params(cfg, jax.random.key(1), jnp.bfloat16)
    tok = np.random.default_rng(0).integers(0, cfg.vocab_size, args.tokens).astype(np.int32)
    res = {"device": jax.devices()[0].device_kind, "tokens": args.tokens, "samples": args.samples,
           "steps": args.steps, "dtype": "bfloat16"}
    run1 = lambda: stage1.importance(cfg, params, tok, alpha=5.0, samples=args.samples, seed=42,
                                     chunk=args.batch, progress=False)
    stage1.importance(cfg, params, tok, alpha=5.0, samples=args.batch, seed=42, chunk=args.batch, progress=False)
    t = time.perf_counter(); imp = run1(); res["stage1_noisy_s"] = time.perf_counter() - t
    t = time.perf_counter(); rk = stage1.rank(imp.scores(), 10000, 1e-6, False)
    res["rank_channel_s"] = time.perf_counter() - t
    t = time.perf_counter(); stage1.rank(imp.scores(), 10000, 1e-6, True)
    res["rank_position_s"] = time.perf_counter() - t
    eng = E.Engine(cfg, params, E.Texts.from_ids([tok.tolist()]), chunk=args.chunk, progress=False)
    stage2.grow(eng, rk, epsilon=1e9, max_steps=args.chunk, full_curve=True)   # compile
    t = time.perf_counter()
    g = stage2.grow(eng, rk, epsilon=1e9, max_steps=args.steps, full_curve=True)
    res["stage2_full_curve_s"] = time.perf_counter() - t
    res["stage2_ms_per_step"] = 1e3 * res["stage2_full_curve_s"] / len(g.ns)
    res["stage1_ms_per_noisy_pass"] = 1e3 * res["stage1_noisy_s"] / args.samples
    res["total_s"] = res["stage1_noisy_s"] + res["rank_channel_s"] + res["stage2_full_curve_s"]
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
