"""Every config field checked before any work, one error line each.

First each field against its rule (jaxcrit/run/fields.py declares both), then the fields against
each other (RELATIONS), then what can be checked against the model's config.json (RANGES: layer
and channel ranges), its tokenizer, the files named and this machine (the text's length, the
prompts, files to evaluate, mesh and kernels), all before a weight is read.
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Iterator

from ml_collections import ConfigDict

from jaxcrit.errors import JaxcritError
from jaxcrit.run.fields import FIELDS, flat, unknown_field

# Fields that are fine alone but not together: (when the config is wrong, its error line; {c} is the config).
RELATIONS: tuple[tuple[Callable[[ConfigDict], bool], str], ...] = (
    (lambda c: "learned" in c.evaluate.sets and not c.learned.candidates,
     "evaluate.sets names learned but the learned mask is off: set learned.candidates"),
    (lambda c: "greedy" in c.evaluate.sets and not (c.scan.sites and c.scan.greedy_steps),
     "evaluate.sets names greedy but the greedy search is off: set scan.sites and scan.greedy_steps"),
    (lambda c: c.tasks.enabled and not c.evaluate.file,
     "tasks.enabled builds its tasks from a corpus: set evaluate.file"),
    (lambda c: c.tasks.enabled and importlib.util.find_spec("lm_eval") is None,
     "tasks.enabled needs lm-evaluation-harness: pip install 'jaxcrit[eval]' (or --config.tasks.enabled=False)"),
    (lambda c: c.mesh.coordinator and c.mesh.process_id >= c.mesh.num_processes,
     "mesh.process_id must be below mesh.num_processes ({c.mesh.num_processes}); got {c.mesh.process_id}"),
)


def fields(c: ConfigDict) -> None:
    """Each field against its rule, then RELATIONS; a field without a declaration or a declared
    field missing is an error."""
    given = flat(c)
    for key in given:
        if key not in FIELDS:
            raise JaxcritError(unknown_field(key))
    for key, f in FIELDS.items():
        if key not in given:
            raise JaxcritError(f"config field '{key}' is missing; start configs from jaxcrit.configs.common.base")
        if not f.rule.ok(given[key]):
            raise JaxcritError(f"{key} must be {f.rule.what()} (got {given[key]!r})")
    for wrong, line in RELATIONS:
        if wrong(c):
            raise JaxcritError(line.format(c=c))


def settle(c: ConfigDict) -> ConfigDict:
    """c with what its "auto" values mean here filled in: the dtype of its model source
    (convert.load.default_dtype) and the compilation cache's directory, so the plan, the workdir's
    identity and --print_config name what the run uses."""
    from jaxcrit.convert.load import AUTO_DTYPE, default_dtype
    from jaxcrit.dist import compile_cache
    if c.dtype == AUTO_DTYPE:
        c.dtype = default_dtype(c.model)
    if c.compile_cache == compile_cache.AUTO:
        c.compile_cache = str(compile_cache.directory(compile_cache.AUTO))
    return c


def _layers(c: ConfigDict, cfg) -> Iterator[str]:
    for layer in c.scan.layers:
        if layer >= cfg.n_layers:
            yield f"scan.layers: layer {layer} out of range; the model has layers 0..{cfg.n_layers - 1}"


def _channels(c: ConfigDict, cfg) -> Iterator[str]:
    from jaxcrit.models.sites import width
    for site in c.scan.sites:
        for ch in c.scan.channels:
            if ch >= width(cfg, site):
                yield f"scan.channels: channel {ch} out of range for {site}; it has channels 0..{width(cfg, site) - 1}"


# Fields against the model's shape (its ModelConfig): each row yields the error lines of its field.
RANGES: tuple[Callable[[ConfigDict, object], Iterator[str]], ...] = (_layers, _channels)


def ranges(c: ConfigDict, cfg) -> None:
    """The RANGES rows: scan.layers and scan.channels inside the model (cfg: its ModelConfig)."""
    for row in RANGES:
        for line in row(c, cfg):
            raise JaxcritError(line)


def against_model(c: ConfigDict) -> None:
    """What the model's metadata, its tokenizer, the files named and this machine allow."""
    import jax.numpy as jnp

    from jaxcrit.convert.checkpoints import resolve
    from jaxcrit.convert.load import tokens
    from jaxcrit.data.texts import read_paragraphs
    from jaxcrit.convert.tokenizer import encode, load_tokenizer
    from jaxcrit.kernels.selection import CHOICES, select
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
    select(cfg, jnp.dtype(c.dtype), mesh, **{spot: c.engine.get(spot, "auto") for spot in CHOICES})
