"""Orbax save/restore of converted params: bit-identical arrays, the table's shardings, same logits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrit.bench import random_params
from jaxcrit.convert import orbax_io
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.params import param_table
from jaxcrit.dist.sharding import make_mesh, named


def logits(cfg, params, ids):
    h, _ = decoder.forward(cfg, params, decoder.embed(cfg, params, jnp.asarray(ids)))
    return np.asarray(decoder.logits(cfg, params, h))


def check_round_trip(path, cfg, params, mesh):
    """params were placed on mesh; restoring onto it must reproduce arrays, shardings and logits."""
    orbax_io.save(path, cfg, params)
    cfg2, params2 = orbax_io.restore(path, mesh)
    assert cfg2 == cfg and hash(cfg2) == hash(cfg)
    assert set(params2) == set(params)
    for name, (shape, axes) in param_table(cfg).items():
        assert params2[name].dtype == params[name].dtype
        np.testing.assert_array_equal(np.asarray(params2[name], np.float32), np.asarray(params[name], np.float32))
        assert params2[name].sharding == named(axes, shape, mesh)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    np.testing.assert_array_equal(logits(cfg2, params2, ids), logits(cfg, params, ids))


def tp_mesh():
    return make_mesh((1, len(jax.devices())))  # tensor-parallel over every device


def test_round_trip_converted_gguf(tmp_path):
    pytest.importorskip("gguf")
    from gguf_files import write_llama
    from jaxcrit.convert.gguf_io import load_gguf

    mesh = tp_mesh()
    cfg, params = load_gguf(write_llama(tmp_path / "tiny.gguf"), mesh=mesh)
    check_round_trip(tmp_path / "ckpt", cfg, params, mesh)


def test_round_trip_bf16_and_tuple_fields(tmp_path):
    cfg = ModelConfig("phi3", 211, 64, 2, 4, 4, 16, 120, 1e-5, 1e4, False, rope_type="longrope",
                      rope_factor=2.0, rope_original_max=64, rope_short_factor=(1.0,) * 8,
                      rope_long_factor=(2.0,) * 8)
    mesh = tp_mesh()
    params = random_params(cfg, jnp.bfloat16, mesh=mesh)
    check_round_trip(tmp_path / "ckpt", cfg, params, mesh)


def test_refusals(tmp_path):
    cfg = ModelConfig("llama", 32, 16, 1, 2, 2, 8, 32, 1e-5, 1e4, True)
    params = random_params(cfg)
    orbax_io.save(tmp_path / "ckpt", cfg, params)
    with pytest.raises(JaxcritError, match="already exists"):
        orbax_io.save(tmp_path / "ckpt", cfg, params)
    with pytest.raises(JaxcritError, match="do not match the config's param table"):
        orbax_io.save(tmp_path / "other", cfg, {k: v for k, v in params.items() if k != "embed"})
    with pytest.raises(JaxcritError, match="not a jaxcrit Orbax checkpoint"):
        orbax_io.restore(tmp_path)
