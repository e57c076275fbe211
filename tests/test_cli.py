"""The CLI end to end on a tiny llama: result files, resume after an interruption, bad input.

`jaxcrit.main.run(config, workdir)` runs in-process (compiled programs are shared between runs
of one model, so the later runs are cheap); one test runs `python -m jaxcrit.main` as a
subprocess to check what a user sees on a bad flag.

Resume: an interrupted run (KeyboardInterrupt raised from inside the scan, after its first
block was checkpointed to state/scan.npz, or from inside Stage 1 after its first batch of
noisy passes was checkpointed to state/stage1.npz) started again with the same workdir must
write byte-identical result files to an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_models
from configs.common import base
from jaxcrit import engine as E
from jaxcrit import main as M
from jaxcrit.critical import stage1
from jaxcrit.errors import JaxcritError

REPO = Path(__file__).resolve().parents[1]
WORDS = 60
TEXT = " ".join(f"w{i}" for i in np.random.default_rng(5).integers(0, WORDS, 40))   # 40 tokens
COMPARED = ("importance.json", "critical.json", "curve.csv", "scan.csv", "baselines.json", "greedy.json",
            "evaluation.json")


def build_model(directory: Path, layers: int = 2, seed: int = 0) -> Path:
    """A tiny llama (hf_models' config, `layers` layers, initializer_range 0.2) saved with
    save_pretrained, plus a WordLevel tokenizer.json (words w0..w59, ids 1..60; [UNK] 0)."""
    model = hf_models.build("llama", directory, seed, layers=layers, initializer_range=0.2)
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}
    assert len(vocab) <= model.config.vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    return directory


def tiny_config(model_dir: Path, **over):
    """configs.common.base with tiny settings; over: dotted keys, e.g. stage2__epsilon=2."""
    c = base(str(model_dir))
    c.text = TEXT
    c.progress = False
    c.stage1.samples = 4
    c.stage1.batch = 2
    c.stage1.top_n = 50
    c.stage2.max_steps = 20
    c.baselines.ns = (1, 2, 5)
    c.baselines.random_repeats = 2
    c.scan.layers = (1,)
    c.scan.greedy_steps = 2
    c.scan.greedy_pool = 3
    c.engine.chunk = 8
    for k, v in over.items():
        *path, last = k.split("__")
        obj = c
        for p in path:
            obj = obj[p]
        obj[last] = v
    return c


def files(workdir: Path, names=COMPARED) -> dict[str, bytes]:
    return {n: (workdir / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted run scanning two layers' down_proj: 128 rows = 2 scan blocks of
    engine.chunk * 8 = 64 rows (main.run's block size)."""
    wd = tmp_path_factory.mktemp("reference")
    M.run(tiny_config(model_dir, scan__layers=(0, 1)), wd)
    return wd


# ----------------------------------------------------------------------------- a full run

def test_run_writes_every_result_file(model_dir, tmp_path):
    wd = tmp_path / "run"
    result = M.run(tiny_config(model_dir), wd)
    for name in M.RESULT_FILES + ("greedy.json", "config.json"):
        assert (wd / name).is_file() and (wd / name).stat().st_size > 0, name

    imp = json.loads((wd / "importance.json").read_text())
    assert imp["ranking"] == "channel" and imp["samples"] == 4 and imp["tokens"] == 40
    assert 0 < len(imp["neurons"]) <= 50
    for r in imp["neurons"]:
        assert {"layer_name", "seq_idx", "hidden_idx", "activation_diff"} <= r.keys()
        assert r["layer_name"].startswith("model.layers.") and r["seq_idx"] == -1
    diffs = [r["activation_diff"] for r in imp["neurons"]]
    assert diffs == sorted(diffs, reverse=True) and diffs[-1] > 1e-6

    crit = json.loads((wd / "critical.json").read_text())
    curve = (wd / "curve.csv").read_text().splitlines()
    assert curve[0] == "n,delta" and len(curve) > 1
    n_last = crit["n"] if crit["n"] is not None else int(curve[-1].split(",")[0])
    assert len(crit["neurons"]) == n_last
    assert [x["layer_name"] for x in crit["neurons"]] == [r["layer_name"] for r in imp["neurons"][:n_last]]

    scan = (wd / "scan.csv").read_text().splitlines()
    assert scan[0] == "site,layer,channel,delta" and len(scan) == 1 + 64   # layer 1's down_proj
    base_ = json.loads((wd / "baselines.json").read_text())
    assert set(base_) == {"random", "activation", "gradient", "massive"} and len(base_["random"]) == 2
    assert [r["n"] for r in base_["activation"][0]] == [1, 2, 5]
    greedy = json.loads((wd / "greedy.json").read_text())
    assert 1 <= len(greedy) <= 2
    ev = json.loads((wd / "evaluation.json").read_text())
    assert ev["overall"]["tokens"] == 39

    summary = (wd / "summary.md").read_text()
    assert "base perplexity" in summary and "Masked perplexity" in summary
    base_ppl = f"10^{crit['base_loss'] / E.LN10:.2f}"
    masked_ppl = f"10^{crit['loss'] / E.LN10:.2f}"
    assert base_ppl in summary and masked_ppl in summary
    assert abs(result["base_loss"] - crit["base_loss"]) < 1e-12
    for png in ("curve.png", "heatmap.png", "scan.png"):
        assert (wd / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((wd / "manifest.json").read_text())["config"]["stage1"]["samples"] == 4


# ----------------------------------------------------------------------------- resume

def test_resume_after_interrupted_scan_is_identical(model_dir, reference, tmp_path, monkeypatch):
    wd = tmp_path / "run"
    orig = E.Engine.deltas
    scan_calls = []

    def deltas(self, abl, desc="ablations"):
        if desc.startswith("scan"):
            scan_calls.append(desc)
            if len(scan_calls) == 2:       # the second scan block: the first is checkpointed
                raise KeyboardInterrupt
        return orig(self, abl, desc=desc)

    monkeypatch.setattr(E.Engine, "deltas", deltas)
    with pytest.raises(KeyboardInterrupt):
        M.run(tiny_config(model_dir, scan__layers=(0, 1)), wd)
    monkeypatch.undo()
    assert len(np.load(wd / "state" / "scan.npz")["deltas"]) == 64
    assert not (wd / "scan.csv").exists() and not (wd / "greedy.json").exists()
    assert (wd / "baselines.json").exists()

    resumed = []
    monkeypatch.setattr(E.Engine, "deltas", lambda self, abl, desc="ablations": (resumed.append(desc),
                                                                                  orig(self, abl, desc=desc))[1])
    M.run(tiny_config(model_dir, scan__layers=(0, 1)), wd)
    assert [d for d in resumed if d.startswith("scan")] == ["scan 64/128"]   # only the missing block
    assert files(wd) == files(reference)


def test_resume_after_interrupted_stage1_is_identical(model_dir, reference, tmp_path, monkeypatch):
    wd = tmp_path / "run"
    orig = stage1._accumulate
    calls = []

    def accumulate(*a, **k):
        calls.append(1)
        if len(calls) == 2:                # the second batch of noisy passes: the first is checkpointed
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(stage1, "_accumulate", accumulate)
    with pytest.raises(KeyboardInterrupt):
        M.run(tiny_config(model_dir, scan__layers=(0, 1)), wd)
    monkeypatch.undo()
    assert int(np.load(wd / "state" / "stage1.npz")["_k"]) == 2
    assert not (wd / "importance.json").exists()

    calls.clear()
    monkeypatch.setattr(stage1, "_accumulate", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    M.run(tiny_config(model_dir, scan__layers=(0, 1)), wd)
    assert len(calls) == 1                 # only the missing batch
    assert (wd / "importance.json").read_bytes() == (reference / "importance.json").read_bytes()
    assert files(wd) == files(reference)


# ----------------------------------------------------------------------------- bad input

def test_short_text_is_refused(model_dir, tmp_path):
    with pytest.raises(JaxcritError, match=r"the text has 3 tokens; at least 10"):
        M.run(tiny_config(model_dir, text="w1 w2 w3"), tmp_path / "run")


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_epsilon_must_be_positive(model_dir, tmp_path, eps):
    with pytest.raises(JaxcritError, match=r"stage2\.epsilon must be > 0"):
        M.run(tiny_config(model_dir, stage2__epsilon=eps), tmp_path / "run")
    assert not (tmp_path / "run").exists()          # refused before the workdir is touched


def test_samples_must_be_positive(model_dir, tmp_path):
    with pytest.raises(JaxcritError, match=r"stage1\.samples \(K\) must be >= 1 \(got 0\)"):
        M.run(tiny_config(model_dir, stage1__samples=0), tmp_path / "run")


def test_workdir_of_another_config_is_refused_unless_overwrite(model_dir, reference, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    before = files(wd)
    other = tiny_config(model_dir, scan__layers=(0, 1), seed=7)
    with pytest.raises(JaxcritError, match="holds results of a different config.*overwrite=True"):
        M.run(other, wd)
    assert files(wd) == before

    # progress and overwrite are not part of a run's identity: the same config resumes
    same = tiny_config(model_dir, scan__layers=(0, 1), progress=True, overwrite=True)
    M.run(same, wd)
    assert files(wd) == before

    other.overwrite = True
    M.run(other, wd)
    assert json.loads((wd / "config.json").read_text())["seed"] == 7
    assert (wd / "importance.json").read_bytes() != before["importance.json"]   # other noise, recomputed
    assert all((wd / n).is_file() for n in M.RESULT_FILES)


def test_empty_ranking_is_refused(model_dir, tmp_path):
    """A threshold above every score leaves Stage 1's list empty: one clear error, not an
    IndexError from Stage 2."""
    with pytest.raises(JaxcritError, match=r"stage 1 ranked no neuron.*stage1\.threshold"):
        M.run(tiny_config(model_dir, stage1__threshold=1e9), tmp_path / "run")
    assert not (tmp_path / "run" / "importance.json").exists()


def test_workdir_below_a_file_is_refused(model_dir, tmp_path):
    """A path below a regular file: not a directory, whoever runs the test."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JaxcritError, match=r"workdir .*/file/sub is not writable \(Not a directory\)"):
        M.run(tiny_config(model_dir), f / "sub")


def test_read_only_workdir_is_refused(model_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user (root) who can write a 0o500 directory; "
                        "test_workdir_below_a_file_is_refused covers the error")
        with pytest.raises(JaxcritError, match="not writable"):
            M.run(tiny_config(model_dir), ro / "sub")
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------- the command line

def _cli(model_dir: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(
        "from configs.common import base\n\n"
        "def get_config(arg=None):\n"
        f"    c = base({str(model_dir)!r})\n"
        f"    c.text = {TEXT!r}\n"
        "    c.progress = False\n"
        "    c.stage1.samples = 4\n"
        "    return c\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxcrit.main", f"--config={cfg}",
                           f"--workdir={tmp_path / 'run'}", *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_bad_value_is_one_error_line(model_dir, tmp_path):
    p = _cli(model_dir, tmp_path, "--config.stage2.epsilon=0")
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert "Traceback" not in p.stderr
    assert [l for l in lines if "jaxcrit: error:" in l] == [
        "jaxcrit: error: stage2.epsilon must be > 0 (got 0.0)"], p.stderr
    assert lines == ["jaxcrit: error: stage2.epsilon must be > 0 (got 0.0)"], p.stderr


def test_cli_unknown_key_fails(model_dir, tmp_path):
    p = _cli(model_dir, tmp_path, "--config.nosuch=1")
    assert p.returncode != 0
    assert "nosuch" in p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["missing_dir", "corrupt_header", "unknown_type"])
def test_cli_bad_checkpoint_is_one_error_line(model_dir, tmp_path, how):
    """A bad checkpoint reaches the user as one line and a non-zero exit, with no result file."""
    import json
    import shutil
    bad = tmp_path / "ckpt"
    if how != "missing_dir":
        shutil.copytree(model_dir, bad)
    if how == "corrupt_header":
        with open(bad / "model.safetensors", "r+b") as f:
            f.write(b"\xff" * 16)
    if how == "unknown_type":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    p = _cli(bad, tmp_path)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("jaxcrit: error:"), p.stderr
    assert not (tmp_path / "run" / "importance.json").exists()


def test_out_of_device_memory_is_one_error_line(model_dir, tmp_path, monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED reaches the user as one line saying what to lower, exit code 3."""
    from absl import flags
    cfg = tmp_path / "tiny_cfg.py"
    cfg.write_text(f"from configs.common import base\n\ndef get_config(arg=None):\n    return base({str(model_dir)!r})\n")
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["jaxcrit", f"--config={cfg}", f"--workdir={tmp_path / 'run'}"])

    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB.")
    monkeypatch.setattr(M, "run", oom)
    with pytest.raises(SystemExit) as e:
        M.main(["jaxcrit"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert e.value.code == 3
    assert err == ["jaxcrit: error: out of device memory; lower --config.engine.chunk or --config.stage1.batch"]
