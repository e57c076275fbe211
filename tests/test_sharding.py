"""The same logits on one CPU device and on eight with a 2x4 ('data', 'model') mesh.

The CPU device count is fixed when jax starts, so the eight-device run is a subprocess; it saves
its logits and the partition specs of the params for this process to compare.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

from jaxcrit.convert.hf import load_hf
from jaxcrit.models import decoder as dec
from jaxcrit.dist.sharding import make_mesh

# Dims that 4 divides (vocab, heads, kv heads, d_ff), so 'model' really splits them.
DIMS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
ARCHS = {
    "qwen2": lambda: tf.Qwen2Config(**DIMS, tie_word_embeddings=True),   # q/k/v biases, tied
    "phi3": lambda: tf.Phi3Config(**DIMS, pad_token_id=0, tie_word_embeddings=False),  # fused, lm_head
}
T = 37

CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxcrit.convert.hf import load_hf
    from jaxcrit.models import decoder as dec
    from jaxcrit.dist.sharding import make_mesh
    assert len(jax.devices()) == 8, jax.devices()
    mesh = make_mesh((2, 4))
    out = {}
    for arch, directory in json.loads(sys.argv[1]).items():
        cfg, params = load_hf(directory, np.float32, mesh)
        ids = jax.device_put(np.load(sys.argv[2]), NamedSharding(mesh, P("data", None)))
        f = jax.jit(lambda p, t: dec.logits(cfg, p, dec.forward(cfg, p, dec.embed(cfg, p, t))[0]))
        np.save(directory + "/logits8.npy", np.asarray(f(params, ids)))
        out[arch] = {k: [str(v.sharding.spec), len(v.sharding.device_set)] for k, v in params.items()}
    print("SPECS" + json.dumps(out))
""")


def build(arch: str, directory) -> None:
    torch.manual_seed(1)
    model = tf.AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    dirs = {}
    for arch in ARCHS:
        dirs[arch] = str(tmp_path_factory.mktemp(f"shard_{arch}"))
        build(arch, dirs[arch])
    return dirs


def test_one_vs_eight_devices(checkpoints, tmp_path):
    ids = np.random.default_rng(0).integers(0, DIMS["vocab_size"], (2, T))
    np.save(tmp_path / "ids.npy", ids)
    one = {}
    mesh1 = make_mesh(devices=jax.devices()[:1])
    for arch, d in checkpoints.items():
        cfg, params = load_hf(d, np.float32, mesh1)
        h, _ = dec.forward(cfg, params, dec.embed(cfg, params, jnp.asarray(ids)))
        one[arch] = np.asarray(dec.logits(cfg, params, h))
        np.save(os.path.join(d, "logits1.npy"), one[arch])

    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(checkpoints), str(tmp_path / "ids.npy")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    specs = json.loads(r.stdout.split("SPECS", 1)[1])

    for arch, d in checkpoints.items():
        s = specs[arch]
        assert all(n == 8 for _, n in s.values())
        split = {k for k, (spec, _) in s.items() if "model" in spec}
        # tensor parallel really splits: vocab, heads, kv and mlp axes over 'model'
        want = {"embed", "q_w", "k_w", "v_w", "o_w", "gate_w", "up_w", "down_w"} | ({"lm_head"} & set(s))
        assert want <= split, s
        eight = np.load(os.path.join(d, "logits8.npy"))
        err = np.linalg.norm(eight - one[arch]) / np.linalg.norm(one[arch])
        assert err <= 1e-5, f"{arch}: 1 vs 8 devices relative error {err:.2e}"
