"""The decoder: one pure forward for every family, plus the Flax NNX module that holds params.

Perturbations are data: `masks[site]` is a [layers, channels] array multiplied into that site's
output at every position (0 ablates), `values[site]` is added after it (mean-ablation style).
Absent sites cost nothing. The forward is a function of arrays only, so `jax.vmap` over a batch
of masks runs thousands of ablations in one XLA program.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp

from jaxcrit.kernels import fused_mlp
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


def folded(norm_w: Array, w: Array, plus_one: bool) -> Array:
    """A GEMM's weight [D, C] with the RMSNorm before it folded in: rms_norm(x) @ w equals
    rms_scale(x) * (x @ folded(...)) up to the dtype's rounding. The layers no row edits run
    their norms so on the fused path (`mlp_impl` "pallas"): no normed copy of the residual is
    written, the GEMMs read the residual itself and the scale goes to their outputs."""
    gain = norm_w.astype(jnp.float32) + (1.0 if plus_one else 0.0)
    return (gain[:, None] * w.astype(jnp.float32)).astype(w.dtype)


def _act(name: str, x: Array) -> Array:
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


def attend(cfg: ModelConfig, q: Array, k: Array, v: Array, valid: Array | None, impl: str,
           positions: Array | None = None) -> Array:
    """Causal GQA attention. q [B, Tq, H, hd], k/v [B, T, KV, hd] -> [B, Tq, H, hd]; valid [B, T]
    marks the keys (None: no padding).

    impl "xla": einsum with an f32 softmax (exact reference path); "cudnn": the fused
    flash-attention kernel (GPU, bf16/fp16), which never materialises the [T, T] scores (given
    no sequence lengths when there is no padding: its faster kernel on the H200).
    positions [Tq] (xla only): the queries' positions among the keys, for queries that are not
    the keys' own sequence (generation's KV cache); default: Tq = T, the same positions.
    """
    B, T, H, hd = q.shape
    KV = k.shape[2]
    if impl == "cudnn":
        lengths = None if valid is None else valid.sum(-1).astype(jnp.int32)
        window = (cfg.sliding_window - 1, 0) if cfg.sliding_window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                            key_value_seq_lengths=lengths, local_window_size=window,
                                            implementation="cudnn")
    # batch axes first, as batched GEMMs want them: XLA:CPU ran the [b, t, k, g, d] form 3.5x slower
    q = q.reshape(B, T, KV, H // KV, hd).transpose(0, 2, 3, 1, 4)                    # [B, KV, G, T, hd]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                         # [B, KV, T, hd]
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32, precision=precision(q.dtype))
    s = s * (1.0 / math.sqrt(hd)) + attention_bias(cfg, k.shape[2], valid, positions)
    a = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", a, v, precision=precision(v.dtype)).transpose(0, 3, 1, 2, 4)


def editor(masks: SiteArrays | None, values: SiteArrays | None, record: dict[str, Array] | None = None):
    """site(name, out): applies the site's edit to a module output (and records it in `record`)."""
    def site(name: str, out: Array) -> Array:
        out = _edit(out, name, masks, values)
        if record is not None:
            record[name] = out
        return out
    return site


def _attention_out(cfg: ModelConfig, p: Params, h: Array, valid: Array | None, cos: Array, sin: Array, site,
                   attn_impl: str, fold: bool = False) -> Array:
    """The attention branch's output o_proj(attn(norm(h))) [B, T, D], site-edited; h [B, T, D]."""
    q, k, v = qkv(cfg, p, h, cos, sin, site, fold)
    return attention_output(cfg, p, attend(cfg, q, k, v, valid, attn_impl), site)


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
        x = rms_norm(h, p["input_norm"], cfg.norm_eps, cfg.family.norm_plus_one)
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


def mlp_out(cfg: ModelConfig, p: Params, mid: Array, site, impl: str = "xla") -> Array:
    """The MLP's output down_proj(act(gate(x)) * up(x)) [B, T, D], site-edited, of the
    post-attention residual `mid` [B, T, D] (x is its post_attention_layernorm). impl "pallas":
    act(gate(x)) * up(x) by the fused kernel (models/fused_mlp.py) with the norm folded in
    (`folded`), for layers without edits."""
    if impl == "pallas":
        fold = lambda w: folded(p["post_norm"], w, cfg.family.norm_plus_one)
        scale = rms_scale(mid, cfg.norm_eps)[..., 0]
        return mm(fused_mlp.swiglu(mid, scale, fold(p["gate_w"]), fold(p["up_w"])), p["down_w"])
    x = site("post_attention_layernorm", rms_norm(mid, p["post_norm"], cfg.norm_eps, cfg.family.norm_plus_one))
    g = site("gate_proj", mm(x, p["gate_w"]))
    u = site("up_proj", mm(x, p["up_w"]))
    a = site("act_fn", _act(cfg.family.act, g))
    return site("down_proj", mm(a * u, p["down_w"]))


def layer_params(cfg: ModelConfig, p: Params) -> Params:
    """One layer's slice of the stacked params, gathered over 'data' under FSDP (sharding.gathered)."""
    table = param_table(cfg)
    return gathered(p, {k: table[k][1][1:] for k in p})


def block(cfg: ModelConfig, p: Params, h: Array, valid: Array | None, cos: Array, sin: Array,
          masks: SiteArrays | None, values: SiteArrays | None, attn_impl: str = "xla", mlp_impl: str = "xla"
          ) -> tuple[Array, dict[str, Array]]:
    """One decoder layer. p holds this layer's slice of the stacked params; h [B, T, D].
    mlp_impl "pallas" applies to a layer without masks or values (an edited MLP needs its pieces);
    such a layer runs both its norms folded into the GEMMs after them (`folded`)."""
    p = layer_params(cfg, p)
    sites: dict[str, Array] = {}
    site = editor(masks, values, sites)
    fast = masks is None and values is None and mlp_impl == "pallas"   # an unedited layer on the fused path
    mid = h + _attention_out(cfg, p, h, valid, cos, sin, site, attn_impl, fold=fast)
    return mid + mlp_out(cfg, p, mid, site, "pallas" if fast else "xla"), sites


# Where a perturbed row can start inside its first perturbed layer S (site-level prefix sharing).
# The clean pass caches, per layer, the residual entering it and its o_proj and down_proj outputs
# (`Cache`); the post-attention residual, the MLP's input and the layer's output follow from these
# by the layer's own ops, so every entry gives the numbers the full layer gives.
#   layer: the residual entering S; all of layer S runs (q/k/v edits change the attention).
#   mlp:   the post-attention residual, o_proj's edit applied; layer S's MLP runs.
#   out:   layer S's output from the clean MLP: down_proj's output edited in place, plus the
#          exact rank-1 change of one MLP hidden channel j (gate/up/act edits of that channel:
#          (m'_j - m_j) * down_w[j], where m_j = act(gate_j) * up_j); nothing of layer S runs.
ENTRIES = ("layer", "mlp", "out")
LAYER, MLP, OUT = range(len(ENTRIES))
HIDDEN = ("gate_proj", "up_proj", "act_fn")  # MLP hidden-axis sites: "out" holds one channel of them
SITE_ENTRY: dict[str, int] = {"q_proj": LAYER, "k_proj": LAYER, "v_proj": LAYER, "o_proj": MLP,
                              "post_attention_layernorm": MLP, "gate_proj": OUT, "up_proj": OUT,
                              "act_fn": OUT, "down_proj": OUT}


def _hidden_change(cfg: ModelConfig, p: Params, mid: Array, masks: SiteArrays, values: SiteArrays | None
                   ) -> Array:
    """The change of down_proj's output [B, T, D] (f32) when the layer's edits of the MLP hidden
    sites touch one channel j alone (j found from the [F] masks/values; any j when none)."""
    edited = [masks[n] != 1 for n in HIDDEN if n in masks]
    edited += [values[n] != 0 for n in HIDDEN if values is not None and n in values]
    j = jnp.argmax(functools.reduce(jnp.logical_or, edited))
    x = rms_norm(mid, p["post_norm"], cfg.norm_eps, cfg.family.norm_plus_one)
    column = lambda w: jnp.einsum("btd,d->bt", x, w[:, j], precision=precision(x.dtype))
    g, u = column(p["gate_w"]), column(p["up_w"])
    at_j = lambda arrs: None if arrs is None else {n: arrs[n][j] for n in HIDDEN if n in arrs}

    def m(site) -> Array:
        return site("act_fn", _act(cfg.family.act, site("gate_proj", g))) * site("up_proj", u)

    change = m(editor(at_j(masks), at_j(values))).astype(jnp.float32) - m(editor(None, None)).astype(jnp.float32)
    return change[..., None] * p["down_w"][j].astype(jnp.float32)


class Cache(NamedTuple):
    """What the clean pass keeps for rows to start at any entry of any layer."""
    resid: Array   # [L + 1, B, T, D] the residual entering each layer, and the last layer's output
    attn: Array    # [L, B, T, D] each layer's o_proj output (the attention branch, bias included)
    mlp: Array     # [L, B, T, D] each layer's down_proj output


def clean_cache(cfg: ModelConfig, params: Params, tokens: Array, valid: Array | None) -> tuple[Array, Cache]:
    """The clean forward: (final-normed hidden state [B, T, D], the Cache)."""
    h, ys = forward(cfg, params, embed(cfg, params, tokens), valid, capture=("o_proj", "down_proj", RESID))
    return h, Cache(ys[RESID], ys["o_proj"], ys["down_proj"])


def resume(cfg: ModelConfig, params: Params, cache: Cache, valid: Array | None, start: Array, *,
           masks: SiteArrays, values: SiteArrays | None = None, edited: Array | None = None,
           attn_impl: str = "xla", mlp_impl: str = "xla") -> Array:
    """The perturbed forward of one row from a start point: the final-normed hidden state [B, T, D].

    start: int32 [2], (layer S, entry index into ENTRIES), traced: one compiled program serves
    every start point (the entry is a `lax.switch` on it, which stays a real branch under vmap as
    long as start is not batched). masks/values: site -> [L, C]; the row's edits at layers below
    S must be none, and at S only of sites its entry allows (SITE_ENTRY; "out": one hidden channel).
    edited: [L] bool, unbatched, as in `forward` (the layers above S that any row edits).
    """
    S, entry = start[0], start[1]
    at = lambda arrs: None if arrs is None else {k: v[S] for k, v in arrs.items()}
    take = lambda a: jax.lax.dynamic_index_in_dim(a, S, keepdims=False)
    p = layer_params(cfg, {k: take(v) for k, v in stacked_params(params).items()})
    h, o, d = take(cache.resid), take(cache.attn), take(cache.mlp)
    m, vals = at(masks), at(values)
    site = editor(m, vals)

    def whole() -> Array:
        cos, sin = rope_tables(cfg, h.shape[1])
        return block(cfg, p, h, valid, cos, sin, m, vals, attn_impl)[0]

    def mlp() -> Array:
        mid = h + site("o_proj", o)
        return mid + mlp_out(cfg, p, mid, site)

    def out() -> Array:
        mid = h + o
        if any(n in m for n in HIDDEN):
            change = _hidden_change(cfg, p, mid, m, vals)
            return mid + site("down_proj", (d.astype(jnp.float32) + change).astype(d.dtype))
        return mid + site("down_proj", d)

    h = jax.lax.switch(entry, (whole, mlp, out))
    h, _ = forward(cfg, params, h, valid, masks=masks, values=values, start=S + 1, edited=edited,
                   attn_impl=attn_impl, mlp_impl=mlp_impl)
    return h


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
            capture: tuple[str, ...] = (), observe=None, start: Array | None = None,
            edited: Array | None = None, attn_impl: str = "xla", mlp_impl: str = "xla", remat: bool = False
            ) -> tuple[Array, dict[str, Array]]:
    """Runs the layers.

    embeds [B, T, D] are E(x) (noise is added to these); valid [B, T] marks real tokens (right
    padding; None: no padding). masks/values: site -> [L, C]. capture: site names (and RESID, the
    residual entering each layer) whose per-layer values are returned stacked [L, B, T, C].
    observe: a function of one layer's site outputs {site: [B, T, C]} returning a pytree; its
    per-layer results come back stacked under "observed" ([L, ...]). It reduces inside the layer
    scan, so nothing of size [L, B, T, C] is kept (Stage 1's |clean - noisy| sums).
    start (prefix sharing; may be traced): only layers start..L-1 run (a loop with a traced lower
    bound, so one program serves every start) and `embeds` is taken as the residual stream
    entering layer `start`, already scaled; capture and observe are then unavailable.
    edited (with start): [L] bool, unbatched under vmap: the layers whose masks/values hold an
    edit in any row. When none from `start` on does, the layers run without masks (a cond
    outside the loop), as fast as the clean forward: a mask product after down_proj keeps
    cuBLAS from adding the residual in its epilogue.
    attn_impl, mlp_impl: the attention's and the unedited MLPs' kernels (engine.Kernels).
    remat: recompute each layer in the backward pass instead of keeping its activations (a
    gradient then holds one residual per layer, not every intermediate).
    Returns the final-normed hidden state [B, T, D] and the captures.
    """
    T = embeds.shape[1]
    h = embeds if start is not None else scale_embeds(cfg, embeds)
    if start is not None and (capture or observe is not None):
        raise ValueError("capture and observe need start=None")
    cos, sin = rope_tables(cfg, T)
    layer_p = stacked_params(params)
    if start is not None:  # layers start..L-1 only: a loop with a traced lower bound
        def layers(m, vals):
            def layer(i, h):
                at = lambda tree: {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in tree.items()}
                return block(cfg, at(layer_p), h, valid, cos, sin, at(m) or None, at(vals) or None, attn_impl,
                             mlp_impl)[0]
            return lambda h: jax.lax.fori_loop(start, cfg.n_layers, layer, h)
        edit = layers(masks or {}, values or {})
        if edited is None or not (masks or values):
            h = edit(h)
        else:
            h = jax.lax.cond((edited & (jnp.arange(cfg.n_layers) >= start)).any(), edit, layers({}, {}), h)
        return rms_norm(h, params["final_norm"], cfg.norm_eps, cfg.family.norm_plus_one), {}

    def step(h, x):
        p, m, vals = x
        out, sites = block(cfg, p, h, valid, cos, sin, m or None, vals or None, attn_impl, mlp_impl)
        ys = {n: sites[n] for n in capture if n != RESID}
        if observe is not None:
            ys["observed"] = observe(sites)
        if RESID in capture:
            ys[RESID] = h
        return out, ys

    h, ys = jax.lax.scan(jax.checkpoint(step) if remat else step, h, (layer_p, masks or {}, values or {}))
    if RESID in capture:
        ys[RESID] = jnp.concatenate([ys[RESID], h[None]])
    h = rms_norm(h, params["final_norm"], cfg.norm_eps, cfg.family.norm_plus_one)
    return h, ys


def unembed(cfg: ModelConfig, params: Params) -> Array:
    """The output matrix [V, D] (the embedding when tied)."""
    return params["embed"] if cfg.tie_embeddings else params["lm_head"]


def logits(cfg: ModelConfig, params: Params, h: Array) -> Array:
    """Full logits [B, T, V] in f32: for parity checks and small models, not the engine's path."""
    return jnp.einsum("btd,vd->btv", h, unembed(cfg, params), preferred_element_type=jnp.float32,
                      precision=precision(h.dtype))


def vocab_split(V: int, chunk: int) -> tuple[int, int]:
    """(chunk size, count) covering V; an exact divisor near `chunk` when there is one."""
    n0 = -(-V // chunk)
    for n in range(n0, 2 * n0 + 1):
        if V % n == 0:
            return V // n, n
    return -(-V // n0), n0


def logsumexp_vocab(cfg: ModelConfig, params: Params, h: Array, chunk: int = 16384,
                    shift: Array | None = None) -> tuple[Array, Array]:
    """(logsumexp, max) of the logits [B, T], f32, the vocabulary processed in chunks.

    Never builds [B, T, V]; under FSDP each chunk's weights are gathered over 'data' as a
    layer's are (sharding.gathered; else XLA gathers the rows and sums partial logits across
    devices). Without `shift`: online logsumexp (two passes over each chunk).
    With `shift` [B, T] (e.g. the clean run's max logit): one pass, exp(z - shift) summed;
    positions where that over- or underflows come back NaN so the caller can redo them exactly.
    The last chunk is shifted back to stay in range and its already-counted columns masked.
    """
    W = unembed(cfg, params)
    V = W.shape[0]
    c, n = vocab_split(V, chunk)
    exact = c * n == V

    def chunk_logits(i):
        lo = jnp.minimum(i * c, V - c)
        w = gathered({"w": jax.lax.dynamic_slice_in_dim(W, lo, c, axis=0)}, {"w": ("vocab", "embed")})["w"]
        z = jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32, precision=precision(h.dtype))
        return z if exact else jnp.where(lo + jnp.arange(c) >= i * c, z, -jnp.inf)

    zeros = jnp.zeros(h.shape[:2], jnp.float32)
    if shift is not None:
        def one_pass(s, i):
            return s + jnp.exp(chunk_logits(i) - shift[..., None]).sum(-1), None
        s, _ = jax.lax.scan(one_pass, zeros, jnp.arange(n))
        ok = jnp.isfinite(s) & (s > 1e-30)
        return jnp.where(ok, shift + jnp.log(s), jnp.nan), shift

    def online(carry, i):
        m, s = carry
        z = chunk_logits(i)
        m2 = jnp.maximum(m, z.max(-1))
        return (m2, s * jnp.exp(m - m2) + jnp.exp(z - m2[..., None]).sum(-1)), None

    (m, s), _ = jax.lax.scan(online, (zeros - jnp.inf, zeros), jnp.arange(n))
    return m + jnp.log(s), m


def target_logit(cfg: ModelConfig, params: Params, h: Array, targets: Array) -> Array:
    """logit of each target token [B, T], f32."""
    w = gathered({"w": jnp.take(unembed(cfg, params), targets, axis=0)}, {"w": ("tokens", "tokens", "embed")})["w"]
    return jnp.einsum("btd,btd->bt", h, w, preferred_element_type=jnp.float32, precision=precision(h.dtype))


def token_nll(cfg: ModelConfig, params: Params, h: Array, targets: Array, chunk: int = 16384) -> Array:
    """-log p(target) [B, T] in f32, without materialising the logits."""
    return logsumexp_vocab(cfg, params, h, chunk)[0] - target_logit(cfg, params, h, targets)


def random_params(cfg: ModelConfig, key: Array, dtype=jnp.float32, scale: float = 0.02) -> dict[str, Array]:
    """Random params from the table (norm weights near their identity); for tests and benchmarks."""
    out = {}
    for i, (name, (shape, _)) in enumerate(sorted(param_table(cfg).items())):
        k = jax.random.fold_in(key, i)
        if "norm" in name:
            base = 0.0 if cfg.family.norm_plus_one else 1.0
            out[name] = (base + 0.1 * jax.random.normal(k, shape)).astype(dtype)
        else:
            out[name] = (scale * jax.random.normal(k, shape)).astype(dtype)
    return out

