"""Logits parity with transformers (float32) for every family (site edits: test_sites_reference.py).

Reference: the transformers model built by hf_models.build (eager attention), run on the same
token ids, with attention_mask for right padding.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from jaxcrit.convert.hf import load_hf
from jaxcrit.models import decoder as dec
from jaxcrit.models.config import rope_inv_freq
from jaxcrit.models.sites import SITE_NAMES, width

TOL = 1e-5
BATCH = 2


@functools.partial(jax.jit, static_argnums=0)
def jax_logits(cfg, params, tokens, valid, masks):
    h, _ = dec.forward(cfg, params, dec.embed(cfg, params, tokens), valid, masks=masks)
    return dec.logits(cfg, params, h)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(vocab: int, T: int, pad: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [2, T] and valid [2, T]; the second row right-padded by `pad` positions."""
    ids = np.random.default_rng(seed).integers(0, vocab, (BATCH, T))
    valid = np.ones((BATCH, T), bool)
    if pad:
        valid[1, T - pad:] = False
        ids[1, T - pad:] = 0
    return ids, valid


def torch_logits(model, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64)))
    return out.logits.float().numpy()


class Loaded:
    def __init__(self, arch, directory):
        self.torch = hf_models.build(arch, directory)
        self.cfg, self.params = load_hf(directory, np.float32)

    def ones(self):
        return {n: jnp.ones((self.cfg.n_layers, width(self.cfg, n)), jnp.float32) for n in SITE_NAMES}

    def jax(self, ids, valid, masks=None):
        return np.asarray(jax_logits(self.cfg, self.params, jnp.asarray(ids), jnp.asarray(valid),
                                     masks or self.ones()))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, Loaded] = {}

    def get(arch: str) -> Loaded:
        if arch not in cache:
            cache[arch] = Loaded(arch, tmp_path_factory.mktemp(arch))
        return cache[arch]
    return get


CASES = [(37, 0), (45, 11)]  # (sequence length, right padding of row 1)


@pytest.mark.parametrize("arch", sorted(hf_models.CONFIGS))
def test_logits_parity(models, arch):
    m = models(arch)
    cases = CASES + ([(97, 13)] if arch == "phi3" else [])
    for T, pad in cases:
        ids, valid = inputs(m.cfg.vocab_size, T, pad, seed=T)
        a, b = m.jax(ids, valid), torch_logits(m.torch, ids, valid)
        err = rel_err(a[valid], b[valid])
        assert err <= TOL, f"{arch} T={T} pad={pad}: relative error {err:.2e}"


def test_phi3_long_rope_is_exercised(models):
    """Past original_max_position_embeddings (64) transformers switches to long_factor for the whole
    sequence (seq_len = max position + 1, right padding included) and scales cos/sin by
    sqrt(1 + ln(factor)/ln(original_max)), factor = max_position_embeddings / original_max."""
    m = models("phi3")
    cfg = m.cfg
    assert cfg.rope_type == "longrope" and cfg.rope_original_max == 64
    short, s_scale = rope_inv_freq(cfg, 64)
    long, l_scale = rope_inv_freq(cfg, 65)
    assert not np.allclose(short, long) and s_scale == l_scale > 1.0
    np.testing.assert_allclose(l_scale, np.sqrt(1 + np.log(256 / 64) / np.log(64)), rtol=1e-12)
    hf_rope = m.torch.model.rotary_emb
    assert hf_rope.attention_scaling == pytest.approx(l_scale)

    ids, valid = inputs(cfg.vocab_size, 97, 13, seed=97)
    b = torch_logits(m.torch, ids, valid)
    np.testing.assert_allclose(hf_rope.inv_freq.numpy(), long, rtol=1e-6)  # torch used long factors
    # The same model with the short factors in place of the long ones must miss by far.
    wrong = dataclasses.replace(cfg, rope_long_factor=cfg.rope_short_factor)
    a = np.asarray(jax_logits(wrong, m.params, jnp.asarray(ids), jnp.asarray(valid), m.ones()))
    assert rel_err(a[valid], b[valid]) > 100 * TOL


def test_nnx_module_matches_transformers_and_splits(models):
    """The Flax NNX Decoder gives transformers' logits, and survives nnx.split / nnx.merge."""
    from flax import nnx
    m = models("qwen2")
    ids, valid = inputs(m.cfg.vocab_size, 37, 0, seed=3)
    from jaxcrit.models.module import Decoder
    module = Decoder(m.cfg, m.params)
    ref = torch_logits(m.torch, ids, valid)
    assert rel_err(np.asarray(module(jnp.asarray(ids))), ref) <= TOL
    graphdef, state = nnx.split(module)
    again = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(ids))
    assert rel_err(np.asarray(again), ref) <= TOL
