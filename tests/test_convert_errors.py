"""Bad checkpoints fail at import with a JaxcritError whose message says what is wrong."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_models
from jaxcrit.convert.hf import load_hf
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import FAMILIES

ST = "model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good_qwen2")
    hf_models.build("qwen2", d)
    load_hf(d)  # the unbroken checkpoint loads
    return d


@pytest.fixture
def ckpt(good, tmp_path):
    """A fresh copy of the good checkpoint for one test to break."""
    d = tmp_path / "ckpt"
    shutil.copytree(good, d)
    return d


def fails(d, *words: str) -> str:
    with pytest.raises(JaxcritError) as e:
        load_hf(d)
    msg = str(e.value)
    for w in words:
        assert w in msg, f"'{w}' not in: {msg}"
    return msg


def edit_config(d, **changes):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def test_missing_dir(tmp_path):
    fails(tmp_path / "nowhere", "nowhere", "no such checkpoint directory")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    fails(ckpt, "config.json", "missing")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    fails(ckpt, "config.json", "not valid JSON")


def test_missing_safetensors(ckpt):
    (ckpt / ST).unlink()
    fails(ckpt, "no model.safetensors", "safetensors")


def test_corrupt_header_length(ckpt):
    with open(ckpt / ST, "r+b") as f:
        f.write(b"\xff" * 8)
    fails(ckpt, ST, "corrupt safetensors header", "re-download")


def test_corrupt_header_json(ckpt):
    with open(ckpt / ST, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff")
    fails(ckpt, ST, "corrupt safetensors header")


def test_truncated_file(ckpt):
    p = ckpt / ST
    os.truncate(p, p.stat().st_size // 2)
    fails(ckpt, ST, "truncated")


def test_file_shorter_than_header(ckpt):
    os.truncate(ckpt / ST, 5)
    fails(ckpt, ST, "too short")


def test_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="gpt_neox")
    msg = fails(ckpt, "unknown model_type 'gpt_neox'", "supported")
    assert all(f in msg for f in FAMILIES)


def test_shape_disagrees_with_config(ckpt):
    edit_config(ckpt, intermediate_size=96)  # saved with 120
    fails(ckpt, "mlp.", "has shape", "96", "120", "disagree")


def test_extra_tensor(ckpt):
    tensors = load_file(ckpt / ST)
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    fails(ckpt, "model.layers.0.mlp.extra_proj.weight", "no place", "qwen2")


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / ST)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, ckpt / ST, metadata={"format": "pt"})
    fails(ckpt, "model.layers.1.self_attn.k_proj.bias", "missing")


def test_index_names_missing_shard(ckpt):
    names = load_file(ckpt / ST).keys()
    (ckpt / ST).rename(ckpt / "model-00001-of-00002.safetensors")
    weight_map = {k: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, k in enumerate(sorted(names))}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails(ckpt, "model-00002-of-00002.safetensors", "missing")


def test_rotary_tables_and_a_tied_head_are_not_extra(ckpt):
    """Tensors jaxcrit recomputes or shares load without complaint: rotary inv_freq tables, and
    lm_head.weight beside tied embeddings (each alone would be refused if either were taken for
    the other's exemption)."""
    tensors = load_file(ckpt / ST)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(tensors, ckpt / ST)
    edit_config(ckpt, tie_word_embeddings=True)
    cfg, params = load_hf(ckpt)
    assert cfg.tie_embeddings and "lm_head" not in params
