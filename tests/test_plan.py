"""The memory plan from shapes alone: a Qwen2.5-72B shape (config.json only, no weights) on 8 CPU devices.

One subprocess with eight forced CPU devices runs the CLI four times: dry runs on a 2x4 and an
8x1 mesh with FSDP against 80 GiB devices and on a 2x1 mesh (two of the eight devices) against
141 GiB ones, which must print every program's per-device memory with the params at a hand count
of what the mesh splits, and fit (bf16 planned for accelerators: XLA:CPU's f32 copies of the
weights would not fit the 2x1 mesh; the FSDP gathers must not copy the stacked weights either);
then a real run (a tokenizer
added, plan always) with params replicated on 8x1, whose 145 GB of params cannot fit an 80 GiB
device: it must be refused with the plan's one line, exit code 2, before any weight is read
(there are none to read). The chunk is given, so each plan compiles four programs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from jaxcrit.bench import SHAPES
from jaxcrit.models.config import to_hf_config

REPO = Path(__file__).resolve().parents[1]
RUNS = textwrap.dedent("""
    import contextlib, io, json, sys
    from jaxcrit.main import main
    out = []
    for args in json.loads(sys.argv[1]):
        o, e = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            code = main(["jaxcrit", *args])
        out.append([code, o.getvalue(), e.getvalue()])
    print("RUNS" + json.dumps(out))
""")


def test_72b_plan_on_8_cpu_devices(tmp_path):
    cfg = SHAPES["72b"]
    shape = tmp_path / "q72"
    shape.mkdir()
    (shape / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    with_tok = tmp_path / "q72tok"
    with_tok.mkdir()
    (with_tok / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(with_tok / "tokenizer.json"))

    common = ["--config.max_tokens=115", "--config.engine.chunk=64", "--config.map.enabled=False"]
    dry = lambda mesh, gib: [f"--config=hf:{shape}", "--config.dry_run=True", f"--config.mesh.shape={mesh}",
                             "--config.mesh.params=fsdp", f"--config.mesh.device_memory_gib={gib}", *common]
    runs = [dry("(2,4)", 80), dry("(8,1)", 80), dry("(2,1)", 141),
            [f"--config=hf:{with_tok}", "--config.plan=always", "--config.mesh.shape=(8,1)", *common,
             "--config.mesh.device_memory_gib=80", f"--workdir={tmp_path / 'run'}",
             "--config.text=" + " ".join(["a"] * 200)]]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", RUNS, json.dumps(runs)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (c1, out1, _), (c2, out2, _), (c4, out4, _), (c3, out3, err3) = json.loads(r.stdout.split("RUNS", 1)[1])

    # params per device by hand: every matrix has the 'embed' axis (split over 'data'); over
    # 'model' the heads/kv/mlp/vocab axes split too; q/k/v biases follow heads/kv; norms whole
    L, D, Q, KV, F, V = cfg.n_layers, cfg.d_model, cfg.q_dim, cfg.kv_dim, cfg.d_ff, cfg.vocab_size
    matrices = 2 * (2 * V * D + L * D * (2 * Q + 2 * KV + 3 * F))
    biases, norms = 2 * L * (Q + 2 * KV), 2 * (D + 2 * L * D)
    for code, out, data, model, gib in ((c1, out1, 2, 4, 80), (c2, out2, 8, 1, 80), (c4, out4, 2, 1, 141)):
        assert code == 0, out
        lines = out.splitlines()
        assert lines[0].startswith(f"memory plan per device: mesh {data}x{model}"), out
        assert lines[0].endswith("(planned for accelerators: XLA:CPU compiled in float32, temporaries scaled to "
                                 "bfloat16)"), out
        params = float(next(ln for ln in lines if ln.split()[0] == "params").split()[1])
        want = (matrices // (data * model) + biases // model + norms) / 2**30
        assert abs(params - want) < 0.05, (params, want)
        for name in ("stage 1", "clean pass", "stage 2 chunk 64", "scan/map chunk 64"):
            row = next(ln for ln in lines if ln.strip().startswith(name))
            peak = float(row.split()[-1])
            assert params - 0.2 < peak <= min(gib, params + 15), row   # (about) the params and a little more
        assert "fits;" in lines[-1], out
    refused = [ln for ln in err3.splitlines() if ln.startswith("jaxcrit: error:")]
    assert c3 == 2 and len(refused) == 1 and "would not fit" in refused[0] and "does not fit" in refused[0], err3
    assert "--config.mesh.params=fsdp" in refused[0]   # what would fit: split the params over 'data'
    assert not (tmp_path / "run").exists()
