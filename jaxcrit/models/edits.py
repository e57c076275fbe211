"""Edit slots: edits at chosen positions, or with a vector, as the decoder's site editor applies them.

Slot k edits site `site[k]` (index into SITE_NAMES; -1: an empty slot) of layer `layer[k]`, at
channel `channel[k]` (-1: every channel) and position `position[k]` (-1: every position):

    out -> out * scale[k] + add[k] + tables[site][vector[k]]     (the table term where vector[k] >= 0)

Slots apply in order, a later one to an earlier one's result. Their fields are arrays of one shape
([K] for one edit set; [N, K] for a batch, vmapped), and `tables` {site: [E, B, T, C] f32} holds the
vectors they add (a patch's source activations, a site's mean, a set vector), shared by every edit
set of a batch: edits are data, so one compiled program serves every batch of the same shapes. The
per-channel edits at every position stay the decoder's dense [L, C] masks and values; slots are
for what those cannot say (engine/edits.py decides which edit goes where).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcrit.models.sites import SITE_INDEX

Array = jax.Array

EMPTY = {"site": -1, "layer": 0, "channel": -1, "position": -1, "scale": 1.0, "add": 0.0, "vector": -1}
FIELDS = {"site": jnp.int32, "layer": jnp.int32, "channel": jnp.int32, "position": jnp.int32,
          "scale": jnp.float32, "add": jnp.float32, "vector": jnp.int32}


class Slots(NamedTuple):
    site: Array       # [..., K] int32, -1 empty
    layer: Array      # [..., K] int32
    channel: Array    # [..., K] int32, -1 the whole site
    position: Array   # [..., K] int32, -1 every position
    scale: Array      # [..., K] f32
    add: Array        # [..., K] f32
    vector: Array     # [..., K] int32, row of the site's table added (-1 none)
    tables: dict      # {site: [E, B, T, C] f32}: a key for every site any slot edits


def batch_axes(slots: Slots) -> Slots:
    """vmap's in_axes for a batch of slots: the fields over their first axis, the tables shared."""
    return Slots(*([0] * (len(Slots._fields) - 1)), tables=None)


def layers_edited(slots: Slots, n_layers: int) -> Array:
    """[L] bool: the layers any slot of any set edits."""
    return ((slots.site >= 0)[..., None] & (slots.layer[..., None] == jnp.arange(n_layers))).reshape(-1, n_layers).any(0)


def apply(slots: Slots, name: str, layer, out: Array) -> Array:
    """A site's output out [B, T, C] in `layer` (may be traced) with the slots' edits there.

    The slots fold into one scale [T, C] and one add [B, T, C] (a loop over K, so the program's
    size does not grow with K); sites without a table are returned as they are."""
    if name not in slots.tables:
        return out
    table = slots.tables[name]
    T, C = out.shape[-2:]
    t, c = jnp.arange(T)[:, None], jnp.arange(C)[None, :]

    def fold(k, acc):
        scale, add = acc
        hit = ((slots.site[k] == SITE_INDEX[name]) & (slots.layer[k] == layer)
               & ((slots.position[k] < 0) | (t == slots.position[k])) & ((slots.channel[k] < 0) | (c == slots.channel[k])))
        vec = jnp.where(slots.vector[k] >= 0, table[jnp.maximum(slots.vector[k], 0)], 0.0)
        return jnp.where(hit, scale * slots.scale[k], scale), jnp.where(hit, add * slots.scale[k] + slots.add[k] + vec, add)

    acc = (jnp.ones((T, C), jnp.float32), jnp.zeros(out.shape, jnp.float32))
    scale, add = jax.lax.fori_loop(0, slots.site.shape[-1], fold, acc)
    return out * scale.astype(out.dtype) + add.astype(out.dtype)


def from_position(slots: Slots, first: int) -> Slots:
    """The slots of rows that run positions first.. alone (no slot edits an earlier one): their
    positions counted from first (every position stays -1) and their tables cut to those positions."""
    if not first:
        return slots
    return slots._replace(position=jnp.where(slots.position < 0, slots.position, slots.position - first),
                          tables={k: v[:, :, first:] for k, v in slots.tables.items()})


def take(slots: Slots, idx) -> Slots:
    """The slots of the rows idx of a batch (fields [N, K]; the tables stay whole)."""
    return slots._replace(**{k: getattr(slots, k)[idx] for k in FIELDS})
