"""TransformerLens 4.3.0 on the interventions benchmark's two workloads (workloads.py defines them):
causal tracing of MLP outputs (patches/s) and down_proj channel ablation (ablations/s).

Written the TransformerLens 4 way: HookedTransformer is gone in 4.0, so the HF model is wrapped by
TransformerBridge.boot_transformers(name, hf_model=..., tokenizer=...) (a pre-loaded model: no
download; its raw HF weights, no compatibility-mode folding; the bridge switches the model to
eager attention so attention hooks can fire). The clean run is `run_with_cache` on the
`blocks.{l}.hook_mlp_out` hook points (the output of model.layers[l].mlp); each batch is one
`run_with_hooks` on the batch of prompts [B, 128] with one hook per layer the batch touches,
which edits that layer's rows at their positions or channels. (a) keeps only the last position's
logits (`logits_to_keep=1`, passed through to the HF forward); (b) takes the logits and computes
the loss in float32 (return_type="loss" would take log_softmax in the model's dtype).

Run it as workloads.py's docstring says.
"""
from __future__ import annotations

import sys
from functools import partial

import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

import workloads


def site(layer: int) -> str:
    """The hook point of model.layers[layer].mlp's output (an alias of blocks.{layer}.mlp.hook_out)."""
    return f"blocks.{layer}.hook_mlp_out"


def put(act: torch.Tensor, hook, rows: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """Hook of (a): act [B, T, D] with the given rows' vector [D] at their position set to vals."""
    act[rows, pos] = vals
    return act


def zero(act: torch.Tensor, hook, rows: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """Hook of (b): act [B, T, D] with the given rows' channel zero at every position."""
    act[rows, :, chans] = 0
    return act


def make_tool(hf_model: transformers.PreTrainedModel) -> workloads.Tool:
    bridge = TransformerBridge.boot_transformers(
        hf_model.config.name_or_path, hf_model=hf_model, device=hf_model.device, dtype=hf_model.dtype,
        tokenizer=workloads.stand_in_tokenizer(hf_model.config.vocab_size))
    n_layers = hf_model.config.num_hidden_layers

    def clean(ids):
        logits, cache = bridge.run_with_cache(ids[None], names_filter=lambda name: name.endswith("hook_mlp_out"))
        return torch.stack([cache[site(l)][0] for l in range(n_layers)]), int(logits[0, -1].argmax())

    def patch(corrupt, layer_ids, positions, values, target):
        hooks = [(site(l), partial(put, rows=rows, pos=positions[rows], vals=values[rows]))
                 for l, rows in workloads.by_layer(layer_ids)]
        logits = bridge.run_with_hooks(corrupt.expand(len(layer_ids), -1), fwd_hooks=hooks, logits_to_keep=1)
        return workloads.last_logprob(logits[:, -1], target)

    def ablate(ids, layer_ids, channels):
        hooks = [(site(l), partial(zero, rows=rows, chans=channels[rows])) for l, rows in workloads.by_layer(layer_ids)]
        return workloads.mean_nll(bridge.run_with_hooks(ids.expand(len(layer_ids), -1), fwd_hooks=hooks), ids)

    return workloads.Tool(clean, patch, ablate)


if __name__ == "__main__":
    sys.exit(workloads.main(__doc__, "transformer_lens", make_tool, ["transformer-lens"]))
