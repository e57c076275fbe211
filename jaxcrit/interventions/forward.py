"""The forward with edits: inputs as token ids, edit sets parsed once (engine/edits.py), logits
or log-probs and captured site activations back as numpy; a batch of edit sets as one vmap.

Inputs are one text, a list of texts of equal token length, or token ids [T] or [B, T]; texts of
unequal length are refused (positions, patch sources and "the last position" then mean the same
thing in every sequence).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Hashable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit.convert.load import Model
from jaxcrit.dist.sharding import placed
from jaxcrit.engine import edits as E
from jaxcrit.engine.ablations import INACTIVE, Ablations, entries, row_masks
from jaxcrit.engine.loss import token_nll
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.edits import EMPTY, Slots, batch_axes
from jaxcrit.models.sites import SITE_NAMES, parse_neuron_name


@dataclasses.dataclass(frozen=True)
class Result:
    """What `forward` returns: logits [B, T, V] f32 (None when targets were given), logprobs [B, T]
    of the targets (None without), activations {site name: [B, T, C]} of the captured sites."""
    logits: np.ndarray | None
    logprobs: np.ndarray | None
    activations: dict[str, np.ndarray]


def token_ids(model: Model, inputs: Any) -> np.ndarray:
    """Inputs as int32 token ids [B, T]: a text, a list of texts of one token length, or ids [T] / [B, T]."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(t, str) for t in inputs):
        if model.tokenizer is None:
            raise JaxcritError(f"{model.source} has no tokenizer: give token ids [T] or [B, T]")
        seqs = [model.tokens(t, model.cfg.max_position_embeddings, 1) for t in inputs]
        if len({len(s) for s in seqs}) > 1:
            raise JaxcritError(f"the texts have {', '.join(str(len(s)) for s in seqs)} tokens: give texts of one "
                               "token length (or token ids [B, T]), so positions line up")
        return np.stack(seqs).astype(np.int32)
    try:
        ids = np.asarray(inputs)
    except ValueError:   # sequences of different lengths
        ids = np.zeros(0)
    if ids.ndim not in (1, 2) or ids.size == 0 or ids.dtype.kind not in "iu":
        raise JaxcritError("inputs: give a text, a list of texts, or token ids as an int array [T] or [B, T]")
    if ids.min() < 0 or ids.max() >= model.cfg.vocab_size:
        raise JaxcritError(f"token id {ids.max() if ids.max() >= model.cfg.vocab_size else ids.min()} out of "
                           f"range: the vocabulary has ids 0..{model.cfg.vocab_size - 1}")
    return np.atleast_2d(ids).astype(np.int32)


def same_shape(model: Model, inputs: Any, shape: tuple[int, int], what: str) -> np.ndarray:
    """token_ids of inputs that must have the given [B, T] shape (a patch source, corrupted inputs)."""
    ids = token_ids(model, inputs)
    if ids.shape != shape:
        raise JaxcritError(f"{what} has token ids of shape {list(ids.shape)}; the inputs have {list(shape)}: "
                           "give inputs of the same length")
    return ids


def checked_edits(model: Model, sets: list[list[dict]], ids: np.ndarray
                  ) -> tuple[list[list[E.Edit]], dict[Hashable, np.ndarray]]:
    """engine.edits.check with patch sources read as inputs of the same shape as ids."""
    return E.check(model.cfg, sets, ids.shape[1], lambda s: same_shape(model, s, ids.shape, "the patch source"))


def parsed(model: Model, sets: list[list[E.Edit]], sources: Mapping[Hashable, np.ndarray], ids: np.ndarray,
           reference: Any = None, captured: Mapping[Hashable, Mapping[str, np.ndarray]] | None = None
           ) -> tuple[Ablations, Slots | None]:
    """Checked edit sets as arrays (engine.edits.parse), running what they need first: each
    patch source's forward (unless `captured` holds its sites' outputs by source_key) and the
    sites' means over `reference` (texts or token ids; None: the inputs' own positions), of
    every site the sets name."""
    want, mean_sites = E.wanted(sets)
    named = tuple(sorted({e.site for s in sets for e in s}))   # captured whole: one program for all of them
    captured = captured or {}
    acts = {k: captured[k] if k in captured else capture_all(model, sources[k], named)[1] for k in want}
    means = site_means(model, ids if reference is None else reference, named if mean_sites else ())
    return E.parse(model.cfg, sets, ids.shape, acts, means)


def capture_all(model: Model, ids: np.ndarray, sites: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The clean run of ids [B, T]: its logits [B, T, V] f32 and its outputs of sites in every
    layer, {site: [L, B, T, C] f32}."""
    with placed(model.mesh, model.params):
        logits, ys = _run(model.params, jnp.asarray(ids), {"site": jnp.zeros((1, 1), jnp.int32)}, None, None,
                          cfg=model.cfg, sites=(), with_values=False, capture=sites)
    return np.asarray(logits[0]), {k: np.asarray(v[0], np.float32) for k, v in ys.items()}


def site_means(model: Model, reference: Any, sites: tuple[str, ...]) -> dict[str, np.ndarray]:
    """{site: [L, C]}: each site's mean output over every position of the reference (one text,
    texts of any lengths, or token ids [T] / [B, T])."""
    if not sites:
        return {}
    refs = [reference] if isinstance(reference, str) else reference
    seqs = [token_ids(model, t) for t in refs] if isinstance(refs, list) and all(isinstance(t, str) for t in refs) \
        else [token_ids(model, refs)]
    sums = {s: 0.0 for s in sites}
    n = 0
    for ids in seqs:
        for s, a in capture_all(model, ids, sites)[1].items():
            sums[s] = sums[s] + a.sum((1, 2), dtype=np.float64)
        n += ids.size
    return {s: (v / n).astype(np.float32) for s, v in sums.items()}


def forward(model: Model, inputs: Any, edits: Any = None, capture: Sequence[str] = (), targets: Any = None,
            reference: Any = None) -> Result:
    """The model on inputs with an edit set applied (a list of edit dicts, engine/edits.py; None:
    clean), or a batch of them (a list of such lists, or a DataFrame: every array of the Result
    then has a leading [N] axis, one vmapped program). capture: whole-site names
    ('model.layers.3.mlp.down_proj') whose outputs come back. targets: token ids [T] or [B, T];
    then logprobs[b, t] = log p(targets[b, t] | inputs[b, :t+1]) comes back instead of the
    logits. reference: what `mean` edits average over (site_means)."""
    ids = token_ids(model, inputs)
    names = [capture] if isinstance(capture, str) else list(capture)
    wanted = []
    for name in names:
        site, layer, channel = parse_neuron_name(name)
        if channel is not None or layer >= model.cfg.n_layers:
            raise JaxcritError(f"capture '{name}': give a whole site of a layer 0..{model.cfg.n_layers - 1}, "
                               "like model.layers.3.mlp.down_proj")
        wanted.append((name, site, layer))
    tg = None if targets is None else np.asarray(targets)
    if tg is not None:
        if tg.shape not in ((ids.shape[1],), ids.shape) or tg.dtype.kind not in "iu" or tg.min() < 0 \
                or tg.max() >= model.cfg.vocab_size:
            raise JaxcritError(f"targets: give token ids [T] or [B, T] of the inputs' shape {list(ids.shape)}, "
                               f"each in 0..{model.cfg.vocab_size - 1}")
        tg = np.broadcast_to(tg, ids.shape).astype(np.int32)
    batched = is_batch(edits)
    sets, sources = checked_edits(model, E.edit_sets(edits) if batched else [E.edit_set(edits)], ids)
    abl, slots = parsed(model, sets, sources, ids, reference)
    # padded to `entries`, with masks for every site the sets name: sets that name the same sites
    # share one compiled program
    pad = lambda a, fill: jnp.asarray(np.pad(a, ((0, 0), (0, entries(a.shape[1]) - a.shape[1])), constant_values=fill))
    rows = {k: pad(getattr(abl, k), INACTIVE[k]) for k in INACTIVE}
    padded = None if slots is None else slots._replace(**{k: pad(getattr(slots, k), v) for k, v in EMPTY.items()})
    named = tuple(n for n in SITE_NAMES if any(e.site == n for s in sets for e in s))
    with placed(model.mesh, model.params):
        out, ys = _run(model.params, jnp.asarray(ids), rows, padded, None if tg is None else jnp.asarray(tg),
                       cfg=model.cfg, sites=named, with_values=bool(named),
                       capture=tuple(sorted({s for _, s, _ in wanted})))
    pick = (lambda a: a) if batched else (lambda a: a[0])
    acts = {name: pick(np.asarray(ys[site][:, layer], np.float32)) for name, site, layer in wanted}
    out = pick(np.asarray(out))
    return Result(None if tg is not None else out, -out if tg is not None else None, acts)


def is_batch(edits: Any) -> bool:
    """Whether edits are a batch of edit sets (a DataFrame, or a non-empty list of lists)."""
    if hasattr(edits, "columns"):
        return True
    return isinstance(edits, (list, tuple)) and bool(edits) and all(isinstance(s, (list, tuple)) for s in edits)


@partial(jax.jit, static_argnames=("cfg", "sites", "with_values", "capture"), compiler_options=decoder.COMPILER_OPTIONS)
def _run(params, tokens, rows, slots, targets, *, cfg, sites: tuple[str, ...], with_values: bool,
         capture: tuple[str, ...]):
    """(logits [N, B, T, V] f32, or -log p(targets) [N, B, T] when targets are given; {site:
    [N, L, B, T, C]} of the captured sites) of tokens [B, T] under N rows of Ablations ({field:
    [N, K]}, dense masks for `sites`) and of edit slots ([N, K2] or None), vmapped."""
    def one(row, row_slots):
        masks, values = row_masks(cfg, sites, row, with_values) if sites else (None, None)
        h, ys = decoder.forward(cfg, params, decoder.embed(cfg, params, tokens), None, masks=masks, values=values,
                                capture=capture, edits=row_slots)
        if targets is None:
            return decoder.logits(cfg, params, h), ys
        return token_nll(cfg, params, h, targets), ys
    return jax.vmap(one, in_axes=(0, None if slots is None else batch_axes(slots)))(rows, slots)
