"""Bad input through the CLI: one `jaxcrit: error:` line, exit code 2, no traceback, and no
result file written, each refused before any weight is read.

Most cases call `jaxcrit.main.main(argv)` in-process (the same parse, validation and error
handling as `python -m jaxcrit.main`, a fraction of a second each); a few run the real command
in a subprocess to check what a user sees.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcrit import main as M
from jaxcrit.run.runner import result_files
from jaxcrit.run.stages import STAGES
from tiny_run import build_model, config_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def cfg(model_dir, tmp_path_factory):
    return config_file(tmp_path_factory.mktemp("cfg") / "tiny.py", model_dir)


def _bad_checkpoint(model_dir: Path, tmp: Path, how: str) -> Path:
    bad = tmp / f"ckpt_{how}"
    shutil.copytree(model_dir, bad)
    if how == "unknown_type":
        c = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**c, "model_type": "gpt_neox"}))
    if how == "no_tokenizer":
        (bad / "tokenizer.json").unlink()
    if how == "bad_json":
        (bad / "config.json").write_text("{not json")
    return bad


# (case id, flags after --config=<tiny config>, what the error line must contain)
FIELD_CASES = [
    ("unknown_section", ["--config.stag1.alpha=1"], "unknown config field 'stag1.alpha' (did you mean 'stage1.alpha'?)"),
    ("misspelt_key", ["--config.stage1.sample=5"], "unknown config field 'stage1.sample' (did you mean 'stage1.samples'?)"),
    ("int_not_a_number", ["--config.stage1.samples=abc"], "--config.stage1.samples=abc"),
    ("int_given_a_float", ["--config.stage1.samples=1.5"], "--config.stage1.samples=1.5"),
    ("float_not_a_number", ["--config.stage2.epsilon=foo"], "--config.stage2.epsilon=foo"),
    ("unknown_flag", ["--nosuchflag=1"], "Unknown command line flag 'nosuchflag'"),
    ("epsilon_zero", ["--config.stage2.epsilon=0"], "stage2.epsilon must be > 0 (got 0.0)"),
    ("epsilon_negative", ["--config.stage2.epsilon=-1"], "stage2.epsilon must be > 0 (got -1.0)"),
    ("samples_zero", ["--config.stage1.samples=0"], "stage1.samples must be an integer >= 1"),
    ("batch_zero", ["--config.stage1.batch=0"], "stage1.batch must be an integer >= 1"),
    ("alpha_zero", ["--config.stage1.alpha=0"], "stage1.alpha must be > 0"),
    ("alpha_negative", ["--config.stage1.alpha=-5"], "stage1.alpha must be > 0"),
    ("top_n_zero", ["--config.stage1.top_n=0"], "stage1.top_n must be an integer >= 1"),
    ("ranking_unknown", ["--config.stage1.ranking=bogus"], "stage1.ranking must be channel or position"),
    ("max_steps_zero", ["--config.stage2.max_steps=0"], "stage2.max_steps must be an integer >= 1"),
    ("dtype_unknown", ["--config.dtype=float64"], "dtype must be auto, float32, bfloat16 or float16"),
    ("max_tokens_small", ["--config.max_tokens=5"], "max_tokens must be an integer >= 10"),
    ("seed_negative", ["--config.seed=-1"], "seed must be an integer >= 0"),
    ("chunk_negative", ["--config.engine.chunk=-1"], "engine.chunk must be an integer >= 0"),
    ("vocab_chunk_zero", ["--config.engine.vocab_chunk=0"], "engine.vocab_chunk must be an integer >= 1"),
    ("attention_unknown", ["--config.engine.attention=flash"], "engine.attention must be auto, xla or cudnn"),
    ("loss_pallas_on_cpu", ["--config.engine.loss=pallas"], "engine.loss pallas needs GPUs"),
    ("mlp_pallas_on_cpu", ["--config.engine.mlp=pallas"], "engine.mlp pallas needs one Hopper GPU"),
    ("mlp_unknown", ["--config.engine.mlp=triton"], "engine.mlp must be auto, xla or pallas"),
    ("attention_cudnn_on_cpu", ["--config.engine.attention=cudnn"], "engine.attention cudnn needs GPUs"),
    ("baseline_unknown", ["--config.baselines.names=('random','bogus')"], "baselines.names must be distinct names"),
    ("baseline_twice", ["--config.baselines.names=('random','random')"], "baselines.names must be distinct names"),
    ("repeats_zero", ["--config.baselines.random_repeats=0"], "baselines.random_repeats must be an integer >= 1"),
    ("baseline_ns_empty", ["--config.baselines.ns=()"], "baselines.ns must be a non-empty tuple"),
    ("baseline_ns_zero", ["--config.baselines.ns=(0,3)"], "baselines.ns must be a non-empty tuple of integers >= 1"),
    ("map_screen_unknown", ["--config.map.screens=('first_order','grad')"], "map.screens must be a non-empty tuple of distinct screens"),
    ("map_screens_empty", ["--config.map.screens=()"], "map.screens must be a non-empty tuple"),
    ("map_block_negative", ["--config.map.block=-1"], "map.block must be an integer >= 0"),
    ("map_audit_negative", ["--config.map.audit=-1"], "map.audit must be an integer >= 0"),
    ("scan_site_unknown", ["--config.scan.sites=('down',)"], "scan.sites must be distinct sites"),
    ("scan_layer_out_of_range", ["--config.scan.layers=(99,)"], "scan.layers: layer 99 out of range; the model has layers 0..1"),
    ("scan_layer_negative", ["--config.scan.layers=(-1,)"], "scan.layers must be a tuple of layer indices >= 0"),
    ("scan_channel_out_of_range", ["--config.scan.channels=(100000,)"], "scan.channels: channel 100000 out of range for down_proj"),
    ("greedy_pool_zero", ["--config.scan.greedy_pool=0"], "scan.greedy_pool must be an integer >= 1"),
    ("scan_top_negative", ["--config.scan.top=-2"], "scan.top must be an integer >= 0"),
    ("evaluate_file_missing", ["--config.evaluate.file=/nonexistent/texts.txt"], "/nonexistent/texts.txt: no such text file"),
    ("evaluate_limit_negative", ["--config.evaluate.limit=-1"], "evaluate.limit must be an integer >= 0"),
    ("evaluate_batch_zero", ["--config.evaluate.batch=0"], "evaluate.batch must be an integer >= 1"),
    ("generate_top_p_zero", ["--config.generate.top_p=0"], "generate.top_p must be in (0, 1]"),
    ("generate_temperature_negative", ["--config.generate.temperature=-1"], "generate.temperature must be >= 0"),
    ("generate_prompt_empty", ["--config.generate.prompts=('w1', '')"], "generate.prompts must be a non-empty tuple"),
    ("generate_prompt_no_tokens", ["--config.generate.prompts=(' ',)"], "generate.prompts: ' ' has no tokens"),
    ("text_too_short", ["--config.text=w1 w2 w3"], "the text has 3 tokens; at least 10 are needed"),
    ("text_empty", ["--config.text="], "the text has 0 tokens; at least 10 are needed"),
    ("mesh_too_many_devices", ["--config.mesh.shape=(3,1)"], "mesh 3x1 needs 3 devices, found 1"),
    ("mesh_zero", ["--config.mesh.shape=(0,1)"], "mesh.shape must be (data, model)"),
    ("coordinator_without_port", ["--config.mesh.coordinator=localhost"], "mesh.coordinator must be '' or HOST:PORT"),
    ("params_layout_unknown", ["--config.mesh.params=zero3"], "mesh.params must be replicated or fsdp"),
    ("peer_timeout_zero", ["--config.mesh.peer_timeout=0"], "mesh.peer_timeout must be an integer >= 1"),
    ("plan_unknown", ["--config.plan=sometimes"], "plan must be auto, always or never"),
    ("process_id_too_large", ["--config.mesh.coordinator=localhost:1234", "--config.mesh.num_processes=2",
                              "--config.mesh.process_id=2"], "mesh.process_id must be below mesh.num_processes (2)"),
    ("model_missing", ["--config.model=/nonexistent/ckpt"], "model '/nonexistent/ckpt': no such file or directory"),
    ("progress_not_bool", ["--config.progress=maybe"], "--config.progress=maybe"),
    ("study_text_unknown", ["--config.study.texts=('klingon',)"], "study.texts must be distinct names among en_science"),
    ("evaluate_set_unknown", ["--config.evaluate.sets=('best',)"], "evaluate.sets must be distinct names among greedy"),
    ("evaluate_learned_off", ["--config.evaluate.sets=('learned',)"], "evaluate.sets names learned but the learned mask is off"),
    ("learned_init_one", ["--config.learned.init=1.0"], "learned.init must be in (0, 1)"),
    ("corpus_dir_without_file", ["--config.evaluate.file=/"], "a corpus directory must hold exactly one"),
    ("tasks_without_corpus", ["--config.tasks.enabled=True"], "tasks.enabled builds its tasks from a corpus: set evaluate.file"),
    ("tasks_limit_zero", ["--config.tasks.limit=0"], "tasks.limit must be an integer >= 1"),
]


def _main(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = M.main(["jaxcrit", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [l for l in err.splitlines() if l.strip()]


def _assert_refused(code: int, lines: list[str], expected: str, workdir: Path) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("jaxcrit: error: "), lines
    assert expected in lines[0], lines[0]
    assert not any((workdir / f).exists() for f in result_files(STAGES)), sorted(os.listdir(workdir))


@pytest.mark.parametrize("flags,expected", [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_bad_field_is_one_line_before_any_work(cfg, tmp_path, capsys, flags, expected):
    wd = tmp_path / "run"
    code, lines = _main([f"--config={cfg}", f"--workdir={wd}", *flags], capsys)
    _assert_refused(code, lines, expected, wd)
    assert not wd.exists()                      # refused before the workdir is made


def test_empty_evaluate_file(cfg, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\nshort line\n")
    code, lines = _main([f"--config={cfg}", f"--workdir={tmp_path / 'run'}", f"--config.evaluate.file={empty}"],
                        capsys)
    _assert_refused(code, lines, f"{empty}: no row longer than 50 characters", tmp_path / "run")


def test_tasks_without_lm_eval(cfg, tmp_path, capsys, monkeypatch):
    """The tasks stage on a machine without the eval extra: refused before any work."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)     # import lm_eval fails, find_spec finds nothing
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" = Title = \n a paragraph long enough to be read as one row of the corpus . \n")
    wd = tmp_path / "run"
    code, lines = _main([f"--config={cfg}", f"--workdir={wd}", "--config.tasks.enabled=True",
                         f"--config.evaluate.file={corpus}"], capsys)
    _assert_refused(code, lines, "tasks.enabled needs lm-evaluation-harness: pip install 'jaxcrit[eval]'", wd)
    assert not wd.exists()


@pytest.mark.parametrize("how,expected", [("unknown_type", "gpt_neox"), ("no_tokenizer", "tokenizer.json: missing"),
                                          ("bad_json", "not valid JSON")])
def test_bad_checkpoint(model_dir, tmp_path, capsys, how, expected):
    bad = _bad_checkpoint(model_dir, tmp_path, how)
    cfg = config_file(tmp_path / "cfg.py", bad)
    code, lines = _main([f"--config={cfg}", f"--workdir={tmp_path / 'run'}"], capsys)
    _assert_refused(code, lines, expected, tmp_path / "run")


def test_workdir_below_a_file(cfg, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    code, lines = _main([f"--config={cfg}", f"--workdir={f / 'sub'}"], capsys)
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"jaxcrit: error: workdir {f / 'sub'} is not writable (Not a directory); choose another --workdir"


def test_workdir_of_another_config(cfg, tmp_path, capsys):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps({"seed": 1}))
    code, lines = _main([f"--config={cfg}", f"--workdir={wd}"], capsys)
    assert code == 2 and len(lines) == 1 and "holds results of a different config" in lines[0]
    assert sorted(p.name for p in wd.iterdir()) == ["config.json"]


def test_no_config_flag(tmp_path, capsys):
    code, lines = _main([f"--workdir={tmp_path / 'run'}"], capsys)
    assert code == 2 and lines == ["jaxcrit: error: give --config=configs/smollm2.py (or a packaged name: smollm2, hf, qwen, study)"]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxcrit.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("args,expected", [
    (["--config=/nonexistent/cfg.py"], "config file '/nonexistent/cfg.py' not found"),
    (["--config=configs/qwen.py"], "the qwen config needs a checkpoint: --config=configs/qwen.py:/path/to/checkpoint"),
    (["--config=hf:/nonexistent/ckpt"], "model '/nonexistent/ckpt': no such file or directory"),
    (["--config=smollm2", "--config.stage3.x=1"], "unknown config field 'stage3.x'; `python -m jaxcrit.main --help`"),
], ids=["missing_config_file", "family_config_without_checkpoint", "missing_checkpoint", "unknown_key"])
def test_bad_config_name(tmp_path, capsys, monkeypatch, args, expected):
    """From an empty directory: the repo's configs/ resolve from REPO only when named by path, so
    the relative path is given from the repo root."""
    monkeypatch.chdir(REPO if any(a.startswith("--config=configs/") for a in args) else tmp_path)
    code, lines = _main([*args, f"--workdir={tmp_path / 'run'}"], capsys)
    _assert_refused(code, lines, expected, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_as_a_user_sees_it(tmp_path):
    """The real command from an empty directory: exit code 2, one line on stderr, no traceback,
    no workdir (every refusal's line: in-process above)."""
    p = _cli("--config=hf:/nonexistent/ckpt", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(lines) == 1 and lines[0].startswith("jaxcrit: error: model '/nonexistent/ckpt': no such file"), p.stderr
    assert not (tmp_path / "run").exists()


def test_help_is_usage_not_an_error(capsys):
    assert M.main(["jaxcrit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "python -m jaxcrit.main --config=smollm2" in out
    from jaxcrit.run.fields import FIELDS
    assert all(f"\n  {name} = " in out or f" {name} = " in out for name in FIELDS), "--help names every field"
