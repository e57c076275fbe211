"""The config fields' declaration (jaxcrit/run/fields.py) against a hand-written reference: the
defaults every config starts from, what each field accepts and refuses (and the error line that
says so), the fields that change no result, and the --help text."""
from __future__ import annotations

import pytest
from ml_collections import ConfigDict

from jaxcrit.configs.common import base
from jaxcrit.data.texts import BOOKENDS
from jaxcrit.errors import JaxcritError
from jaxcrit.run import fields, validate

SITES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "act_fn", "down_proj",
         "post_attention_layernorm")

# Every field's default, with its Python type (base("smollm2") of the package before the declaration).
DEFAULTS = {
    "model": "smollm2", "dtype": "auto", "text": BOOKENDS, "max_tokens": 512, "seed": 42, "overwrite": False,
    "progress": True, "dry_run": False, "plan": "auto", "compile_cache": "auto",
    "stage1": {"alpha": 5.0, "samples": 100, "batch": 10, "top_n": 10000, "threshold": 1e-6, "ranking": "channel"},
    "stage2": {"epsilon": 1.0, "max_steps": 1000, "full_curve": False},
    "baselines": {"names": ("random", "activation", "gradient", "massive"), "random_repeats": 10,
                  "ns": (1, 3, 10, 30, 100, 300, 1000)},
    "scan": {"sites": ("down_proj",), "layers": (), "max_layers": 0, "channels": (), "top": 0, "greedy_steps": 8,
             "greedy_pool": 32},
    "map": {"enabled": True, "screens": ("first_order", "magnitude", "importance"), "top_k": 10, "block": 0,
            "max_rounds": 50, "audit": 128},
    "evaluate": {"file": "", "limit": 0, "batch": 8, "sets": ()},
    "generate": {"enabled": True, "prompts": ("The capital of France is", "Water boils at a temperature of",
                                              "Once upon a time, there was a"),
                 "max_new_tokens": 24, "temperature": 0.0, "top_k": 0, "top_p": 1.0},
    "engine": {"chunk": 64, "vocab_chunk": 16384, "prefix_sharing": True, "sites": (), "attention": "auto",
               "mlp": "auto", "norms": "auto", "loss": "auto", "ahead": "auto"},
    "study": {"other_ranking": False, "seeds": (), "alphas": (), "samples": (), "texts": (), "dtypes": (),
              "massive": 0},
    "tasks": {"enabled": False, "limit": 100, "batch": 16},
    "learned": {"candidates": 0, "steps": 200, "lr": 0.1, "sparsity": 0.01, "margin": 1.0, "init": 0.95,
                "temperature": 0.0},
    "mesh": {"shape": (-1, 1), "params": "replicated", "device_memory_gib": 0.0, "distributed": False,
             "coordinator": "", "num_processes": 1, "process_id": 0, "peer_timeout": 60},
}

# field: (a value it takes, at the edge where there is one; a value it refuses; words of the error line)
EDGES = {
    "model": ("/some/dir", "", "an embedded name, a checkpoint dir, a file or a Hub id"),
    "dtype": ("float16", "float64", "auto, float32, bfloat16 or float16"),
    "text": ("", 5, "a string"),
    "max_tokens": (10, 9, "an integer >= 10"),
    "seed": (0, -1, "an integer >= 0"),
    "overwrite": (True, 1, "True or False"),
    "progress": (False, 0, "True or False"),
    "dry_run": (True, "yes", "True or False"),
    "plan": ("never", "sometimes", "auto, always or never"),
    "compile_cache": ("", None, "a string"),
    "stage1.alpha": (1e-9, 0.0, "> 0"),
    "stage1.samples": (1, 0, "an integer >= 1"),
    "stage1.batch": (1, 2.0, "an integer >= 1"),
    "stage1.top_n": (1, 0, "an integer >= 1"),
    "stage1.threshold": (-3.0, float("nan"), "a number"),
    "stage1.ranking": ("position", "neuron", "channel or position"),
    "stage2.epsilon": (0.01, -1.0, "> 0"),
    "stage2.max_steps": (1, 0, "an integer >= 1"),
    "stage2.full_curve": (True, None, "True or False"),
    "baselines.names": ((), ("random", "random"), "distinct names among random, activation, gradient, massive"),
    "baselines.random_repeats": (1, 0, "an integer >= 1"),
    "baselines.ns": ((1,), (), "a non-empty tuple of integers >= 1"),
    "scan.sites": (SITES, ("down",), f"distinct sites among {', '.join(SITES)}"),
    "scan.layers": ((0, 5), (-1,), "a tuple of layer indices >= 0"),
    "scan.max_layers": (0, -1, "an integer >= 0"),
    "scan.channels": ((0,), (1, -2), "a tuple of channel indices >= 0"),
    "scan.top": (0, -2, "an integer >= 0"),
    "scan.greedy_steps": (0, -1, "an integer >= 0"),
    "scan.greedy_pool": (1, 0, "an integer >= 1"),
    "map.enabled": (False, "no", "True or False"),
    "map.screens": (("importance",), (), "a non-empty tuple of distinct screens among first_order, magnitude, "
                                         "importance"),
    "map.top_k": (1, 0, "an integer >= 1"),
    "map.block": (0, -1, "an integer >= 0"),
    "map.max_rounds": (0, -1, "an integer >= 0"),
    "map.audit": (0, -1, "an integer >= 0"),
    "evaluate.file": ("texts.txt", None, "a path, hf-dataset:ORG/NAME/path[@REVISION] or ''"),
    "evaluate.limit": (0, -1, "an integer >= 0"),
    "evaluate.batch": (1, 0, "an integer >= 1"),
    "evaluate.sets": (("prefix@3", "prefix@0.5"), ("prefix@",), "distinct names among greedy, learned, prefix@E"),
    "generate.enabled": (False, 1, "True or False"),
    "generate.prompts": (("a",), ("a", ""), "a non-empty tuple of non-empty strings"),
    "generate.max_new_tokens": (1, 0, "an integer >= 1"),
    "generate.temperature": (0.0, -0.5, ">= 0"),
    "generate.top_k": (0, -1, "an integer >= 0"),
    "generate.top_p": (1.0, 0.0, "in (0, 1]"),
    "engine.chunk": (0, -1, "an integer >= 0"),
    "engine.vocab_chunk": (1, 0, "an integer >= 1"),
    "engine.prefix_sharing": (False, "False", "True or False"),
    "engine.sites": (("act_fn", "down_proj"), ("act_fn", "act_fn"), "distinct sites among q_proj"),
    "engine.attention": ("cudnn", "flash", "auto, xla or cudnn"),
    "engine.mlp": ("pallas", "triton", "auto, xla or pallas"),
    "engine.norms": ("folded", "fused", "auto, plain or folded"),
    "engine.loss": ("xla", "cudnn", "auto, xla or pallas"),
    "engine.ahead": ("always", "later", "auto, always or never"),
    "study.other_ranking": (True, 1, "True or False"),
    "study.seeds": ((0, 1), (-1,), "a tuple of seeds >= 0"),
    "study.alphas": ((0.5, 2), (1.0, 0.0), "a tuple of numbers > 0"),
    "study.samples": ((1,), (0,), "a tuple of integers >= 1"),
    "study.texts": (("fr", "zh"), ("klingon",), "distinct names among en_science"),
    "study.dtypes": (("bfloat16",), ("float64",), "distinct names among float32, bfloat16, float16"),
    "study.massive": (0, -1, "an integer >= 0"),
    "tasks.enabled": (False, "on", "True or False"),
    "tasks.limit": (1, 0, "an integer >= 1"),
    "tasks.batch": (1, 0, "an integer >= 1"),
    "learned.candidates": (0, -1, "an integer >= 0"),
    "learned.steps": (1, 0, "an integer >= 1"),
    "learned.lr": (1e-4, 0.0, "> 0"),
    "learned.sparsity": (0.0, -0.1, ">= 0"),
    "learned.margin": (0.0, -1.0, ">= 0"),
    "learned.init": (0.5, 1.0, "in (0, 1)"),
    "learned.temperature": (0.0, -1.0, ">= 0"),
    "mesh.shape": ((2, -1), (-1, -1), "(data, model), positive integers, one of them may be -1"),
    "mesh.params": ("fsdp", "zero3", "replicated or fsdp"),
    "mesh.device_memory_gib": (0.0, -1.0, ">= 0"),
    "mesh.distributed": (True, 0, "True or False"),
    "mesh.coordinator": ("host:1234", "host", "'' or HOST:PORT"),
    "mesh.num_processes": (1, 0, "an integer >= 1"),
    "mesh.process_id": (0, -1, "an integer >= 0"),
    "mesh.peer_timeout": (1, 0, "an integer >= 1"),
}


def _typed(x):
    """A nested value with every leaf's type beside it: 5 and 5.0, () and [] differ."""
    if isinstance(x, dict):
        return {k: _typed(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x).__name__, [_typed(v) for v in x]
    return type(x).__name__, x


def _with(key: str, value) -> ConfigDict:
    """The default config with one field set to any value (a plain dict: no type lock)."""
    d = base("smollm2").to_dict()
    *path, last = key.split(".")
    section = d
    for k in path:
        section = section[k]
    section[last] = value
    return ConfigDict(d)


def test_defaults_are_the_reference_with_their_types():
    assert _typed(base("smollm2").to_dict()) == _typed(DEFAULTS)
    assert _typed(fields.defaults().to_dict()) == _typed(DEFAULTS)
    assert _typed(base("/ckpt").to_dict()) == _typed({**DEFAULTS, "model": "/ckpt"})


def test_every_field_has_a_reference_row():
    assert set(fields.FIELDS) == set(EDGES)


@pytest.mark.parametrize("key", sorted(EDGES))
def test_each_field_takes_its_default_and_edge_and_names_itself_when_refusing(key):
    good, bad, words = EDGES[key]
    validate.fields(base("smollm2"))
    validate.fields(_with(key, good))
    with pytest.raises(JaxcritError) as e:
        validate.fields(_with(key, bad))
    line = str(e.value)
    assert line.startswith(f"{key} must be {words}") and line.endswith(f"(got {bad!r})") and "\n" not in line, line


def test_unknown_and_missing_fields_are_refused():
    with pytest.raises(JaxcritError, match="unknown config field 'stage1.speed'; "):
        validate.fields(_with("stage1.speed", 3))
    d = base("smollm2").to_dict()
    del d["learned"]["margin"]
    with pytest.raises(JaxcritError, match="config field 'learned.margin' is missing"):
        validate.fields(ConfigDict(d))


def test_fields_that_change_no_result():
    assert set(fields.IGNORED_FOR_IDENTITY) == {"overwrite", "progress", "compile_cache", "engine.ahead"}


def test_help_lists_every_field_in_its_section_with_default_and_comment():
    text = fields.help_text()
    lines = text.splitlines()
    headings = [i for i, l in enumerate(lines) if l and not l.startswith(" ") and ":" in l][1:]   # after the title
    sections = [lines[i].split(":")[0] for i in headings]
    assert sections == ["top level", *[k for k, v in DEFAULTS.items() if isinstance(v, dict)]]
    for start, end, name in zip(headings, [*headings[1:], len(lines)], sections):
        block = "\n".join(lines[start:end])
        wanted = DEFAULTS if name == "top level" else DEFAULTS[name]
        for field, default in wanted.items():
            if isinstance(default, dict):
                continue
            key = field if name == "top level" else f"{name}.{field}"
            shown = repr(default) if len(repr(default)) <= 60 else repr(default)[:57] + "..."
            assert f"\n  {key} = {shown}\n" in block + "\n", key
            flowed = " ".join(block.split())
            assert f"must be {EDGES[key][2].split(',')[0]}" in flowed and fields.FIELDS[key].doc in flowed, key
    assert "the gates push delta to stage2.epsilon + margin" in text
    assert "noise scale on the input embeddings" in text
    assert all(len(l) <= 100 for l in lines)


def test_every_engine_field_reaches_the_engine():
    """Each field of the engine section but the runner's own `ahead` is an option build_engine passes on,
    and Engine takes it as a keyword."""
    import inspect

    from jaxcrit.engine import Engine
    from jaxcrit.run import fields as fields_module
    from jaxcrit.run.engines import OPTIONS
    fields = {f.name for s in fields_module.SECTIONS if s.name == "engine" for f in s.fields} - {"ahead"}
    assert set(OPTIONS) == fields
    assert fields <= set(inspect.signature(Engine.__init__).parameters)


@pytest.mark.parametrize("key, meant", [
    ("stage1.alpah", "stage1.alpha"), ("stag1.alpha", "stage1.alpha"), ("dtyp", "dtype"),
    ("engine.vocab_chunks", "engine.vocab_chunk"), ("mesh.proces_id", "mesh.process_id"),
    ("stage3.x", None), ("zzz", None), ("stage1", None)])
def test_unknown_field_names_the_closest_declared_one(key, meant):
    line = fields.unknown_field(key)
    assert line.startswith(f"unknown config field '{key}'") and "\n" not in line
    assert (f"(did you mean '{meant}'?)" in line) if meant else "did you mean" not in line, line
    assert fields.did_you_mean("sampels", ["samples", "seed", "batch"]) == " (did you mean 'samples'?)"
    assert fields.did_you_mean("xyz", ["samples"]) == ""


def test_config_text_is_every_field_once_as_an_override():
    c = base("smollm2")
    c.stage1.alpha, c.scan.layers = 2.5, (3, 4)
    lines = [line for line in fields.config_text(c).splitlines() if line]
    assert [line.split(" = ")[0] for line in lines] == list(fields.FIELDS)
    assert "stage1.alpha = 2.5" in lines and "scan.layers = (3, 4)" in lines and "dtype = 'auto'" in lines
