"""Engine benchmark: exhaustive single-neuron scans of a Qwen2.5-0.5B-shaped model.

    python -m jaxcrit.bench --out bench.json [--seq 512 --max-chunk 640 --sites down_proj,act_fn]

Weights are random bf16 generated on the device (timing does not depend on values). Each site's
chunk is the largest divisor of its channel count <= --max-chunk (so a layer's rows fill whole
chunks, as the PyTorch peer picks its batch): 448 for down_proj, 608 for act_fn at the default.
Reports ablations/s; the FLOPs actually run (matmuls and causal attention of the layers each row
runs from its start point, plus the lm head), as TFLOP/s; the physical limit (those FLOPs at the
bf16 matmul peak measured in the same process) and the % of it reached; peak device memory. Run
shared/peers/torch_strong_peer.py in the same call for the ratio.
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

_QWEN = dict(model_type="qwen2", vocab_size=152064, head_dim=128, norm_eps=1e-6, rope_theta=1e6,
             tie_embeddings=False, max_position_embeddings=32768)
SHAPES: dict[str, ModelConfig] = {   # Qwen2.5 shapes by size, as their config.json files give them
    "0.5b": QWEN_05B,
    "7b": ModelConfig(**_QWEN, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944),
    "32b": ModelConfig(**_QWEN, d_model=5120, n_layers=64, n_heads=40, n_kv_heads=8, d_ff=27648),
    "72b": ModelConfig(**_QWEN, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=29568),
}


def device_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, mesh=None,
                  layout: str = "replicated", scale: float = 0.02) -> dict[str, jax.Array]:
    """Random params drawn on the devices one layer at a time, placed by a layout's rules (as
    decoder.random_params draws them, but no whole-tensor f32 draw: a 32B or 72B shape's peak
    stays at the params plus one layer's draw)."""
    from jaxcrit.models.params import param_table
    from jaxcrit.dist.sharding import make_mesh, named, rules
    mesh = mesh or make_mesh()
    out = {}
    for i, (name, (shape, axes)) in enumerate(sorted(param_table(cfg).items())):
        base, s = ((0.0 if cfg.family.norm_plus_one else 1.0), 0.1) if "norm" in name else (0.0, scale)
        stacked = axes[0] == "layers"

        def draw(k, shape=shape, base=base, s=s, stacked=stacked):
            one = lambda k, sh: (base + s * jax.random.normal(k, sh, jnp.float32)).astype(dtype)
            if stacked:
                return jax.lax.map(lambda k: one(k, shape[1:]), jax.random.split(k, shape[0]))
            return one(k, shape)

        out[name] = jax.jit(draw, out_shardings=named(axes, shape, mesh, rules(layout)))(jax.random.fold_in(key, i))
    return out


_matmul = jax.jit(lambda a, b: a @ b)   # module level: repeated calls (tools/sustained_matmul.py) compile once


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an n^3 matmul on random data, the device's practical peak."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    _matmul(a, b).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        c = _matmul(a, b)
    c.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def attention_flops(cfg: ModelConfig, T: int) -> float:
    """One layer's attention branch on one sequence: q/k/v/o matmuls, QK^T and PV at causal half."""
    D, Q, KV = cfg.d_model, cfg.q_dim, cfg.kv_dim
    return 2 * T * (D * Q + 2 * D * KV + Q * D) + 2 * T * T * Q


def mlp_flops(cfg: ModelConfig, T: int) -> float:
    """One layer's MLP on one sequence: gate, up and down matmuls."""
    return 2 * T * 3 * cfg.d_model * cfg.d_ff


def head_flops(cfg: ModelConfig, T: int) -> float:
    """The lm head on the T-1 predicting positions of one sequence."""
    return 2 * (T - 1) * cfg.d_model * cfg.vocab_size


def row_flops(cfg: ModelConfig, T: int, starts: np.ndarray) -> np.ndarray:
    """[R] FLOPs each row runs from its start point [R, 2] (layer S, entry): its part of layer S
    ("layer": all, "mlp": the MLP, "out": none), layers S+1.. whole, and the head."""
    att, mlp = attention_flops(cfg, T), mlp_flops(cfg, T)
    entry = np.array([att + mlp, mlp, 0.0])[starts[:, 1]]
    return entry + (cfg.n_layers - 1 - starts[:, 0].astype(np.float64)) * (att + mlp) + head_flops(cfg, T)


def chunk_for(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--max-chunk", type=int, default=640)
    ap.add_argument("--vocab-chunk", type=int, default=16384)
    ap.add_argument("--loss", default="auto", help="auto | xla | pallas")
    ap.add_argument("--sites", default="down_proj,act_fn")
    ap.add_argument("--layers", type=int, default=0, help="scan only the first N layers (0: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = QWEN_05B
    res = {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "jax": jax.__version__,
           "seq": args.seq, "vocab_chunk": args.vocab_chunk, "dtype": "bfloat16"}
    peak = res["matmul_peak_tflops"] = matmul_peak()
    params = decoder.random_params(cfg, jax.random.key(1), jnp.bfloat16)
    texts = E.Texts.from_ids([np.random.default_rng(0).integers(0, cfg.vocab_size, args.seq).tolist()])
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
        res[site] = {"ablations": abl.rows, "chunk": eng.chunk, **eng.kernels._asdict(),
                     "setup_s": setup, "seconds": dt, "abl_per_s": abl.rows / dt,
                     "gflop_per_abl": fl / abl.rows / 1e9, "tflops": fl / dt / 1e12,
                     "limit_abl_per_s": abl.rows / (fl / (peak * 1e12)), "pct_of_limit": 100 * fl / dt / 1e12 / peak,
                     "finite": bool(np.isfinite(losses).all()), "max_effect": float(np.abs(losses - eng.base_loss).max())}
        print(json.dumps({site: res[site]}), flush=True)
    res["peak_memory_gib"] = (peak_memory() or 0) / 2**30
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
