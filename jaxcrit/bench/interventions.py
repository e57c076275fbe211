"""Interventions as batches of edit sets: causal tracing, single-channel zeroing, a mixed batch's memory.

    python -m jaxcrit.bench interventions --out interventions.json [--model DIR | --shape 0.5b]
        [--tokens 128 | --ids ids.npy] [--dtype bfloat16] [--npy interventions]

(c) first, as the device's peak memory counts from the start: one batch of 100 mixed edit sets
(every op, whole sites and channels, all positions and single ones) scored by loss; the peak
device memory after it (memory_stats' peak_bytes_in_use; null where the device reports none).
(a) causal tracing: the corrupted run is the clean one with its first --corrupt tokens replaced
(seeded); each layer's down_proj output at each position is patched from the clean run in, the
metric the log-prob of the clean run's top token at the last position: patches/s, the [L, T]
values saved to NPY_tracing.npy. (b) each of the first 4,096 down_proj channels (layer-major)
zeroed alone, one per row, scored by loss: ablations/s, the [4096] losses saved to NPY_zero.npy.
Each timing follows the same call once (it compiles the programs), as the peers' do. Weights: a HF checkpoint
directory (--model) or random params of a SHAPES shape, drawn on the device.
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxcrit.bench.measure import header, line
from jaxcrit.bench.model import SHAPES, add_model_arguments, random_params, random_tokens
from jaxcrit.convert.load import Model, load
from jaxcrit.dist.sharding import make_mesh
from jaxcrit.errors import JaxcritError
from jaxcrit.engine import edits as E
from jaxcrit.interventions import intervene, patch
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import neuron_name, width

OPS = tuple(E.OPS)   # every op an edit can name
MIXED_SITES = ("down_proj", "o_proj", "act_fn", "q_proj")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    add_model_arguments(ap)
    ap.add_argument("--model", help="a HF checkpoint directory (default: random params of --shape)")
    ap.add_argument("--tokens", type=int, default=128, help="seeded random token ids of this length")
    ap.add_argument("--ids", help="token ids as a .npy file (instead of --tokens): [T], or [2, T] for the "
                                   "clean and the corrupted run")
    ap.add_argument("--corrupt", type=int, default=3, help="tracing: the first N tokens replaced in the corrupted run")
    ap.add_argument("--channels", type=int, default=4096, help="zeroing: the first N down_proj channels, layer-major")
    ap.add_argument("--sets", type=int, default=100, help="memory: edit sets in the mixed batch")
    ap.add_argument("--chunk", type=int, default=0, help="edit sets per compiled call (0: planned from memory)")
    ap.add_argument("--npy", default="interventions", help="prefix of the saved .npy results")


def random_edit(rng: np.random.Generator, cfg: ModelConfig, site: str, T: int, source: np.ndarray) -> dict:
    """One random edit of a site: a random layer, the whole site or one channel, a random op
    (`value` for scale and set, `source` for patch), at every position or at one or two of T."""
    channel = int(rng.integers(width(cfg, site))) if rng.random() < 0.5 else None
    e = {"neuron": neuron_name(site, int(rng.integers(cfg.n_layers)), channel), "op": OPS[rng.integers(len(OPS))]}
    if e["op"] in ("scale", "set"):
        e["value"] = float(rng.normal())
    if e["op"] == "patch":
        e["source"] = source
    if rng.random() < 0.5:
        e["position"] = [int(p) for p in rng.choice(T, rng.integers(1, 3), replace=False)]
    return e


def mixed_sets(cfg: ModelConfig, n: int, T: int, source: np.ndarray, seed: int = 0) -> list[list[dict]]:
    """n seeded edit sets of 1-3 edits, each a `random_edit` of one of MIXED_SITES."""
    rng = np.random.default_rng(seed)
    return [[random_edit(rng, cfg, MIXED_SITES[rng.integers(len(MIXED_SITES))], T, source)
             for _ in range(rng.integers(1, 4))] for _ in range(n)]


def model_of(args: argparse.Namespace) -> Model:
    """The checkpoint of --model, or random params of --shape as a Model (token ids only: no tokenizer)."""
    if args.model:
        return load(args.model, args.dtype)
    cfg = SHAPES[args.shape]
    return Model(cfg, random_params(cfg, args.dtype), None, make_mesh(), f"random {args.shape}")


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run(args: argparse.Namespace) -> dict:
    m = model_of(args)
    cfg = m.cfg
    given = np.atleast_2d(np.load(args.ids).astype(np.int32) if args.ids else random_tokens(cfg, args.tokens))
    if given.ndim != 2 or len(given) > 2:
        raise JaxcritError(f"--ids {args.ids}: give token ids [T] or [2, T] (clean, corrupted), not {given.shape}")
    ids = given[0]
    T, L, D = len(ids), cfg.n_layers, cfg.d_model
    if not 0 < args.corrupt < T:
        raise JaxcritError(f"--corrupt {args.corrupt}: give 1..{T - 1} tokens to replace")
    if not 0 < args.channels <= L * D:
        raise JaxcritError(f"--channels {args.channels}: the model has {L * D} down_proj channels")
    corrupted = ids.copy()
    corrupted[:args.corrupt] = (ids[:args.corrupt] + 1 + np.random.default_rng(1).integers(
        0, cfg.vocab_size - 1, args.corrupt)) % cfg.vocab_size   # each one a different token
    if len(given) == 2:
        corrupted = given[1]
    engine = {"chunk": args.chunk, "progress": False}
    res = {**header(), "model": m.source, "dtype": args.dtype, "tokens": T, "layers": L}

    sets = mixed_sets(cfg, args.sets, T, ids[None])
    t = time.perf_counter()
    mixed = intervene(m, ids, sets, **engine)
    res["mixed"] = {"sets": len(sets), "edits": int(mixed["edits"].sum()), "seconds": time.perf_counter() - t,
                    "peak_bytes_in_use": peak_bytes(), "finite": bool(np.isfinite(mixed["value"]).all())}
    line({"mixed": res["mixed"]})

    patch(m, ids, corrupted, **engine)   # compiles the sweep's programs (one per position bucket), as the peers warm up
    t = time.perf_counter()
    sweep = patch(m, ids, corrupted, **engine)
    dt = time.perf_counter() - t
    grid = sweep["value"].to_numpy().reshape(L, T)
    np.save(f"{args.npy}_tracing.npy", grid)
    res["tracing"] = {"patches": L * T, "seconds": dt, "patches_per_s": L * T / dt, "target": sweep.attrs["target"],
                      "clean": sweep.attrs["clean"], "corrupted": sweep.attrs["corrupted"],
                      "finite": bool(np.isfinite(grid).all()), "npy": f"{args.npy}_tracing.npy"}
    line({"tracing": res["tracing"]})

    zero = [[{"neuron": neuron_name("down_proj", i // D, i % D), "op": "zero"}] for i in range(args.channels)]
    intervene(m, ids, zero, **engine)   # compiles the rows' programs, as the peers warm up
    t = time.perf_counter()
    losses = intervene(m, ids, zero, **engine)
    dt = time.perf_counter() - t
    np.save(f"{args.npy}_zero.npy", losses["value"].to_numpy())
    res["zeroing"] = {"ablations": len(zero), "seconds": dt, "ablations_per_s": len(zero) / dt,
                      "base_loss": losses.attrs["clean"], "finite": bool(np.isfinite(losses["value"]).all()),
                      "npy": f"{args.npy}_zero.npy"}
    line({"zeroing": res["zeroing"]})
    res["peak_bytes_in_use"] = peak_bytes()
    return res
