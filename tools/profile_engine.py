"""Where the engine's time goes: times the pieces of one chunk on a Qwen2.5-0.5B-shaped model.

    python tools/profile_engine.py [--rows 256 --seq 512]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench import QWEN_05B, layer_flops
from jaxcrit.models import decoder


def timeit(f, *a, reps=5):
    jax.block_until_ready(f(*a))
    t = time.perf_counter()
    for _ in range(reps):
        out = f(*a)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    cfg, R, T = QWEN_05B, args.rows, args.seq
    p = decoder.random_params(cfg, jax.random.key(1), jnp.bfloat16)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, T)
    res = {"device": jax.devices()[0].device_kind, "rows": R, "seq": T}
    h = jax.random.normal(jax.random.key(2), (R, 1, T, cfg.d_model), jnp.bfloat16)
    tg = jnp.asarray(tokens[None, 1:])
    for name, vc in [("loss_twopass_16k", 16384), ("loss_twopass_32k", 32768)]:
        f = jax.jit(jax.vmap(lambda h, vc=vc: decoder.token_nll(cfg, p, h[:, :-1], tg, vc).sum()))
        res[name + "_ms"] = 1e3 * timeit(f, h)
    shift = jnp.zeros((1, T - 1), jnp.float32)
    f = jax.jit(jax.vmap(lambda h: decoder.logsumexp_vocab(cfg, p, h[:, :-1], 16384, shift)[0].sum()))
    res["loss_onepass_16k_ms"] = 1e3 * timeit(f, h)
    lp = {k: v[0] for k, v in p.items() if k not in ("embed", "final_norm")}
    valid = jnp.ones((1, T), bool)
    cos, sin = decoder.rope_tables(cfg, T)
    for impl in ("xla", "cudnn") if jax.default_backend() == "gpu" else ("xla",):
        f = jax.jit(jax.vmap(lambda h: decoder.block(cfg, lp, h, valid, cos, sin, None, None, impl)[0]))
        res[f"layer_{impl}_ms"] = 1e3 * timeit(f, h)
        res[f"layer_{impl}_tflops"] = R * layer_flops(cfg, T) / res[f"layer_{impl}_ms"] * 1e-9
    m = {"down_proj": jnp.ones((R, cfg.d_model), jnp.float32)}
    f = jax.jit(jax.vmap(lambda h, m: decoder.block(cfg, lp, h, valid, cos, sin, {"down_proj": m}, None, "xla")[0]))
    res["layer_masked_ms"] = 1e3 * timeit(f, h, m["down_proj"])
    try:
        def att(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        q = jax.random.normal(jax.random.key(3), (R, T, cfg.n_heads, cfg.head_dim), jnp.bfloat16)
        kv = jax.random.normal(jax.random.key(4), (R, T, cfg.n_kv_heads, cfg.head_dim), jnp.bfloat16)
        res["cudnn_attn_ms"] = 1e3 * timeit(jax.jit(att), q, kv, kv)
        def xla_att(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        res["xla_attn_ms"] = 1e3 * timeit(jax.jit(xla_att), q, kv, kv)
    except Exception as e:  # noqa: BLE001 - exploratory
        res["cudnn_attn_error"] = str(e)[:300]
    eng = E.Engine(cfg, p, E.Texts.from_ids([tokens.tolist()]), chunk=R, progress=False)
    for layer in (0, 12, 23):
        abl = E.single(cfg, "down_proj", layers=[layer], channels=range(R))
        eng.losses(abl)
        t = time.perf_counter(); eng.losses(abl); res[f"chunk_down_L{layer}_ms"] = 1e3 * (time.perf_counter() - t)
    abl = E.single(cfg, "act_fn", layers=[12], channels=range(R))
    eng.losses(abl)
    t = time.perf_counter(); eng.losses(abl); res["chunk_act_L12_ms"] = 1e3 * (time.perf_counter() - t)
    if jax.default_backend() == "gpu":
        abl = E.single(cfg, "down_proj", layers=[12], channels=range(R))
        for name, kw in [("attention", dict(attention="xla")), ("loss", dict(loss="xla"))]:
            other = E.Engine(cfg, p, E.Texts.from_ids([tokens.tolist()]), chunk=R, progress=False, **kw)
            res[f"{name}_{eng.__dict__[name]}_vs_xla_max_abs_loss_diff"] = float(
                np.abs(other.losses(abl) - eng.losses(abl)).max())
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
