"""Perturbation batches as data: rows of (site, layer, channel, scale, value) entries.

Row r multiplies channel `channel[r, k]` of site `site[r, k]` in layer `layer[r, k]` by
`scale[r, k]` and adds `value[r, k]` (an entry with scale 1 and value 0 changes nothing: padding).
Built and checked on the host (numpy); inside a compiled program each row becomes dense per-site
[layers, channels] masks (`row_masks`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_INDEX, SITE_NAMES, site as site_info, width

INACTIVE = {"site": 0, "layer": 0, "channel": 0, "scale": 1.0, "value": 0.0}   # an entry that changes nothing
FIELDS = {"site": jnp.int32, "layer": jnp.int32, "channel": jnp.int32, "scale": jnp.float32, "value": jnp.float32}


def entries(k: int) -> int:
    """Entries per row a compiled program holds for rows of k: the next power of two, at least 8,
    so batches of nearby sizes (a scan's 1, a greedy step's 4, Stage 2's first 8) share one."""
    return max(8, 1 << (k - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Ablations:
    """rows x entries of (site index, layer, channel, scale, value); numpy, built on the host."""
    site: np.ndarray     # [R, K] int32, index into SITE_NAMES
    layer: np.ndarray    # [R, K] int32
    channel: np.ndarray  # [R, K] int32
    scale: np.ndarray    # [R, K] float32: 0 ablates, 1 leaves the channel as it is
    value: np.ndarray    # [R, K] float32: added after the scale (mean-ablation style)

    @property
    def rows(self) -> int:
        return self.site.shape[0]

    @property
    def active(self) -> np.ndarray:
        return (self.scale != 1) | (self.value != 0)

    def take(self, idx: np.ndarray) -> "Ablations":
        return Ablations(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def sites(self) -> tuple[str, ...]:
        """Sites any active entry touches: only these get masks in the compiled program."""
        return tuple(SITE_NAMES[i] for i in sorted(set(self.site[self.active].tolist())))

    def first_layer(self) -> np.ndarray:
        """[R] the lowest layer each row touches (int32 max for a row that touches none)."""
        return np.where(self.active, self.layer, np.iinfo(np.int32).max).min(axis=1)


def make(site, layer, channel, scale=0.0, value=0.0, *, cfg: ModelConfig) -> Ablations:
    """Ablations from broadcastable [R, K] (or [R]) arrays; checks every index against cfg.

    site may hold names or indices. Raises JaxcritError on an unknown site, a layer or channel
    out of range, or an empty batch.
    """
    s = np.asarray(site)
    if s.dtype.kind in "US":
        for n in np.unique(s):
            site_info(str(n))
        s = np.vectorize(SITE_INDEX.__getitem__, otypes=[np.int32])(s)
    as2d = lambda a: np.asarray(a).reshape(-1, 1) if np.ndim(a) == 1 else np.atleast_2d(a)
    arrs = np.broadcast_arrays(*map(as2d, (s, layer, channel, scale, value)))
    s, l, c, sc, v = (np.ascontiguousarray(a, dt) for a, dt in
                      zip(arrs, (np.int32, np.int32, np.int32, np.float32, np.float32)))
    if s.size == 0:
        raise JaxcritError("empty perturbation batch: give at least one neuron")
    if s.min() < 0 or s.max() >= len(SITE_NAMES):
        raise JaxcritError(f"site index out of range 0..{len(SITE_NAMES) - 1}")
    if l.min() < 0 or l.max() >= cfg.n_layers:
        bad = l[(l < 0) | (l >= cfg.n_layers)][0]
        raise JaxcritError(f"layer {bad} out of range: the model has layers 0..{cfg.n_layers - 1}")
    widths = np.array([width(cfg, n) for n in SITE_NAMES])
    over = (c < 0) | (c >= widths[s])
    if over.any():
        r = np.argwhere(over)[0]
        name = SITE_NAMES[s[tuple(r)]]
        raise JaxcritError(f"channel {c[tuple(r)]} out of range for {name}: it has channels "
                           f"0..{width(cfg, name) - 1}")
    return Ablations(s, l, c, sc, v)


def single(cfg: ModelConfig, site: str, layers: Sequence[int] | None = None,
           channels: Sequence[int] | None = None, scale: float = 0.0) -> Ablations:
    """One row per (layer, channel) of one site: the exhaustive single-neuron scan by default."""
    layers = np.arange(cfg.n_layers) if layers is None else np.asarray(layers)
    channels = np.arange(width(cfg, site)) if channels is None else np.asarray(channels)
    l, c = np.meshgrid(layers, channels, indexing="ij")
    return make(np.full(l.size, site), l.ravel(), c.ravel(), scale, cfg=cfg)


def prefixes(cfg: ModelConfig, site, layer, channel, ns: Sequence[int], width: int = 0) -> Ablations:
    """Row i zeroes the first ns[i] entries of a ranking (the paper's Stage 2 sets).

    width: entries per row (at least max(ns); the rest inactive), so batches of different prefix
    sizes share one compiled program; 0: max(ns)."""
    site, layer, channel = (np.asarray(a) for a in (site, layer, channel))
    ns = np.asarray(ns, int)
    if ns.size == 0:
        raise JaxcritError("empty perturbation batch: give at least one prefix size")
    K = max(int(ns.max()), width)
    if K > len(site) or ns.min() < 0:
        raise JaxcritError(f"prefix sizes must lie in 0..{len(site)} (the ranking's length); got {ns.min()}..{K}")
    keep = np.arange(K)[None, :] < ns[:, None]
    return make(np.broadcast_to(site[None, :K], keep.shape), layer[None, :K], channel[None, :K],
                np.where(keep, 0.0, 1.0), cfg=cfg)


def random_sets(cfg: ModelConfig, sites: Sequence[str], n_rows: int, k: int, seed: int) -> Ablations:
    """n_rows random sets of k distinct (site, layer, channel) neurons, uniform over the given sites."""
    if n_rows < 1 or k < 1:
        raise JaxcritError(f"empty perturbation batch: random_sets needs n_rows >= 1 and k >= 1 (got {n_rows}, {k})")
    rng = np.random.default_rng(seed)
    sizes = np.array([cfg.n_layers * width(cfg, s) for s in sites])
    total = sizes.sum()
    flat = np.stack([rng.choice(total, size=k, replace=False) for _ in range(n_rows)])
    which = np.searchsorted(np.cumsum(sizes), flat, side="right")
    off = flat - np.concatenate([[0], np.cumsum(sizes)])[which]
    w = np.array([width(cfg, s) for s in sites])[which]
    names = np.array(sites)[which]
    return make(names, off // w, off % w, cfg=cfg)


def row_masks(cfg: ModelConfig, sites: tuple[str, ...], row: dict, with_values: bool):
    """Dense per-site [L, C] masks (and values, or None) of one row ({field: [K]} of Ablations),
    for the sites given (a superset of the row's: the others get all-ones masks)."""
    masks, values = {}, {}
    for s in sites:
        mine = row["site"] == SITE_INDEX[s]
        shape = (cfg.n_layers, width(cfg, s))
        idx = (row["layer"], row["channel"])
        masks[s] = jnp.ones(shape, jnp.float32).at[idx].multiply(
            jnp.where(mine, row["scale"], 1.0), mode="drop")
        if with_values:
            values[s] = jnp.zeros(shape, jnp.float32).at[idx].add(
                jnp.where(mine, row["value"], 0.0), mode="drop")
    return masks, (values or None)
