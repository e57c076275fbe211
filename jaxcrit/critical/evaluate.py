"""Perplexity of texts before and after masking a neuron set, per text and overall, in log space."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxcrit import engine as E
from jaxcrit.models.config import ModelConfig

LN10 = E.LN10


def evaluate(cfg: ModelConfig, params: dict, seqs: Sequence[Sequence[int]], texts: Sequence[str],
             neurons: E.Ablations, *, batch: int = 8, **engine_kw) -> dict:
    """Token-weighted perplexity (the reference's WikiText rule) with and without `neurons`.

    neurons: one row, the set to mask. Returns {"texts": [{text, tokens, base_ppl_log10,
    masked_ppl_log10}], "overall": {...}} with PPL in log10 (never exponentiated: no overflow).
    """
    rows = []
    for lo in range(0, len(seqs), batch):
        part = list(seqs[lo:lo + batch])
        texts_b = E.Texts.from_ids(part)
        eng = E.Engine(cfg, params, texts_b, **{**engine_kw, "chunk": 1, "progress": False})
        nll = eng.losses(neurons, per_token=True)[0]            # [B, T-1]
        base = eng.losses(None, per_token=True)[0]
        n = (texts_b.valid[:, 1:] & texts_b.valid[:, :-1]).sum(1)
        for i, t in enumerate(texts[lo:lo + batch]):
            rows.append({"text": t, "tokens": int(n[i]),
                         "base_ppl_log10": float(base[i].sum() / n[i] / LN10),
                         "masked_ppl_log10": float(nll[i].sum() / n[i] / LN10)})
    w = np.array([r["tokens"] for r in rows], float)
    overall = {k: float((np.array([r[k] for r in rows]) * w).sum() / w.sum())
               for k in ("base_ppl_log10", "masked_ppl_log10")}
    overall["tokens"] = int(w.sum())
    return {"texts": rows, "overall": overall}
