"""Batches of edit sets as one compiled program: `intervene` scores each set, `patch` sweeps
activation patching over sites, layers and positions.

A batch runs on the engine (engine/scoring.py): its rows are the edit sets, vmapped in chunks
sized as the engine sizes them and sharded over the model's mesh; each row starts from the clean
run's cache at its first edited layer (prefix sharing). Metrics read the rows' final hidden
states: the mean next-token NLL by the engine's loss program, log-probs and logits at chosen
positions, or a function of the full logits, by its metric program.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from jaxcrit.convert.load import Model
from jaxcrit.engine import edits as E
from jaxcrit.engine.program import Readout
from jaxcrit.engine.scoring import Engine
from jaxcrit.errors import JaxcritError
from jaxcrit.interventions.forward import capture_all, checked_edits, parsed, same_shape, token_ids
from jaxcrit.models.sites import neuron_name, site as site_info
from jaxcrit.run.engines import OPTIONS, build_engine

METRICS = ("loss", "logprob", "logit_diff")
ENGINE_ARGS = (*OPTIONS, "progress", "memory_fraction")


def readout(model: Model, metric: str, shape: tuple[int, int], targets: Any, tokens: Any) -> Readout:
    """The Readout of a named metric other than loss, each text weighted 1/B (the mean over texts).

    logprob: targets an int: log p(targets) at the last position; ids [T] or [B, T]: the sum over
    positions t of log p(targets[b, t] | inputs[b, :t+1]), where targets >= 0. logit_diff:
    tokens (a, b): logit of a minus logit of b at the last position."""
    B, T = shape
    V = model.cfg.vocab_size
    last = np.full((B, 2), T - 1, np.int32)   # two columns for both last-position metrics: they share a program
    if metric == "logprob":
        if targets is None:
            raise JaxcritError("metric 'logprob' needs targets: a token id (at the last position) or ids [T] / [B, T]")
        tg = np.asarray(targets)
        if tg.ndim == 0:
            pos, tok = last, np.array([[int(tg), -1]] * B, np.int32)
        elif tg.shape in ((T,), (B, T)):
            pos, tok = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)), np.broadcast_to(tg, (B, T))
        else:
            raise JaxcritError(f"targets of shape {list(tg.shape)}: give a token id, or ids [T] or [B, T] "
                               f"(the inputs are {list(shape)})")
        if tok.max() >= V:
            raise JaxcritError(f"target id {tok.max()} out of range: the vocabulary has ids 0..{V - 1}")
        w = (tok >= 0).astype(np.float32) / B
        return Readout(pos, np.maximum(tok, 0).astype(np.int32), w, np.zeros_like(w))
    if tokens is None or np.shape(tokens) != (2,) or not all(0 <= int(t) < V for t in tokens):
        raise JaxcritError(f"metric 'logit_diff' needs tokens=(a, b): two token ids in 0..{V - 1}")
    w = np.tile(np.array([[1.0, -1.0]], np.float32) / B, (B, 1))
    return Readout(last, np.tile(np.asarray(tokens, np.int32), (B, 1)), np.zeros_like(w), w)


def intervene(model: Model, inputs: Any, edit_sets: Any, metric: str | Callable = "loss", targets: Any = None,
              tokens: Sequence[int] | None = None, reference: Any = None, **engine: Any) -> pd.DataFrame:
    """One row per edit set (engine/edits.py: a list of sets, or a DataFrame) of its metric on the
    inputs (forward.token_ids): columns set, edits (how many), value. metric: "loss" (mean
    next-token NLL), "logprob" (targets as `readout` says), "logit_diff" (tokens=(a, b)), or a
    jittable fn(logits [T, V]) -> scalar, averaged over the texts. attrs: metric, clean (the
    value without edits). reference: what `mean` edits average over (None: the inputs).
    engine: Engine options (chunk, vocab_chunk, prefix_sharing, ...; chunk 0 plans it from memory)."""
    ids = token_ids(model, inputs)
    sets = E.edit_sets(edit_sets)
    if not sets:
        raise JaxcritError("no edit set given: give a list of edit sets (each a list of edit dicts)")
    read = metric_readout(model, metric, ids, targets, tokens)
    values, clean = scores(model, ids, sets, metric, read, reference, engine)
    df = pd.DataFrame({"set": np.arange(len(sets)), "edits": [len(s) for s in sets], "value": values})
    df.attrs.update(metric=metric_name(metric), clean=clean)
    return df


def metric_name(metric: str | Callable) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "fn")


def metric_readout(model: Model, metric: str | Callable, ids: np.ndarray, targets: Any, tokens: Any
                   ) -> Readout | None:
    """The checked metric's Readout (None for loss and functions of the logits)."""
    if callable(metric):
        return None
    if metric not in METRICS:
        raise JaxcritError(f"unknown metric '{metric}': give one of {', '.join(METRICS)} or a function of the logits")
    if metric == "loss":
        if ids.shape[1] < 2:
            raise JaxcritError("metric 'loss' needs at least 2 tokens")
        return None
    return readout(model, metric, ids.shape, targets, tokens)


def scores(model: Model, ids: np.ndarray, sets: list[list[dict]], metric: str | Callable, read: Readout | None,
           reference: Any, engine: dict, captured: dict | None = None) -> tuple[np.ndarray, float]:
    """([N] each set's metric, the clean run's) on token ids [B, T] (read: metric_readout's):
    the engine options and edits checked, then the edits parsed (captured: as forward.parsed
    takes it), then one engine batch with the clean run as its last row."""
    bad = sorted(set(engine) - set(ENGINE_ARGS))
    if bad:
        raise JaxcritError(f"unknown argument '{bad[0]}': give an Engine option ({', '.join(ENGINE_ARGS)})")
    checked, sources = checked_edits(model, sets + [[]], ids)
    abl, slots = parsed(model, checked, sources, ids, reference, captured)
    eng = engine_for(model, ids, engine)
    if metric == "loss":
        out = eng.losses(abl, edits=slots, desc="edit sets")
    elif read is not None:
        out = eng.metric(abl, slots, read)
    else:
        zeros = np.zeros((ids.shape[0], 1), np.float32)
        out = eng.metric(abl, slots, Readout(zeros.astype(np.int32), zeros.astype(np.int32), zeros, zeros), fn=metric)
    return out[:-1], float(out[-1])


# The last engine built: {"engine": (model's weak reference, key, Engine)}. A notebook's calls on
# one text and options reuse its clean pass and chunk plan; it goes with its model.
LAST: dict[str, tuple[weakref.ref, tuple, Engine]] = {}


def engine_for(model: Model, ids: np.ndarray, options: dict) -> Engine:
    """The Engine of the model on token ids [B, T] with these options: the last one built if it is
    for the same, else a new one (which replaces it)."""
    key = (ids.shape, ids.tobytes(), tuple(sorted(options.items())))
    last = LAST.get("engine")
    if last is None or last[0]() is not model or last[1] != key:
        LAST.clear()   # the old engine's device arrays go before the new one's are made
        LAST["engine"] = (weakref.ref(model, forget), key, build_engine(model, list(ids), **options))
    return LAST["engine"][2]


def forget(ref: weakref.ref) -> None:
    """Drops the last engine when its model is collected (a weakref callback)."""
    if LAST.get("engine", (None,))[0] is ref:
        LAST.clear()


def of_logits(logits: np.ndarray, ids: np.ndarray, metric: str | Callable, read: Readout | None) -> float:
    """A metric of one run's logits [B, T, V] (what the engine computes of a row's hidden states)."""
    if callable(metric):
        return float(np.mean([metric(z) for z in logits]))
    log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    if metric == "loss":
        logp = log_softmax(logits[:, :-1].astype(np.float64))
        return float(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean())
    z = np.take_along_axis(logits, read.pos[..., None], 1).astype(np.float64)   # [B, P, V]: the read positions only
    at = lambda a: np.take_along_axis(a, read.tokens[..., None], 2)[..., 0]
    return float((read.w_logit * at(z) + read.w_logprob * at(log_softmax(z))).sum())


def patch(model: Model, clean: Any, corrupted: Any, sites: Sequence[str] = ("down_proj",),
          layers: Sequence[int] | None = None, positions: Sequence[int] | None = None,
          metric: str | Callable = "logprob", target: int | None = None, tokens: Sequence[int] | None = None,
          **engine: Any) -> pd.DataFrame:
    """Activation patching: for every site x layer x position (default: every layer and position)
    the corrupted run with the clean run's whole-site output at that layer and position copied in.
    One row each (site, layer, position, value), in that order. metric: as `intervene`'s (logprob
    reads `target`, default the clean run's top token at the last position). attrs: metric, target,
    clean and corrupted (the metric of the two runs unpatched)."""
    ids = token_ids(model, clean)
    if ids.shape[0] != 1:
        raise JaxcritError("patch: give one clean sequence and one corrupted sequence (a text or ids [T])")
    corr = same_shape(model, corrupted, ids.shape, "the corrupted input")
    names = [sites] if isinstance(sites, str) else list(sites)
    for s in names:
        site_info(s)
    L, T = model.cfg.n_layers, ids.shape[1]
    layers = list(range(L)) if layers is None else [int(x) for x in layers]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    logits, acts = capture_all(model, ids, tuple(sorted(set(names))))   # the patches' source, and its logits
    if metric == "logprob" and target is None:
        target = int(logits[0, -1].argmax())
    read = metric_readout(model, metric, ids, target, tokens)
    cells = [(s, layer, p) for s in names for layer in layers for p in positions]
    sets = [[{"neuron": neuron_name(s, layer), "op": "patch", "source": ids, "position": p}] for s, layer, p in cells]
    values, corrupted_value = scores(model, corr, sets, metric, read, None, engine, {E.source_key(ids): acts})
    df = pd.DataFrame(cells, columns=["site", "layer", "position"]).assign(value=values)
    df.attrs.update(metric=metric_name(metric), target=target, clean=of_logits(logits, ids, metric, read),
                    corrupted=corrupted_value)
    return df
