"""Variants of the fused MLP's tiles against each other, alternating: the kernel alone at the
card's power cap, and whole engine chunks; every variant's products and losses against the first's.

    python tools/mlp_tiles.py 64,256,64,3,2,2 128,128,64,3,2,2 [--rounds 2 --seconds 3]

A variant is hopper.Tiles' fields in order, tm,tn,tk,stages,groups,cluster[,pingpong] (0 or 1;
the first variant: the baseline, usually fused_mlp.TILES; the second above gives each
warpgroup 128 rows of 64 gate and 64 up columns). Shapes: a 448-ablation chunk of Qwen2.5-0.5B at 512
tokens (229,376 rows), bf16 random data; the chunks: 12 of 448 down_proj rows starting after
layers 0-11. Each variant is compiled once, before any timing, so the rounds alternate between
compiled programs. Prints JSON lines. GPU only (Hopper); docs/benchmarks.md has the results of
the probe it was written from.
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
from jaxcrit.kernels import fused_mlp, hopper
from kernel_energy import at_cap

ROWS, SEQ = 448, 512


def parse_tiles(text: str) -> hopper.Tiles:
    """hopper.Tiles from its fields in order, comma-separated ints (0/1 for the flags)."""
    t = hopper.Tiles(*(int(v) for v in text.split(",")))
    return t._replace(pingpong=bool(t.pingpong))


def compiled_with(tiles: hopper.Tiles, build):
    """build() compiled while fused_mlp.TILES is `tiles` (the trace reads it; caches cleared)."""
    kept = fused_mlp.TILES
    fused_mlp.TILES = tiles
    jax.clear_caches()
    try:
        return build()
    finally:
        fused_mlp.TILES = kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tiles", nargs="+", help="tm,tn,tk,stages,groups,cluster[,pingpong] per variant")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    variants = {t: parse_tiles(t) for t in args.tiles}
    cfg = QWEN_05B
    N, D, F = ROWS * SEQ, cfg.d_model, cfg.d_ff
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (N, D), jnp.float32).astype(jnp.bfloat16)
    g, u = ((0.03 * jax.random.normal(k, (D, F), jnp.float32)).astype(jnp.bfloat16) for k in keys[1:])

    # the kernel alone
    s = jnp.ones((N,), jnp.float32)   # the rows' RMSNorm scales
    kernel = {n: compiled_with(t, lambda: jax.jit(lambda *a: fused_mlp.swiglu(*a)).lower(x, s, g, u).compile())
              for n, t in variants.items()}
    first = args.tiles[0]
    want = kernel[first](x, s, g, u)
    print(json.dumps({"products_differ_from_first": {n: float(jnp.mean(f(x, s, g, u) != want))
                                                     for n, f in kernel.items()}}), flush=True)
    for r in range(args.rounds):
        for n, f in kernel.items():
            print(json.dumps({"alone": n, "round": r, **at_cap(f, (x, s, g, u), 4 * N * D * F, args.seconds)}),
                  flush=True)

    # engine chunks
    params = decoder.random_params(cfg, jax.random.key(1), jnp.bfloat16)
    texts = E.Texts.from_ids([np.random.default_rng(0).integers(0, cfg.vocab_size, SEQ).tolist()])
    eng = E.Engine(cfg, params, texts, chunk=ROWS, progress=False)
    _, cols, starts = eng.plan(E.single(cfg, "down_proj", layers=range(12), channels=np.arange(ROWS)))
    chunks = [({k: jax.device_put(v[i * ROWS:(i + 1) * ROWS], eng.rows_sharding) for k, v in cols.items()},
               jax.device_put(s, eng.replicated)) for i, s in enumerate(starts)]
    fixed = (eng.params, eng.cache, eng.valid, eng.targets, eng.tmask, eng.shift)
    program = {n: compiled_with(t, lambda: eng._compiled(ROWS, 1, ("down_proj",))) for n, t in variants.items()}
    run = lambda f: np.asarray(jnp.concatenate(jax.block_until_ready([f(*fixed, r, s) for r, s in chunks])))
    losses = {n: run(f) for n, f in program.items()}
    print(json.dumps({"losses_max_abs_diff_from_first": {n: float(np.abs(l - losses[first]).max())
                                                         for n, l in losses.items()}}), flush=True)
    for r in range(args.rounds):
        seconds = {}
        for n, f in program.items():
            t0 = time.perf_counter()
            run(f)
            seconds[n] = round(time.perf_counter() - t0, 4)
        print(json.dumps({"chunks_s": seconds, "round": r}), flush=True)


if __name__ == "__main__":
    main()
