"""Models and corpora named by their Hugging Face Hub id, fetched through huggingface_hub's own
download path from a loopback stand-in for the Hub (fake_hub.py).

In this process the Hub's address, the hub cache and offline mode are set on
huggingface_hub.constants (read at each call); the subprocesses get them as a user sets them,
HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE.
"""
from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from huggingface_hub import constants

import jaxcrit
from jaxcrit import main as M
from jaxcrit.data import hub as H
from jaxcrit.data.texts import read_paragraphs
from jaxcrit.errors import JaxcritError
from jaxcrit.run.runner import result_files
from jaxcrit.run.stages import STAGES
from fake_hub import Hub, Repo
from hf_models import one_thread
from tiny_run import TEXT, build_model, files, paragraphs, tiny_config

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "wikitext" / "wiki.test.raw"
FETCHED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}   # what jaxcrit reads
# the core stages at the sizes of test_cli.py's runs (a full curve, tiny_run.paragraphs evaluated in
# blocks of 2): programs one of them compiled come from the session's compilation cache
CORE = dict(baselines__names=(), scan__sites=(), map__enabled=False, generate__enabled=False, stage2__full_curve=True,
            evaluate__batch=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The checkpoint, in a directory of the hub id's name: a run titles its plots with it."""
    d = tmp_path_factory.mktemp("ckpt") / "org" / "tiny"
    d.mkdir(parents=True)
    return build_model(d)


@pytest.fixture(scope="module")
def repos(model_dir):
    ckpt = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert set(ckpt) == FETCHED
    unread = {"pytorch_model.bin": b"\x80\x04 a pickle", "README.md": b"# tiny", "tokenizer_config.json": b"{}"}
    return {("model", "org/tiny"): Repo({**ckpt, **unread}),
            ("model", "org/gated"): Repo(ckpt, gated=True),
            ("model", "org/pickled"): Repo({"config.json": ckpt["config.json"], "tokenizer.json": ckpt["tokenizer.json"],
                                            "pytorch_model.bin": b"\x80\x04 a pickle"}),
            ("dataset", "org/wiki"): Repo({"raw/wiki.test.raw": CORPUS.read_bytes(), "README.md": b"# wiki"})}


@pytest.fixture(scope="module")
def hub(repos):
    with Hub(repos) as h:
        yield h


def _point(monkeypatch, url: str, cache: Path, offline: bool = False) -> None:
    """This process's huggingface_hub at the Hub `url`, with the hub cache `cache`."""
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    H.snapshot.cache_clear()
    H.dataset_file.cache_clear()


@pytest.fixture
def cache(hub, tmp_path, monkeypatch):
    """An empty hub cache of this test's own, this process pointed at the loopback Hub."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _point(monkeypatch, hub.url, tmp_path / "hub")
    yield tmp_path / "hub"
    H.snapshot.cache_clear()
    H.dataset_file.cache_clear()


def _logits(m: jaxcrit.Model) -> np.ndarray:
    return np.asarray(m.decoder()(m.tokens(TEXT)[None]))[0]


def _dead_url() -> str:
    """The address of a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_hub_id_fetches_what_jaxcrit_reads_and_loads_the_model(model_dir, hub, cache):
    """jaxcrit.load("ORG/NAME"): only the files jaxcrit reads come down (not the pickle, README or
    tokenizer_config), into the hub cache; the logits equal the same checkpoint's loaded from its
    directory, and transformers'."""
    before = len(hub.requests)
    m = jaxcrit.load("org/tiny", "float32")
    fetched = {p.rsplit("/", 1)[1] for method, p in hub.requests[before:] if method == "GET" and "/resolve/" in p}
    assert fetched == FETCHED
    (snap,) = (cache / "models--org--tiny" / "snapshots").iterdir()
    assert {p.name for p in snap.iterdir()} == FETCHED
    got, local = _logits(m), _logits(jaxcrit.load(str(model_dir), "float32"))
    np.testing.assert_array_equal(got, local)
    with one_thread(), torch.no_grad():
        ref = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()(torch.tensor(m.tokens(TEXT)[None])).logits[0]
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-4, rtol=1e-4)
    sha = snap.name
    assert H.snapshot(H.model_name(f"hf:org/tiny@{sha}")) == snap == H.snapshot(H.model_name("org/tiny@main"))


def test_an_existing_local_path_wins_over_a_hub_id(model_dir, hub, cache, monkeypatch):
    """From the directory holding org/tiny, 'org/tiny' and 'hf:org/tiny' name it: no request."""
    from jaxcrit.convert.checkpoints import resolve
    monkeypatch.chdir(model_dir.parents[1])
    before = len(hub.requests)
    assert resolve("org/tiny")[1] == resolve("hf:org/tiny")[1] == Path("org/tiny")
    assert hub.requests[before:] == []


def test_offline_loads_from_the_cache_with_the_hub_stopped(repos, tmp_path, monkeypatch):
    """A fetch from a Hub that then stops; HF_HUB_OFFLINE=1 serves the same model from the cache."""
    with Hub(repos) as h:
        _point(monkeypatch, h.url, tmp_path / "hub")
        online = _logits(jaxcrit.load("org/tiny"))
    _point(monkeypatch, h.url, tmp_path / "hub", offline=True)
    np.testing.assert_array_equal(_logits(jaxcrit.load("hf:org/tiny")), online)
    _point(monkeypatch, h.url, tmp_path / "empty", offline=True)
    with pytest.raises(JaxcritError, match="org/tiny: not in the hub cache .*HF_HUB_OFFLINE=1"):
        jaxcrit.load("org/tiny")


def test_corpus_from_a_dataset_repository(hub, cache):
    assert read_paragraphs("hf-dataset:org/wiki/raw/wiki.test.raw") == read_paragraphs(CORPUS.parent)
    assert read_paragraphs("hf-dataset:org/wiki/raw/wiki.test.raw@main", limit=2) == read_paragraphs(CORPUS, limit=2)
    assert (cache / "datasets--org--wiki").is_dir()
    with pytest.raises(JaxcritError, match="hf-dataset:org/wiki/raw/none.raw: the repository has no such file"):
        read_paragraphs("hf-dataset:org/wiki/raw/none.raw")
    with pytest.raises(JaxcritError, match="a corpus on the Hub is hf-dataset:ORG/NAME/path/in/repo"):
        read_paragraphs("hf-dataset:org/wiki")


def _untimed(summary: bytes) -> list[bytes]:
    """summary.md without its table of stage times (`| load | 0.47 s |`, `| **total** | 1 min 4 s |`:
    every form of report.summary.fmt_seconds)."""
    time = rb"([\d.]+ s|\d+ min \d+ s|\d+ h \d+ min)"
    return [row for row in summary.splitlines() if not re.fullmatch(rb"\| [*\w]+ \| " + time + rb" \|", row)]


def test_cli_run_from_a_hub_id_equals_the_run_from_its_directory(model_dir, cache, tmp_path):
    """The same result files, byte for byte, but for the model's name where a file records it
    (config.json, the manifest's config, summary.md's title) and the times (manifest.json,
    summary.md)."""
    core = dict(CORE, evaluate__file=str(paragraphs(tmp_path / "paragraphs.txt")))
    M.run(tiny_config(str(model_dir), **core), tmp_path / "from_dir")
    M.run(tiny_config("org/tiny", **core), tmp_path / "from_hub")
    names = result_files(STAGES, tiny_config("org/tiny", **core))
    local, remote = files(tmp_path / "from_dir", names), files(tmp_path / "from_hub", names)
    assert set(local) == set(remote) == set(names)
    local = {n: data.replace(str(model_dir).encode(), b"org/tiny") for n, data in local.items()}
    named = {"config.json", "manifest.json", "summary.md"}
    assert {n: local[n] for n in names if n not in named} == {n: remote[n] for n in names if n not in named}
    assert local["config.json"] == remote["config.json"]
    assert json.loads(local["manifest.json"])["config"] == json.loads(remote["manifest.json"])["config"]
    assert _untimed(local["summary.md"]) == _untimed(remote["summary.md"])
    assert len(_untimed(remote["summary.md"])) < len(remote["summary.md"].splitlines())


def _cli(args: list[str], home: Path, **env: str) -> subprocess.Popen:
    """`python -m jaxcrit.main` with the hub cache under home and no token."""
    base = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return subprocess.Popen([sys.executable, "-m", "jaxcrit.main", *args], cwd=home.parent, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**base, "JAX_PLATFORMS": "cpu", "HF_HOME": str(home), "PYTHONPATH": str(REPO), **env})


# case -> (arguments, what the error line says); {model_dir}: the checkpoint's directory
FAILURES = {
    "missing_repo": (["--config=hf:org/none"], "org/none: no such local path, and no such repository on the Hub"),
    "gated_without_token": (["--config=hf:org/gated"], "org/gated: a gated repository; accept its terms"),
    "no_network_nothing_cached": (["--config=hf:org/tiny"], "org/tiny: not in the hub cache"),
    "pickled_weights_only": (["--config=hf:org/pickled"], "org/pickled: the repository has no .safetensors weights, "
                             "and jaxcrit reads no pickled .bin/.pt weights; convert it once with transformers: "
                             "AutoModelForCausalLM.from_pretrained('org/pickled')"
                             ".save_pretrained(DIR, safe_serialization=True)"),
    "missing_revision": (["--config=hf:org/tiny@v9"], "org/tiny@v9: org/tiny has no revision 'v9'"),
    "missing_corpus_file": (["--config=hf:{model_dir}", "--config.evaluate.file=hf-dataset:org/wiki/none.raw"],
                            "hf-dataset:org/wiki/none.raw: the repository has no such file"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_each_hub_failure_is_one_line_before_any_work(case, model_dir, cache, tmp_path, monkeypatch, capsys):
    """Through the CLI's main, with no token: one `jaxcrit: error:` line, exit code 2, no traceback,
    no workdir. (HF_HUB_OFFLINE=1 with nothing cached: test_offline_loads_from_the_cache...)"""
    args, said = FAILURES[case]
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    if case == "no_network_nothing_cached":
        _point(monkeypatch, _dead_url(), cache)
    wd = tmp_path / "run"
    code = M.main(["jaxcrit", *(a.format(model_dir=model_dir) for a in args), f"--workdir={wd}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("jaxcrit: error: ") and said in lines[0], lines
    assert not wd.exists()


def test_a_hub_failure_as_a_user_sees_it(hub, tmp_path):
    """The real command, given the Hub and its cache as a user gives them (HF_ENDPOINT, HF_HOME) and
    no token: a gated repository is one line, exit code 2, no traceback, no workdir."""
    p = _cli(["--config=hf:org/gated", f"--workdir={tmp_path / 'run'}"], tmp_path / "hf", HF_ENDPOINT=hub.url)
    out, err = p.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("jaxcrit: error: ") and FAILURES["gated_without_token"][1] in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_processes_of_one_host_fetch_once(repos, tmp_path):
    """Two processes sharing a hub cache fetch at once from a slow Hub: every file is asked for
    (HEAD) and sent (GET) once, and both get the same snapshot."""
    with Hub(repos, delay=2.0) as h:
        code = "from jaxcrit.data import hub as H; print(H.snapshot(H.model_name('org/tiny')))"
        env = {**os.environ, "HF_ENDPOINT": h.url, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO),
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        ps = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
        paths = {p.communicate(timeout=120)[0].strip() for p in ps}
    assert all(p.returncode == 0 for p in ps) and len(paths) == 1
    asked = collections.Counter((m, p.rsplit("/", 1)[1]) for m, p in h.requests if "/resolve/" in p)
    assert asked == collections.Counter({(m, f): 1 for m in ("HEAD", "GET") for f in FETCHED})
