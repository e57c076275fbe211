"""Exhaustive single-neuron ground truth on the embedded SmolLM2: the exact delta of every neuron
of the required groups, what tools/map_recall.py measures a whole-model map against.

    python tools/ground_truth.py                      # fills docs/data/smollm2_ground_truth.csv.gz
    python tools/ground_truth.py --groups down_proj:29 q_proj:0   # only these (site:layer) groups

Use it to rebuild docs/data/smollm2_ground_truth.csv.gz when a change moves deltas (the engine's
numerics, the default text, the embedded model): about two hours on 2 CPU cores. Scans every
channel of the required groups (all nine sites of layers 0, 11 and 29, and down_proj of every
layer) on the default text, through the engine exactly as the scan stage does (f32, prefix
sharing), cheapest groups first. The csv (site, layer, channel, delta) is rewritten atomically
after every block of `--block` neurons, so a stopped run resumes with the neurons the file lacks;
seconds per block go to the .json beside it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

import jaxcrit
from jaxcrit import engine as E
from jaxcrit.configs.common import base
from jaxcrit.models.sites import SITE_NAMES, width
from jaxcrit.report import io

OUT = Path(__file__).resolve().parents[1] / "docs" / "data" / "smollm2_ground_truth.csv.gz"
KEY = ["site", "layer", "channel"]


def required(n_layers: int) -> list[tuple[str, int]]:
    """Every site of the first, a middle (11, the critical neuron's) and the last layer, and down_proj everywhere."""
    groups = [(s, l) for l in (0, 11, n_layers - 1) for s in SITE_NAMES]
    return groups + [("down_proj", l) for l in range(n_layers) if ("down_proj", l) not in groups]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--groups", nargs="*", help="site:layer groups (default: the required set)")
    ap.add_argument("--block", type=int, default=512, help="neurons per saved block")
    ap.add_argument("--chunk", type=int, default=64, help="engine rows per compiled call")
    a = ap.parse_args(argv)
    c = base("smollm2")
    m = jaxcrit.load(c.model, c.dtype)
    groups = [(g.split(":")[0], int(g.split(":")[1])) for g in a.groups] if a.groups else required(m.cfg.n_layers)
    groups.sort(key=lambda g: -g[1])              # deepest first: the cheapest ablations
    done = pd.read_csv(a.out) if a.out.exists() else pd.DataFrame(columns=KEY + ["delta"])
    log_path = a.out.with_name(a.out.name.split(".")[0] + ".json")
    log = io.read_json(log_path) if log_path.exists() else {"command": "python tools/ground_truth.py",
                                                             "text": "jaxcrit.data.texts.BOOKENDS", "blocks": []}
    have = set(map(tuple, done[KEY].itertuples(index=False)))
    todo = [(s, l, ch) for s, l in groups for ch in range(width(m.cfg, s)) if (s, l, ch) not in have]
    print(f"{len(have)} neurons in {a.out}, {len(todo)} to scan", file=sys.stderr)
    if not todo:
        return 0
    eng = E.Engine(m.cfg, m.params, E.Texts.from_ids([m.tokens(c.text, c.max_tokens).tolist()]), chunk=a.chunk)
    for lo in range(0, len(todo), a.block):
        part = todo[lo:lo + a.block]
        site, layer, channel = (np.array(x) for x in zip(*part))
        t = time.perf_counter()
        d = eng.deltas(E.make(site, layer, channel, cfg=m.cfg), desc=f"ground truth {lo}/{len(todo)}")
        seconds = time.perf_counter() - t
        done = pd.concat([done, pd.DataFrame({"site": site, "layer": layer, "channel": channel, "delta": d})])
        tmp = a.out.with_name(".tmp-" + a.out.name)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        done.to_csv(tmp, index=False, float_format="%.7g")
        tmp.replace(a.out)
        log["blocks"].append({"neurons": len(part), "first": list(map(str, part[0])), "seconds": round(seconds, 2)})
        io.write_json(log_path, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
