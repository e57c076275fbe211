"""Engine results on one CPU device equal those on eight, rows over 'data' and params over 'model'.

The eight-device run is a subprocess (XLA_FLAGS must be set before jax starts); both sides build
the same random params from a seed, so no checkpoint is needed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax
    from jaxcrit import engine as E
    from jaxcrit.models import decoder
    from jaxcrit.models.config import ModelConfig
    from jaxcrit.sharding import make_mesh
    from jaxcrit.models.params import shard
    cfg = ModelConfig(model_type="qwen2", vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=96, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True)
    shape = tuple(int(x) for x in sys.argv[2].split("x"))
    mesh = make_mesh(shape)
    raw = decoder.random_params(cfg, jax.random.key(0))
    params = shard(cfg, raw, mesh)
    rng = np.random.default_rng(0)
    texts = E.Texts.from_ids([rng.integers(0, 256, 33).tolist(), rng.integers(0, 256, 29).tolist()])
    eng = E.Engine(cfg, params, texts, mesh=mesh, chunk=8, progress=False)
    single = E.single(cfg, "down_proj", channels=range(0, 64, 5))
    rand = E.random_sets(cfg, ("q_proj", "act_fn", "post_attention_layernorm"), 13, 6, seed=1)
    out = np.concatenate([eng.losses(single), eng.losses(rand)])
    np.save(sys.argv[1], out)
    print("specs", {k: str(v.sharding.spec) for k, v in params.items()})
""")


def run(tmp_path, devices: int, shape: str) -> np.ndarray:
    out = tmp_path / f"losses{devices}.npy"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), shape], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out), proc.stdout


def test_engine_same_on_1_and_8_devices(tmp_path):
    one, _ = run(tmp_path, 1, "1x1")
    eight, specs = run(tmp_path, 8, "4x2")
    assert "'model'" in specs  # params really split over the model axis
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)
    assert np.ptp(one) > 1e-3  # the ablations really differ from one another
