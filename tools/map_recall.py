"""The whole-model map against exhaustive single-neuron ground truth: whether its exact top-k is the truth's.

    python tools/map_recall.py --truth docs/data/smollm2_ground_truth.csv.gz --map runs/map/map.csv --k 20
    python tools/map_recall.py --scans a/scan.csv b/scan.csv --save truth.csv.gz   # build the truth file

Use it after a change to the map's screens or stopping rule (critical/maps.py): run the map on
SmolLM2 (`python -m jaxcrit.main --config=smollm2 --config.map.enabled=True --config.map.top_k=20`)
and compare it with the ground truth tools/ground_truth.py wrote.

truth: (site, layer, channel, delta) rows of exhaustive scans (scan.csv files; a neuron scanned
twice keeps its first row). The map covers every neuron but verifies few; the comparison is made
on the truth's neurons: the map's exact top-k among them (verified neurons only, as the map's
own top-k is) against the truth's top-k. Prints JSON: whether the two are equal, the exact
evaluations the map made, the largest difference between the map's and the truth's delta where
both exist, and for each screen the whole-model rank of each truth top-k neuron (its recall at
the depth the map verified, and the depth that would have held all k).
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from jaxcrit.critical.maps import depth_of

KEY = ["site", "layer", "channel"]


def truth_of(scans: list[str]) -> pd.DataFrame:
    df = pd.concat([pd.read_csv(p)[KEY + ["delta"]] for p in scans])
    return df.drop_duplicates(KEY).reset_index(drop=True)


def compare(truth: pd.DataFrame, mp: pd.DataFrame, meta: dict, k: int) -> dict:
    screens = [c for c in mp.columns if c not in KEY + ["delta", "verified"]]
    for s in screens:   # whole-model ranks in the order the map takes candidates (maps.ranked: largest |value|)
        mp[f"{s}_rank"] = mp[s].abs().rank(ascending=False, method="first", na_option="bottom").astype(int) - 1
    both = truth.merge(mp, on=KEY, how="left", suffixes=("_truth", ""))
    top_truth = both.nlargest(k, "delta_truth")
    mine = both[both.verified != "no"]
    top_map = mine.nlargest(k, "delta")
    key = lambda df: [tuple(r) for r in df[KEY].itertuples(index=False)]
    depth = depth_of(meta["rounds"], meta["block"])
    out = {
        "truth_neurons": len(truth), "k": k,
        "equal": set(key(top_truth)) == set(key(top_map)),
        "same_order": key(top_truth) == key(top_map),
        "missed": sorted(set(key(top_truth)) - set(key(top_map))),
        "exact_evaluations": {"rounds": int((mp.verified == "screen").sum()), "audit": int((mp.verified == "audit").sum()),
                              "of_truth_neurons": int(len(mine))},
        "map_neurons": len(mp), "rounds": meta["rounds"], "block": meta["block"], "stopped": meta["stopped"],
        "max_abs_delta_difference": float((mine.delta - mine.delta_truth).abs().max()),
        "truth_top": [dict(zip(KEY + ["delta"], (r.site, int(r.layer), int(r.channel), float(r.delta_truth))))
                      for r in top_truth.itertuples()],
        "screens": {},
    }
    best = top_truth[[f"{s}_rank" for s in screens]].min(axis=1).to_numpy()
    out["union_depth_for_all_k"] = int(best.max()) + 1     # candidates per screen that would have held all k
    for s in screens:
        ranks = top_truth[f"{s}_rank"].to_numpy()
        out["screens"][s] = {"recall_at_verified_depth": float((ranks < depth).mean()),
                             "depth_for_all_k": int(ranks.max()) + 1, "ranks": ranks.tolist()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--truth", help="ground-truth csv (site, layer, channel, delta)")
    ap.add_argument("--scans", nargs="*", default=[], help="scan.csv files to build the truth from")
    ap.add_argument("--save", help="write the truth built from --scans here")
    ap.add_argument("--map", help="a map.csv (map.json beside it)")
    ap.add_argument("--k", type=int, default=20)
    a = ap.parse_args(argv)
    if bool(a.truth) == bool(a.scans):
        print("map_recall: give --truth or --scans", file=sys.stderr)
        return 2
    truth = pd.read_csv(a.truth) if a.truth else truth_of(a.scans)
    if a.save:
        truth.to_csv(a.save, index=False, float_format="%.6g")
    if a.map:
        mp = pd.read_csv(a.map, keep_default_na=False, na_values=["nan"])
        meta = json.load(open(a.map[:-len("csv")] + "json"))
        print(json.dumps(compare(truth, mp, meta, a.k), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
