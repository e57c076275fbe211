"""Each device reads only its part of a param: `Source.read` with the slices a sharded placement
asks for, against the same part cut by hand from the tensors the safetensors library reads (fused
q|k|v and gate|up rows of phi3, transposed and plain params of qwen2)."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

import hf_models
from jaxcrit.convert.hf import name_map, read_config
from jaxcrit.convert.safetensors_io import Checkpoint

SLICES = [slice(None), slice(0, 3), slice(2, None), slice(1, 5)]


@pytest.fixture(scope="module", params=["phi3", "qwen2"])
def checkpoint(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf_models.build(request.param, d)
    return read_config(d), Checkpoint(d), load_file(d / "model.safetensors")


def by_hand(tensors: dict, cfg, name: str, layer: int) -> np.ndarray:
    """The whole param [in, out] (or its vector) from the HF tensors: fused rows cut, then transposed."""
    Q, KV, F = cfg.q_dim, cfg.kv_dim, cfg.d_ff
    fused = {"q_w": ("self_attn.qkv_proj", 0, Q), "k_w": ("self_attn.qkv_proj", Q, Q + KV),
             "v_w": ("self_attn.qkv_proj", Q + KV, Q + 2 * KV), "gate_w": ("mlp.gate_up_proj", 0, F),
             "up_w": ("mlp.gate_up_proj", F, 2 * F)}
    if cfg.family.fused and name in fused:
        module, lo, hi = fused[name]
        return tensors[f"model.layers.{layer}.{module}.weight"][lo:hi].T
    src = name_map(cfg)[name]
    t = tensors[src.key.format(i=layer)]
    return t.T if src.transpose else t


@pytest.mark.parametrize("name", ["q_w", "k_w", "v_w", "gate_w", "up_w", "o_w", "down_w", "input_norm", "embed"])
def test_parts_equal_the_parts_cut_by_hand(checkpoint, name):
    cfg, ckpt, tensors = checkpoint
    src = name_map(cfg)[name]
    layer = None if name == "embed" else 1
    whole = by_hand(tensors, cfg, name, layer)
    for rows in SLICES:
        for index in [(rows,)] if whole.ndim == 1 else [(rows, cols) for cols in SLICES]:
            np.testing.assert_array_equal(src.read(ckpt, layer, index), whole[index], err_msg=f"{name} {index}")
