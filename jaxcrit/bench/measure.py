"""What every benchmark measures with: timing, the bf16 matmul peak, the FLOPs of the model's
parts (to state rates against the physical limit), peak device memory, and the JSON report."""
from __future__ import annotations

import json
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit.models.config import ModelConfig


def header() -> dict:
    """The report's first fields: the device, how many, jax's version."""
    return {"device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "jax": jax.__version__}


def write(report: dict, out: str | None) -> None:
    """Prints the report as indented JSON, and writes it to `out` when given."""
    text = json.dumps(report, indent=1)
    print(text, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(text)


def line(entry: dict) -> None:
    """One JSON line of a benchmark's progress, flushed (a run cut short still shows its results)."""
    print(json.dumps(entry), flush=True)


def timed(f: Callable, *args, reps: int = 5, rounds: int = 1) -> float:
    """Seconds per call of f(*args): the best of `rounds` loops of `reps` calls, after a warm-up
    call that compiles."""
    jax.block_until_ready(f(*args))
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = f(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


_matmul = jax.jit(lambda a, b: a @ b)   # module level: repeated calls compile once


def matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """bf16 TFLOP/s of an n^3 matmul on random data, the device's practical peak."""
    a, b = jax.jit(lambda k: tuple(jax.random.normal(k, (2, n, n), jnp.bfloat16)))(jax.random.key(0))
    return 2 * n**3 / timed(_matmul, a, b, reps=reps) / 1e12


def attention_flops(cfg: ModelConfig, T: int) -> float:
    """One layer's attention branch on one sequence: q/k/v/o matmuls, QK^T and PV at causal half."""
    D, Q, KV = cfg.d_model, cfg.q_dim, cfg.kv_dim
    return 2 * T * (D * Q + 2 * D * KV + Q * D) + 2 * T * T * Q


def mlp_flops(cfg: ModelConfig, T: int) -> float:
    """One layer's MLP on T rows: gate, up and down matmuls."""
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


def peak_memory_gib() -> float:
    """Peak device memory of this process on the first device, GiB (0 where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2**30
