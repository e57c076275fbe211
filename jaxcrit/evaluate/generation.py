"""What a perturbed model says: greedy or sampled decoding with a KV cache, and token log-probabilities.

A perturbation is the engine's: one `engine.Ablations` row per sequence, made dense by
`engine.row_masks` and applied by the decoder's own site editor at every position, prompt and
generated tokens alike, so a continuation under a NeuronSet comes from the model the engine
scores. One cached step runs the decoder's own layer (decoder.layer) with an attention that first
writes the new tokens' keys and values into a fixed-size cache [L, S, KV, hd] per sequence at
their positions, then attends their queries over it by position.

Two compiled programs per (rows, prompt bucket): the prefill (prompts right-padded to a bucket of
16, 32, 64, ... tokens) and a chunk of STEPS decode steps over a cache of the bucket plus
max_new_tokens rounded up to whole chunks. Between chunks the host checks the stop rule, so
generation ends once every sequence has stopped.

`token_logprobs` is the other half of what a language-model harness asks (jaxcrit/evaluate/lmeval.py):
log p(token | the tokens before it) of given sequences under a perturbation, batched through
the decoder's forward with the loss computed in vocabulary chunks.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcrit import engine as E
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.neurons import NeuronSet

Array = jax.Array
STEPS = 8   # decode steps per compiled chunk (the host checks the stop rule between chunks)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each token is chosen. temperature 0: greedy (the argmax). Otherwise the logits are
    divided by temperature, cut to the top_k largest (0: no cut), then to the smallest set whose
    probability reaches top_p (1: no cut), as transformers' warpers do in that order, and sampled
    with a key from seed, the token's index and the row (the same tokens whatever STEPS is).
    Only greedy-or-not is compiled in; the numbers are arguments of the compiled programs."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def args(self) -> tuple[Array, Array]:
        """(temperature, top_k, top_p) as a float32 [3] array, and the seed's key data."""
        return (jnp.asarray([self.temperature or 1.0, self.top_k, self.top_p], jnp.float32),
                jax.random.key_data(jax.random.key(self.seed)))


@dataclasses.dataclass(frozen=True)
class Continuation:
    tokens: list[int]       # the new tokens, a stop token included
    logprobs: list[float]   # log p of each under the (perturbed) model, before temperature and cuts


class KV(NamedTuple):
    """One sequence's KV cache: keys and values [L, S, KV, hd] (rotated keys, site-edited)."""
    k: Array
    v: Array


def bucket(n: int) -> int:
    """The padded length of n tokens: the next power of two, at least 16 (one compile each)."""
    return max(16, 1 << (n - 1).bit_length())


# ----------------------------------------------------------------------------- choosing tokens

def filter_logits(z: Array, knobs: Array) -> Array:
    """Logits [..., V] / temperature with the top_k and top_p cuts as -inf; knobs: Sampling.args()[0]."""
    temperature, top_k, top_p = knobs[0], knobs[1].astype(jnp.int32), knobs[2]
    z = z / temperature
    ascending = jnp.sort(z, axis=-1)
    kth = jnp.take(ascending, z.shape[-1] - jnp.clip(top_k, 1, z.shape[-1]), axis=-1)[..., None]
    z = jnp.where((top_k > 0) & (z < kth), -jnp.inf, z)
    order = jnp.argsort(z, axis=-1)                               # ascending, as transformers sorts
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(z, order, -1), -1), -1)
    drop = (cum <= 1.0 - top_p).at[..., -1].set(False)            # the most likely token stays
    return jnp.where(jnp.take_along_axis(drop, jnp.argsort(order, -1), -1), -jnp.inf, z)


def pick(logits: Array, index: Array, greedy: bool, knobs: Array, key: Array) -> tuple[Array, Array]:
    """The next token of each row from logits [B, V] (f32), the index-th token generated: ids [B]
    int32 and their log-probabilities [B] under the unfiltered logits. knobs, key: Sampling.args()."""
    if greedy:
        tok = jnp.argmax(logits, -1)
    else:
        keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key), index), logits.shape[0])
        tok = jax.vmap(jax.random.categorical)(keys, filter_logits(logits, knobs))
    tok = tok.astype(jnp.int32)
    return tok, jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], -1)[:, 0]


# ----------------------------------------------------------------------------- the cached forward

def step(cfg: ModelConfig, params: dict, kv: KV, tokens: Array, pos: Array, length: Array,
         masks: dict | None, values: dict | None) -> tuple[Array, KV]:
    """One sequence's tokens [T] at positions pos..pos+T-1 through every layer, their keys and
    values written into kv; `length` tokens of the sequence are real after them (it picks
    longrope's factors, as transformers does per call). masks/values: site -> [L, C].
    Returns the final-normed hidden states [T, D] and the cache."""
    h = decoder.scale_embeds(cfg, decoder.embed(cfg, params, tokens[None]))
    positions = pos + jnp.arange(tokens.shape[0])
    cos, sin = decoder.rope_at(cfg, positions, length)
    keys = jnp.ones((1, kv.k.shape[1]), bool)      # what a query sees is decided by position alone

    def layer(h, x):
        p, k_l, v_l, m, vals = x
        cached = {}

        def attend(q, k, v):   # the new keys and values into the cache; the queries over it by position
            cached["k"] = jax.lax.dynamic_update_slice_in_dim(k_l, k[0].astype(k_l.dtype), pos, axis=0)
            cached["v"] = jax.lax.dynamic_update_slice_in_dim(v_l, v[0].astype(v_l.dtype), pos, axis=0)
            return decoder.attend(cfg, q, cached["k"][None], cached["v"][None], keys, positions)

        h = decoder.layer(cfg, p, h, cos, sin, decoder.editor(m or None, vals or None), attend)
        return h, (cached["k"], cached["v"])

    h, (k, v) = jax.lax.scan(layer, h, (decoder.stacked_params(params), kv.k, kv.v, masks or {}, values or {}))
    return decoder.final_norm(cfg, params, h[0]), KV(k, v)


def _next_logits(cfg: ModelConfig, params: dict, h: Array) -> Array:
    """Logits [B, V] (f32) of hidden states [B, D]."""
    return decoder.logits(cfg, params, h[:, None])[:, 0]


@partial(jax.jit, static_argnames=("cfg", "cache_len", "greedy"))
def _prefill(params, tokens, lengths, masks, values, index, knobs, key, *, cfg: ModelConfig, cache_len: int,
             greedy: bool):
    """Sequences [B, T] (right-padded; lengths [B]) into fresh caches of cache_len positions; the
    next token of each [B] (the index-th generated), its log-probability [B] and the caches
    [B, L, S, KV, hd]."""
    shape = (cfg.n_layers, cache_len, cfg.n_kv_heads, cfg.head_dim)
    empty = KV(jnp.zeros(shape, params["embed"].dtype), jnp.zeros(shape, params["embed"].dtype))

    def row(tok, n, m, vals):
        h, kv = step(cfg, params, empty, tok, jnp.int32(0), n, m, vals)
        return h[n - 1], kv

    h, kv = jax.vmap(row)(tokens, lengths, masks, values)
    tok, lp = pick(_next_logits(cfg, params, h), index, greedy, knobs, key)
    return tok, lp, kv


@partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("kv",))
def _decode(params, kv, tok, pos, masks, values, index, knobs, key, *, cfg: ModelConfig, greedy: bool):
    """STEPS tokens after tok [B], which sits at positions pos [B]; index: the index of the first
    token generated here. Returns the caches, the tokens [B, STEPS] and their log-probabilities."""
    def one(carry, i):
        kv, tok, pos = carry
        h, kv = jax.vmap(lambda kv, t, p, m, vals: step(cfg, params, kv, t[None], p, p + 1, m, vals))(
            kv, tok, pos, masks, values)
        new, lp = pick(_next_logits(cfg, params, h[:, 0]), i, greedy, knobs, key)
        return (kv, new, pos + 1), (new, lp)

    (kv, _, _), (toks, lps) = jax.lax.scan(one, (kv, tok, pos), index + jnp.arange(STEPS))
    return kv, toks.T, lps.T


def _dense(cfg: ModelConfig, ablations: E.Ablations | None, rows: int) -> tuple[dict, dict | None]:
    """Per-row dense masks and values (site -> [rows, L, C]) from one Ablations row per sequence
    (or one row for all), through the engine's own row_masks."""
    if ablations is None:
        return {}, None
    if ablations.rows not in (1, rows):
        raise JaxcritError(f"give one perturbation row per sequence ({rows}) or one for all; got {ablations.rows}")
    if ablations.rows == 1:
        ablations = ablations.take(np.zeros(rows, int))
    cols = {f.name: jnp.asarray(getattr(ablations, f.name)) for f in dataclasses.fields(ablations)}
    sites, with_values = ablations.sites(), bool((ablations.value != 0).any())
    return jax.vmap(lambda row: E.row_masks(cfg, sites, row, with_values))(cols)


def generate_ids(cfg: ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
                 ablations: E.Ablations | None = None, *, max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), finished: Callable[[int, list[int]], bool] | None = None
                 ) -> list[Continuation]:
    """Continues each prompt (token ids) by up to max_new_tokens tokens, as one batch.

    ablations: one row per prompt or one for all (None: the clean model). A sequence stops after
    a token in stop_ids (kept), or once finished(row, its tokens so far) says so (checked between
    chunks of STEPS tokens; the tokens of that chunk are kept, the caller trims its stop string).

    Longrope (Phi-3): when a sequence grows past rope_original_max, transformers drops its cache
    and recomputes the whole sequence with the long factors; so does this, for the whole batch
    (a sequence not crossing gets the cache it had, up to rounding).
    """
    if not prompts or min(len(p) for p in prompts) < 1:
        raise JaxcritError("give at least one prompt, each of at least one token")
    if max_new_tokens < 1:
        raise JaxcritError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    B, lengths = len(prompts), np.array([len(p) for p in prompts], np.int32)
    masks, values = _dense(cfg, ablations, B)
    stops = np.asarray(list(stop_ids), np.int32)
    knobs = sampling.args()
    # counts g of generated tokens at which a sequence reaches rope_original_max + 1 tokens
    switch = cfg.rope_original_max + 1 - lengths if cfg.rope_type == "longrope" else np.zeros(0, np.int32)
    new = np.zeros((B, 0), np.int32)
    lps = np.zeros((B, 0), np.float32)
    done = np.zeros(B, bool)
    while new.shape[1] < max_new_tokens and not done.all():
        g = new.shape[1]
        if g == 0 or (switch == g).any():      # (re)start: every sequence as it stands
            T = bucket(int(lengths.max()) + g)
            seqs = np.zeros((B, T), np.int32)
            for i, p in enumerate(prompts):
                seqs[i, :len(p) + g] = np.concatenate([p, new[i]])
            cache_len = T + -(-(max_new_tokens - g - 1) // STEPS) * STEPS
            tok, lp, kv = _prefill(params, seqs, jnp.asarray(lengths + g), masks, values, jnp.int32(g), *knobs,
                                   cfg=cfg, cache_len=cache_len, greedy=sampling.greedy)
            toks, lp = np.asarray(tok)[:, None], np.asarray(lp)[:, None]
        else:
            kv, toks, lp = _decode(params, kv, tok, jnp.asarray(lengths + g - 1), masks, values, jnp.int32(g),
                                   *knobs, cfg=cfg, greedy=sampling.greedy)
            keep = min([STEPS] + [int(c) - g for c in switch if c > g])   # up to the next restart
            toks, lp = np.asarray(toks)[:, :keep], np.asarray(lp)[:, :keep]
        tok = jnp.asarray(toks[:, -1])
        new, lps = np.concatenate([new, toks], 1), np.concatenate([lps, lp], 1)
        done |= np.isin(new, stops).any(1)
        if finished is not None:
            done |= np.array([bool(d) or finished(r, new[r, :max_new_tokens].tolist()) for r, d in enumerate(done)])
    result = []
    for r in range(B):
        toks = new[r, :max_new_tokens]
        hit = np.flatnonzero(np.isin(toks, stops))
        n = int(hit[0]) + 1 if hit.size else len(toks)
        result.append(Continuation(toks[:n].tolist(), lps[r, :n].astype(float).tolist()))
    return result


# ----------------------------------------------------------------------------- scoring given tokens

# The target's logit and the chunked maximum come from two matmuls that may round differently;
# a target within this relative distance of the maximum counts as the greedy choice.
GREEDY_TOLERANCE = 1e-5


@partial(jax.jit, static_argnames=("cfg", "vocab_chunk"))
def _score(params, inputs, targets, valid, masks, values, *, cfg: ModelConfig, vocab_chunk: int):
    """log p(targets | inputs up to there) [B, T] and whether each target is the argmax [B, T]."""
    h, _ = decoder.forward(cfg, params, decoder.embed(cfg, params, inputs), valid, masks=masks, values=values)
    lse, top = E.logsumexp_vocab(cfg, params, h, vocab_chunk)
    z = E.target_logit(cfg, params, h, targets)
    return z - lse, z >= top - GREEDY_TOLERANCE * jnp.maximum(1.0, jnp.abs(top))


def token_logprobs(cfg: ModelConfig, params: dict, seqs: Sequence[Sequence[int]],
                   ablations: E.Ablations | None = None, *, batch: int = 8, vocab_chunk: int = 16384
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each sequence [T] (T >= 2): log p(token t | tokens before it) [T-1] (f32) and whether
    token t is the greedy choice there [T-1], with ablations' one row applied to every sequence.

    Sequences go `batch` at a time, longest first, their first T-1 tokens padded to a bucket and
    to whole batches (short batches repeat their last sequence), so a few programs serve any
    mix of lengths."""
    if any(len(s) < 2 for s in seqs):
        raise JaxcritError("each sequence needs at least 2 tokens to score")
    if ablations is not None and ablations.rows != 1:
        raise JaxcritError(f"give one perturbation row for all sequences; got {ablations.rows}")
    masks, values = _dense(cfg, ablations, 1)
    masks = {k: v[0] for k, v in masks.items()}
    values = None if values is None else {k: v[0] for k, v in values.items()}
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list = [None] * len(seqs)
    for lo in range(0, len(order), batch):
        idx = order[lo:lo + batch]
        T = bucket(len(seqs[idx[0]]) - 1)
        inputs, targets = np.zeros((batch, T), np.int32), np.zeros((batch, T), np.int32)
        valid = np.zeros((batch, T), bool)
        for r in range(batch):
            s = np.asarray(seqs[idx[min(r, len(idx) - 1)]], np.int32)
            n = len(s) - 1
            inputs[r, :n], targets[r, :n], valid[r, :n] = s[:-1], s[1:], True
        lp, greedy = (np.asarray(a) for a in _score(params, inputs, targets, valid, masks, values, cfg=cfg,
                                                    vocab_chunk=vocab_chunk))
        for r, i in enumerate(idx):
            n = len(seqs[i]) - 1
            out[i] = (lp[r, :n], greedy[r, :n])
    return out


# ----------------------------------------------------------------------------- on a loaded model

def ablation(cfg: ModelConfig, neurons: NeuronSet | None, scales: Sequence[float] = (0.0,)) -> E.Ablations | None:
    """Ablations zeroing (scale 0) or keeping (scale 1) a neuron set: one row per scale (None for
    an empty or absent set)."""
    if neurons is None or not len(neurons):
        return None
    return E.make(neurons.site[None], neurons.layer[None], neurons.channel[None],
                  np.asarray(scales, np.float32)[:, None], cfg=cfg)


def continue_texts(model, prompts: Sequence[str], ablations: E.Ablations | None = None, *,
                   max_new_tokens: int, sampling: Sampling = Sampling(), max_tokens: int = 512) -> list[dict]:
    """Continuations of text prompts on a loaded jaxcrit.Model, stopping at its EOS tokens: one
    {prompt, text, tokens, logprobs} per prompt (text decoded without special tokens)."""
    seqs = [model.tokens(p, max_tokens, min_tokens=1).tolist() for p in prompts]
    outs = generate_ids(model.cfg, model.params, seqs, ablations, max_new_tokens=max_new_tokens,
                        sampling=sampling, stop_ids=model.eos)
    return [{"prompt": p, "text": model.tokenizer.decode(o.tokens), "tokens": o.tokens, "logprobs": o.logprobs}
            for p, o in zip(prompts, outs)]


def base_vs_masked(model, prompts: Sequence[str], neurons: NeuronSet, *, max_new_tokens: int,
                   sampling: Sampling, max_tokens: int = 512) -> dict:
    """Each prompt continued by the clean model and with `neurons` zeroed, in one batch (the clean
    rows keep the set at scale 1, so both share one compiled program): generations.json."""
    n = len(prompts)
    outs = continue_texts(model, list(prompts) * 2, ablation(model.cfg, neurons, [1.0] * n + [0.0] * n),
                          max_new_tokens=max_new_tokens, sampling=sampling, max_tokens=max_tokens)
    rows = []
    for base, masked in zip(outs[:n], outs[n:]):
        a, b = base["tokens"], masked["tokens"]
        differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y] or ([min(len(a), len(b))] if len(a) != len(b) else [])
        rows.append({"prompt": base["prompt"], "base": base["text"], "masked": masked["text"],
                     "diverge_at": differ[0] if differ else None,
                     "base_logprob": float(sum(base["logprobs"])), "masked_logprob": float(sum(masked["logprobs"])),
                     "base_tokens": a, "masked_tokens": b})
    return {"neurons": len(neurons), "max_new_tokens": max_new_tokens, "sampling": dataclasses.asdict(sampling),
            "prompts": rows}
