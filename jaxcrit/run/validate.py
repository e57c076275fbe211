"""Every config field checked before any work, one error line each.

First each field on its own (FIELDS: one row per field of jaxcrit/configs/common.py), then what
can be checked against the model's config.json, tokenizer and this machine (layer and channel
ranges, the text's length, files to evaluate, kernels and mesh), all before a weight is read.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Any, Callable

from ml_collections import ConfigDict

from jaxcrit.errors import JaxcritError

Check = Callable[[Any], bool]


def _int(lo: int) -> Check:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _num(ok: Callable[[float], bool]) -> Check:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)


def _one_of(*options: str) -> Check:
    return lambda v: v in options


def _names(options) -> Check:
    return lambda v: isinstance(v, (tuple, list)) and all(x in options for x in v) and len(set(v)) == len(v)


def _ints(lo: int, nonempty: bool = False) -> Check:
    return lambda v: isinstance(v, (tuple, list)) and all(_int(lo)(x) for x in v) and (len(v) > 0 or not nonempty)


def _mesh(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) == 2 and all(_int(-1)(x) and x != 0 for x in v)
            and list(v).count(-1) <= 1)


_bool: Check = lambda v: isinstance(v, bool)
_str: Check = lambda v: isinstance(v, str)


def _fields() -> tuple[tuple[str, Check, str], ...]:
    from jaxcrit.convert.load import DTYPES
    from jaxcrit.critical.baselines import BASELINES
    from jaxcrit.critical.screens import SCREENS
    from jaxcrit.data.texts import STUDY_TEXTS
    from jaxcrit.models.sites import SITE_NAMES
    from jaxcrit.dist.sharding import LAYOUTS
    from jaxcrit.run.study import valid_set_name
    return (
        ("model", lambda v: isinstance(v, str) and bool(v), "an embedded name, a checkpoint dir or a file"),
        ("dtype", _one_of(*DTYPES), f"one of {', '.join(DTYPES)}"),
        ("text", _str, "a string"),
        ("max_tokens", _int(10), "an integer >= 10"),
        ("seed", _int(0), "an integer >= 0"),
        ("overwrite", _bool, "True or False"),
        ("progress", _bool, "True or False"),
        ("dry_run", _bool, "True or False"),
        ("plan", _one_of("auto", "always", "never"), "auto, always or never"),
        ("stage1.alpha", _num(lambda x: x > 0), "> 0"),
        ("stage1.samples", _int(1), "an integer >= 1 (K, the noisy passes)"),
        ("stage1.batch", _int(1), "an integer >= 1"),
        ("stage1.top_n", _int(1), "an integer >= 1"),
        ("stage1.threshold", _num(lambda x: True), "a number"),
        ("stage1.ranking", _one_of("channel", "position"), "channel or position"),
        ("stage2.epsilon", _num(lambda x: x > 0), "> 0"),
        ("stage2.max_steps", _int(1), "an integer >= 1"),
        ("stage2.full_curve", _bool, "True or False"),
        ("baselines.names", _names(BASELINES), f"distinct names among {', '.join(BASELINES)}"),
        ("baselines.random_repeats", _int(1), "an integer >= 1"),
        ("baselines.ns", _ints(1, nonempty=True), "a non-empty tuple of integers >= 1"),
        ("scan.sites", _names(SITE_NAMES), f"distinct sites among {', '.join(SITE_NAMES)}"),
        ("scan.layers", _ints(0), "a tuple of layer indices >= 0"),
        ("scan.max_layers", _int(0), "an integer >= 0"),
        ("scan.channels", _ints(0), "a tuple of channel indices >= 0"),
        ("scan.top", _int(0), "an integer >= 0"),
        ("scan.greedy_steps", _int(0), "an integer >= 0"),
        ("scan.greedy_pool", _int(1), "an integer >= 1"),
        ("map.enabled", _bool, "True or False"),
        ("map.screens", lambda v: _names(SCREENS)(v) and len(v) > 0,
         f"a non-empty tuple of distinct screens among {', '.join(SCREENS)}"),
        ("map.top_k", _int(1), "an integer >= 1"),
        ("map.block", _int(0), "an integer >= 0 (0: the engine chunk shared among the screens, at least map.top_k)"),
        ("map.max_rounds", _int(0), "an integer >= 0 (0: no limit)"),
        ("map.audit", _int(0), "an integer >= 0"),
        ("evaluate.file", _str, "a path or ''"),
        ("evaluate.limit", _int(0), "an integer >= 0"),
        ("evaluate.batch", _int(1), "an integer >= 1"),
        ("evaluate.sets", lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) and valid_set_name(x)
                                                                         for x in v) and len(set(v)) == len(v),
         "distinct names among greedy, learned, prefix@E (E a number)"),
        ("generate.enabled", _bool, "True or False"),
        ("generate.prompts", lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(x, str) and x
                                                                                       for x in v),
         "a non-empty tuple of non-empty strings"),
        ("generate.max_new_tokens", _int(1), "an integer >= 1"),
        ("generate.temperature", _num(lambda x: x >= 0), ">= 0 (0: greedy)"),
        ("generate.top_k", _int(0), "an integer >= 0 (0: no cut)"),
        ("generate.top_p", _num(lambda x: 0 < x <= 1), "in (0, 1] (1: no cut)"),
        ("engine.chunk", _int(0), "an integer >= 0 (0: planned from free memory)"),
        ("engine.vocab_chunk", _int(1), "an integer >= 1"),
        ("engine.prefix_sharing", _bool, "True or False"),
        ("engine.sites", _names(SITE_NAMES), f"distinct sites among {', '.join(SITE_NAMES)}"),
        ("engine.attention", _one_of("auto", "xla", "cudnn"), "auto, xla or cudnn"),
        ("engine.mlp", _one_of("auto", "xla", "pallas"), "auto, xla or pallas"),
        ("engine.loss", _one_of("auto", "xla", "pallas"), "auto, xla or pallas"),
        ("engine.ahead", _one_of("auto", "always", "never"), "auto, always or never"),
        # --- issue 15: the study and the learned mask
        ("study.other_ranking", _bool, "True or False"),
        ("study.seeds", _ints(0), "a tuple of seeds >= 0"),
        ("study.alphas", lambda v: isinstance(v, (tuple, list)) and all(_num(lambda x: x > 0)(x) for x in v),
         "a tuple of numbers > 0"),
        ("study.samples", _ints(1), "a tuple of integers >= 1"),
        ("study.texts", _names(STUDY_TEXTS), f"distinct names among {', '.join(STUDY_TEXTS)}"),
        ("study.dtypes", _names(DTYPES), f"distinct names among {', '.join(DTYPES)}"),
        ("study.massive", _int(0), "an integer >= 0"),
        ("tasks.enabled", _bool, "True or False"),
        ("tasks.limit", _int(1), "an integer >= 1"),
        ("tasks.batch", _int(1), "an integer >= 1"),
        ("learned.candidates", _int(0), "an integer >= 0 (0: off)"),
        ("learned.steps", _int(1), "an integer >= 1"),
        ("learned.lr", _num(lambda x: x > 0), "> 0"),
        ("learned.sparsity", _num(lambda x: x >= 0), ">= 0"),
        ("learned.margin", _num(lambda x: x >= 0), ">= 0"),
        ("learned.init", _num(lambda x: 0 < x < 1), "a number in (0, 1)"),
        ("learned.temperature", _num(lambda x: x >= 0), ">= 0"),
        # --- end issue 15
        ("mesh.shape", _mesh, "(data, model), positive integers, one of them may be -1"),
        ("mesh.params", _one_of(*LAYOUTS), f"one of {', '.join(LAYOUTS)}"),
        ("mesh.device_memory_gib", _num(lambda x: x >= 0), "a number of GiB >= 0 (0: what the device reports)"),
        ("mesh.distributed", _bool, "True or False"),
        ("mesh.coordinator", lambda v: v == "" or (isinstance(v, str) and v.rpartition(":")[2].isdigit()),
         "'' or HOST:PORT"),
        ("mesh.num_processes", _int(1), "an integer >= 1"),
        ("mesh.process_id", _int(0), "an integer >= 0"),
        ("mesh.peer_timeout", _int(1), "an integer >= 1 (seconds)"),
    )


def fields(c: ConfigDict) -> None:
    """Each field against its row; a field without a row or a row without a field is an error."""
    rows = _fields()
    known = {k for k, _, _ in rows}
    flat = _flatten(c.to_dict())
    for k in flat:
        if k not in known:
            raise JaxcritError(f"config field '{k}' is unknown; see jaxcrit/configs/common.py for the fields")
    for key, ok, what in rows:
        if key not in flat:
            raise JaxcritError(f"config field '{key}' is missing; start configs from jaxcrit.configs.common.base")
        if not ok(flat[key]):
            raise JaxcritError(f"{key} must be {what} (got {flat[key]!r})")
    if "learned" in c.evaluate.sets and not c.learned.candidates:
        raise JaxcritError("evaluate.sets names learned but the learned mask is off: set learned.candidates")
    if "greedy" in c.evaluate.sets and not (c.scan.sites and c.scan.greedy_steps):
        raise JaxcritError("evaluate.sets names greedy but the greedy search is off: set scan.sites and scan.greedy_steps")
    if c.tasks.enabled and not c.evaluate.file:
        raise JaxcritError("tasks.enabled builds its tasks from a corpus: set evaluate.file")
    if c.tasks.enabled and importlib.util.find_spec("lm_eval") is None:
        raise JaxcritError("tasks.enabled needs lm-evaluation-harness: pip install 'jaxcrit[eval]' "
                           "(or --config.tasks.enabled=False)")
    if c.mesh.coordinator and c.mesh.process_id >= c.mesh.num_processes:
        raise JaxcritError(f"mesh.process_id must be below mesh.num_processes ({c.mesh.num_processes}); "
                           f"got {c.mesh.process_id}")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ranges(c: ConfigDict, cfg) -> None:
    """scan.layers and scan.channels inside the model (cfg: its ModelConfig)."""
    from jaxcrit.models.sites import width
    for layer in c.scan.layers:
        if layer >= cfg.n_layers:
            raise JaxcritError(f"scan.layers: layer {layer} out of range; the model has layers 0..{cfg.n_layers - 1}")
    for site in c.scan.sites:
        for ch in c.scan.channels:
            if ch >= width(cfg, site):
                raise JaxcritError(f"scan.channels: channel {ch} out of range for {site}; it has channels "
                                   f"0..{width(cfg, site) - 1}")


def against_model(c: ConfigDict) -> None:
    """What the model's metadata, its tokenizer, the files named and this machine allow."""
    import jax.numpy as jnp

    from jaxcrit.convert.checkpoints import resolve
    from jaxcrit.convert.load import tokens
    from jaxcrit.data.texts import read_paragraphs
    from jaxcrit.convert.tokenizer import encode, load_tokenizer
    from jaxcrit.engine import kernels
    from jaxcrit.run.plan import target_mesh

    kind, path = resolve(c.model)
    cfg = kind.config(path)
    ranges(c, cfg)
    if not (c.dry_run and path.is_dir() and not (path / "tokenizer.json").exists()):   # a model shape alone
        tok = load_tokenizer(path)
        tokens(tok, c.text, c.max_tokens, min_tokens=10)
        for prompt in c.generate.prompts if c.generate.enabled else ():
            if not encode(tok, prompt):
                raise JaxcritError(f"generate.prompts: {prompt!r} has no tokens; give prompts of at least one token")
    if c.evaluate.file:
        read_paragraphs(c.evaluate.file, limit=c.evaluate.limit)
    mesh = target_mesh(c)
    kernels(cfg, jnp.dtype(c.dtype), c.engine.attention, c.engine.mlp, c.engine.loss, mesh.size)
