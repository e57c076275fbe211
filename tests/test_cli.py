"""The CLI end to end on a tiny llama: result files, overwrite.

`jaxcrit.main.run(config, workdir)` runs in-process (compiled programs are shared between runs
of one model, so the later runs are cheap); the subprocess tests run `python -m jaxcrit.main`
as a user would, from an empty directory.

Resume after a kill inside each stage, and over damaged state: tests/test_resume_faults.py.
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

from jaxcrit import engine as E
from jaxcrit import main as M
from jaxcrit.run.runner import result_files
from jaxcrit.run.stages import STAGES
from tiny_run import PROMPTS, TEXT, build_model, config_file, files, paragraphs, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory):
    return paragraphs(tmp_path_factory.mktemp("texts") / "paragraphs.txt")


def full_config(model_dir, texts_file, **over):
    """Every stage has several units of partial work: 3 Stage 2 blocks (full curve), 5 baseline
    repeats, 2 scan blocks (128 rows of 64), 2 greedy steps, 3 evaluation blocks."""
    return tiny_config(model_dir, stage2__full_curve=True, scan__layers=(0, 1), evaluate__file=str(texts_file),
                       evaluate__batch=2, **over)


# The stages every run has (Stage 1, Stage 2, the critical set, the evaluation, the report); the
# optional ones off, for the tests about the run around the stages rather than about a stage.
CORE = dict(baselines__names=(), scan__sites=(), map__enabled=False, generate__enabled=False)


@pytest.fixture(scope="module")
def reference(model_dir, texts_file, tmp_path_factory):
    wd = tmp_path_factory.mktemp("reference")
    M.run(full_config(model_dir, texts_file), wd)
    return wd


# ----------------------------------------------------------------------------- a full run

def test_run_writes_every_result_file(model_dir, texts_file, reference):
    wd, c = reference, full_config(model_dir, texts_file)
    for name in result_files(STAGES):   # the study's stages (test_study.py) are off by default
        on = name in result_files(STAGES, c)
        assert (wd / name).is_file() == on and (not on or (wd / name).stat().st_size > 0), name
    assert "modes.json" not in result_files(STAGES, c)

    imp = json.loads((wd / "importance.json").read_text())
    assert imp["ranking"] == "channel" and imp["samples"] == 4 and imp["tokens"] == 40
    assert 0 < len(imp["neurons"]) <= 50
    for r in imp["neurons"]:
        assert {"layer_name", "seq_idx", "hidden_idx", "activation_diff"} <= r.keys()
        assert r["layer_name"].startswith("model.layers.") and r["seq_idx"] == r["position"] == -1
        assert (r["hidden_idx"], r["activation_diff"]) == (r["channel"], r["score"])
    diffs = [r["activation_diff"] for r in imp["neurons"]]
    assert diffs == sorted(diffs, reverse=True) and diffs[-1] > 1e-6

    crit = json.loads((wd / "critical.json").read_text())
    curve = (wd / "curve.csv").read_text().splitlines()
    assert curve[0] == "n,delta" and len(curve) > 1
    n_last = crit["n"] if crit["n"] is not None else int(curve[-1].split(",")[0])
    assert len(crit["neurons"]) == n_last
    assert [x["layer_name"] for x in crit["neurons"]] == [r["layer_name"] for r in imp["neurons"][:n_last]]

    scan = (wd / "scan.csv").read_text().splitlines()
    assert scan[0] == "site,layer,channel,delta" and len(scan) == 1 + 2 * 64   # the down_proj of layers 0 and 1
    base_ = json.loads((wd / "baselines.json").read_text())
    assert set(base_) == {"random", "activation", "gradient", "massive"} and len(base_["random"]) == 2
    assert [r["n"] for r in base_["activation"][0]] == [1, 2, 5]
    greedy = json.loads((wd / "greedy.json").read_text())
    assert 1 <= len(greedy) <= 2
    ev = json.loads((wd / "evaluation.json").read_text())
    assert ev["overall"]["tokens"] == 5 * 29                                # the 5 rows of 30 words of texts_file

    import pandas as pd
    mp, meta = pd.read_csv(wd / "map.csv"), json.loads((wd / "map.json").read_text())
    assert list(mp.columns) == ["site", "layer", "channel", "first_order", "magnitude", "importance", "delta",
                                "verified"]
    assert len(mp) == 2 * (64 + 32 + 32 + 64 + 3 * 120 + 64 + 64)           # every neuron of the 2 layers
    assert (mp.verified == "screen").sum() == meta["verified"] and (mp.verified == "audit").sum() == 16
    assert mp.delta.isna().sum() == len(mp) - meta["verified"] - 16 and mp.importance.notna().sum() == 50
    assert [t["delta"] for t in meta["top"]] == sorted(mp.delta.dropna(), reverse=True)[:3]

    gen = json.loads((wd / "generations.json").read_text())
    assert [g["prompt"] for g in gen["prompts"]] == list(PROMPTS) and gen["sampling"]["temperature"] == 0
    for g in gen["prompts"]:
        assert len(g["base_tokens"]) == len(g["masked_tokens"]) == 6 and isinstance(g["masked"], str)

    summary = (wd / "summary.md").read_text()
    assert "## Generations" in summary and "log p clean / masked" in summary
    assert "base perplexity" in summary and "Masked perplexity" in summary
    assert "## Whole-model map" in summary and "Δ (exact)" in summary
    assert f"10^{crit['base_loss'] / E.LN10:.2f}" in summary and f"10^{crit['loss'] / E.LN10:.2f}" in summary
    for png in ("curve.png", "heatmap.png", "scan.png", "map.png"):
        assert (wd / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((wd / "manifest.json").read_text())["config"]["stage1"]["samples"] == 4


def test_scan_top_takes_stage1s_best_channels(model_dir, reference, texts_file, tmp_path):
    """scan.top = 5: the 5 channels of each scanned layer that Stage 1 ranks highest, with the
    deltas the exhaustive scan measured for them; the core stages' files are the reference's
    (the optional stages change none of them)."""
    wd = tmp_path / "run"
    scan_only = dict(CORE, scan__sites=("down_proj",), scan__greedy_steps=0)
    M.run(full_config(model_dir, texts_file, scan__top=5, **scan_only), wd)
    core = ("importance.json", "curve.csv", "critical.json", "evaluation.json")
    assert files(wd, core) == files(reference, core) and len(files(wd, core)) == 4
    ranking = json.loads((reference / "importance.json").read_text())["neurons"]
    full = {tuple(r.split(",")[:3]): float(r.split(",")[3]) for r in (reference / "scan.csv").read_text().split()[1:]}
    got = [r.split(",") for r in (wd / "scan.csv").read_text().split()[1:]]
    for layer in (1, 0):
        best = list(dict.fromkeys(r["channel"] for r in ranking if r["site"] == "down_proj" and r["layer"] == layer))
        mine = [int(r[2]) for r in got if int(r[1]) == layer]
        assert mine == best[:5]
    for s, l, ch, d in got:
        assert abs(float(d) - full[(s, l, ch)]) < 1e-6


# ----------------------------------------------------------------------------- resume

def test_engine_built_ahead_and_overwrite_give_a_fresh_runs_files(model_dir, texts_file, reference, tmp_path,
                                                                  monkeypatch):
    """A config with only the core stages and another seed, run fresh with engine.ahead=always: the
    engine and Stage 2's program are built in a thread while Stage 1 runs (on CPU auto never does),
    and Stage 2's blocks run the program compiled ahead (one compile of its shape, in the thread).
    The same config (engine.ahead auto) run with overwrite=True over a workdir holding every stage's
    files leaves exactly what the fresh run left, byte for byte: none of the optional stages' files
    stays behind, and building ahead changed no result."""
    import threading
    compiled = []
    compile_ = E.Engine.compile
    monkeypatch.setattr(E.Engine, "compile", lambda self, k, sites=(): (
        compiled.append((threading.current_thread().name, k)), compile_(self, k, sites))[1])
    fresh = tmp_path / "fresh"
    M.run(full_config(model_dir, texts_file, seed=7, engine__ahead="always", **CORE), fresh)
    assert [name.startswith("jaxcrit-engine") for name, _ in compiled] == [True]
    assert sorted(files(fresh)) == ["critical.json", "curve.csv", "evaluation.json", "importance.json"]
    monkeypatch.setattr(E.Engine, "compile", compile_)

    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    other = full_config(model_dir, texts_file, seed=7, overwrite=True, **CORE)
    M.run(other, wd)
    stale = set(result_files(STAGES, full_config(model_dir, texts_file))) - set(result_files(STAGES, other))
    assert {"greedy.json", "scan.csv", "map.csv", "baselines.json", "generations.json"} <= stale
    assert not any((wd / name).exists() for name in stale)
    assert files(wd) == files(fresh) and files(wd)["importance.json"] != files(reference)["importance.json"]
    assert sorted(p.name for p in wd.iterdir()) == sorted(p.name for p in fresh.iterdir())


def test_workdir_of_another_config_is_refused_unless_overwrite(model_dir, texts_file, reference, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    before = files(wd)
    with pytest.raises(Exception, match="holds results of a different config.*overwrite=True"):
        M.run(full_config(model_dir, texts_file, seed=7), wd)
    assert files(wd) == before
    # progress and overwrite are not part of a run's identity: the same config resumes, computing nothing
    result = M.run(full_config(model_dir, texts_file, progress=True, overwrite=True), wd)
    assert files(wd) == before
    assert abs(result["base_loss"] - json.loads((wd / "critical.json").read_text())["base_loss"]) < 1e-12


# ----------------------------------------------------------------------------- the runner alone

def test_the_runner_runs_the_table_it_is_given(tmp_path):
    """A Run handed a table of its own (no model read: each stage's value is a string) computes
    the enabled stages in table order, each once, saving their files; a second Run on the same
    workdir loads them instead; result_files lists the table's files."""
    from types import SimpleNamespace

    from jaxcrit.configs.common import base
    from jaxcrit.dist.sharding import make_mesh
    from jaxcrit.run.runner import Run, Stage, run_all
    computed = []

    def stage(name: str, needs: tuple[str, ...] = (), enabled=lambda c: True) -> Stage:
        def compute(run):
            computed.append(name)
            return "+".join([name, *(str(run[n]) for n in needs)])
        return Stage(name, (f"{name}.txt",), compute, lambda run, v: (run.workdir / f"{name}.txt").write_text(v),
                     lambda run: (run.workdir / f"{name}.txt").read_text(), enabled)

    table = {st.name: st for st in (stage("first"), stage("off", enabled=lambda c: False),
                                    stage("second", needs=("first",)), stage("report", needs=("second", "off")))}
    model = SimpleNamespace(mesh=make_mesh(), params={})
    c = base("unused")
    got = run_all(Run(c, tmp_path, stages=table, model=model))
    assert computed == ["first", "second", "report"]
    assert got == "report+second+first+None" and (tmp_path / "second.txt").read_text() == "second+first"
    again = Run(c, tmp_path, stages=table, model=model)
    assert again["second"] == "second+first" and computed == ["first", "second", "report"]
    assert result_files(table, c) == ("first.txt", "second.txt", "report.txt", "config.json", "manifest.json")


# ----------------------------------------------------------------------------- as a user runs it

def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "jaxcrit.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_from_an_empty_directory_with_an_absolute_config(model_dir, texts_file, tmp_path):
    """The config file named by absolute path, run from an empty directory: every result file of
    its config (the core stages; every stage's files: test_run_writes_every_result_file). Its
    sizes are full_config's, so the programs the in-process runs compiled come from the session's
    compilation cache."""
    sizes = dict(stage1__batch=2, stage1__top_n=50, stage2__max_steps=20, stage2__full_curve=True, engine__chunk=8,
                 evaluate__file=str(texts_file), evaluate__batch=2)
    cfg = config_file(tmp_path / "cfg.py", model_dir, **sizes, **CORE)
    empty = tmp_path / "empty"
    empty.mkdir()
    p = _cli(f"--config={cfg}", "--workdir=out", cwd=empty)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert all((empty / "out" / f).is_file() for f in result_files(STAGES, M.parse(["jaxcrit", f"--config={cfg}"])[0]))
    assert "critical n" in p.stdout


def test_packaged_config_names_resolve_from_anywhere(tmp_path, monkeypatch):
    """--config=smollm2 and --config=qwen:/ckpt name the configs shipped inside the package."""
    monkeypatch.chdir(tmp_path)
    c, wd, _ = M.parse(["jaxcrit", "--config=smollm2", "--workdir=w"])
    assert c.model == "smollm2" and c.stage1.samples == 100 and wd == Path("w")
    c, *_ = M.parse(["jaxcrit", "--config=qwen:/some/ckpt", "--config.stage2.epsilon=3"])
    assert (c.model, c.dtype, c.stage1.batch, c.stage2.epsilon) == ("/some/ckpt", "auto", 20, 3.0)
    c, *_ = M.parse(["jaxcrit", f"--config={REPO / 'configs' / 'hf.py'}:/x"])
    assert (c.model, c.engine.chunk) == ("/x", 0)


def test_out_of_device_memory_is_one_error_line(model_dir, tmp_path, monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED reaches the user as one line saying what to lower, exit code 3."""
    cfg = config_file(tmp_path / "cfg.py", model_dir)

    def oom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.2GiB.")
    monkeypatch.setattr(M, "run", oom)
    assert M.main(["jaxcrit", f"--config={cfg}", f"--workdir={tmp_path / 'run'}"]) == 3
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err == ["jaxcrit: error: out of device memory; lower --config.engine.chunk or --config.stage1.batch "
                   "(--config.dry_run=True prints the memory plan)"]


def test_print_config_prints_the_settled_config_and_does_nothing_else(tmp_path, capsys, monkeypatch):
    """--print_config: the packaged config with the overrides applied, validated, dtype and cache settled;
    exit 0, no workdir, no model read (the embedded model is never loaded: load is refused here)."""
    from jaxcrit.convert import load as L
    from jaxcrit.run import fields
    monkeypatch.setattr(L, "load", lambda *a, **k: pytest.fail("--print_config loaded the model"))
    wd = tmp_path / "w"
    code = M.main(["jaxcrit", "--config=smollm2", "--config.stage1.alpha=2", "--print_config", f"--workdir={wd}"])
    out = capsys.readouterr().out
    assert code == 0 and not wd.exists()
    lines = [line for line in out.splitlines() if line]
    assert [line.split(" = ")[0] for line in lines] == list(fields.FIELDS)
    assert "stage1.alpha = 2.0" in lines and "stage1.batch = 25" in lines and "dtype = 'float32'" in lines
    assert f"compile_cache = {os.environ['JAX_COMPILATION_CACHE_DIR']!r}" in lines
    code = M.main(["jaxcrit", "--config=smollm2", "--config.stage1.alpha=-2", "--print_config"])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == "jaxcrit: error: stage1.alpha must be > 0 (got -2.0)"
