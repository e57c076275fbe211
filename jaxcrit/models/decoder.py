"""The decoder: one pure forward for every family (models/module.py holds params in a Flax NNX module).

Perturbations are data: `masks[site]` is a [layers, channels] array multiplied into that site's
output at every position (0 ablates), `values[site]` is added after it (mean-ablation style);
then `edits` (models/edits.py: slots at chosen positions, or adding vectors) apply. Absent sites
cost nothing. The forward is a function of arrays only, so `jax.vmap` over a batch of masks
runs thousands of ablations in one XLA program.

A layer is assembled once (`layer`: the attention branch, then the MLP branch, each added to the
residual); the full forward (`block`, `forward`), the engine's prefix sharing and generation's
cached step all run it or its branches. The hot spots' implementations are handed in
(`LayerKernels`, chosen by jaxcrit.kernels.selection); the default is XLA's, exact.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxcrit.models import edits as slot_edits
from jaxcrit.models.config import ModelConfig, rope_inv_freq
from jaxcrit.models.params import param_table
from jaxcrit.dist.sharding import gathered

# For jax.jit(compiler_options=...) of the programs that run the decoder on GPUs: GEMMs go to
# cuBLAS. XLA's own Triton GEMMs made a decoder layer ~4 % slower on the H200, and autotuning
# their tiles was a third of the compile time of the 32B shape's pipeline (docs/benchmarks.md).
# Ignored off GPUs.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

Array = jax.Array
Params = Mapping[str, Array]
SiteArrays = Mapping[str, Array]

RESID = "resid"  # capture key of the residual stream entering each layer, and the last output [L+1, B, T, D]


def precision(dtype) -> jax.lax.Precision | None:
    """f32 models get true f32 matmuls (no TF32 on GPUs): parity with transformers is the point."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def mm(x: Array, w: Array) -> Array:
    """x @ w at the precision the dtype asks for."""
    return jnp.matmul(x, w, precision=precision(x.dtype))


def rms_scale(x: Array, eps: float) -> Array:
    """RMSNorm's row scale 1 / rms(x) [..., 1] (f32) of x [..., D]."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm(x: Array, w: Array, eps: float, plus_one: bool) -> Array:
    """RMSNorm in f32, cast back as transformers does (Gemma scales by 1 + w before the cast)."""
    xf = x.astype(jnp.float32) * rms_scale(x, eps)
    if plus_one:
        return (xf * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w * xf.astype(x.dtype)


def norm(cfg: ModelConfig, x: Array, w: Array) -> Array:
    """The model's RMSNorm of x [..., D] with gain w [D]."""
    return rms_norm(x, w, cfg.norm_eps, cfg.family.norm_plus_one)


def folded(norm_w: Array, w: Array, plus_one: bool) -> Array:
    """A GEMM's weight [D, C] with the RMSNorm before it folded in: rms_norm(x) @ w equals
    rms_scale(x) * (x @ folded(...)) up to the dtype's rounding. Layers run with folded norms
    (`LayerKernels.fold_norms`) write no normed copy of the residual: the GEMMs read the residual
    itself and the scale goes to their outputs."""
    gain = norm_w.astype(jnp.float32) + (1.0 if plus_one else 0.0)
    return (gain[:, None] * w.astype(jnp.float32)).astype(w.dtype)


def act(name: str, x: Array) -> Array:
    """The MLP's gate activation (Family.act)."""
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[Array, Array]:
    """cos, sin [seq, head_dim] in f32, rotate-half layout."""
    return rope_at(cfg, jnp.arange(seq_len), seq_len)


def rope_at(cfg: ModelConfig, positions: Array, length) -> tuple[Array, Array]:
    """cos, sin [T, head_dim] in f32 at positions [T] of a sequence `length` tokens long.

    Both may be traced (generation's cached steps). The length matters for longrope alone: past
    rope_original_max its long factors apply, as transformers picks them (from the largest
    position + 1 of each forward call).
    """
    inv, scale = rope_inv_freq(cfg, 0)
    if cfg.rope_type == "longrope":
        long, _ = rope_inv_freq(cfg, cfg.rope_original_max + 1)
        inv = jnp.where(length > cfg.rope_original_max, jnp.asarray(long), jnp.asarray(inv))
    ang = jnp.asarray(positions, jnp.float32)[:, None] * jnp.asarray(inv)[None, :]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang) * scale, jnp.sin(ang) * scale


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, H, hd]; rotate-half RoPE computed in x's dtype as transformers does."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[None, :, None, :].astype(x.dtype), sin[None, :, None, :].astype(x.dtype)
    return x * c + rot * s


def _edit(out: Array, name: str, masks: SiteArrays | None, values: SiteArrays | None) -> Array:
    if masks is not None and name in masks:
        out = out * masks[name].astype(out.dtype)
    if values is not None and name in values:
        out = out + values[name].astype(out.dtype)
    return out


def attention_bias(cfg: ModelConfig, T: int, valid: Array | None, positions: Array | None = None) -> Array:
    """Additive mask [B, 1, 1, Tq, T] ([1, ...] when valid is None: no padding): causal, key
    padding, sliding window. T keys; positions [Tq]: the queries' positions (default: arange(T),
    the keys' own)."""
    i = (jnp.arange(T) if positions is None else positions)[:, None]
    j = jnp.arange(T)[None, :]
    ok = j <= i
    if cfg.sliding_window:
        ok = ok & (i - j < cfg.sliding_window)
    ok = ok[None] if valid is None else ok[None] & valid[:, None, :]
    return jnp.where(ok, 0.0, -jnp.inf)[:, None, None].astype(jnp.float32)


def attend(cfg: ModelConfig, q: Array, k: Array, v: Array, valid: Array | None,
           positions: Array | None = None) -> Array:
    """Causal GQA attention, einsum with an f32 softmax (the exact reference form). q [B, Tq, H, hd],
    k/v [B, T, KV, hd] -> [B, Tq, H, hd]; valid [B, T] marks the keys (None: no padding).
    positions [Tq]: the queries' positions among the keys, for queries that are not the keys' own
    sequence (generation's KV cache); default: Tq = T, the same positions.
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    # batch axes first, as batched GEMMs want them: XLA:CPU ran the [b, t, k, g, d] form 3.5x slower
    q = q.reshape(B, T, KV, H // KV, hd).transpose(0, 2, 3, 1, 4)                    # [B, KV, G, T, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                         # [B, KV, T, hd]
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32, precision=precision(q.dtype))
    s = s * (1.0 / math.sqrt(hd)) + attention_bias(cfg, k.shape[2], valid, positions)
    a = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", a, v, precision=precision(v.dtype)).transpose(0, 3, 1, 2, 4)


def editor(masks: SiteArrays | None, values: SiteArrays | None, record: dict[str, Array] | None = None,
           edits: slot_edits.Slots | None = None, layer=None):
    """site(name, out): applies the site's edit to a module output (and records it in `record`):
    its masks and values (one layer's [C]), then the edit slots of `layer` (may be traced). The
    one place an edit meets an activation: the forward, the engine's rows and generation use it."""
    def site(name: str, out: Array) -> Array:
        out = _edit(out, name, masks, values)
        if edits is not None:
            out = slot_edits.apply(edits, name, layer, out)
        if record is not None:
            record[name] = out
        return out
    return site


class LayerKernels(NamedTuple):
    """The implementations a layer runs at its hot spots (jaxcrit.kernels.selection picks them).
    attend(cfg, q, k, v, valid) -> [B, T, H, hd]: the attention, as `attend` computes it.
    swiglu(x, s, gate_w, up_w) -> act(s * (x @ gate_w)) * (s * (x @ up_w)) [..., F], s each
    row's scale [...] f32: a fused MLP for the layers without edits; None: XLA's GEMMs.
    fold_norms: the layers without edits run both RMSNorms folded into the GEMMs after them."""
    attend: Callable[..., Array] = attend
    swiglu: Callable[[Array, Array, Array, Array], Array] | None = None
    fold_norms: bool = False


XLA = LayerKernels()   # XLA's ops everywhere, exact


def qkv(cfg: ModelConfig, p: Params, h: Array, cos: Array, sin: Array, site, fold: bool = False
        ) -> tuple[Array, Array, Array]:
    """The attention's q [B, T, H, hd] and k, v [B, T, KV, hd] of the residual h [B, T, D]:
    site-edited projections, q/k-normed (Qwen3) and rotated (cos, sin [T, hd]). fold: the input
    norm folded into the projections (`folded`)."""
    B, T, _ = h.shape
    if fold:
        scale, gain = rms_scale(h, cfg.norm_eps), p["input_norm"]
        proj = lambda n: scale * mm(h, folded(gain, p[n + "_w"], cfg.family.norm_plus_one)).astype(scale.dtype)
    else:
        x = norm(cfg, h, p["input_norm"])
        proj = lambda n: mm(x, p[n + "_w"])
    q, k, v = (proj(n) for n in "qkv")
    if "q_b" in p:
        q, k, v = q + p["q_b"], k + p["k_b"], v + p["v_b"]
    q, k, v = (site(n + "_proj", a.astype(h.dtype)) for n, a in zip("qkv", (q, k, v)))
    hd, KV = cfg.head_dim, cfg.n_kv_heads
    q = q.reshape(B, T, cfg.n_heads, hd)
    k = k.reshape(B, T, KV, hd)
    v = v.reshape(B, T, KV, hd)
    if cfg.family.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.norm_eps, False)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps, False)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def attention_output(cfg: ModelConfig, p: Params, o: Array, site) -> Array:
    """o_proj of the heads' outputs o [B, T, H, hd]: [B, T, D], site-edited."""
    B, T = o.shape[:2]
    o = mm(o.reshape(B, T, cfg.q_dim), p["o_w"])
    if "o_b" in p:
        o = o + p["o_b"]
    return site("o_proj", o)


def attention(cfg: ModelConfig, p: Params, h: Array, cos: Array, sin: Array, site,
              attend_qkv: Callable[[Array, Array, Array], Array], fold: bool = False) -> Array:
    """The attention branch's output o_proj(attention(norm(h))) [B, T, D], site-edited, of the
    residual h [B, T, D]; attend_qkv(q, k, v) -> [B, T, H, hd] runs the attention (`attend` or a
    kernel; generation's puts the keys and values into its cache first). fold as in `qkv`."""
    return attention_output(cfg, p, attend_qkv(*qkv(cfg, p, h, cos, sin, site, fold)), site)


def hidden(cfg: ModelConfig, g: Array, u: Array, site) -> Array:
    """The MLP's hidden activations act(g) * u [..., F] of the (edited) gate and up outputs, the
    act_fn site edited."""
    return site("act_fn", act(cfg.family.act, g)) * u


def mlp_out(cfg: ModelConfig, p: Params, mid: Array, site, swiglu: Callable | None = None, fold: bool = False
            ) -> Array:
    """The MLP branch's output down_proj(act(gate(x)) * up(x)) [B, T, D], site-edited, of the
    post-attention residual mid [B, T, D] (x: its post_attention_layernorm). For a layer without
    edits: swiglu (`LayerKernels`) computes act(gate(x)) * up(x) in one kernel; fold: the norm
    folded into gate and up (`folded`), which then read mid itself, each row's scale on their outputs."""
    gate, up = p["gate_w"], p["up_w"]
    if fold:
        scale = rms_scale(mid, cfg.norm_eps)                                       # [B, T, 1] f32
        gate, up = (folded(p["post_norm"], w, cfg.family.norm_plus_one) for w in (gate, up))
        x = mid
        gemm = lambda w: (scale * mm(x, w).astype(scale.dtype)).astype(x.dtype)
    else:
        scale = None
        x = site("post_attention_layernorm", norm(cfg, mid, p["post_norm"]))
        gemm = lambda w: mm(x, w)
    if swiglu is not None:
        m = swiglu(x, jnp.ones(x.shape[:-1], jnp.float32) if scale is None else scale[..., 0], gate, up)
    else:
        m = hidden(cfg, site("gate_proj", gemm(gate)), site("up_proj", gemm(up)), site)
    return site("down_proj", mm(m, p["down_w"]))


def layer(cfg: ModelConfig, p: Params, h: Array, cos: Array, sin: Array, site,
          attend_qkv: Callable[[Array, Array, Array], Array], swiglu: Callable | None = None,
          fold: bool = False) -> Array:
    """One decoder layer's output [B, T, D] of the residual h entering it: the attention branch,
    then the MLP branch, each added to the residual. p: this layer's params (one layer's slice);
    attend_qkv as in `attention`; swiglu and fold as in `mlp_out` (a layer without edits only)."""
    mid = h + attention(cfg, p, h, cos, sin, site, attend_qkv, fold)
    return mid + mlp_out(cfg, p, mid, site, swiglu, fold)


def layer_params(cfg: ModelConfig, p: Params) -> Params:
    """One layer's slice of the stacked params, gathered over 'data' under FSDP (sharding.gathered)."""
    table = param_table(cfg)
    return gathered(p, {k: table[k][1][1:] for k in p})


class Earlier(NamedTuple):
    """The positions before a layer's own, for a layer run over the later positions alone: the
    residual entering the layer there, h [B, P, D], and their rope tables cos, sin [P, hd]. Their
    keys and values are computed from h unedited (nothing edits a position before the first
    edited one) and prepended to the layer's own; the queries sit at positions P.. ."""
    h: Array
    cos: Array
    sin: Array


def block(cfg: ModelConfig, p: Params, h: Array, valid: Array | None, cos: Array, sin: Array,
          masks: SiteArrays | None, values: SiteArrays | None, kernels: LayerKernels = XLA,
          edits: slot_edits.Slots | None = None, layer_index=None, earlier: Earlier | None = None
          ) -> tuple[Array, dict[str, Array]]:
    """One decoder layer of the stacked params' slice p and its edits: (its output [B, T, D], its
    sites' outputs {site: [B, T, C]}). edits: slots, applied where their layer is layer_index.
    A layer without masks, values or slots runs the kernels' fused MLP and folded norms (an
    edited layer needs its pieces). earlier: h holds positions P.. alone, and these the positions
    before them (`Earlier`; valid [B, P + T] then marks all keys); attention is XLA's there."""
    p = layer_params(cfg, p)
    sites: dict[str, Array] = {}
    site = editor(masks, values, sites, edits, layer_index)
    unedited = masks is None and values is None and edits is None
    attend_qkv = lambda q, k, v: kernels.attend(cfg, q, k, v, valid)
    if earlier is not None:
        _, k0, v0 = qkv(cfg, p, earlier.h, earlier.cos, earlier.sin, editor(None, None))
        P = earlier.h.shape[1]
        attend_qkv = lambda q, k, v: attend(cfg, q, jnp.concatenate([k0, k], 1), jnp.concatenate([v0, v], 1), valid,
                                            P + jnp.arange(q.shape[1]))
    out = layer(cfg, p, h, cos, sin, site, attend_qkv, kernels.swiglu if unedited else None,
                unedited and kernels.fold_norms)
    return out, sites


def stacked_params(params: Params) -> dict[str, Array]:
    """The stacked per-layer params [L, ...] (all but the embedding, lm_head and final norm)."""
    return {k: v for k, v in params.items() if k not in ("embed", "lm_head", "final_norm")}


def embed(cfg: ModelConfig, params: Params, tokens: Array) -> Array:
    """Token embeddings E(x) [B, T, D], before any model-internal scaling (gathered over 'data'
    under FSDP, so the residual stream is not split like the table)."""
    return gathered({"e": jnp.take(params["embed"], tokens, axis=0)}, {"e": ("tokens", "tokens", "embed")})["e"]


def scale_embeds(cfg: ModelConfig, embeds: Array) -> Array:
    """The residual stream entering layer 0 from E(x) [B, T, D] (Gemma scales by sqrt(d_model))."""
    if cfg.family.embed_scale:
        return embeds * jnp.asarray(math.sqrt(cfg.d_model), embeds.dtype)
    return embeds


def forward(cfg: ModelConfig, params: Params, embeds: Array, valid: Array | None = None, *,
            masks: SiteArrays | None = None, values: SiteArrays | None = None,
            capture: tuple[str, ...] = (), observe=None, kernels: LayerKernels = XLA, remat: bool = False,
            edits: slot_edits.Slots | None = None) -> tuple[Array, dict[str, Array]]:
    """Runs the layers.

    embeds [B, T, D] are E(x) (noise is added to these); valid [B, T] marks real tokens (right
    padding; None: no padding). masks/values: site -> [L, C]; edits: slots (models/edits.py),
    applied after them. capture: site names (and RESID, the residual entering each layer) whose
    per-layer values are returned stacked [L, B, T, C].
    observe: a function of one layer's site outputs {site: [B, T, C]} returning a pytree; its
    per-layer results come back stacked under "observed" ([L, ...]). It reduces inside the layer
    scan, so nothing of size [L, B, T, C] is kept (Stage 1's |clean - noisy| sums).
    kernels: the layers' implementations (`LayerKernels`).
    remat: recompute each layer in the backward pass instead of keeping its activations (a
    gradient then holds one residual per layer, not every intermediate).
    Returns the final-normed hidden state [B, T, D] and the captures.
    """
    T = embeds.shape[1]
    h = scale_embeds(cfg, embeds)
    cos, sin = rope_tables(cfg, T)
    layer_p = stacked_params(params)

    def step(h, x):
        p, m, vals, i = x
        out, sites = block(cfg, p, h, valid, cos, sin, m or None, vals or None, kernels, edits, i)
        ys = {n: sites[n] for n in capture if n != RESID}
        if observe is not None:
            ys["observed"] = observe(sites)
        if RESID in capture:
            ys[RESID] = h
        return out, ys

    index = None if edits is None else jnp.arange(cfg.n_layers)   # the layer a slot's edit is in
    h, ys = jax.lax.scan(jax.checkpoint(step) if remat else step, h, (layer_p, masks or {}, values or {}, index))
    if RESID in capture:
        ys[RESID] = jnp.concatenate([ys[RESID], h[None]])
    return final_norm(cfg, params, h), ys


def final_norm(cfg: ModelConfig, params: Params, h: Array) -> Array:
    """The last layer's output h [..., D] normed as the unembedding reads it."""
    return norm(cfg, h, params["final_norm"])


def unembed(cfg: ModelConfig, params: Params) -> Array:
    """The output matrix [V, D] (the embedding when tied)."""
    return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def logits(cfg: ModelConfig, params: Params, h: Array) -> Array:
    """Full logits [B, T, V] in f32: for parity checks and small models, not the engine's path."""
    return jnp.einsum("btd,vd->btv", h, unembed(cfg, params), preferred_element_type=jnp.float32,
                      precision=precision(h.dtype))

