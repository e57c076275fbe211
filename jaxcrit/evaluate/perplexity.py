"""Perplexity of texts before and after masking neuron sets, per text and overall, in log space.

The reference's WikiText rule (investigation/wikitext_evaluator.py of the paper's code): each
text is one sequence cut to max_tokens, and the overall perplexity weights each text's mean token
loss by its length in tokens, len(input_ids): exp(sum_i mean_i * T_i / sum_i T_i).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxcrit import engine as E
from jaxcrit.models.config import ModelConfig
from jaxcrit.models.neurons import NeuronSet
from jaxcrit.progress import Memo, no_memo

BUCKET = 128  # texts are padded to a multiple of this many tokens: one set of compiled programs per bucket (4 at 512 tokens)


def nll_sums(cfg: ModelConfig, params: dict, seqs: Sequence[Sequence[int]], sets: Sequence[NeuronSet], *,
             batch: int = 8, memo: Memo = no_memo, **engine_kw) -> np.ndarray:
    """[N, 2 + S] per text: predicted tokens, clean NLL sum, and the NLL sum with each set masked.

    Texts are sorted by length and go through the engine `batch` at a time, padded to a multiple
    of BUCKET tokens (and short blocks to `batch` texts with copies of their last text), so a
    corpus compiles a handful of programs. Each block's rows are the clean run and each distinct
    set masked (an empty set: the clean run again). memo(key, compute) may keep each block.
    """
    keys = [frozenset(s.keys()) for s in sets]
    distinct = [sets[keys.index(k)] for k in dict.fromkeys(keys)]        # a set named twice is scored once
    row_of = np.array([0] + [1 + list(dict.fromkeys(keys)).index(k) for k in keys])
    K = max([1] + [len(s) for s in distinct])
    entries = np.zeros((3, 1 + len(distinct), K), np.int64)
    scale = np.ones((1 + len(distinct), K), np.float32)
    for r, s in enumerate(distinct, start=1):
        for i, a in enumerate((s.site_index(), s.layer, s.channel)):
            entries[i, r, :len(s)] = a
        scale[r, :len(s)] = 0.0
    abl = E.make(*entries, scale, cfg=cfg)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    batch = min(batch, len(seqs))      # fewer texts than a block: one block of just them

    def block(lo: int) -> np.ndarray:
        idx = order[lo:lo + batch]
        idx = np.concatenate([idx, np.full(batch - len(idx), idx[-1])])
        t = E.Texts.from_ids([list(seqs[i]) for i in idx])
        pad = -t.tokens.shape[1] % BUCKET
        t = E.Texts(np.pad(t.tokens, ((0, 0), (0, pad))), np.pad(t.valid, ((0, 0), (0, pad))))
        eng = E.Engine(cfg, params, t, **{**engine_kw, "chunk": 1, "progress": False})
        n = (t.valid[:, 1:] & t.valid[:, :-1]).sum(1)
        sums = eng.losses(abl, per_token=True).sum(-1)[row_of]                      # [1 + S, B]
        return np.concatenate([n[None], sums]).T.astype(np.float64)                 # [B, 2 + S]

    out = np.zeros((len(seqs), 2 + len(sets)))
    for lo in range(0, len(seqs), batch):
        got = memo(f"block-{lo}", lambda: block(lo))
        take = order[lo:lo + batch]
        out[take] = got[:len(take)]
    return out


def log10_ppl(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From nll_sums' [N, 2 + S]: per text log10 PPL [N, 1 + S] (clean first) and the overall
    [1 + S], each text's mean loss weighted by its length in tokens (predicted + 1)."""
    n = sums[:, :1]
    per_text = sums[:, 1:] / n / E.LN10
    w = n + 1
    return per_text, (per_text * w).sum(0) / w.sum()


def evaluate_sets(cfg: ModelConfig, params: dict, seqs: Sequence[Sequence[int]], sets: Mapping[str, NeuronSet],
                  *, batch: int = 8, memo: Memo = no_memo, **engine_kw) -> dict:
    """Perplexity (log10) of texts clean and with each named set masked.

    Returns {"tokens": [predicted tokens per text], "base": [log10 PPL per text], "sets": {name:
    [log10 PPL per text]}, "overall": {"base": x, name: x, ..., "tokens": total predicted}}.
    """
    sums = nll_sums(cfg, params, seqs, list(sets.values()), batch=batch, memo=memo, **engine_kw)
    per_text, overall = log10_ppl(sums)
    return {"tokens": sums[:, 0].astype(int).tolist(), "base": per_text[:, 0].tolist(),
            "sets": {k: per_text[:, 1 + i].tolist() for i, k in enumerate(sets)},
            "overall": {"base": float(overall[0]), **{k: float(overall[1 + i]) for i, k in enumerate(sets)},
                        "tokens": int(sums[:, 0].sum())}}


def evaluate(cfg: ModelConfig, params: dict, seqs: Sequence[Sequence[int]], texts: Sequence[str],
             neurons: NeuronSet, *, batch: int = 8, memo: Memo = no_memo, **engine_kw) -> dict:
    """Perplexity with and without one set masked: {"texts": [{text, tokens, base_ppl_log10,
    masked_ppl_log10}], "overall": {base_ppl_log10, masked_ppl_log10, tokens}}, PPL in log10
    (never exponentiated), overall token-weighted as the reference does."""
    ev = evaluate_sets(cfg, params, seqs, {"masked": neurons}, batch=batch, memo=memo, **engine_kw)
    rows = [{"text": t, "tokens": n, "base_ppl_log10": b, "masked_ppl_log10": m}
            for t, n, b, m in zip(texts, ev["tokens"], ev["base"], ev["sets"]["masked"])]
    o = ev["overall"]
    return {"texts": rows, "overall": {"base_ppl_log10": o["base"], "masked_ppl_log10": o["masked"],
                                       "tokens": o["tokens"]}}
