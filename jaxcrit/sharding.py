"""Device mesh and the logical-axis -> mesh-axis rules: changing the parallelism is changing a table.

Mesh axes: 'data' (perturbation rows, and params under FSDP) and 'model' (tensor parallel).
Model code never names a mesh axis; it names logical axes (see models/sites.py). How params lie
over 'data' is a row of LAYOUTS, chosen by `mesh.params`:

    replicated  every 'data' row of the mesh holds the whole model, split over 'model'
    fsdp        the 'embed' axis of every weight is split over 'data' too: a device holds
                1 / (data x model) of each matrix; the compiled programs gather a layer's
                weights when they run it (XLA's SPMD partitioner inserts the all-gathers)
"""
from __future__ import annotations

from typing import Mapping, Sequence

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


def make_mesh(shape: Sequence[int] = (-1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over all devices; -1 in shape takes the rest."""
    devices = list(devices if devices is not None else jax.devices())
    data, model = shape
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


def gathered(p: Mapping[str, jax.Array], axes: Mapping[str, Sequence[str]]) -> dict[str, jax.Array]:
    """One layer's params as a layer uses them: split over 'model' only (the replicated layout).

    Under FSDP this is where a layer's weights are all-gathered over 'data', one layer at a time
    inside the layer loop; without it XLA gathers every layer's weights before the loop (the whole
    model on every device). Needs the mesh in context (`jax.set_mesh`: pipeline.Run, the Engine
    and the memory plan set it); without one, or with 'data' of 1, the params pass unchanged.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get("data", 1) == 1:
        return dict(p)
    return {k: jax.lax.with_sharding_constraint(v, spec(axes[k], v.shape, mesh)) for k, v in p.items()}
