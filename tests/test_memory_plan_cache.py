"""The engine's memory plan is kept beside the compiled programs: a later process with the same
cache plans the same chunk without compiling its two sizes, and an unreadable file is recomputed,
never read as bytes."""
from __future__ import annotations

import json

import pytest

from jaxcrit.bench.model import SHAPES, random_params, random_text
from jaxcrit.dist import compile_cache
from jaxcrit.engine.scoring import CHUNK_BYTES, Engine


@pytest.fixture
def cache(tmp_path):
    compile_cache.use(str(tmp_path))
    yield tmp_path
    compile_cache.use(compile_cache.AUTO)
    CHUNK_BYTES.clear()


def test_a_later_process_plans_the_chunk_without_compiling(cache, monkeypatch):
    cfg = SHAPES["tiny"]
    params = random_params(cfg)
    compiled = []
    real = Engine.compiled
    monkeypatch.setattr(Engine, "compiled", lambda self, rows, *a, **k: compiled.append(rows) or real(self, rows, *a, **k))

    def plan(tokens: int) -> int:
        return Engine(cfg, params, random_text(cfg, tokens), chunk=0, progress=False).chunk

    chunk = plan(16)
    assert compiled == [8, 16]
    memo = json.loads((cache / "jaxcrit-chunk-bytes.json").read_text())
    assert sorted(memo.values()) == sorted(CHUNK_BYTES.values())   # XLA's own figures, as the plan read them

    CHUNK_BYTES.clear()   # what a new process holds
    assert plan(16) == chunk and compiled == [8, 16]
    plan(24)              # texts of another shape: another program
    assert compiled == [8, 16, 8, 16]

    (cache / "jaxcrit-chunk-bytes.json").write_text('{"torn')
    CHUNK_BYTES.clear()
    assert plan(16) == chunk and compiled == [8, 16, 8, 16, 8, 16]
    assert len(json.loads((cache / "jaxcrit-chunk-bytes.json").read_text())) == 2


def test_without_the_cache_every_process_compiles(cache, monkeypatch):
    compile_cache.use("")
    cfg = SHAPES["tiny"]
    compiled = []
    real = Engine.compiled
    monkeypatch.setattr(Engine, "compiled", lambda self, rows, *a, **k: compiled.append(rows) or real(self, rows, *a, **k))
    params, texts = random_params(cfg), random_text(cfg, 16)
    for _ in range(2):
        CHUNK_BYTES.clear()
        Engine(cfg, params, texts, chunk=0, progress=False)
    assert compiled == [8, 16, 8, 16] and not list(cache.glob("jaxcrit-*.json"))
