"""Interventions as a library: a forward with edits, batches of edit sets, activation patching.

Edits are data (engine/edits.py): dicts naming a neuron or a whole site, an op (zero, scale, set,
mean, patch), and optionally a value, positions and a patch source. `forward` runs one edit set
and returns logits (or log-probs) and captured activations; `intervene` scores a batch of edit
sets as one compiled, chunked, sharded program on the engine; `patch` sweeps activation patching
over sites, layers and positions (docs/interventions.md).

    r = jaxcrit.forward(m, text, [{"neuron": "model.layers.3.mlp.down_proj[7]", "op": "zero"}],
                        capture=["model.layers.3.mlp.down_proj"])
    df = jaxcrit.intervene(m, text, [[{"neuron": "model.layers.3.mlp.down_proj", "op": "mean"}], []])
    sweep = jaxcrit.patch(m, "The Eiffel Tower is in", "The Colosseum is in")
"""
from jaxcrit.interventions.batch import METRICS, intervene, patch
from jaxcrit.interventions.forward import Result, forward

__all__ = ["METRICS", "Result", "forward", "intervene", "patch"]
