"""Whole-model map wall time on Qwen2.5-shaped models (random weights on the device).

    python -m jaxcrit.bench map [--shape 0.5b|7b --seq 512 --block 0 --audit 128]

Times the screens' gradient pass (first_order and magnitude of every neuron; compile reported
apart), then the verification rounds and the audit through the engine (chunk planned from free
memory, one program for all sites), with the map config's defaults unless given. Also reports
what the exhaustive exact map would take at the measured ablation rate. Random weights: the
deltas themselves mean nothing; the cost does not depend on them.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from jaxcrit import engine as E
from jaxcrit.bench.measure import header, line, peak_memory_gib
from jaxcrit.bench.model import SHAPES, add_model_arguments, random_params, random_tokens
from jaxcrit.configs.common import base
from jaxcrit.critical import maps
from jaxcrit.critical import screens as SC
from jaxcrit.models.sites import SITE_NAMES


def add_arguments(ap: argparse.ArgumentParser) -> None:
    c = base("bench").map
    add_model_arguments(ap)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=c.top_k)
    ap.add_argument("--block", type=int, default=c.block)
    ap.add_argument("--max-rounds", type=int, default=c.max_rounds)
    ap.add_argument("--audit", type=int, default=c.audit)
    ap.add_argument("--chunk", type=int, default=0, help="engine rows per compiled call (0: planned from memory)")


def run(args: argparse.Namespace) -> dict:
    cfg = SHAPES[args.shape]
    params = random_params(cfg, args.dtype)
    tok = random_tokens(cfg, args.seq)
    res = {**header(), "shape": args.shape, "seq": args.seq, "dtype": args.dtype,
           "screens": ["first_order", "magnitude"], "top_k": args.top_k, "block": args.block, "audit": args.audit}

    t = time.perf_counter()
    SC.gradient_screens(cfg, params, tok)
    res["screen_pass_first_call_s"] = time.perf_counter() - t
    t = time.perf_counter()
    values = SC.gradient_screens(cfg, params, tok)
    res["screen_pass_s"] = time.perf_counter() - t

    t = time.perf_counter()
    eng = E.Engine(cfg, params, E.Texts.from_ids([tok.tolist()]), chunk=args.chunk, progress=False)
    everyone = SC.universe(cfg)
    warm = everyone[np.arange(0, len(everyone), len(everyone) // eng.chunk)[:eng.chunk]]
    eng.deltas(E.make(warm.site, warm.layer, warm.channel, cfg=cfg), sites=SITE_NAMES)   # compile
    res.update(engine_setup_s=time.perf_counter() - t, chunk=eng.chunk)

    units = []

    def measure(key: str, idx: np.ndarray) -> np.ndarray:
        """The exact deltas of these neurons, timed as one unit of the map."""
        part = everyone[idx]
        t = time.perf_counter()
        d = eng.deltas(E.make(part.site, part.layer, part.channel, cfg=cfg), sites=SITE_NAMES)
        units.append({"unit": key, "rows": len(idx), "s": time.perf_counter() - t})
        line(units[-1])
        return d

    t = time.perf_counter()
    res["block"] = maps.round_block(args.block, eng.chunk, len(res["screens"]), args.top_k)
    mp = maps.build(everyone, {k: SC.flat(values[k]) for k in res["screens"]}, measure, top_k=args.top_k,
                    block=res["block"], max_rounds=args.max_rounds, audit=args.audit, seed=0)
    res["verify_s"] = time.perf_counter() - t
    rows = sum(u["rows"] for u in units)
    rate = rows / sum(u["s"] for u in units)
    s = mp.summary()
    res.update(neurons=len(everyone), rounds=mp.rounds, stopped=mp.stopped, verified=s["verified"],
               audited=s["audited"], ablations=rows, abl_per_s=rate, units=units,
               map_s=res["screen_pass_s"] + res["verify_s"], exhaustive_exact_s_at_this_rate=len(everyone) / rate,
               peak_memory_gib=peak_memory_gib(), audit_result=s["audit"])
    return res
