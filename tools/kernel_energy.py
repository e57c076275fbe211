"""Each hot kernel of the engine alone at the card's power cap: TFLOP/s, watts, pJ per FLOP, SM clock.

    python tools/kernel_energy.py [--rows 229376 --seconds 4 --only "fused MLP"]

Under a long scan the H200 sits at its 700 W cap (docs/benchmarks.md), so a kernel's rate there is
set by the energy it spends per FLOP, not by its speed in a short burst. Each kernel runs in a
loop for 1 s to settle, then for --seconds while nvidia-smi samples power and SM clock every 200
ms. Shapes: a 448-ablation chunk of Qwen2.5-0.5B at 512 tokens (229,376 rows), bf16 random data.
GPU only (the Mosaic GPU kernels need sm_90); prints one JSON line per kernel. --only picks the
kernels whose names hold the text: with ncu, `ncu --kernel-name regex:fused_mlp --launch-skip 1
--launch-count 1 python tools/kernel_energy.py --only "fused MLP" --seconds 0` profiles one launch
of the MLP kernel at the chunk's shape (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit.bench import QWEN_05B
from jaxcrit.models import decoder
from jaxcrit.kernels import fused_loss, fused_mlp


def sampled(f, args, seconds: float) -> tuple[int, float, float, float]:
    """(calls, seconds, mean watts, mean SM MHz) of f(*args) in a loop, nvidia-smi sampling."""
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.0:   # settle at the cap
        out = f(*args)
    jax.block_until_ready(out)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=power.draw,clocks.sm", "--format=csv,noheader,nounits",
                            "-lms", "200"], stdout=subprocess.PIPE, text=True)
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        for _ in range(5):
            out = f(*args)
        jax.block_until_ready(out)
        n += 5
    dt = time.perf_counter() - t0
    smi.terminate()
    rows = [line.split(",") for line in smi.communicate()[0].splitlines() if "," in line]
    watts, mhz = np.array(rows[2:] or rows or [[np.nan, np.nan]], float).mean(0)   # the first samples come before the loop's load
    return n, dt, float(watts), float(mhz)


def at_cap(f, args, flops: float, seconds: float) -> dict:
    """f(*args)'s rate at the cap ({tflops, watts, pj_per_flop, sm_mhz}), flops per call."""
    n, dt, watts, mhz = sampled(f, args, seconds)
    rate = n * flops / dt
    return {"tflops": round(rate / 1e12, 1), "watts": round(watts, 1), "pj_per_flop": round(watts / rate * 1e12, 4),
            "sm_mhz": round(mhz)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=448 * 512)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--only", default="", help="time only the kernels whose names hold this text")
    args = ap.parse_args()
    cfg, N = QWEN_05B, args.rows
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    keys = iter(jax.random.split(jax.random.key(0), 8))
    rand = lambda shape, scale=1.0: (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(jnp.bfloat16)
    x, gate, up, w, down_in, down_w = rand((N, D)), rand((D, F), 0.03), rand((D, F), 0.03), rand((V, D), 0.02), \
        rand((N, F), 0.01), rand((F, D), 0.03)
    shift = jnp.full((N,), 3.0, jnp.float32)
    scale = jnp.ones((N,), jnp.float32)   # the MLP rows' RMSNorm scales
    big = rand((8192, 8192))
    mm = jax.jit(lambda a, b: a @ b, compiler_options=decoder.COMPILER_OPTIONS)
    xla_mlp = jax.jit(lambda x, g, u: jax.nn.silu(x @ g) * (x @ u), compiler_options=decoder.COMPILER_OPTIONS)
    gate_up = 4 * N * D * F   # FLOPs of x @ gate and x @ up
    kernels = {   # name: (function, arguments, FLOPs per call)
        "cuBLAS matmul 8192^3": (mm, (big, big), 2 * 8192**3),
        "cuBLAS gate|up GEMM": (mm, (x, jnp.concatenate([gate, up], 1)), gate_up),
        "fused MLP gate|up + SiLU*mul (Mosaic GPU)": (jax.jit(fused_mlp.swiglu), (x, scale, gate, up), gate_up),
        "XLA gate, up GEMMs + SiLU*mul pass": (xla_mlp, (x, gate, up), gate_up),
        "cuBLAS down_proj GEMM": (mm, (down_in, down_w), 2 * N * F * D),
        "head exp-sum (fused loss kernel)": (jax.jit(fused_loss.shifted_expsum), (x, w, shift), 2 * N * D * V),
        "cuBLAS lm-head GEMM, 16,384 rows, bf16 logits": (mm, (x[:16384], w.T), 2 * 16384 * D * V),
    }
    for name, (f, a, flops) in kernels.items():
        if args.only not in name:
            continue
        print(json.dumps({"kernel": name, **at_cap(f, a, flops, args.seconds)}), flush=True)


if __name__ == "__main__":
    main()
