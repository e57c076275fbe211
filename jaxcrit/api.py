"""The notebook API: the pipeline's stages on a loaded model, results as pandas DataFrames.

Each function runs the stage code of the CLI (jaxcrit/run/stages/) in memory, with a config built
from the CLI's defaults (jaxcrit/run/fields.py). Keyword arguments are config fields: first
of the function's own section (importance: stage1, grow: stage2, scan: scan, evaluate:
evaluate, map: map, generate: generate), then the top level (seed, max_tokens), then engine
(chunk, vocab_chunk, ...).

    m = jaxcrit.load("smollm2")
    ranking = jaxcrit.importance(m, text, samples=16)          # DataFrame, best first
    curve = jaxcrit.grow(m, ranking, text, epsilon=1.0)        # DataFrame n, delta; attrs critical_n
    jaxcrit.scan(m, text, sites=["down_proj"], layers=[11])    # DataFrame ..., delta
    jaxcrit.evaluate(m, ranking[:curve.attrs["critical_n"]], [text])
    jaxcrit.map(m, text, screens=("first_order", "magnitude"))  # every neuron; top ones verified
    jaxcrit.generate(m, "The capital of France is", neurons=ranking[:1])  # prompt, text, tokens, logprobs
    critical, curve = jaxcrit.find_critical(m, text, epsilon=1.0)  # both stages; critical.neuron: names

Interventions (jaxcrit.forward, intervene, patch: jaxcrit/interventions/) take edits as data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ml_collections import ConfigDict

# jaxcrit/__init__ binds this module's `evaluate` and `run` as jaxcrit.evaluate and jaxcrit.run, the names of
# two subpackages; a subpackage imported for the first time is bound over its package's attribute of that
# name, so both are imported here, before those bindings, and a later import leaves the functions in place.
import jaxcrit.evaluate  # noqa: F401
import jaxcrit.run  # noqa: F401
from jaxcrit import engine as E
from jaxcrit.convert.load import DTYPES, Model, load
from jaxcrit.errors import JaxcritError
from jaxcrit.models.neurons import NeuronSet


def config(model: str = "smollm2") -> ConfigDict:
    """The default config (what the CLI starts from) for a model source."""
    from jaxcrit.configs.common import base
    return base(model)


def _run(model: Model, text: str, section: str, fields: dict[str, Any]):
    """A Run in memory over a loaded model, with config fields set as the module docstring says."""
    from jaxcrit.dist import compile_cache
    from jaxcrit.run import validate
    from jaxcrit.run.fields import did_you_mean
    from jaxcrit.run.runner import Run
    from jaxcrit.run.stages import STAGES
    c = config(model.source)
    c.text = text
    c.dtype = model.dtype
    levels = (c[section], c, c.engine)
    for k, v in fields.items():
        where = next((s for s in levels if k in s and not isinstance(s[k], ConfigDict)), None)
        if where is None:
            names = [f for s in levels for f, x in s.items() if not isinstance(x, ConfigDict)]
            raise JaxcritError(f"unknown argument '{k}'{did_you_mean(k, names)}; give a field of {section}, "
                               "the top level or engine (jaxcrit/run/fields.py)")
        where[k] = tuple(v) if isinstance(v, (list, range)) else v
    validate.fields(c)
    compile_cache.use(validate.settle(c).compile_cache)
    return Run(c, None, stages=STAGES, model=model)


def importance(model: Model, text: str, **stage1_fields):
    """Stage 1: the ranked neurons of one text, best first (layer_name, site, layer, channel,
    position, score); ranking='position' gives the reference's per-position list."""
    from jaxcrit.run.stages.ranking import importance
    return importance(_run(model, text, "stage1", stage1_fields)).to_pandas()


def grow(model: Model, ranking, text: str, **stage2_fields):
    """Stage 2 along a ranking (a DataFrame from importance, a NeuronSet or (site, layer, channel)
    tuples): delta for each prefix n; attrs['critical_n'] is the first n with delta >= epsilon."""
    from jaxcrit.run.stages.ranking import growth_of
    g = growth_of(_run(model, text, "stage2", stage2_fields), NeuronSet.of(ranking))
    df = g.to_pandas()
    df.attrs["critical_n"] = g.critical_n
    return df


def scan(model: Model, text: str, sites: Sequence[str] = ("down_proj",), layers: Sequence[int] | None = None,
         channels: Sequence[int] | None = None, **fields):
    """Single-neuron deltas of the given sites, layers (default all) and channels (default all)."""
    from jaxcrit.critical import scan as S
    from jaxcrit.run import validate
    from jaxcrit.run.stages.scan import scan_of
    layers = range(model.cfg.n_layers) if layers is None else layers
    r = _run(model, text, "scan", {"sites": sites, "layers": layers, "channels": channels or (), **fields})
    validate.ranges(r.c, model.cfg)
    todo = S.neurons(model.cfg, r.c.scan.sites, r.c.scan.layers, list(r.c.scan.channels) or None)
    return scan_of(r, todo).to_pandas().rename(columns={"score": "delta"})


def map(model: Model, text: str, **map_fields):
    """The whole-model map: one row per neuron (site, layer, channel, each screen's value, delta,
    verified); delta is exact (the engine's) where verified is "screen" or "audit", NaN elsewhere,
    and screen values are estimates. attrs['summary'] holds the exact top-k, the stopping rule
    and the audit. The importance screen runs Stage 1 with its defaults; leave it out of
    `screens` to skip that."""
    from jaxcrit.run.stages.whole_map import map_of
    mp = map_of(_run(model, text, "map", map_fields))
    df = mp.table()
    df.attrs["summary"] = mp.summary()
    return df


def evaluate(model: Model, neurons, texts: Sequence[str], **fields):
    """Perplexity (log10) of each text before and after masking neurons (a DataFrame, NeuronSet or
    (site, layer, channel) tuples): one row per text; attrs['overall'] is the token-weighted total."""
    import pandas as pd

    from jaxcrit.run.stages.evaluation import evaluate_texts
    texts = list(texts)
    if not texts:
        raise JaxcritError("give at least one text to evaluate")
    r = _run(model, texts[0], "evaluate", fields)
    ev = evaluate_texts(r, NeuronSet.of(neurons), texts)
    df = pd.DataFrame(ev["texts"])
    df["delta"] = df["masked_ppl_log10"] - df["base_ppl_log10"]
    df.attrs["overall"] = ev["overall"]
    return df


def generate(model: Model, prompts: str | Sequence[str], neurons=None, **fields):
    """Continuations of prompts (one string or several, one batch) with neurons zeroed (a
    DataFrame, NeuronSet or (site, layer, channel) tuples; None: the clean model), stopping at
    the model's EOS tokens. Fields of generate (max_new_tokens, temperature, top_k, top_p) and
    the top level (seed, max_tokens). One row per prompt: prompt, text (the continuation),
    tokens, logprobs (of each new token under the model that wrote it)."""
    import pandas as pd

    from jaxcrit.evaluate import generation as G
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise JaxcritError("give at least one prompt")
    r = _run(model, prompts[0], "generate", {"prompts": prompts, **fields})
    c = r.c.generate
    abl = None if neurons is None else G.ablation(model.cfg, NeuronSet.of(neurons))
    return pd.DataFrame(G.continue_texts(model, prompts, abl, max_new_tokens=c.max_new_tokens,
                                         sampling=G.Sampling(c.temperature, c.top_k, c.top_p, r.c.seed),
                                         max_tokens=r.c.max_tokens))


def find_critical(model: Model, text: str, epsilon: float = 1.0, **fields):
    """Stage 1 then Stage 2 in one call: (the critical set, Stage 1's rows of its neurons best first
    with a `neuron` column of their names; Stage 2's curve, as `grow` gives it). fields: of stage1
    or stage2 (each goes to its stage), the top level or engine (both)."""
    from jaxcrit.models.sites import neuron_name
    c = config(model.source)
    ranking = importance(model, text, **{k: v for k, v in fields.items() if k not in c.stage2})
    curve = grow(model, ranking, text, epsilon=epsilon, **{k: v for k, v in fields.items() if k not in c.stage1})
    n = curve.attrs["critical_n"]
    critical = ranking.iloc[:0 if n is None else n].copy()
    critical.insert(0, "neuron", [neuron_name(s, int(l), int(c)) for s, l, c in
                                  zip(critical["site"], critical["layer"], critical["channel"])])
    return critical.reset_index(drop=True), curve


def engine_for(model: Model, texts: Sequence[str] | str, max_tokens: int = 512, **kw) -> E.Engine:
    """An Engine scoring ablations on these texts (the low-level interface); kw: Engine's
    keyword arguments (chunk, progress, ...)."""
    from jaxcrit.run.engines import build_engine
    texts = [texts] if isinstance(texts, str) else list(texts)
    return build_engine(model, [model.tokens(t, max_tokens) for t in texts], **kw)


def run(c: ConfigDict, workdir: str | Path) -> dict:
    """The whole pipeline, as the CLI runs it, into workdir; returns the summary."""
    from jaxcrit.main import run as run_cli
    return run_cli(c, Path(workdir))


__all__ = ["Model", "DTYPES", "load", "config", "importance", "grow", "scan", "map", "evaluate", "generate",
           "find_critical", "engine_for", "run"]
