"""The one place an Engine is built from a loaded model: the runner's, the study's and the API's.

A config's engine section names Engine's options (chunk, vocab_chunk, prefix_sharing, attention,
mlp, norms, loss, sites); `ahead` is the runner's own (runner.Run.build_ahead).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from jaxcrit import engine as E
from jaxcrit.convert.load import Model

OPTIONS = ("chunk", "vocab_chunk", "prefix_sharing", "attention", "mlp", "norms", "loss", "sites")


def engine_options(model: Model, section: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Engine's keyword arguments: the model's mesh and the options a config's engine section sets."""
    return {"mesh": model.mesh, **{k: section[k] for k in OPTIONS if section is not None and k in section}}


def build_engine(model: Model, ids: Sequence[Sequence[int]], section: Mapping[str, Any] | None = None,
                 **kw: Any) -> E.Engine:
    """An Engine scoring ablations on token sequences (each [T_i] ids, one row of the engine's
    texts), set as a config's engine section says; kw: Engine's other arguments (progress,
    memory_fraction) or, without a section, any of its options."""
    return E.Engine(model.cfg, model.params, E.Texts.from_ids(list(ids)), **engine_options(model, section), **kw)
