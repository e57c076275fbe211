"""NeuronSet: the one type for a list of neurons, from Stage 1's ranking to the report.

A neuron is one channel of one site in one layer (`model.layers.11.mlp.down_proj[507]`); it may
carry the token position it was scored at (-1: every position, which is what masking acts on)
and a score (an importance, a baseline's value, a measured delta). Rankings, critical sets,
scans, baselines and evaluations all hold NeuronSets, written as one JSON record schema:

    {"layer_name": "model.layers.11.mlp.down_proj", "site": "down_proj", "layer": 11,
     "channel": 507, "position": -1, "score": 4.68}

importance.json adds the reference implementation's names of the same fields (seq_idx,
hidden_idx, activation_diff) so its readers keep working.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np

from jaxcrit.errors import JaxcritError
from jaxcrit.models.sites import SITE_NAMES, module_path, parse_module_path, parse_neuron_name

COLUMNS = ("layer_name", "site", "layer", "channel", "position", "score")
REFERENCE_FIELDS = {"seq_idx": "position", "hidden_idx": "channel", "activation_diff": "score"}


@dataclasses.dataclass(frozen=True)
class NeuronSet:
    """Ordered neurons: site names, layers, channels [N]; positions [N] (-1: all); scores [N] or None."""
    site: np.ndarray
    layer: np.ndarray
    channel: np.ndarray
    position: np.ndarray
    score: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.site)
        for f in ("layer", "channel", "position") + (("score",) if self.score is not None else ()):
            if len(getattr(self, f)) != n:
                raise JaxcritError(f"NeuronSet: {f} has {len(getattr(self, f))} entries, site has {n}")

    @staticmethod
    def make(site: Iterable[str], layer: Iterable[int], channel: Iterable[int],
             position: Iterable[int] | None = None, score: Iterable[float] | None = None) -> "NeuronSet":
        site = np.array([str(s) for s in site], dtype=str)
        n = len(site)
        pos = np.full(n, -1, np.int64) if position is None else np.asarray(position, np.int64).reshape(n)
        sc = None if score is None else np.asarray(score, np.float32).reshape(n)
        return NeuronSet(site, np.asarray(layer, np.int64).reshape(n), np.asarray(channel, np.int64).reshape(n),
                         pos, sc)

    @staticmethod
    def of(x: Any) -> "NeuronSet":
        """A NeuronSet from a NeuronSet, a DataFrame or record list with its columns, neuron
        names ('model.layers.11.mlp.down_proj[507]', as every result file writes them), or
        (site, layer, channel) tuples."""
        if isinstance(x, NeuronSet):
            return x
        if hasattr(x, "to_dict") and hasattr(x, "columns"):
            return NeuronSet.from_records(x.to_dict("records"))
        rows = [x] if isinstance(x, str) else list(x)
        if rows and isinstance(rows[0], dict):
            return NeuronSet.from_records(rows)
        if rows and all(isinstance(r, str) for r in rows):
            return NeuronSet.of([neuron_of(r) for r in rows])
        if not rows:
            return NeuronSet.make([], [], [])
        if any(len(r) != 3 for r in rows):
            raise JaxcritError("neurons: give (site, layer, channel) tuples, records, a DataFrame or a NeuronSet")
        s, l, c = zip(*rows)
        return NeuronSet.make(s, l, c)

    def __len__(self) -> int:
        return len(self.site)

    def __getitem__(self, idx) -> "NeuronSet":
        """A slice or index array of the neurons, in that order."""
        return NeuronSet(self.site[idx], self.layer[idx], self.channel[idx], self.position[idx],
                         None if self.score is None else self.score[idx])

    def keys(self) -> list[tuple[str, int, int]]:
        """(site, layer, channel) of each neuron."""
        return [(str(s), int(l), int(c)) for s, l, c in zip(self.site, self.layer, self.channel)]

    def site_index(self) -> np.ndarray:
        """[N] int32 index of each neuron's site in SITE_NAMES."""
        lookup = {n: i for i, n in enumerate(SITE_NAMES)}
        return np.array([lookup[s] for s in self.site], np.int32)

    def records(self, reference: bool = False) -> list[dict]:
        """The JSON schema above; reference=True adds seq_idx, hidden_idx, activation_diff."""
        out = []
        for i in range(len(self)):
            r = {"layer_name": module_path(str(self.site[i]), int(self.layer[i])), "site": str(self.site[i]),
                 "layer": int(self.layer[i]), "channel": int(self.channel[i]), "position": int(self.position[i])}
            if self.score is not None:
                r["score"] = float(self.score[i])
            if reference:
                r.update({ref: r[ours] for ref, ours in REFERENCE_FIELDS.items() if ours in r})
            out.append(r)
        return out

    @staticmethod
    def from_records(records: Sequence[dict]) -> "NeuronSet":
        """Inverse of records(); site and layer may come from layer_name alone."""
        def site_layer(r):
            if "site" in r and "layer" in r:
                return str(r["site"]), int(r["layer"])
            if "layer_name" in r:
                return parse_module_path(str(r["layer_name"]))
            raise JaxcritError(f"neuron record {r} has neither site and layer nor layer_name")
        try:
            sl = [site_layer(r) for r in records]
            return NeuronSet.make([s for s, _ in sl], [l for _, l in sl], [int(r["channel"]) for r in records],
                                  [int(r.get("position", -1)) for r in records],
                                  [float(r["score"]) for r in records]
                                  if records and all("score" in r for r in records) else None)
        except KeyError as e:
            raise JaxcritError(f"neuron record without {e}: each needs channel and site/layer or layer_name") from None

    def to_pandas(self):
        """A DataFrame with the record columns (score only when the set has scores)."""
        import pandas as pd
        cols = {"layer_name": [module_path(str(s), int(l)) for s, l in zip(self.site, self.layer)],
                "site": self.site.astype(str), "layer": self.layer, "channel": self.channel,
                "position": self.position}
        if self.score is not None:
            cols["score"] = self.score
        return pd.DataFrame(cols)


def neuron_of(name: str) -> tuple[str, int, int]:
    """(site, layer, channel) of a neuron name; a whole site is refused here (a neuron set holds channels)."""
    site_name, layer, channel = parse_neuron_name(name)
    if channel is None:
        raise JaxcritError(f"'{name}' names a whole site; a neuron needs its channel, e.g. {name}[0]")
    return site_name, layer, channel
