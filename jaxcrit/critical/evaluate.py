"""Perplexity of texts before and after masking a neuron set, per text and overall, in log space."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxcrit import engine as E
from jaxcrit.critical.stage2 import Memo, no_memo
from jaxcrit.models.config import ModelConfig
from jaxcrit.neurons import NeuronSet


def evaluate(cfg: ModelConfig, params: dict, seqs: Sequence[Sequence[int]], texts: Sequence[str],
             neurons: NeuronSet, *, batch: int = 8, memo: Memo = no_memo, **engine_kw) -> dict:
    """Token-weighted perplexity (the reference's WikiText rule) with and without `neurons` masked.

    Texts go through the engine `batch` at a time; memo(key, compute) may keep each block's
    [tokens, base NLL sum, masked NLL sum] per text. Returns {"texts": [{text, tokens,
    base_ppl_log10, masked_ppl_log10}], "overall": {...}}, PPL in log10 (never exponentiated).
    """
    # row 0 leaves every entry as it is (scale 1): the clean run, in the same compiled program
    abl = E.make(neurons.site[None], neurons.layer[None], neurons.channel[None], np.array([[1.0], [0.0]]), cfg=cfg)

    def block(lo: int) -> np.ndarray:
        texts_b = E.Texts.from_ids(list(seqs[lo:lo + batch]))
        eng = E.Engine(cfg, params, texts_b, **{**engine_kw, "chunk": 2, "progress": False})
        n = (texts_b.valid[:, 1:] & texts_b.valid[:, :-1]).sum(1)
        base, masked = eng.losses(abl, per_token=True).sum(-1)                                  # [2, B]
        return np.stack([n, base, masked], axis=1).astype(np.float64)                             # [B, 3]

    sums = np.concatenate([memo(f"block-{lo}", lambda: block(lo)) for lo in range(0, len(seqs), batch)])
    rows = [{"text": t, "tokens": int(n), "base_ppl_log10": float(b / n / E.LN10),
             "masked_ppl_log10": float(m / n / E.LN10)} for t, (n, b, m) in zip(texts, sums)]
    w = sums[:, 0]
    overall = {"base_ppl_log10": float(sums[:, 1].sum() / w.sum() / E.LN10),
               "masked_ppl_log10": float(sums[:, 2].sum() / w.sum() / E.LN10), "tokens": int(w.sum())}
    return {"texts": rows, "overall": overall}
