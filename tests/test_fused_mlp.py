"""The fused gate|up kernel (kernels/fused_mlp.py): its vmap rule here (the kernel replaced by a
plain product), its program in Pallas's Mosaic GPU interpreter on CPU, the compiled kernel and
the engine with it on a Hopper GPU (the benchmark call)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrit.kernels import fused_mlp, hopper


def plain(x, g, u, scale=None) -> np.ndarray:
    """silu(s * (x @ g)) * (s * (x @ u)) rounded as transformers' MLP rounds in PyTorch: the
    GEMMs' outputs (scaled by each row's s, default 1), SiLU (here in f64) and the product, each to bf16."""
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)
    s = 1.0 if scale is None else np.asarray(scale, np.float32)[:, None]
    mm = lambda w: bf(s * np.asarray(jnp.einsum("nd,df->nf", x, w, preferred_element_type=jnp.float32)))
    a, b = mm(g), mm(u)
    return bf(bf(a / (1 + np.exp(-a))) * b)


def contract(x, s, g, u, t=None):
    """What `fused_mlp._product` computes, as XLA code: the kernel's stand-in on CPU."""
    return (jax.nn.silu(s[:, None] * (x @ g)) * (s[:, None] * (x @ u))).astype(x.dtype)


def test_vmap_folds_rows_into_one_launch(monkeypatch):
    calls = []

    def product(x, s, g, u, t):   # rows a multiple of TILES.rows; records each launch's rows
        jax.debug.callback(lambda a: calls.append(a.shape), x)
        return contract(x, s, g, u)

    monkeypatch.setattr(fused_mlp, "_product", product)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (3, 4, 20, 64))                 # rows x [B, T, D]: 3 x 80 token rows
    s = 1 + jnp.arange(80.0).reshape(4, 20) / 80                # scales shared by the rows (unbatched)
    g, u = (0.1 * jax.random.normal(kk, (64, 256)) for kk in k[1:])
    out = jax.jit(jax.vmap(fused_mlp.swiglu, in_axes=(0, None, None, None)))(x, s, g, u)
    assert calls == [(256, 64)]   # one launch: the 240 token rows together, padded to TILES.rows (not 3 of 80 -> 128)
    want = np.stack([np.asarray(jax.nn.silu(s[..., None] * (r @ g)) * (s[..., None] * (r @ u))) for r in x])
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(NotImplementedError, match="weights batched"):
        jax.vmap(fused_mlp.swiglu)(x, jnp.stack([s] * 3), jnp.stack([g] * 3), jnp.stack([u] * 3))


@pytest.mark.parametrize("tiles", [fused_mlp.TILES._replace(cluster=1),
                                   hopper.Tiles(128, 128, 64, 3, 2),
                                   hopper.Tiles(128, 128, 64, 3, 2, pingpong=True)],
                         ids=["kernel's tiles", "128-row tiles", "ping-pong"])
def test_kernel_interpreted_on_cpu(tiles, monkeypatch):
    """The kernel's own program (TMA copies, barriers, wgmma, the epilogue's stores) run by Pallas's
    Mosaic GPU interpreter on CPU, against `plain`: 3 row blocks on 4 stand-in SMs (a whole round
    of 2 row blocks, then one shared out), two blocks side by side on each, 2 k-steps a tile so
    the ring of 3 slots runs through tile boundaries, the epilogue in its two parts; also with
    128 rows per warpgroup (two wgmma row groups per accumulator) and ping-pong (the warpgroups
    on alternate tiles, one epilogue beside the other's k-steps). Single blocks: the interpreter
    has no cluster barriers (the GPU tests run the clusters)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams, force_gpu_interpret_mode
    except ImportError:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    if jax.default_backend() == "gpu":   # there, 42 % of its products came out unlike on CPU (jax 0.11.2, H100)
        pytest.skip("the interpreter's run is checked on CPU hosts; on a GPU the compiled kernel's tests run")

    class Device:   # what hopper.gemm asks of the device
        core_count = 4

    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [Device()])
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (3 * tiles.rows, 128)).astype(jnp.bfloat16)
    g, u = ((0.1 * jax.random.normal(kk, (128, 512))).astype(jnp.bfloat16) for kk in k[1:])
    with force_gpu_interpret_mode(InterpretGPUParams()):
        out = fused_mlp._product(x, None, g, u, tiles)
    frac, rel = differ(np.asarray(out, np.float64), plain(x, g, u))
    assert frac < 0.001 and rel < 2 ** -5, (frac, rel)


on_hopper = pytest.mark.skipif(not hopper.on_hopper(),
                               reason="the Mosaic GPU kernel needs a Hopper GPU (run in the GPU benchmark call)")


def gpu_case(scale=False):
    """x, g, u, each row's scale (ones unless `scale`) and the kernel's products, on the GPU."""
    k = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(k[0], (1000, 896)).astype(jnp.bfloat16)   # rows not a multiple of the block
    g, u = ((0.06 * jax.random.normal(kk, (896, 4864))).astype(jnp.bfloat16) for kk in k[1:3])
    s = jax.random.uniform(k[3], (1000,), minval=0.25, maxval=4.0) if scale else jnp.ones(1000)
    return x, g, u, s, np.asarray(jax.jit(fused_mlp.swiglu)(x, s, g, u), np.float64)


def differ(out, want) -> tuple[float, float]:
    """(fraction of elements that differ, max relative difference)."""
    return float(np.mean(out != want)), float((np.abs(out - want) / (np.abs(want) + 1e-3)).max())


@on_hopper
def test_compiled_kernel_on_gpu():
    """The same roundings as `plain`: elements differ only where the GEMMs' summation orders
    round gate or up to neighbouring bf16 values (one ulp of gate moves SiLU's output up to ~4
    ulps at gate ~ -5): rare and bounded."""
    for scale in (False, True):   # each row's scale (RMSNorm's) applied to the GEMMs' outputs
        x, g, u, s, out = gpu_case(scale)
        frac, rel = differ(out, plain(x, g, u, s))
        assert frac < 0.01 and rel < 2 ** -5, (scale, frac, rel)


@on_hopper
def test_kernel_against_transformers_mlp_on_gpu():
    """act_fn(gate_proj(x)) * up_proj(x) by transformers' Qwen2MLP modules on the same GPU, bf16."""
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    x, g, u, _, out = gpu_case()
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
    from jaxcrit.bench import QWEN_05B, random_params
    cfg = dataclasses.replace(QWEN_05B, n_layers=4, vocab_size=4096)
    params = random_params(cfg, jnp.bfloat16, seed=2)
    texts = E.Texts.from_ids([np.random.default_rng(0).integers(0, cfg.vocab_size, 256).tolist()])
    abl = E.single(cfg, "down_proj", layers=[0, 2], channels=range(0, 896, 7))
    out = {m: E.Engine(cfg, params, texts, chunk=64, mlp=m, progress=False).losses(abl) for m in ("xla", "pallas")}
    assert E.Engine(cfg, params, texts, chunk=64, progress=False).kernels.mlp == "pallas"   # auto picks it
    np.testing.assert_allclose(out["pallas"], out["xla"], atol=2e-3)


@pytest.mark.parametrize("mlp, norms", [("pallas", "folded"), ("xla", "folded"), ("pallas", "plain")])
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma"])
def test_unedited_layer_kernels(model_type, mlp, norms, monkeypatch):
    """An unedited layer run by the kernels the selection names: the fused MLP (the kernel stands
    in as XLA code of its contract) and the folded norms (each row's 1/rms applied to q/k/v's and
    gate/up's outputs, the norms' gains in the weights), each on or off. In f32 every combination
    gives the plain layer's output (norm, then GEMMs) within 1e-5; folded norms round otherwise
    (q/k biases, Qwen3's q/k norms, Gemma's 1 + w)."""
    from jaxcrit.bench import random_params
    from jaxcrit.kernels.selection import Kernels
    from jaxcrit.models import decoder
    from jaxcrit.models.config import ModelConfig

    monkeypatch.setattr(fused_mlp, "_product", contract)
    cfg = ModelConfig(model_type=model_type, vocab_size=64, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=128, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True)
    if model_type == "gemma":   # the fold's 1 + w; the kernel's SiLU stands for Gemma's GELU on both sides
        monkeypatch.setattr(decoder, "act", lambda name, x: jax.nn.silu(x))
    p = {k: v[0] for k, v in decoder.stacked_params(random_params(cfg)).items()}
    h = 3.0 * jax.random.normal(jax.random.key(1), (2, 12, 64))
    cos, sin = decoder.rope_tables(cfg, 12)
    run = lambda k: np.asarray(decoder.block(cfg, p, h, None, cos, sin, None, None, k.layer)[0])
    fast, plain_layer = run(Kernels(mlp=mlp, norms=norms)), run(Kernels())
    if norms == "folded":
        assert np.abs(fast - plain_layer).max() > 0   # the fold runs (other roundings), and agrees:
    np.testing.assert_allclose(fast, plain_layer, rtol=1e-5, atol=1e-5)
