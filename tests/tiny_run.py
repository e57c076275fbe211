"""A tiny llama with a word-level tokenizer, and configs that run the whole pipeline on it in seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

import hf_models
from jaxcrit.configs.common import base

WORDS = 60
TEXT = " ".join(f"w{i}" for i in np.random.default_rng(5).integers(0, WORDS, 40))   # 40 tokens
COMPARED = ("importance.json", "curve.csv", "critical.json", "baselines.json", "scan.csv", "greedy.json",
            "map.csv", "map.json", "evaluation.json", "generations.json")
PROMPTS = ("w3 w14 w15 w9 w26", "w53 w5 w8")


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


def paragraphs(path: Path, n: int = 5) -> Path:
    """A text file of n rows of 30 words (> 50 characters: each is evaluated)."""
    rng = np.random.default_rng(11)
    path.write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(0, WORDS, 30)) for _ in range(n)) + "\n")
    return path


def tiny_config(model_dir: Path, **over):
    """jaxcrit.configs.common.base with tiny settings; over: dotted keys as __, e.g. stage2__epsilon=2."""
    c = base(str(model_dir))
    c.dtype = "float32"     # the references (transformers, hand loops) run in float32
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
    c.map.top_k = 3
    c.map.block = 8
    c.map.audit = 16
    c.engine.chunk = 8
    c.generate.prompts = PROMPTS
    c.generate.max_new_tokens = 6
    for k, v in over.items():
        *path, last = k.split("__")
        obj = c
        for p in path:
            obj = obj[p]
        obj[last] = v
    return c


def config_file(path: Path, model_dir: Path, **fields) -> Path:
    """A config file for the CLI: base(model_dir), the tiny text, no progress bars, `fields` set."""
    lines = ["from jaxcrit.configs.common import base", "", "", "def get_config(arg=None):",
             f"    c = base({str(model_dir)!r})", "    c.dtype = 'float32'", f"    c.text = {TEXT!r}", "    c.progress = False",
             f"    c.generate.prompts = {PROMPTS!r}",
             "    c.stage1.samples = 4"]
    lines += [f"    c.{k.replace('__', '.')} = {v!r}" for k, v in fields.items()]
    path.write_text("\n".join(lines + ["    return c", ""]))
    return path


def files(workdir: Path, names=COMPARED) -> dict[str, bytes]:
    return {n: (workdir / n).read_bytes() for n in names if (workdir / n).exists()}
