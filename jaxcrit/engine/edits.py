"""Edits as data: edit sets (lists of dicts, or a DataFrame) checked once, then parsed into arrays.

An edit is a dict:
  neuron    a neuron name, 'model.layers.11.mlp.down_proj[507]', or a whole site,
            'model.layers.11.mlp.down_proj' (models.sites.parse_neuron_name reads both)
  op        zero | scale | set | mean | patch (OPS)
  value     scale: the factor; set: a scalar, or for a whole site a vector of its width
  position  an int or a list of ints (negative counts from the end); absent: every position
  source    patch only: the source run's inputs (the same shape as the inputs); its activation at
            the same site, layer, channel and position replaces the edited run's
An edit set is a list of edits applied in order (a dict alone is a set of one; [] the clean run).

`check` refuses a bad edit with one line before any work; `parse` turns checked sets into arrays:
per-channel edits at every position as Ablations entries (the engine's dense masks, its fastest
path), the rest as edit slots whose vectors sit in per-site tables (models/edits.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from jaxcrit.engine.ablations import INACTIVE, Ablations, entries, make
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.edits import EMPTY, Slots
from jaxcrit.models.sites import SITE_INDEX, parse_neuron_name, width


@dataclasses.dataclass(frozen=True)
class Op:
    value: str        # what `value` must be: "none", "scalar", "scalar or vector" (a vector: whole sites only)
    source: bool      # takes a `source` (and needs one)


OPS: dict[str, Op] = {
    "zero": Op("none", False),
    "scale": Op("scalar", False),
    "set": Op("scalar or vector", False),
    "mean": Op("none", False),
    "patch": Op("none", True),
}
KEYS = ("neuron", "op", "value", "position", "source")


@dataclasses.dataclass(frozen=True)
class Edit:
    """One checked edit."""
    site: str
    layer: int
    channel: int | None                  # None: the whole site
    op: str
    value: float | np.ndarray | None     # the scale factor, or the set value (a [C] vector for a whole site)
    positions: tuple[int, ...] | None    # in 0..T-1; None: every position
    source: Hashable | None              # patch: the key of its source in check's sources


def edit_sets(obj: Any) -> list[list[dict]]:
    """A batch of edit sets as lists of dicts: a list whose items are edit sets (a list of dicts,
    or one dict: a set of one), or a DataFrame of the edit columns, its rows grouped into sets by a
    `set` column (in order of first appearance), else one set per row; empty cells are absent keys."""
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):
        rows = [{k: v for k, v in r.items() if not _missing(v)} for r in obj.to_dict("records")]
        if "set" not in obj.columns:
            return [[r] for r in rows]
        groups: dict[Any, list[dict]] = {}
        for r in rows:
            groups.setdefault(r.pop("set"), []).append(r)
        return list(groups.values())
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise JaxcritError("edit sets: give a list of edit sets (each a list of edit dicts) or a DataFrame")
    return [edit_set(s) for s in obj]


def edit_set(obj: Any) -> list[dict]:
    """One edit set as a list of dicts (None: the clean run, a dict alone: a set of one)."""
    if obj is None:
        return []
    if isinstance(obj, Mapping):
        return [dict(obj)]
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)) and all(isinstance(e, Mapping) for e in obj):
        return [dict(e) for e in obj]
    raise JaxcritError(f"an edit set is a list of dicts with keys {', '.join(KEYS)}; got {type(obj).__name__}")


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def check(cfg: ModelConfig, sets: list[list[dict]], T: int, source_ids: Callable[[Any], np.ndarray]
          ) -> tuple[list[list[Edit]], dict[Hashable, np.ndarray]]:
    """The edits checked against the model and inputs of T positions: (sets of Edits, the patch
    sources' token ids by key). source_ids(source) -> the source's ids in the inputs' shape (or
    raises). Raises JaxcritError naming the set and edit on the first bad one."""
    sources: dict[Hashable, np.ndarray] = {}
    keys: dict[int, Hashable] = {}   # a source object's key by its id: a sweep's edits share one source

    def key_of(source: Any) -> Hashable:
        if id(source) not in keys:
            ids = np.asarray(source_ids(source))
            keys[id(source)] = source_key(ids)
            sources[keys[id(source)]] = ids
        return keys[id(source)]

    out = []
    for i, s in enumerate(sets):
        checked = []
        for j, e in enumerate(s):
            try:
                checked.append(_check_one(cfg, e, T, key_of))
            except JaxcritError as err:
                where = f"edit set {i}, edit {j}" if len(sets) > 1 else f"edit {j}"
                raise JaxcritError(f"{where}: {err}") from None
        out.append(checked)
    return out, sources


def _check_one(cfg: ModelConfig, e: dict, T: int, key_of: Callable[[Any], Hashable]) -> Edit:
    unknown = sorted(set(e) - set(KEYS))
    if unknown:
        raise JaxcritError(f"unknown key '{unknown[0]}'; an edit has keys {', '.join(KEYS)}")
    if "neuron" not in e:
        raise JaxcritError("no 'neuron': give a name like model.layers.11.mlp.down_proj[507] (or a whole site)")
    site, layer, channel = parse_neuron_name(str(e["neuron"]))
    C = width(cfg, site)
    if layer >= cfg.n_layers:
        raise JaxcritError(f"layer {layer} out of range: the model has layers 0..{cfg.n_layers - 1}")
    if channel is not None and channel >= C:
        raise JaxcritError(f"channel {channel} out of range for {site}: it has channels 0..{C - 1}")
    op_name = e.get("op")
    if op_name not in OPS:
        raise JaxcritError(f"unknown op '{op_name}'; ops are: {', '.join(OPS)}")
    op = OPS[op_name]
    value = _value(op_name, op, e.get("value"), channel, C)
    positions = None
    p = e.get("position")
    if isinstance(p, (int, np.integer)) and not isinstance(p, bool) and -T <= p < T:
        positions = (int(p) % T,)
    elif not _missing(p):
        pos = np.asarray(e["position"]).ravel()
        if not pos.size or pos.dtype.kind not in "iuf" or (pos != np.round(pos)).any():
            raise JaxcritError(f"position {e['position']!r}: give an int or a list of ints")
        bad = [int(p) for p in pos if not -T <= int(p) < T]
        if bad:
            raise JaxcritError(f"position {bad[0]} out of range: the inputs have positions 0..{T - 1} "
                               f"(or -{T}..-1 from the end)")
        positions = tuple(sorted({int(p) % T for p in pos}))
    key = None
    if op.source:
        if _missing(e.get("source")):
            raise JaxcritError("patch needs a 'source': a text or token ids of the inputs' length")
        key = key_of(e["source"])
    elif not _missing(e.get("source")):
        raise JaxcritError(f"'{op_name}' takes no 'source' (only patch does)")
    return Edit(site, layer, channel, op_name, value, positions, key)


def source_key(ids: np.ndarray) -> Hashable:
    """The key of a patch source's token ids (check's sources, parse's activations)."""
    return ids.shape, ids.tobytes()


def _value(name: str, op: Op, value: Any, channel: int | None, C: int) -> float | np.ndarray | None:
    """The checked value of an edit of op `name` (C: the site's width)."""
    if op.value == "none":
        if not _missing(value):
            raise JaxcritError(f"'{name}' takes no 'value'")
        return None
    if _missing(value):
        raise JaxcritError(f"'{name}' needs a 'value': {op.value}")
    v = np.asarray(value, np.float32)
    if v.ndim == 0:
        return float(v)
    if op.value == "scalar" or channel is not None:
        raise JaxcritError(f"'{name}' of {'one channel' if channel is not None else 'a site'} takes a scalar "
                           f"value, not an array of shape {v.shape}")
    if v.shape != (C,):
        raise JaxcritError(f"a set vector for this site has {C} values (its width); got shape {v.shape}")
    return v


def wanted(sets: list[list[Edit]]) -> tuple[dict[Hashable, set[str]], set[str]]:
    """What the parse needs computed: ({patch source key: sites}, sites whose mean is asked for)."""
    sources: dict[Hashable, set[str]] = {}
    means: set[str] = set()
    for e in (e for s in sets for e in s):
        if e.op == "patch":
            sources.setdefault(e.source, set()).add(e.site)
        elif e.op == "mean":
            means.add(e.site)
    return sources, means


def parse(cfg: ModelConfig, sets: list[list[Edit]], shape: tuple[int, int],
          activations: Mapping[Hashable, Mapping[str, np.ndarray]], means: Mapping[str, np.ndarray]
          ) -> tuple[Ablations, Slots | None]:
    """The checked sets as arrays: (Ablations [N, K1], edit Slots [N, K2] with their tables, or None
    when no set needs a slot). shape: the inputs' (B, T); activations[source][site]: [L, B, T, C]
    of each patch source (`wanted`); means[site]: [L, C].

    An edit of one channel at every position becomes an Ablations entry, unless an earlier edit
    of its set went to a slot at the same site and layer, or one already holds the channel (slots
    apply after the dense entries, and dense entries of one channel would not compose in order).
    Every site the sets name gets a table, its rows padded to `entries` (so sets naming the same
    sites compile to one program)."""
    B, T = shape
    tables: dict[str, list[np.ndarray]] = {}
    keys: dict[tuple, int] = {}

    def vector(site: str, key: tuple, make_row: Callable[[], np.ndarray]) -> int:
        rows = tables.setdefault(site, [])
        if (site, key) not in keys:
            keys[site, key] = len(rows)
            rows.append(np.broadcast_to(np.asarray(make_row(), np.float32), (B, T, width(cfg, site))))
        return keys[site, key]

    dense_rows, slot_rows = [], []
    for s in sets:
        dense, slots, slotted, held = [], [], set(), set()
        for n, e in enumerate(s):
            scale = e.value if e.op == "scale" else 0.0
            ch = (e.site, e.layer, e.channel)
            if (e.channel is not None and e.positions is None and e.op != "patch" and (e.site, e.layer) not in slotted
                    and ch not in held):   # a mean of one channel at every position is a constant
                held.add(ch)
                value = e.value if e.op == "set" else means[e.site][e.layer][e.channel] if e.op == "mean" else 0.0
                dense.append((SITE_INDEX[e.site], e.layer, e.channel, scale, float(value)))
                continue
            add, vec = 0.0, -1
            if e.op == "set" and np.ndim(e.value) == 0:
                add = e.value
            elif e.op == "set":
                vec = vector(e.site, ("set", id(s), n), lambda: e.value)
            elif e.op == "mean":
                vec = vector(e.site, ("mean", e.layer), lambda: means[e.site][e.layer])
            elif e.op == "patch":
                vec = vector(e.site, ("patch", e.source, e.layer), lambda: activations[e.source][e.site][e.layer])
            slotted.add((e.site, e.layer))
            slots += [(SITE_INDEX[e.site], e.layer, -1 if e.channel is None else e.channel, p, scale, add, vec)
                      for p in (e.positions or (-1,))]
        dense_rows.append(dense)
        slot_rows.append(slots)
    inactive = tuple(INACTIVE[k] for k in ("site", "layer", "channel", "scale", "value"))
    abl = make(*_stack(dense_rows, inactive), cfg=cfg)
    if not any(slot_rows):
        return abl, None
    fields = _stack(slot_rows, tuple(EMPTY.values()))
    zeros = lambda site: np.zeros((B, T, width(cfg, site)), np.float32)
    named = {e.site for s in sets for e in s}   # a table for each: edit sets naming the same sites share a program
    tabs = {site: np.stack(rows + [zeros(site)] * (entries(len(rows) or 1) - len(rows)))
            for site, rows in ((n, tables.get(n, [])) for n in sorted(named))}
    return abl, Slots(*(np.asarray(a, dt) for a, dt in zip(fields, (np.int32,) * 4 + (np.float32,) * 2 + (np.int32,))),
                      tables=tabs)


def _stack(rows: list[list[tuple]], fill: tuple) -> list[np.ndarray]:
    """Rows of tuples as one [N, K] array per tuple field, K the longest row (at least 1), padded with fill."""
    K = max(1, max(len(r) for r in rows))
    if K == 1:   # one tuple per row (a sweep): no padding loop
        full = np.array([r[0] if r else fill for r in rows], np.float64)
        return [full[:, f:f + 1] for f in range(len(fill))]
    full = np.array([r + [fill] * (K - len(r)) for r in rows], np.float64)   # [N, K, fields]
    return [full[..., f] for f in range(len(fill))]
