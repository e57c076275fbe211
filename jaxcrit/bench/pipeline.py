"""Stage 1 + Stage 2 wall time on a Qwen2.5-shaped model (random weights on the device).

    python -m jaxcrit.bench pipeline [--shape 0.5b|7b|32b|72b --tokens 115 --samples 100 --steps 1000]

The default text is 113-115 tokens for these tokenizers; random ids of that length stand in
for it. Stage 2 runs the full curve n = 1..steps, the cost when no prefix collapses the model.
The pipeline runs twice: "cold", the first run after load, every program compiling inside it as
in a real run, then "warm". Peak device memory is for the whole process, the params drawn one
layer at a time; compare it with the memory plan of the same settings:

    python tools/model_shape.py 32b /tmp/q32 && python -m jaxcrit.main --config=hf:/tmp/q32 \\
        --config.dry_run=True --config.max_tokens=115 --config.stage1.batch=20 --config.engine.chunk=256 \\
        --config.baselines.names='()' --config.scan.sites='()' --config.map.enabled=False

Run the PyTorch peer with SEQ=<tokens> on the same machine: its sequential forward is the
reference's cost per Stage 2 step and per noisy pass.
"""
from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import jax

from jaxcrit import engine as E
from jaxcrit.bench.measure import header, peak_memory_gib
from jaxcrit.bench.model import SHAPES, add_model_arguments, random_params, random_tokens
from jaxcrit.critical import stage1, stage2
from jaxcrit.models.sites import SITE_NAMES


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_model_arguments(ap)
    ap.add_argument("--tokens", type=int, default=115)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--batch", type=int, default=20, help="noisy passes per Stage 1 call")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--loss", default="auto", help="auto | xla | pallas")
    ap.add_argument("--ahead", type=int, default=1, help="1: the engine built beside Stage 1 (engine.ahead); 0: after")


def run(args: argparse.Namespace) -> dict:
    cfg = SHAPES[args.shape]
    t = time.perf_counter()
    params = jax.block_until_ready(random_params(cfg, args.dtype))
    res = {**header(), "shape": args.shape, "tokens": args.tokens, "samples": args.samples, "batch": args.batch,
           "steps": args.steps, "chunk": args.chunk, "dtype": args.dtype, "params_s": time.perf_counter() - t}
    tok = random_tokens(cfg, args.tokens)

    def engine() -> E.Engine:
        """The engine, its base loss and Stage 2's program, as the runner builds them ahead."""
        eng = E.Engine(cfg, params, E.Texts.from_ids([tok.tolist()]), chunk=args.chunk, loss=args.loss,
                       progress=False)
        eng.base_loss
        eng.compile(args.steps, SITE_NAMES)
        return eng

    def pipeline(tag: str) -> stage2.Growth:
        """Stage 1 and its ranking, beside them the engine built in a thread (engine.ahead), then
        Stage 2's full curve; each step timed."""
        t = time.perf_counter()
        ahead = ThreadPoolExecutor(1).submit(engine) if args.ahead else None
        imp = stage1.importance(cfg, params, tok, alpha=5.0, samples=args.samples, seed=42, chunk=args.batch,
                                progress=False)
        scores = jax.block_until_ready(imp.scores())
        res[f"{tag}_stage1_s"] = time.perf_counter() - t
        t = time.perf_counter()
        rk = stage1.rank(scores, 10000, 1e-6, False)
        res[f"{tag}_rank_s"] = time.perf_counter() - t
        del imp, scores   # the runner drops Stage 1's sums before Stage 2 too
        t = time.perf_counter()
        eng = ahead.result() if ahead else engine()
        g = stage2.grow(eng, rk, epsilon=1e9, max_steps=args.steps, full_curve=True)
        res[f"{tag}_stage2_s"] = time.perf_counter() - t
        res[f"{tag}_total_s"] = sum(res[f"{tag}_{k}_s"] for k in ("stage1", "rank", "stage2"))
        res.update(eng.kernels.names())
        return g

    pipeline("cold")
    g = pipeline("warm")
    res["stage2_steps"] = len(g.ns)
    res["stage2_ms_per_step"] = 1e3 * res["warm_stage2_s"] / len(g.ns)
    res["stage1_ms_per_noisy_pass"] = 1e3 * res["warm_stage1_s"] / args.samples
    res["peak_memory_gib"] = peak_memory_gib()
    return res
