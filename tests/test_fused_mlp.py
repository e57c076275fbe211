"""The fused gate|up kernel (models/fused_mlp.py): its vmap rule here (the kernel replaced by a
plain product), its program in Pallas's Mosaic GPU interpreter on CPU, the compiled kernel and
the engine with it on a Hopper GPU (the benchmark call)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrit.models import fused_mlp, hopper


def plain(x, g, u) -> np.ndarray:
    """silu(x @ g) * (x @ u) rounded as transformers' MLP rounds in PyTorch: the GEMMs' outputs,
    SiLU (here in f64) and the product, each to bf16."""
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)
    mm = lambda w: bf(jnp.einsum("nd,df->nf", x, w, preferred_element_type=jnp.float32))
    a, b = mm(g), mm(u)
    return bf(bf(a / (1 + np.exp(-a))) * b)


def test_vmap_folds_rows_into_one_launch(monkeypatch):
    calls = []

    def product(x, g, u, t):   # the kernel's contract: rows a multiple of TILES.rows; records each launch's rows
        jax.debug.callback(lambda a: calls.append(a.shape), x)
        return (jax.nn.silu(x @ g) * (x @ u)).astype(x.dtype)

    monkeypatch.setattr(fused_mlp, "_product", product)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, 4, 20, 64))                 # rows x [B, T, D]: 3 x 80 token rows
    g, u = (0.1 * jax.random.normal(kk, (64, 256)) for kk in k[1:])
    out = jax.jit(jax.vmap(fused_mlp.swiglu, in_axes=(0, None, None)))(x, g, u)
    assert calls == [(256, 64)]   # one launch: the 240 token rows together, padded to TILES.rows (not 3 of 80 -> 128)
    want = np.stack([np.asarray(jax.nn.silu(r @ g) * (r @ u)) for r in x])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match="weights batched"):
        jax.vmap(fused_mlp.swiglu)(x, jnp.stack([g] * 3), jnp.stack([u] * 3))


@pytest.mark.parametrize("tiles", [fused_mlp.TILES._replace(cluster=1),
                                   hopper.Tiles(64, 128, 64, 3, 2, cluster=1, defer=True)],
                         ids=["kernel's tiles", "deferred epilogue"])
def test_kernel_interpreted_on_cpu(tiles, monkeypatch):
    """The kernel's own program (TMA copies, barriers, wgmma, the epilogue's stores) run by Pallas's
    Mosaic GPU interpreter on CPU, against `plain`: 3 row blocks on 4 stand-in SMs (a whole round
    of 2 row blocks, then one shared out), two blocks side by side on each, 2 k-steps a tile so
    the ring of 3 slots runs through tile boundaries; also with each tile's epilogue deferred
    beside the next tile's first wgmma. Single blocks: the interpreter has no cluster barriers
    (the GPU tests run the clusters)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
    except ImportError:
        pytest.skip("this jax has no Mosaic GPU interpreter")

    class Device:   # what hopper.gemm asks of the device
        core_count = 4

    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [Device()])
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (384, 128)).astype(jnp.bfloat16)
    g, u = ((0.1 * jax.random.normal(kk, (128, 512))).astype(jnp.bfloat16) for kk in k[1:])
    with force_gpu_interpret_mode(InterpretGPUParams()):
        out = fused_mlp._product(x, g, u, tiles)
    frac, rel = differ(np.asarray(out, np.float64), plain(x, g, u))
    assert frac < 0.001 and rel < 2 ** -5, (frac, rel)


on_hopper = pytest.mark.skipif(not hopper.on_hopper(),
                               reason="the Mosaic GPU kernel needs a Hopper GPU (run in the GPU benchmark call)")


def gpu_case():
    k = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k[0], (1000, 896)).astype(jnp.bfloat16)   # rows not a multiple of the block
    g, u = ((0.06 * jax.random.normal(kk, (896, 4864))).astype(jnp.bfloat16) for kk in k[1:])
    return x, g, u, np.asarray(jax.jit(fused_mlp.swiglu)(x, g, u), np.float64)


def differ(out, want) -> tuple[float, float]:
    """(fraction of elements that differ, max relative difference)."""
    return float(np.mean(out != want)), float((np.abs(out - want) / (np.abs(want) + 1e-3)).max())


@on_hopper
def test_compiled_kernel_on_gpu():
    """The same roundings as `plain`: elements differ only where the GEMMs' summation orders
    round gate or up to neighbouring bf16 values (one ulp of gate moves SiLU's output up to ~4
    ulps at gate ~ -5): rare and bounded."""
    x, g, u, out = gpu_case()
    frac, rel = differ(out, plain(x, g, u))
    assert frac < 0.01 and rel < 2 ** -5, (frac, rel)


@on_hopper
def test_kernel_against_transformers_mlp_on_gpu():
    """act_fn(gate_proj(x)) * up_proj(x) by transformers' Qwen2MLP modules on the same GPU, bf16."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    x, g, u, out = gpu_case()
    mlp = Qwen2MLP(Qwen2Config(hidden_size=896, intermediate_size=4864)).to("cuda", torch.bfloat16)
    t = lambda a: torch.from_numpy(np.asarray(a.astype(jnp.float32))).to("cuda", torch.bfloat16)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(t(g).T)
        mlp.up_proj.weight.copy_(t(u).T)
        want = (mlp.act_fn(mlp.gate_proj(t(x))) * mlp.up_proj(t(x))).float().cpu().numpy().astype(np.float64)
    frac, rel = differ(out, want)
    assert frac < 0.01 and rel < 2 ** -5, (frac, rel)


@on_hopper
def test_engine_losses_with_and_without_the_kernel():
    """A bf16 scan on a small Qwen2-shaped model: the fused MLP moves the losses by bf16 rounding only."""
    import dataclasses

    from jaxcrit import engine as E
    from jaxcrit.bench import QWEN_05B
    from jaxcrit.models import decoder
    cfg = dataclasses.replace(QWEN_05B, n_layers=4, vocab_size=4096)
    params = decoder.random_params(cfg, jax.random.key(2), jnp.bfloat16)
    texts = E.Texts.from_ids([np.random.default_rng(0).integers(0, cfg.vocab_size, 256).tolist()])
    abl = E.single(cfg, "down_proj", layers=[0, 2], channels=range(0, 896, 7))
    out = {m: E.Engine(cfg, params, texts, chunk=64, mlp=m, progress=False).losses(abl) for m in ("xla", "pallas")}
    assert E.Engine(cfg, params, texts, chunk=64, progress=False).kernels.mlp == "pallas"   # auto picks it
    np.testing.assert_allclose(out["pallas"], out["xla"], atol=2e-3)
