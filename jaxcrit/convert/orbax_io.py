"""Converted params saved with Orbax, so a checkpoint is converted (dequantized, permuted) once.

Layout: `<path>/params` (an Orbax StandardCheckpointer pytree) and `<path>/jaxcrit.json` (the
ModelConfig and each param's dtype), which is what lets `restore` build the abstract target that
places every array straight into its NamedSharding without a host copy of the whole model.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jaxcrit.convert.checkpoints import ORBAX_META as META
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.params import param_table
from jaxcrit.dist.sharding import DEFAULT_RULES, make_mesh, named

PARAMS = "params"


def config_from_json(d: dict) -> ModelConfig:
    """Inverse of dataclasses.asdict; JSON lists go back to tuples so the config stays hashable."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def save(path: str | Path, cfg: ModelConfig, params: Mapping[str, jax.Array]) -> None:
    """Writes params and config to `path` (a new directory)."""
    p = Path(path).absolute()
    if p.exists():
        raise JaxcritError(f"{p}: already exists; choose a new directory for the checkpoint")
    diff = set(param_table(cfg)) ^ set(params)
    if diff:
        raise JaxcritError(f"params do not match the config's param table (differ in {sorted(diff)})")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(p / PARAMS, dict(params))
    ckptr.wait_until_finished()
    ckptr.close()
    meta = {"config": dataclasses.asdict(cfg), "dtypes": {k: str(v.dtype) for k, v in params.items()}}
    (p / META).write_text(json.dumps(meta, indent=1))


def restore(path: str | Path, mesh: Mesh | None = None,
            rules=DEFAULT_RULES) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Reads a checkpoint written by `save`, each array placed by the param table's sharding."""
    p = Path(path).absolute()
    if not (p / META).is_file() or not (p / PARAMS).is_dir():
        raise JaxcritError(f"{p}: not a jaxcrit Orbax checkpoint (expected {META} and {PARAMS}/ written by save)")
    meta = json.loads((p / META).read_text())
    cfg = config_from_json(meta["config"])
    mesh = mesh or make_mesh()
    target = {name: jax.ShapeDtypeStruct(shape, meta["dtypes"][name], sharding=named(axes, shape, mesh, rules))
              for name, (shape, axes) in param_table(cfg).items()}
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(p / PARAMS, target)
    ckptr.close()
    return cfg, params
