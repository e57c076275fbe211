"""Engine results on one CPU device equal those on eight, rows over 'data' and params over 'model',
and with params split over 'data' too (FSDP: mesh.params = "fsdp") on 2x4 and 8x1 meshes.

Every run is in one subprocess of eight CPU devices (the device count is fixed when jax starts),
the one-device run on a 1x1 mesh of the first; all build the same random params from a seed, so
no checkpoint is needed. Each run also reports the param bytes every device holds, checked
against a hand count of what each layout splits.
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
    from jaxcrit.bench import random_params
    from jaxcrit.models.config import ModelConfig
    from jaxcrit.dist.sharding import make_mesh
    cfg = ModelConfig(model_type="qwen2", vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=16, d_ff=96, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True)
    for run in sys.argv[2:]:
        shape, layout = run.split(":")
        mesh = make_mesh(tuple(int(x) for x in shape.split("x")), subset=True)
        params = random_params(cfg, mesh=mesh, layout=layout)
        rng = np.random.default_rng(0)
        texts = E.Texts.from_ids([rng.integers(0, 256, 33).tolist(), rng.integers(0, 256, 29).tolist()])
        eng = E.Engine(cfg, params, texts, mesh=mesh, chunk=8, progress=False)
        single = E.single(cfg, "down_proj", channels=range(0, 64, 5))
        rand = E.random_sets(cfg, ("q_proj", "act_fn", "post_attention_layernorm"), 13, 6, seed=1)
        exact = eng._run(single, eng.program(("down_proj",), exact=True), "exact")
        out = np.concatenate([eng.losses(single), eng.losses(rand), exact])   # exact: the redo's program
        np.save(f"{sys.argv[1]}/{run}.npy", out)
        held = {d: 0 for d in mesh.devices.flat}
        for v in params.values():
            for sh in v.addressable_shards:
                held[sh.device] += sh.data.nbytes
        print("RUN", run, sorted(set(held.values())), {k: str(v.sharding.spec) for k, v in params.items()})
""")


def run(tmp_path, *runs: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Losses and the printed line of each run ('DxM:layout') in one subprocess of eight devices."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *runs], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {ln.split()[1]: ln for ln in proc.stdout.splitlines() if ln.startswith("RUN")}
    return {r: np.load(tmp_path / f"{r}.npy") for r in runs}, lines


# f32 bytes of the test model's params by what the layouts may split: matrices (every one has the
# 'embed' axis), q/k/v biases (heads/kv only), norms (never split)
L, D, Q, KV, F, V = 3, 64, 64, 32, 96, 256
MATRICES = 4 * (V * D + L * D * (Q + 2 * KV) + L * Q * D + 3 * L * D * F)
BIASES = 4 * L * (Q + 2 * KV)
NORMS = 4 * (D + 2 * L * D)


def test_engine_same_on_1_and_8_devices(tmp_path):
    eight, lines = run(tmp_path, "1x1:replicated", "4x2:replicated", "2x4:fsdp", "8x1:fsdp")
    one = {"1x1:replicated": eight.pop("1x1:replicated")}
    assert lines["1x1:replicated"].startswith("RUN 1x1:replicated [" + str(MATRICES + BIASES + NORMS) + "]")
    assert "'model'" in lines["4x2:replicated"]  # params really split over the model axis
    assert "'data'" in lines["8x1:fsdp"] and "'data'" not in lines["4x2:replicated"]
    for r, losses in eight.items():
        np.testing.assert_allclose(losses, one["1x1:replicated"], rtol=1e-5, atol=1e-6, err_msg=r)
    assert np.ptp(one["1x1:replicated"]) > 1e-3  # the ablations really differ from one another
    singles = 3 * 13   # layers x channels; then 13 random rows, then the singles by the exact program
    for r, losses in {**one, **eight}.items():   # the exact logsumexp (rows one at a time per device) agrees
        assert len(losses) == 2 * singles + 13
        np.testing.assert_allclose(losses[-singles:], losses[:singles], rtol=1e-5, err_msg=r)
    # every device holds the same bytes: tensor parallel halves everything but the norms; FSDP on
    # 8 devices splits every matrix 8 ways (over 'data' x 'model'), the biases over 'model' only
    per_device = {r: lines[r].split("[", 1)[1].split("]", 1)[0] for r in eight}
    assert per_device["4x2:replicated"] == str(MATRICES // 2 + BIASES // 2 + NORMS)
    assert per_device["2x4:fsdp"] == str(MATRICES // 8 + BIASES // 4 + NORMS)
    assert per_device["8x1:fsdp"] == str(MATRICES // 8 + BIASES + NORMS)
