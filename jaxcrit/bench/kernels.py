"""The engine's fused kernels against XLA and tokamax at the engine's shapes: the MLP and the loss head.

    python -m jaxcrit.bench kernels [--shape 0.5b --rows 448 --seq 512 --sweep]

MLP: SiLU(x @ gate) * (x @ up) for x [rows * seq, D], gate and up [D, F] (the rows of one engine
chunk): by XLA (two cuBLAS GEMMs, as the engine compiles them, then the product), by the fused
kernel the engine's kernel selection gives (`Kernels.layer.swiglu`), and by tokamax's
gated_linear_unit (mosaic). Loss: each position's NLL of rows * (seq - 1) hidden
states against the lm head [V, D]: XLA's one pass over vocabulary chunks (exp(z - shift)
summed, the shift the max logit, as the engine's clean run gives it), XLA's two-pass online
logsumexp, the selection's fused exp-sum (`Kernels.expsum`), tokamax's
linear_softmax_cross_entropy_loss (chunked_xla). Each: ms per call (best of 3 loops), TFLOP/s of
its matmuls, and its error against an f32 reference on the first rows. A fused kernel that does
not apply here (it needs a GPU, Hopper for the MLP, and a half dtype) is reported with the
selection's reason; tokamax's rows where it is not installed, with the import error.
--sweep: the fused loss's Triton kernel with each tile candidate of SWEEP (how its TILES were chosen).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxcrit.bench.measure import head_flops, header, line, timed
from jaxcrit.bench.model import SHAPES
from jaxcrit.dist.sharding import make_mesh
from jaxcrit.engine.loss import from_expsum, logsumexp_vocab, target_logit
from jaxcrit.errors import JaxcritError
from jaxcrit.kernels import fused_loss
from jaxcrit.kernels.selection import Kernels, select
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.decoder import COMPILER_OPTIONS

SWEEP = [fused_loss.Tiles(*t) for t in (
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 32, 8, 4), (128, 256, 128, 8, 2), (128, 128, 64, 4, 3),
    (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 4, 3), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
    (64, 256, 64, 4, 3), (128, 256, 64, 4, 3), (256, 256, 64, 8, 2), (64, 128, 64, 4, 4), (128, 128, 64, 8, 4),
    (64, 256, 64, 8, 3))]
CHECKED_ROWS = {"mlp": 4096, "loss": 256}   # rows compared with the f32 reference


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", default="0.5b", choices=SHAPES)
    ap.add_argument("--rows", type=int, default=448, help="ablations in a chunk")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab-chunk", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=10, help="calls per timed loop")
    ap.add_argument("--sweep", action="store_true", help="time the fused loss's Triton kernel at each of SWEEP")


def fused(cfg: ModelConfig, dtype, mesh: Mesh, spot: str) -> Kernels | str:
    """The selection's kernels with the fused implementation at this hot spot, or why it does not apply."""
    try:
        return select(cfg, dtype, mesh, **{spot: "pallas"})
    except JaxcritError as e:
        return str(e)


def tokamax_or_reason():
    """The tokamax module, or the reason it cannot be imported."""
    try:
        import tokamax
        return tokamax
    except ImportError as e:
        return f"tokamax not installed ({e})"


def measured(candidates: dict[str, Callable | str], args: tuple, flops: float, reps: int,
             error: Callable[[np.ndarray], float]) -> dict[str, dict]:
    """Each candidate f(*args) timed, its TFLOP/s and error(its output's first rows); a string
    candidate is the reason it does not run here, and an exception while compiling or running is
    reported as the candidate's result."""
    out = {}
    for name, f in candidates.items():
        if isinstance(f, str):
            out[name] = {"skipped": f}
        else:
            try:
                s = timed(f, *args, reps=reps, rounds=3)
                out[name] = {"ms": 1e3 * s, "tflops": flops / s / 1e12, "max_error": error(f(*args))}
            except Exception as e:  # noqa: BLE001 - a kernel that fails here is a result too
                out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        line({name: out[name]})
    return out


def mlp(cfg: ModelConfig, dtype, mesh: Mesh, M: int, reps: int) -> dict[str, dict]:
    """The MLP's gate|up with SiLU·mul on M rows; errors relative to the f32 product's largest."""
    D, F, n = cfg.d_model, cfg.d_ff, min(M, CHECKED_ROWS["mlp"])

    @jax.jit
    def inputs(k):
        g, u = ((0.03 * jax.random.normal(jax.random.fold_in(k, i), (D, F))).astype(dtype) for i in (1, 2))
        return jax.random.normal(k, (M, D), dtype), g, u, jnp.ones((M,), jnp.float32)   # ones: no RMSNorm scales

    x, g, u, ones = inputs(jax.random.key(0))
    f32 = lambda a, b: jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
    ref = np.asarray(jax.jit(lambda x: jax.nn.silu(f32(x, g)) * f32(x, u))(x[:n]))
    error = lambda out: float(np.abs(np.asarray(out[:n], np.float32) - ref).max() / np.abs(ref).max())
    kernels, tokamax = fused(cfg, dtype, mesh, "mlp"), tokamax_or_reason()
    glu = lambda impl: tokamax if isinstance(tokamax, str) else jax.jit(
        lambda x: tokamax.gated_linear_unit(x, (g, u), activation=jax.nn.silu, implementation=impl))
    candidates = {
        "xla": jax.jit(lambda x: jax.nn.silu(x @ g) * (x @ u), compiler_options=COMPILER_OPTIONS),
        "fused": kernels if isinstance(kernels, str) else jax.jit(lambda x: kernels.layer.swiglu(x, ones, g, u)),
        "tokamax mosaic": glu("mosaic"),
    }
    return measured(candidates, (x,), 4 * M * D * F, reps, error)


def loss(cfg: ModelConfig, dtype, mesh: Mesh, rows: int, seq: int, vocab_chunk: int, reps: int,
         sweep: bool) -> dict[str, dict]:
    """Each position's NLL of rows * (seq - 1) hidden states; errors in nats against f32."""
    N, D, V = rows * (seq - 1), cfg.d_model, cfg.vocab_size
    n = min(N, CHECKED_ROWS["loss"])
    head_of = lambda w: {"embed" if cfg.tie_embeddings else "lm_head": w}   # the params the loss reads
    lse = lambda h, w, shift=None: logsumexp_vocab(cfg, head_of(w), h[None], vocab_chunk, shift)

    @jax.jit
    def inputs(k):
        h = jax.random.normal(k, (N, D), dtype)
        w = (0.05 * jax.random.normal(jax.random.fold_in(k, 1), (V, D))).astype(dtype)
        z = jnp.matmul(h[:n].astype(jnp.float32), w.astype(jnp.float32).T, precision="highest")
        labels = jax.random.randint(jax.random.fold_in(k, 2), (N,), 0, V)
        ref = jax.nn.logsumexp(z, -1) - jnp.take_along_axis(z, labels[:n, None], 1)[:, 0]
        return h, w, w.T, labels, lse(h, w)[1], ref   # w.T: tokamax's layout; the max logits [1, N]: the shift

    h, w, wt, labels, shift, ref = inputs(jax.random.key(1))
    ref = np.asarray(ref)
    error = lambda out: float(np.abs(np.asarray(out[:n], np.float32) - ref).max())
    nll = lambda lse_of_h, h: lse_of_h - target_logit(cfg, head_of(w), h[None], labels[None])[0]
    kernels, tokamax = fused(cfg, dtype, mesh, "loss"), tokamax_or_reason()
    by = lambda k: lambda h: nll(from_expsum(k.expsum(h[None, None], w, shift, mesh), shift)[0, 0], h)
    candidates = {
        "xla one pass (shifted)": jax.jit(lambda h: nll(lse(h, w, shift)[0][0], h)),
        "xla two pass (online)": jax.jit(lambda h: nll(lse(h, w)[0][0], h)),
        "fused": kernels if isinstance(kernels, str) else jax.jit(by(kernels)),
        "tokamax chunked_xla": tokamax if isinstance(tokamax, str) else jax.jit(
            lambda h: tokamax.linear_softmax_cross_entropy_loss(h, labels, wt, reduction="none",
                                                                implementation="chunked_xla")),
    }
    if sweep:   # the Triton kernel's tile candidates, in the selection's callable
        candidates |= {f"fused {tuple(t)}": kernels if isinstance(kernels, str) else
                       jax.jit(by(dataclasses.replace(kernels, loss_tiles=t))) for t in SWEEP}
    return measured(candidates, (h,), rows * head_flops(cfg, seq), reps, error)


def run(args: argparse.Namespace) -> dict:
    cfg, dtype = SHAPES[args.shape], jnp.bfloat16
    mesh = make_mesh((1, 1), subset=True)
    res = {**header(), "shape": args.shape, "rows": args.rows, "seq": args.seq, "dtype": "bfloat16",
           "engine_kernels": select(cfg, dtype, mesh).names(), "checked_rows": CHECKED_ROWS}
    res["mlp"] = mlp(cfg, dtype, mesh, args.rows * args.seq, args.reps)
    res["loss"] = loss(cfg, dtype, mesh, args.rows, args.seq, args.vocab_chunk, args.reps, args.sweep)
    return res
