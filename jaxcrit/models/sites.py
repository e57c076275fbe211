"""The neuron sites: the one list of where a perturbation can act.

A site is the output of one module inside every decoder layer; a neuron is one channel of it.
Names follow the reference's hooks, which are the HF module paths, so a site `down_proj` of
layer 11 is `model.layers.11.mlp.down_proj`. Phi-3's fused qkv_proj / gate_up_proj outputs are
split into the same logical sites (q_proj, k_proj, v_proj, gate_proj, up_proj).

Axis vocabulary used across jaxcrit (params, activations, sharding rules):
  layers  the stacked decoder-layer axis (always first)
  batch   independent sequences (texts) of one forward
  rows    perturbations of one engine chunk (the vmapped axis)
  seq     token positions
  embed   the residual stream (d_model)
  heads   q heads x head_dim, flattened;  kv: kv heads x head_dim
  mlp     the MLP hidden axis (d_ff)
  vocab   the vocabulary
"""
from __future__ import annotations

import dataclasses

from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Site:
    name: str       # short name, used as key of masks and captures
    module: str     # HF module path below model.layers.{i}
    width: str      # ModelConfig attribute giving the channel count
    axis: str       # logical axis of its channels
    entry: str      # the latest point of its layer a perturbed forward can start from and still
                    # run its edit (the engine's prefix sharing): "layer" (the residual entering
                    # the layer), "mlp" (the post-attention residual) or "out" (the MLP's output,
                    # plus the exact change of one hidden channel)


SITES: tuple[Site, ...] = (
    Site("q_proj", "self_attn.q_proj", "q_dim", "heads", "layer"),
    Site("k_proj", "self_attn.k_proj", "kv_dim", "kv", "layer"),
    Site("v_proj", "self_attn.v_proj", "kv_dim", "kv", "layer"),
    Site("o_proj", "self_attn.o_proj", "d_model", "embed", "mlp"),
    Site("gate_proj", "mlp.gate_proj", "d_ff", "mlp", "out"),
    Site("up_proj", "mlp.up_proj", "d_ff", "mlp", "out"),
    Site("act_fn", "mlp.act_fn", "d_ff", "mlp", "out"),
    Site("down_proj", "mlp.down_proj", "d_model", "embed", "out"),
    Site("post_attention_layernorm", "post_attention_layernorm", "d_model", "embed", "mlp"),
)
SITE_NAMES: tuple[str, ...] = tuple(s.name for s in SITES)
SITE_INDEX: dict[str, int] = {n: i for i, n in enumerate(SITE_NAMES)}


def site(name: str) -> Site:
    if name not in SITE_INDEX:
        raise JaxcritError(f"unknown site '{name}'; sites are: {', '.join(SITE_NAMES)}")
    return SITES[SITE_INDEX[name]]


def width(cfg: ModelConfig, name: str) -> int:
    """Channels of a site in one layer."""
    return getattr(cfg, site(name).width)


def module_path(name: str, layer: int) -> str:
    """HF module path of a site in a layer, e.g. model.layers.11.mlp.down_proj."""
    return f"model.layers.{layer}.{site(name).module}"


def parse_module_path(path: str) -> tuple[str, int]:
    """Inverse of module_path: 'model.layers.11.mlp.down_proj' -> ('down_proj', 11)."""
    parts = path.split(".")
    if len(parts) < 4 or parts[:2] != ["model", "layers"] or not parts[2].isdigit():
        raise JaxcritError(f"'{path}' is not a site path like model.layers.11.mlp.down_proj")
    module = ".".join(parts[3:])
    for s in SITES:
        if s.module == module:
            return s.name, int(parts[2])
    raise JaxcritError(f"'{path}' names no site; sites are: {', '.join(s.module for s in SITES)}")


def neuron_name(name: str, layer: int, channel: int | None = None) -> str:
    """The one written name of a neuron, 'model.layers.11.mlp.down_proj[507]', or of a whole site
    (channel None), 'model.layers.11.mlp.down_proj'."""
    path = module_path(name, layer)
    return path if channel is None else f"{path}[{channel}]"


def parse_neuron_name(text: str) -> tuple[str, int, int | None]:
    """Inverse of neuron_name: 'model.layers.11.mlp.down_proj[507]' -> ('down_proj', 11, 507);
    a whole site without '[...]' gives channel None."""
    path, bracket, rest = text.strip().partition("[")
    site_name, layer = parse_module_path(path)
    if not bracket:
        return site_name, layer, None
    if not rest.endswith("]") or not rest[:-1].isdigit():
        raise JaxcritError(f"'{text}' is not a neuron name like model.layers.11.mlp.down_proj[507]")
    return site_name, layer, int(rest[:-1])
