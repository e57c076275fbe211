"""Device mesh and the logical-axis -> mesh-axis rules: changing the parallelism is changing a table.

Mesh axes: 'data' (perturbation rows, and params under FSDP) and 'model' (tensor parallel).
Model code never names a mesh axis; it names logical axes (see models/sites.py). How params lie
over 'data' is a row of LAYOUTS, chosen by `mesh.params`:

    replicated  every 'data' row of the mesh holds the whole model, split over 'model'
    fsdp        the 'embed' axis of every weight is split over 'data' too: a device holds
                1 / (data x model) of each matrix; the compiled programs all-gather a layer's
                weights over 'data' when they run it (`gathered`)
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcrit.errors import JaxcritError

# Tensor parallel over 'model', params replicated over 'data'; "rows" are perturbation rows.
DEFAULT_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "model",
    "embed": None,
    "heads": "model",
    "kv": "model",
    "mlp": "model",
    "norm": None,
    "rows": "data",
    "tokens": None,   # the texts' batch and time axes
}

LAYOUTS: dict[str, dict[str, str | None]] = {
    "replicated": DEFAULT_RULES,
    "fsdp": {**DEFAULT_RULES, "embed": "data"},
}


def rules(layout: str) -> dict[str, str | None]:
    """The logical-axis rules of a params layout (`mesh.params`)."""
    if layout not in LAYOUTS:
        raise JaxcritError(f"params layout '{layout}' unknown: use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Sequence[jax.Device] | None = None, *,
              subset: bool = False) -> Mesh:
    """A ('data', 'model') mesh over all devices; -1 in shape takes the rest. subset: a shape
    without -1 may take the first of more devices (a dry run planning fewer than the machine has)."""
    devices = list(devices if devices is not None else jax.devices())
    data, model = shape
    if subset and data > 0 and data * model < len(devices):
        devices = devices[:data * model]
    if data == -1:
        if len(devices) % model:
            raise JaxcritError(f"mesh model axis {model} does not divide {len(devices)} devices")
        data = len(devices) // model
    if data * model != len(devices):
        raise JaxcritError(f"mesh {data}x{model} needs {data * model} devices, found {len(devices)}; "
                           "set mesh_shape to (-1, model)")
    return Mesh(np.asarray(devices).reshape(data, model), ("data", "model"))


def spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
         rules: Mapping[str, str | None] = DEFAULT_RULES) -> P:
    """PartitionSpec for an array with these logical axes; a dim the mesh axis does not divide,
    or a mesh axis already used by an earlier dim, stays replicated."""
    out, used = [], set()
    for ax, n in zip(axes, shape):
        m = rules.get(ax)
        if m is None or m in used or n % mesh.shape[m]:
            out.append(None)
        else:
            out.append(m)
            used.add(m)
    return P(*out)


def named(axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
          rules: Mapping[str, str | None] = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, spec(axes, shape, mesh, rules))


_LAYOUT = contextvars.ContextVar("jaxcrit_params_layout", default="replicated")


def layout_of(params) -> str:
    """The LAYOUTS row these params (arrays or ShapeDtypeStructs) lie in: fsdp when any is split
    over 'data'."""
    for x in jax.tree.leaves(params):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and "data" in s.spec:
            return "fsdp"
    return "replicated"


@contextlib.contextmanager
def placed(mesh, params) -> Iterator[None]:
    """Runs programs over these params: their mesh in context (jax.set_mesh) and their layout,
    which `gathered` reads while tracing (a traced array does not carry its sharding)."""
    token = _LAYOUT.set(layout_of(params))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _LAYOUT.reset(token)


def gathered(p: Mapping[str, jax.Array], axes: Mapping[str, Sequence[str]]) -> dict[str, jax.Array]:
    """One layer's params as a layer uses them: split over 'model' only (the replicated layout).

    Under FSDP this is where a layer's weights are all-gathered over 'data', one layer at a time
    inside the layer loop. The gather is explicit (shard_map) on the layer's slice: left to XLA's
    SPMD partitioner (a sharding constraint) it gathers before the slice's unit layer axis is
    squeezed, and to make the gathered axis major XLA re-lays out every layer's stacked weights
    before the loop (a copy of the whole model shard). Needs `placed` in context (pipeline.Run,
    the Engine and the memory plan enter it); without it, or with 'data' of 1, the params pass
    unchanged.
    """
    mesh, layout = jax.sharding.get_abstract_mesh(), _LAYOUT.get()
    if mesh.empty or mesh.shape.get("data", 1) == 1 or layout == "replicated":
        return dict(p)
    return {k: _all_gather(v, spec(axes[k], v.shape, mesh, rules(layout)), spec(axes[k], v.shape, mesh))
            for k, v in p.items()}


def _all_gather(x: jax.Array, held: P, used: P) -> jax.Array:
    """x from spec `held` to `used`, which differ only in the dims `held` splits over 'data'."""
    dims = [i for i, ax in enumerate(held) if ax == "data"]
    if not dims:
        return x

    def gather(block):
        for i in dims:
            block = jax.lax.all_gather(block, "data", axis=i, tiled=True)
        return block
    return jax.shard_map(gather, in_specs=held, out_specs=used, check_vma=False)(x)
