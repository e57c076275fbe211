"""Engine benchmark: exhaustive single-neuron scans of a Qwen2.5-0.5B-shaped model.

    python -m jaxcrit.bench --out bench.json [--seq 512 --chunk 256 --sites down_proj,act_fn]

Weights are random bf16 generated on the device (timing does not depend on values). Reports
ablations/s, achieved TFLOP/s (matmul and attention FLOPs actually run, prefix sharing counted),
the % of a bf16 matmul peak measured in the same process, and peak device memory. Run the
PyTorch peer (shared/peers/torch_hooks_baseline.py) in the same call for the ratio.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig

QWEN_05B = ModelConfig(model_type="qwen2", vocab_size=151936, d_model=896, n_layers=24, n_heads=14,
                       n_kv_heads=2, head_dim=64, d_ff=4864, norm_eps=1e-6, rope_theta=1e6,
                       tie_embeddings=True, max_position_embeddings=32768)


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an n^3 matmul, the device's practical peak."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        c = f(a, b)
    c.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def layer_flops(cfg: ModelConfig, T: int) -> float:
    """Forward FLOPs of one decoder layer on one sequence (attention computed unmasked, as run)."""
    D, Q, KV, F = cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.d_ff
    return 2 * T * (D * Q + 2 * D * KV + Q * D + 3 * D * F) + 4 * T * T * Q


def scan_flops(cfg: ModelConfig, T: int, first_layers: np.ndarray) -> float:
    """FLOPs the engine runs for rows starting at these layers: layers >= first, then the lm head."""
    lm = 2 * T * cfg.d_model * cfg.vocab_size
    return float(np.sum((cfg.n_layers - first_layers.astype(np.float64)) * layer_flops(cfg, T) + lm))


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--vocab-chunk", type=int, default=16384)
    ap.add_argument("--loss", default="auto", help="auto | xla | pallas")
    ap.add_argument("--sites", default="down_proj,act_fn")
    ap.add_argument("--layers", type=int, default=0, help="scan only the first N layers (0: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = QWEN_05B
    res = {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "jax": jax.__version__,
           "seq": args.seq, "chunk": args.chunk, "vocab_chunk": args.vocab_chunk, "dtype": "bfloat16"}
    res["matmul_peak_tflops"] = matmul_peak()
    params = decoder.random_params(cfg, jax.random.key(1), jnp.bfloat16)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.seq)
    t = time.perf_counter()
    eng = E.Engine(cfg, params, E.Texts.from_ids([tokens.tolist()]), chunk=args.chunk,
                   vocab_chunk=args.vocab_chunk, loss=args.loss, progress=False)
    res["attention"], res["loss"] = eng.attention, eng.loss
    res["setup_s"] = time.perf_counter() - t
    layers = range(args.layers or cfg.n_layers)
    for site in args.sites.split(","):
        abl = E.single(cfg, site, layers=layers)
        warm = abl.take(np.arange(eng.chunk))   # compile outside the timing
        eng.losses(warm)
        t = time.perf_counter()
        losses = eng.losses(abl, desc=f"{site} scan")
        dt = time.perf_counter() - t
        fl = scan_flops(cfg, args.seq, np.asarray(abl.layer[:, 0]))
        res[site] = {"ablations": abl.rows, "seconds": dt, "abl_per_s": abl.rows / dt,
                     "tflops": fl / dt / 1e12, "pct_of_peak": 100 * fl / dt / 1e12 / res["matmul_peak_tflops"],
                     "finite": bool(np.isfinite(losses).all())}
        print(json.dumps({site: res[site]}), flush=True)
    res["peak_memory_gib"] = (peak_memory() or 0) / 2**30
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
