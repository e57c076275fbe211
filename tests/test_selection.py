"""The kernel selection (kernels/selection.py) against its rules written out by hand: what "auto"
picks on a CPU and on a pretend Hopper GPU, for one device and a mesh that splits the vocabulary,
the folded norms following the fused MLP, and the errors for unknown or inapplicable names."""
from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from jaxcrit.errors import JaxcritError
from jaxcrit.kernels import cudnn, fused_loss, fused_mlp, hopper
from jaxcrit.kernels.selection import Kernels, select
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig

ONE = AbstractMesh((1, 1), ("data", "model"))


def config(model_type: str = "qwen2", vocab: int = 384) -> ModelConfig:
    """A Qwen2-shaped model whose sizes the kernels' tiles divide (d_model 128, d_ff 256)."""
    return ModelConfig(model_type=model_type, vocab_size=vocab, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=32, d_ff=256, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=False)


@pytest.fixture
def hopper_gpu(monkeypatch):
    monkeypatch.setattr(hopper, "on_hopper", lambda: True)


def names(k: Kernels) -> tuple:
    return tuple(k.names().values()) + (k.loss_tiles,)


def test_auto_off_gpu_is_xla():
    for dtype in (jnp.float32, jnp.bfloat16):
        k = select(config(), dtype, ONE)
        assert names(k) == ("xla", "xla", "plain", "xla", fused_loss.TILES)
        assert k.layer == decoder.LayerKernels(decoder.attend, None, False) and k.expsum is None


def test_auto_on_a_hopper_gpu(hopper_gpu):
    gpu = lambda cfg, mesh=ONE, dtype=jnp.bfloat16, **kw: select(cfg, dtype, mesh, backend="gpu", **kw)
    k = gpu(config())
    assert names(k) == ("cudnn", "pallas", "folded", "pallas", fused_loss.HOPPER)   # 384 = 3 x 128 columns
    assert k.layer == decoder.LayerKernels(cudnn.attention, fused_mlp.swiglu, True)
    assert names(gpu(config(vocab=400))) == ("cudnn", "pallas", "folded", "pallas", fused_loss.TILES)
    # 2 devices over 'model': each holds 192 of the 384 columns, no multiple of 128; the MLP stays on XLA
    two = AbstractMesh((1, 2), ("data", "model"))
    assert names(gpu(config(), two)) == ("cudnn", "xla", "plain", "pallas", fused_loss.TILES)
    assert names(gpu(config(vocab=512), two)) == ("cudnn", "xla", "plain", "pallas", fused_loss.HOPPER)
    assert names(gpu(config("gemma"))) == ("cudnn", "xla", "plain", "pallas", fused_loss.HOPPER)   # GELU MLP
    assert names(gpu(config(), dtype=jnp.float32)) == ("xla", "xla", "plain", "xla", fused_loss.HOPPER)
    assert gpu(config(), mlp="xla").norms == "plain" and gpu(config(), mlp="pallas", norms="plain").norms == "plain"
    assert gpu(config(), mlp="xla", norms="folded").layer == decoder.LayerKernels(cudnn.attention, None, True)


def test_folded_norms_anywhere_fused_kernels_where_they_apply():
    assert select(config(), jnp.float32, ONE, norms="folded").layer == decoder.LayerKernels(decoder.attend, None, True)
    for spot, fused, needs in (("attention", "cudnn", "needs GPUs"), ("mlp", "pallas", "needs one Hopper GPU"),
                               ("loss", "pallas", "needs GPUs")):
        with pytest.raises(JaxcritError, match=f"engine.{spot} {fused} {needs}"):
            select(config(), jnp.bfloat16, ONE, **{spot: fused})
    with pytest.raises(JaxcritError, match="engine.norms 'fused' unknown: use auto, plain or folded"):
        select(config(), jnp.float32, ONE, norms="fused")
