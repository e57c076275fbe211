"""Where the engine's time goes, against the physical limit (Qwen2.5-0.5B shape, bf16, one device).

    python tools/profile_engine.py [--rows 448 --seq 512 --sweep]

For chunks of R single-channel down_proj rows (which start after their layer: nothing of it runs):
  * the ceilings, measured here: the bf16 matmul peak and the copy bandwidth;
  * real engine chunks starting after layer S, for several S: a chunk runs the head and L-1-S
    whole layers, so a line through their times gives the time of one tail layer and of the head
    (plus the entry and the chunk's overhead), per ablation;
  * the pieces alone: one vmapped decoder layer (cuDNN attention; compiled as the engine does,
    and with XLA's default Triton GEMMs) with XLA's FLOP and byte counts; its matmuls alone and
    its attention alone (the rest is norms, RoPE, the activation, residual adds); the loss head
    through the fused kernel and through XLA;
  * --sweep: the fused kernel's tiles (rows x vocab x hidden, warps, stages) on the head's shape;
  * GPU: one engine chunk's device time by kernel (jax.profiler), grouped into the head, GEMMs,
    attention and XLA's fusions (norms, RoPE, SiLU(gate)*up, residual adds), per ablation.
Each piece: microseconds per ablation, GFLOP per ablation, and the time those FLOPs take at the
measured peak (the limit); the full down_proj scan predicted from the fit, against its limit.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench import QWEN_05B, attention_flops, head_flops, matmul_peak, mlp_flops, row_flops
from jaxcrit.models import decoder
from jaxcrit.kernels import fused_loss
from jaxcrit.kernels.fused_loss import Tiles

SWEEP = [Tiles(128, 256, 64, 8, 3), Tiles(128, 256, 64, 8, 4), Tiles(128, 256, 32, 8, 4), Tiles(128, 256, 128, 8, 2),
         Tiles(128, 128, 64, 4, 3), Tiles(128, 128, 64, 4, 4), Tiles(128, 128, 64, 8, 3), Tiles(128, 128, 128, 4, 3),
         Tiles(256, 128, 64, 8, 3), Tiles(256, 128, 64, 8, 4), Tiles(64, 256, 64, 4, 3), Tiles(128, 256, 64, 4, 3),
         Tiles(256, 256, 64, 8, 2), Tiles(64, 128, 64, 4, 4), Tiles(128, 128, 64, 8, 4), Tiles(64, 256, 64, 8, 3)]


def timeit(f, *a, reps: int = 5) -> float:
    """Seconds per call, after a warm-up call."""
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(reps):
        out = f(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def copy_bandwidth(gib: int = 4) -> float:
    """TB/s of an elementwise pass over `gib` GiB of bf16 (bytes read plus written)."""
    x = jnp.ones((gib * 2**29,), jnp.bfloat16)
    return 2 * x.nbytes / timeit(jax.jit(lambda x: x + 1), x) / 1e12


# kernel name fragments by group, first match wins (cuDNN's attention kernel also ends in "_kernel0_0")
KERNEL_GROUPS = (("attention (cuDNN)", ("cudnn", "sdpa", "flash")),
                 ("GEMMs (cuBLAS)", ("nvjet", "gemm", "xmma", "cutlass")),
                 ("MLP gate|up + SiLU·mul (fused)", ("fused_mlp",)),
                 ("head (fused loss)", ("fused_loss", "_kernel", "mosaic")), ("XLA fusions", ("fusion",)))


def kernel_times(f, *a) -> dict:
    """Device milliseconds of one call of f by kernel name, from a jax.profiler trace."""
    from jax.profiler import ProfileData
    jax.block_until_ready(f(*a))
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d)
    jax.block_until_ready(f(*a))
    jax.profiler.stop_trace()
    out = collections.Counter()
    for plane in ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0]).planes:
        if plane.name.startswith("/device:GPU"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    for e in line.events:
                        out[e.name] += e.duration_ns / 1e6
    return dict(out.most_common())


def grouped(kernels: dict, rows: int) -> dict:
    """Kernel times [ms] as microseconds per ablation by KERNEL_GROUPS (first match), plus the rest."""
    groups = collections.Counter()
    for name, ms in kernels.items():
        g = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        groups[g] += 1e3 * ms / rows
    return dict(groups)


def cost(f, *a) -> dict:
    """XLA's own FLOP and byte counts of a jitted function."""
    c = f.lower(*a).compile().cost_analysis()
    c = c[0] if isinstance(c, list) else c
    return {"xla_gflop": c.get("flops", 0) / 1e9, "xla_gbytes": c.get("bytes accessed", 0) / 1e9}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=448)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--sweep", action="store_true", help="time the fused loss kernel's tile candidates")
    args = ap.parse_args()
    cfg, R, T, L = QWEN_05B, args.rows, args.seq, QWEN_05B.n_layers
    gpu = jax.default_backend() == "gpu"
    peak = matmul_peak()
    res = {"device": jax.devices()[0].device_kind, "rows": R, "seq": T, "matmul_peak_tflops": peak,
           "copy_tb_per_s": copy_bandwidth()}
    at_peak = lambda flops: flops / (peak * 1e12) * 1e6   # microseconds at the peak
    p = decoder.random_params(cfg, jax.random.key(1), jnp.bfloat16)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, T)
    layer_f, head_f = attention_flops(cfg, T) + mlp_flops(cfg, T), head_flops(cfg, T)

    # the loss head alone: the fused kernel (its tiles swept), and the XLA loss
    N = R * (T - 1)
    hs = jax.random.normal(jax.random.key(2), (N, cfg.d_model), jnp.bfloat16)
    W = decoder.unembed(cfg, p)
    shift = jnp.full((N,), 8.0, jnp.float32)
    pieces = {}
    if gpu:
        if args.sweep:
            sweep = {}
            for t in SWEEP:
                try:
                    ms = 1e3 * timeit(jax.jit(lambda h, s, t=t: fused_loss.shifted_expsum(h, W, s, t)), hs, shift)
                    sweep[str(tuple(t))] = {"ms": ms, "tflops": N * 2 * cfg.d_model * cfg.vocab_size / ms / 1e9}
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a sweep result too
                    sweep[str(tuple(t))] = {"error": str(e).splitlines()[0][:200]}
                print(json.dumps({str(tuple(t)): sweep[str(tuple(t))]}), flush=True)
            res["tile_sweep"] = sweep
        pieces["head_fused"] = timeit(jax.jit(lambda h, s: fused_loss.shifted_expsum(h, W, s)), hs, shift)
        pieces["head_triton"] = timeit(jax.jit(lambda h, s: fused_loss.shifted_expsum(h, W, s, fused_loss.TILES)), hs, shift)
    one_pass = jax.jit(lambda h, s: decoder.logsumexp_vocab(cfg, p, h[None], 16384, s[None])[0])
    pieces["head_xla"] = timeit(one_pass, hs, shift)

    # one decoder layer for R rows, and its matmuls / attention alone
    lp = {k: v[0] for k, v in p.items() if k not in ("embed", "final_norm")}
    valid = None   # no padding, as the engine runs one unpadded text
    cos, sin = decoder.rope_tables(cfg, T)
    impl = "cudnn" if gpu else "xla"
    eng_kernels = E.kernels(cfg, jnp.bfloat16, "auto", "auto", "auto", 1)
    h = jax.random.normal(jax.random.key(3), (R, 1, T, cfg.d_model), jnp.bfloat16)
    one_layer = jax.vmap(lambda h: decoder.block(cfg, lp, h, valid, cos, sin, None, None, impl)[0])
    pieces["layer_xla_triton_gemms"] = timeit(jax.jit(one_layer), h)
    layer = jax.jit(one_layer, compiler_options=decoder.COMPILER_OPTIONS)   # as the engine compiles it
    pieces["layer"] = timeit(layer, h)
    res["layer_xla_cost"] = cost(layer, h)
    if eng_kernels.mlp == "pallas":   # the layer as the engine's unedited tail runs it
        fused = jax.vmap(lambda h: decoder.block(cfg, lp, h, valid, cos, sin, None, None, impl, "pallas")[0])
        pieces["layer_fused_mlp"] = timeit(jax.jit(fused, compiler_options=decoder.COMPILER_OPTIONS), h)
    x = h.reshape(R * T, cfg.d_model)
    m = jax.random.normal(jax.random.key(4), (R * T, cfg.d_ff), jnp.bfloat16)
    o = jax.random.normal(jax.random.key(5), (R * T, cfg.q_dim), jnp.bfloat16)
    matmuls = jax.jit(lambda x, m, o: (x @ lp["q_w"], x @ lp["k_w"], x @ lp["v_w"], o @ lp["o_w"],
                                       x @ lp["gate_w"], x @ lp["up_w"], m @ lp["down_w"]),
                      compiler_options=decoder.COMPILER_OPTIONS)
    pieces["layer_matmuls_only"] = timeit(matmuls, x, m, o)
    q = o.reshape(R, T, cfg.n_heads, cfg.head_dim)
    kv = jax.random.normal(jax.random.key(6), (R, T, cfg.n_kv_heads, cfg.head_dim), jnp.bfloat16)
    attn = jax.jit(lambda q, k, v: decoder.attend(cfg, q, k, v, None, impl))
    pieces["layer_attention_only"] = timeit(attn, q, kv, kv)
    flops = {"head_fused": head_f, "head_triton": head_f, "head_xla": head_f, "layer": layer_f,
             "layer_fused_mlp": layer_f, "layer_xla_triton_gemms": layer_f,
             "layer_matmuls_only": layer_f - 2 * T * T * cfg.q_dim, "layer_attention_only": 2 * T * T * cfg.q_dim}
    res["pieces"] = {k: {"us_per_abl": 1e6 * s / R, "gflop_per_abl": flops[k] / 1e9,
                         "limit_us_per_abl": at_peak(flops[k]), "pct_of_peak": 100 * at_peak(flops[k]) / (1e6 * s / R)}
                     for k, s in pieces.items()}
    print(json.dumps({k: res[k] for k in ("matmul_peak_tflops", "copy_tb_per_s", "layer_xla_cost", "pieces")}), flush=True)

    # real engine chunks of down_proj rows starting after layer S: head + (L-1-S) layers
    eng = E.Engine(cfg, p, E.Texts.from_ids([tokens.tolist()]), chunk=R, progress=False)
    res.update(eng.kernels._asdict())
    chunk = {}
    for S in (L - 1, L - 2, 3 * L // 4, L // 2, L // 4, 0):
        abl = E.single(cfg, "down_proj", layers=[S], channels=np.arange(R) % cfg.d_model)
        chunk[S] = timeit(eng.losses, abl, reps=3)
    n_tail = np.array([L - 1 - S for S in chunk])
    slope, icept = np.polyfit(n_tail, np.array(list(chunk.values())), 1)
    res["chunks_ms"] = {f"down_proj_after_L{S}": 1e3 * s for S, s in chunk.items()}
    res["fit"] = {"tail_layer_us_per_abl": 1e6 * slope / R, "tail_layer_limit_us": at_peak(layer_f),
                  "head_entry_overhead_us_per_abl": 1e6 * icept / R, "head_limit_us": at_peak(head_f),
                  "max_residual_ms": 1e3 * float(np.abs(np.polyval([slope, icept], n_tail) - list(chunk.values())).max())}
    act = E.single(cfg, "act_fn", layers=[L - 1], channels=np.arange(R))
    res["chunks_ms"][f"act_fn_after_L{L - 1}"] = 1e3 * timeit(eng.losses, act, reps=3)
    print(json.dumps({k: res[k] for k in ("chunks_ms", "fit")}), flush=True)
    if gpu:  # one chunk starting after layer L/2, by kernel
        S = L // 2
        k = kernel_times(eng.losses, E.single(cfg, "down_proj", layers=[S], channels=np.arange(R) % cfg.d_model))
        res["kernels"] = {"chunk": f"down_proj_after_L{S}", "tail_layers": L - 1 - S,
                          "us_per_abl": grouped(k, R), "top_ms": dict(list(k.items())[:12])}
        print(json.dumps({"kernels": res["kernels"]}), flush=True)

    # the full down_proj scan as the fit predicts it, against the limit (layer L shared)
    abl = E.single(cfg, "down_proj")
    starts = E.start_points(abl, L)
    per_row = icept / R + (L - 1 - starts[:, 0]) * slope / R
    fl = row_flops(cfg, T, starts)
    res["down_proj_scan"] = {"gflop_per_abl": fl.mean() / 1e9, "limit_abl_per_s": 1 / (fl.mean() / (peak * 1e12)),
                             "predicted_abl_per_s": 1 / per_row.mean(),
                             "time_share": {"head_entry_overhead": icept / R / per_row.mean(),
                                            "tail_layers": 1 - icept / R / per_row.mean()}}
    if gpu:  # the fused head against the XLA loss on real rows
        xla = E.Engine(cfg, p, E.Texts.from_ids([tokens.tolist()]), chunk=R, progress=False, loss="xla")
        abl = E.single(cfg, "down_proj", layers=[L // 2], channels=np.arange(R) % cfg.d_model)
        res["fused_vs_xla_loss_max_abs_diff"] = float(np.abs(xla.losses(abl) - eng.losses(abl)).max())
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
