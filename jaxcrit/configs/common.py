"""The config every other starts from: the paper's method as fields.

The fields, their defaults, the values each takes and what each turns are declared once, in
jaxcrit/run/fields.py. A config for a model overrides `model` and what differs.
"""
from __future__ import annotations

import ml_collections

from jaxcrit.run import fields


def base(model: str) -> ml_collections.ConfigDict:
    """Every field at its default, for this model source."""
    c = fields.defaults()
    c.model = model
    return c


def checkpoint(arg: str | None, name: str) -> ml_collections.ConfigDict:
    """A checkpoint given after the colon (`--config=NAME:/path` or `--config=NAME:ORG/NAME[@REVISION]`,
    a Hugging Face Hub id), in its kind's dtype (dtype auto: bfloat16 for a HF checkpoint) with the
    chunk planned from free device memory. Without it: one error line saying how to give it."""
    from jaxcrit.errors import JaxcritError
    if not arg:
        raise JaxcritError(f"the {name} config needs a checkpoint: --config=configs/{name}.py:/path/to/checkpoint "
                           f"(or a Hugging Face Hub id: --config={name}:ORG/NAME)")
    c = base(arg)
    c.engine.chunk = 0
    return c
