"""Every site of every family, edited through the decoder's masks and values, against transformers.

Reference: the transformers model of hf_models.build (eager attention, f32) with the same edit
made by a PyTorch forward hook on the HF module the site is named after (phi3's fused qkv_proj
and gate_up_proj: the site's slice of the fused output): out[..., c] = out[..., c] * m + v,
the decoder's contract (the mask multiplies, then the value adds). So an edit placed on the
wrong side of a bias (Qwen2's q/k/v), of a norm (Qwen3's q/k norm, Gemma's plus-one norm) or of
an activation shows up in the logits.

Each site is edited alone at one channel near its end, at a layer that differs by site, three
ways (EDITS: zeroed, scaled, scaled with a value added); then all nine sites at once, each way.
(A value added to k_proj's last channels hardly shows alone: RoPE turns them slowly, so it shifts
all of a query's scores nearly alike; the sign-flipping mask of that row is what moves them.)
All rows of a family run as one vmapped jaxcrit call; full f32 logits of a right-padded batch
are compared on the real tokens with test_parity's tolerance.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from jaxcrit.models import decoder as dec
from jaxcrit.models.sites import SITE_NAMES, width
from test_parity import TOL, Loaded, inputs, rel_err, torch_logits

EDITS = {"zero": (0.0, 0.0), "scale": (3.0, 0.0), "scale+add": (-2.0, 1.5)}   # (mask, value)
T, PAD = 37, 7      # sequence length, right padding of the batch's second row


def placements(cfg) -> dict[str, tuple[int, int]]:
    """site -> (layer, channel): a different layer for consecutive sites, channels near the end."""
    return {n: (i % cfg.n_layers, width(cfg, n) - 1 - i) for i, n in enumerate(SITE_NAMES)}


def rows(cfg) -> list[tuple[str, dict[str, tuple[int, int, float, float]]]]:
    """(label, {site: (layer, channel, mask, value)}): each site alone, each edit; then all sites."""
    where = placements(cfg)
    out = [(f"{n} {e}", {n: (*where[n], m, v)}) for n in SITE_NAMES for e, (m, v) in EDITS.items()]
    return out + [(f"all sites {e}", {n: (*where[n], m, v) for n in SITE_NAMES}) for e, (m, v) in EDITS.items()]


@functools.partial(jax.jit, static_argnums=0)
def edited_logits(cfg, params, tokens, valid, masks, values):
    """Logits [R, B, T, V] of tokens [B, T] under R rows of edits; masks, values: site -> [R, L, C]."""
    def one(m, v):
        h, _ = dec.forward(cfg, params, dec.embed(cfg, params, tokens), valid, masks=m, values=v)
        return dec.logits(cfg, params, h)
    return jax.vmap(one)(masks, values)


def edit_arrays(cfg, edits) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Dense masks (ones) and values (zeros) site -> [R, L, C] holding each row's edits."""
    R = len(edits)
    masks = {n: np.ones((R, cfg.n_layers, width(cfg, n)), np.float32) for n in SITE_NAMES}
    values = {n: np.zeros((R, cfg.n_layers, width(cfg, n)), np.float32) for n in SITE_NAMES}
    for r, (_, row) in enumerate(edits):
        for n, (layer, c, m, v) in row.items():
            masks[n][r, layer, c], values[n][r, layer, c] = m, v
    return masks, values


def hf_edited_logits(model, arch: str, cfg, edits, ids: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """transformers' logits [R, B, T, V]: the batch repeated once per row in one forward, each
    row's edits made by forward hooks out * m + v with per-sequence [R * B, 1, out] m and v."""
    R, B = len(edits), ids.shape[0]
    per_module: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for r, (_, row) in enumerate(edits):
        for n, (layer, c, m, v) in row.items():
            mod, offset = hf_models.hf_site(model, arch, cfg, n, layer)
            if mod not in per_module:
                out = mod.out_features if isinstance(mod, torch.nn.Linear) else width(cfg, n)
                per_module[mod] = (torch.ones(R, out), torch.zeros(R, out))
            per_module[mod][0][r, offset + c] = m
            per_module[mod][1][r, offset + c] = v

    def hook(m: torch.Tensor, v: torch.Tensor):
        m, v = (a.repeat_interleave(B, dim=0)[:, None] for a in (m, v))
        return lambda mod, args, out: out * m + v

    handles = [mod.register_forward_hook(hook(*mv)) for mod, mv in per_module.items()]
    try:
        out = torch_logits(model, np.tile(ids, (R, 1)), np.tile(valid, (R, 1)))
    finally:
        for h in handles:
            h.remove()
    return out.reshape(R, B, *out.shape[1:])


@pytest.fixture(scope="module", params=sorted(hf_models.CONFIGS))
def family(request, tmp_path_factory) -> tuple[str, Loaded]:
    return request.param, Loaded(request.param, tmp_path_factory.mktemp(request.param))


def test_site_edits_match_transformers(family):
    arch, m = family
    cfg = m.cfg
    ids, valid = inputs(cfg.vocab_size, T, PAD, seed=1)
    edits = rows(cfg)
    masks, values = edit_arrays(cfg, edits)
    got = np.asarray(edited_logits(cfg, m.params, jnp.asarray(ids), jnp.asarray(valid), masks, values))
    clean = torch_logits(m.torch, ids, valid)
    want = hf_edited_logits(m.torch, arch, cfg, edits, ids, valid)
    still, wrong = [], []
    for (label, row), a, b in zip(edits, got, want):
        moved, err = rel_err(b[valid], clean[valid]), rel_err(a[valid], b[valid])
        if moved <= 10 * TOL:
            still.append(f"{label}: {moved:.1e}")
        if err > TOL:
            wrong.append(f"{label} at {[row[n][:2] for n in row]}: {err:.2e}")
    assert not still, f"{arch}: edits that barely moved transformers' logits: {still}"
    assert not wrong, f"{arch}: relative errors against transformers above {TOL}: {wrong}"
