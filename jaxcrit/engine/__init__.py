"""The batched perturbation engine: many ablations as one compiled, sharded XLA program.

A batch of perturbations is data (`Ablations`, ablations.py): row r multiplies channel
`channel[r, k]` of site `site[r, k]` in layer `layer[r, k]` by `scale[r, k]` and adds `value[r, k]`.
Each chunk of rows becomes dense per-site masks inside the jitted program and runs as
`vmap(forward)` (program.py); rows may carry edit slots too (edits at chosen positions or adding
vectors: edits.py parses edit dicts into both), and a metric program reads other numbers of the
rows' logits than the loss. The loss is computed in vocabulary chunks (loss.py), so the
[rows, batch, seq, vocab] logits never exist. A row starts inside its first perturbed layer, from
the clean pass's cache (prefix.py); rows are sorted by start point so chunks share it, and results
come back in the caller's order (`Engine`, scoring.py). The hot spots' implementations (XLA's or
fused kernels) are chosen once, by jaxcrit.kernels.selection.

    from jaxcrit import engine as E
    eng = E.Engine(cfg, params, E.Texts.from_ids([tokens]))
    deltas = eng.deltas(E.single(cfg, "down_proj"))
"""
from jaxcrit.engine.ablations import (FIELDS, INACTIVE, Ablations, entries, make, prefixes, random_sets, row_masks,
                                      single)
from jaxcrit.engine.loss import LN10, logsumexp_vocab, target_logit, token_nll
from jaxcrit.engine.prefix import start_points
from jaxcrit.engine.scoring import Engine
from jaxcrit.engine.texts import Texts

__all__ = ["FIELDS", "INACTIVE", "LN10", "Ablations", "Engine", "Texts", "entries", "logsumexp_vocab", "make",
           "prefixes", "random_sets", "row_masks", "single", "start_points", "target_logit", "token_nll"]
