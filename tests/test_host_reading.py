"""Each process reads only its devices' part of a sharded safetensors checkpoint.

A tiny llama saved as several safetensors shards with model.safetensors.index.json; two
processes of four CPU devices load it on an 8x1 mesh with FSDP (mesh.params = "fsdp": every
matrix split eight ways over 'data', so each process holds half of it). Each process counts the
bytes its reads return; each must read half of every matrix and each norm once (its four devices'
replicas share one read), and every part it holds must equal the checkpoint's values as the
safetensors package reads them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import hf_models
from test_multiprocess import _port

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{sys.argv[2]}", 2, int(sys.argv[3]))
    from safetensors.numpy import load_file
    from jaxcrit.convert import safetensors_io as st
    from jaxcrit.convert.hf import load_hf
    from jaxcrit.dist.sharding import make_mesh, rules
    reads = []
    plain = st.SafetensorsFile.read
    def counted(self, name, index=()):
        out = plain(self, name, index)
        reads.append((self.path.name, out.nbytes))
        return out
    st.SafetensorsFile.read = counted
    d = sys.argv[1]
    cfg, params = load_hf(d, np.float32, make_mesh((8, 1)), rules("fsdp"))
    ref = {}
    for f in sorted(set(json.load(open(d + "/model.safetensors.index.json"))["weight_map"].values())):
        ref.update(load_file(f"{d}/{f}"))
    layer = lambda fmt: np.stack([ref[fmt.format(i)].T for i in range(cfg.n_layers)])
    full = {"embed": ref["model.embed_tokens.weight"], "q_w": layer("model.layers.{}.self_attn.q_proj.weight"),
            "down_w": layer("model.layers.{}.mlp.down_proj.weight"),
            "input_norm": np.stack([ref[f"model.layers.{i}.input_layernorm.weight"] for i in range(cfg.n_layers)])}
    for k, want in full.items():
        for sh in params[k].addressable_shards:
            np.testing.assert_array_equal(np.asarray(sh.data), want[sh.index], err_msg=k)
    print("READ" + json.dumps({"bytes": sum(n for _, n in reads), "files": sorted({f for f, _ in reads})}))
""")


def test_each_process_reads_its_part(tmp_path):
    model = hf_models.build("llama", tmp_path / "m")
    model.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3
    tensors = {k: v for f in files for k, v in load_file(tmp_path / "m" / f).items()}
    matrices = sum(v.nbytes for v in tensors.values() if v.ndim == 2)
    vectors = sum(v.nbytes for v in tensors.values() if v.ndim == 1)

    port = _port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "4"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "m"), str(port), str(i)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.split("READ", 1)[1])
        # half of every matrix (the 'embed' axis split over 8 devices, 4 of them here), norms once;
        # every shard file holds some layer's matrices, so every process opens each one
        assert got["bytes"] == matrices // 2 + vectors
        assert got["files"] == files
