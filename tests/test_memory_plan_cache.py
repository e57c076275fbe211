"""The engine's memory plan is kept beside the compiled programs: a later process with the same
cache plans the same chunk without compiling its two sizes; a fact is learnt again for another key,
with the cache off, or when its file cannot be read."""
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
    params, texts = random_params(cfg), random_text(cfg, 16)
    compiled = []
    real = Engine.compiled
    monkeypatch.setattr(Engine, "compiled", lambda self, rows, *a, **k: compiled.append(rows) or real(self, rows, *a, **k))
    chunk = Engine(cfg, params, texts, chunk=0, progress=False).chunk
    assert compiled == [8, 16]
    memo = json.loads((cache / "jaxcrit-chunk-bytes.json").read_text())
    assert sorted(memo.values()) == sorted(CHUNK_BYTES.values())   # XLA's own figures, as the plan read them

    CHUNK_BYTES.clear()   # what a new process holds
    assert Engine(cfg, params, texts, chunk=0, progress=False).chunk == chunk and compiled == [8, 16]


def test_facts_are_learnt_again_for_another_key_a_torn_file_or_no_cache(cache):
    computed = []

    def fact(value: int):
        return lambda: computed.append(value) or value

    assert compile_cache.remembered("facts", "a", fact(1)) == 1
    assert compile_cache.remembered("facts", "a", fact(2)) == 1 and computed == [1]
    assert compile_cache.remembered("facts", "b", fact(3)) == 3 and computed == [1, 3]

    (cache / "jaxcrit-facts.json").write_text('{"torn')
    assert compile_cache.remembered("facts", "a", fact(4)) == 4 and computed == [1, 3, 4]
    assert len(json.loads((cache / "jaxcrit-facts.json").read_text())) == 1

    compile_cache.use("")
    assert compile_cache.remembered("facts", "a", fact(5)) == 5 and computed == [1, 3, 4, 5]
