"""The fused exp-sum kernel (Pallas, run here in interpret mode) against a plain computation,
alone and under shard_map on eight CPU devices (rows over 'data', vocabulary over 'model')."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcrit.kernels.fused_loss import Tiles, shifted_expsum
from jaxcrit.kernels.selection import loss_tiles


def plain(h, w, shift) -> np.ndarray:
    z = np.asarray(jnp.einsum("nd,vd->nv", h, w, preferred_element_type=jnp.float32), np.float64)
    return np.exp(z - np.asarray(shift, np.float64)[..., None]).sum(-1)


@pytest.mark.parametrize("V, tiles", [(700, Tiles(128, 256, 64, 8, 3)),   # a masked last vocab tile
                                      (768, Tiles(64, 128, 32, 4, 2))])   # whole vocab tiles only
def test_shifted_expsum_matches_plain_sum(V, tiles):
    # rows not a multiple of the row tile
    k1, k2 = jax.random.split(jax.random.key(V))
    h = jax.random.normal(k1, (200, 128)).astype(jnp.bfloat16)
    w = (0.1 * jax.random.normal(k2, (V, 128))).astype(jnp.bfloat16)
    shift = jnp.linspace(0.0, 4.0, 200, dtype=jnp.float32)
    out = np.asarray(shifted_expsum(h, w, shift, tiles, interpret=True))
    np.testing.assert_allclose(out, plain(h, w, shift), rtol=1e-5)


SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, jax.numpy as jnp
    from jaxcrit.kernels.fused_loss import Tiles, expsum_sharded
    from jaxcrit.dist.sharding import make_mesh
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hs = jax.random.normal(k1, (8, 2, 5, 64)).astype(jnp.bfloat16)          # [R, B, T, D]
    w = (0.2 * jax.random.normal(k2, (320, 64))).astype(jnp.bfloat16)     # V = 320 = 2 x 160
    shift = jax.random.uniform(k3, (2, 5), minval=-1.0, maxval=1.0)
    for shape in sys.argv[2:]:
        mesh = make_mesh(tuple(int(x) for x in shape.split("x")))
        f = jax.jit(lambda h, w, s: expsum_sharded(h, w, s, mesh, Tiles(16, 64, 32, 4, 1), interpret=True))
        out = f(hs, w, shift)
        np.save(f"{sys.argv[1]}/{shape}.npy", np.asarray(out))
        print(shape, "rows", out.sharding.spec[0], "psum", "psum" in str(jax.make_jaxpr(f)(hs, w, shift)))
""")


def test_sharded_expsum_on_8_devices(tmp_path):
    """Both meshes in one process of eight CPU devices."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), "4x2", "8x1"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines()}
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hs = jax.random.normal(k1, (8, 2, 5, 64)).astype(jnp.bfloat16)
    w = (0.2 * jax.random.normal(k2, (320, 64))).astype(jnp.bfloat16)
    shift = jax.random.uniform(k3, (2, 5), minval=-1.0, maxval=1.0)
    want = plain(hs.reshape(-1, 64), w, jnp.broadcast_to(shift, (8, 2, 5)).reshape(-1)).reshape(8, 2, 5)
    for shape in ("4x2", "8x1"):
        # rows stay split over 'data'; on 4x2 the vocabulary is split over 'model' and the partial sums psum'd
        assert printed[shape][:2] == ["rows", "data"], proc.stdout
        assert shape != "4x2" or printed[shape][3] == "True", proc.stdout
        np.testing.assert_allclose(np.load(tmp_path / f"{shape}.npy"), want, rtol=1e-5, err_msg=shape)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel needs a GPU (run in the GPU benchmark call)")
@pytest.mark.parametrize("V", [151936 // 4 + 3, 297 * 128])
def test_compiled_kernel_on_gpu(V):
    """The kernel as the engine runs it (ex2.approx epilogue, default tiles): V not a multiple of
    128 runs the Triton kernel (its last tile masked), a multiple of 128 the Hopper kernel on sm_90."""
    k1, k2 = jax.random.split(jax.random.key(1))
    h = jax.random.normal(k1, (1000, 896)).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(k2, (V, 896))).astype(jnp.bfloat16)
    shift = jnp.linspace(-2.0, 6.0, 1000, dtype=jnp.float32)
    tiles = loss_tiles(896, V)   # as the engine selects them
    got = jax.jit(lambda *a: shifted_expsum(*a, tiles))(h, w, shift)
    np.testing.assert_allclose(np.asarray(got), plain(h, w, shift), rtol=1e-5)
