"""nnsight 0.8.1 on the interventions benchmark's two workloads (workloads.py defines them):
causal tracing of MLP outputs (patches/s) and down_proj channel ablation (ablations/s).

Written as nnsight's documentation batches interventions: the HF model wrapped in
nnsight.TransformersModel (a pre-loaded model needs a tokenizer; the ids need none, so a stand-in
is given), one `model.trace` per batch whose input is the batch of prompts [B, 128], and in it, in
forward order, one indexed assignment per layer the batch touches into
`model.model.layers[l].mlp.output` (its rows, at their positions or channels). One input invoke
with per-row indexing is the cheap form of nnsight's batching: each `tracer.invoke` is a mediator
of its own (a greenlet the model's hooks switch to, with its own slice of the batch), so one
invoke per edit set adds that cost once per row (about 0.6 ms a row on a CPU). (a) keeps only the
last position's logits (`logits_to_keep=1`, passed through to the HF forward).

Run it as workloads.py's docstring says.
"""
from __future__ import annotations

import sys

import torch
import transformers
from nnsight import TransformersModel

import workloads


def make_tool(hf_model: transformers.PreTrainedModel) -> workloads.Tool:
    model = TransformersModel(hf_model, tokenizer=workloads.stand_in_tokenizer(hf_model.config.vocab_size))
    layers = model.model.layers
    n_layers = len(layers)

    def clean(ids):
        with model.trace(ids[None]):
            outs = list().save()
            for l in range(n_layers):
                outs.append(layers[l].mlp.output[0])
            last = model.lm_head.output[0, -1].save()
        return torch.stack(outs), int(last.argmax())

    def patch(corrupt, layer_ids, positions, values, target):
        edits = [(l, rows, positions[rows], values[rows]) for l, rows in workloads.by_layer(layer_ids)]
        with model.trace(corrupt.expand(len(layer_ids), -1), logits_to_keep=1):
            for l, rows, pos, vals in edits:
                layers[l].mlp.output[rows, pos] = vals
            logits = model.lm_head.output[:, -1].save()
        return workloads.last_logprob(logits, target)

    def ablate(ids, layer_ids, channels):
        edits = [(l, rows, channels[rows]) for l, rows in workloads.by_layer(layer_ids)]
        with model.trace(ids.expand(len(layer_ids), -1)):
            for l, rows, chans in edits:
                layers[l].mlp.output[rows, :, chans] = 0
            logits = model.lm_head.output.save()
        return workloads.mean_nll(logits, ids)

    return workloads.Tool(clean, patch, ablate)


if __name__ == "__main__":
    sys.exit(workloads.main(__doc__, "nnsight", make_tool, ["nnsight"]))
