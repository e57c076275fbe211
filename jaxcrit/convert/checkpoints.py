"""What a model source names, and how to read its config alone or load it whole.

A source is an embedded model name ('smollm2'), a HF checkpoint dir, a .gguf file, a dir
written by orbax_io.save, or a model on the Hugging Face Hub (`ORG/NAME[@REVISION]`, optionally
after `hf:`; data/hub.py fetches it), an existing local path winning over a hub name. Each kind
is one row: how to recognise it, how to read its ModelConfig from metadata alone (validation
before any weight is read), how to load it, and the dtype it runs in when none is given (the
config's dtype "auto", jaxcrit.load's default): a GGUF file's quantized blocks dequantize
exactly into float32 (and the embedded model is sized for a CPU), a HF checkpoint is run in
bfloat16 as it is mostly stored, a converted dir in the dtype it was saved in.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig

ORBAX_META = "jaxcrit.json"   # the metadata file orbax_io.save writes beside the params: it marks that layout


def _gguf_config(path: Path) -> ModelConfig:
    from jaxcrit.convert.gguf_io import hf_config, open_gguf
    from jaxcrit.models.config import from_hf_config
    return from_hf_config(hf_config(open_gguf(path), str(path)), str(path))


def _orbax_config(path: Path) -> ModelConfig:
    from jaxcrit.convert.orbax_io import config_from_json
    return config_from_json(json.loads((path / ORBAX_META).read_text())["config"])


def _hf_config(path: Path) -> ModelConfig:
    from jaxcrit.convert.hf import read_config
    return read_config(path)


def _gguf_load(path, dtype, mesh, rules):
    from jaxcrit.convert.gguf_io import load_gguf
    return load_gguf(path, dtype, mesh, rules)


def _orbax_load(path, dtype, mesh, rules):
    from jaxcrit.convert.orbax_io import restore
    return restore(path, mesh, rules)


def _orbax_dtype(path: Path) -> str:
    """The dtype most of a converted dir's params were saved in."""
    from collections import Counter
    saved = Counter(json.loads((path / ORBAX_META).read_text())["dtypes"].values())
    return max(("float32", "bfloat16", "float16"), key=lambda d: saved[d])


def _hf_load(path, dtype, mesh, rules):
    from jaxcrit.convert.hf import load_hf
    return load_hf(path, dtype, mesh, rules)


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    matches: Callable[[Path], bool]
    config: Callable[[Path], ModelConfig]   # metadata only, no weights read
    load: Callable                          # (path, numpy dtype, mesh, rules) -> (ModelConfig, params)
    dtype: Callable[[Path], str]            # the dtype it runs in when none is given


KINDS: tuple[Kind, ...] = (
    Kind("gguf", lambda p: p.is_file(), _gguf_config, _gguf_load, lambda p: "float32"),
    Kind("orbax", lambda p: (p / ORBAX_META).is_file(), _orbax_config, _orbax_load, _orbax_dtype),
    Kind("hf", lambda p: p.is_dir(), _hf_config, _hf_load, lambda p: "bfloat16"),
)


def resolve(source: str) -> tuple[Kind, Path]:
    """The kind and path of a model source; one error line when it names nothing."""
    from jaxcrit.convert import embedded
    from jaxcrit.data import hub
    if source in embedded.EMBEDDED:
        path = embedded.embedded_path(source)
    elif local := [Path(s) for s in (source, source.removeprefix(hub.MODEL_PREFIX)) if Path(s).exists()]:
        path = local[0]
    elif name := hub.model_name(source):
        path = hub.snapshot(name)
    else:
        path = Path(source)
    for kind in KINDS:
        if kind.matches(path):
            return kind, path
    raise JaxcritError(f"model '{source}': no such file or directory; give an embedded name "
                       f"({', '.join(embedded.EMBEDDED)}), a HF checkpoint dir, a .gguf file, a converted dir "
                       "or a Hugging Face Hub id ORG/NAME[@REVISION]")
