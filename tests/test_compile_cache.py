"""JAX's persistent compilation cache as jaxcrit turns it on (jaxcrit/dist/compile_cache.py).

A second process reads what the first wrote: the same jaxcrit.evaluate on the tiny llama, run
twice in fresh interpreters over one cache directory, gives the same numbers, and only the
second reads entries (jax's cache-hit events). The field "" turns it off, a directory moves
it (the CLI's --config.compile_cache), and "auto" picks the directory from the environment as
documented.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxcrit.dist import compile_cache
from tiny_run import TEXT, build_model, config_file

REPO = Path(__file__).resolve().parents[1]

# one process: jaxcrit.load's default cache ("auto", here $JAX_COMPILATION_CACHE_DIR), or the
# field given as argv[2]; prints the losses and how many programs came from the cache
EVALUATE = """
import json, sys
import jax, jaxcrit
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
m = jaxcrit.load(sys.argv[1], "float32")
fields = {} if len(sys.argv) < 3 else {"compile_cache": sys.argv[2]}
df = jaxcrit.evaluate(m, ["model.layers.1.mlp.down_proj[3]"], [TEXT], progress=False, **fields)
print("RESULT", json.dumps({"ppl": df[["base_ppl_log10", "masked_ppl_log10"]].values.tolist(), "hits": len(hits)}))
""".replace("TEXT", repr(TEXT))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_llama"))


def evaluate(model_dir: Path, env: dict, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", EVALUATE, str(model_dir), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def entries(d: Path) -> set[str]:
    return {p.name for p in d.glob("*-cache")} if d.is_dir() else set()


def test_a_second_process_reads_the_first_ones_programs_and_empty_turns_the_cache_off(model_dir, tmp_path):
    d, off = tmp_path / "cache", tmp_path / "off"
    first = evaluate(model_dir, {"JAX_COMPILATION_CACHE_DIR": str(d)})
    written = entries(d)
    assert first["hits"] == 0 and len(written) >= 3       # the forward, the loss, the masked forward at least
    second = evaluate(model_dir, {"JAX_COMPILATION_CACHE_DIR": str(d)})
    assert second["ppl"] == first["ppl"]
    assert second["hits"] >= len(written) // 2, (second, len(written))
    assert entries(d) == written                           # nothing compiled anew, so nothing written
    # compile_cache "" from the API call on: only what load compiled before it is written
    third = evaluate(model_dir, {"JAX_COMPILATION_CACHE_DIR": str(off)}, "")
    assert third["ppl"] == first["ppl"] and entries(off) < written


def test_the_cli_field_names_the_directory(model_dir, tmp_path):
    """A dry run compiles the plan's programs from shapes: they land where compile_cache says
    (the core stages only: their programs are enough to see where entries go)."""
    d = tmp_path / "cli-cache"
    cfg = config_file(tmp_path / "cfg.py", model_dir, baselines__names=(), scan__sites=(), map__enabled=False,
                      generate__enabled=False)
    r = subprocess.run([sys.executable, "-m", "jaxcrit.main", f"--config={cfg}", "--config.dry_run=True",
                        f"--config.compile_cache={d}", f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert entries(d)


def test_auto_is_the_environment_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.directory("auto") == tmp_path / "jax"
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert compile_cache.directory("auto") == tmp_path / "xdg" / "jaxcrit" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.directory("auto") == tmp_path / "home" / ".cache" / "jaxcrit" / "jax"
    assert compile_cache.directory("~/c") == tmp_path / "home" / "c"
    assert compile_cache.directory("") is None
