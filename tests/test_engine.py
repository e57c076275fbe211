"""The batched engine against independent references, row by row.

References, both run one ablation at a time (no vmap, no chunks, no prefix sharing, no
vocabulary-chunked loss):
  * jaxcrit's own `decoder.forward` with dense [layers, channels] masks (and values) for all nine
    sites, full logits, NLL from a float64 log-softmax in numpy;
  * the transformers model (eager attention) with PyTorch forward hooks editing the same
    channels of the HF modules the sites are named after (Phi-3's fused qkv_proj / gate_up_proj
    sliced at the site's offset, its act_fn being `mlp.activation_fn`), NLL computed the same way.
Loss: mean NLL of each next token, token-weighted over all texts, on valid positions only.

The tiny models are built with initializer_range 0.2 (not the default 0.02), so one zeroed channel
moves the loss by ~1e-3 relative: with the default init most single-neuron effects are ~1e-5,
the size of the tolerance itself, and a test that mixed channels up could still pass.
`sensitive` checks this for every compared set.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_models
from jaxcrit.convert.hf import load_hf
from jaxcrit.engine import LN10, Ablations, Engine, Texts, make, prefixes, random_sets, single, start_points
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder as dec
from jaxcrit.engine.prefix import LAYER, MLP, OUT
from jaxcrit.models.sites import SITE_INDEX, SITE_NAMES, site as site_info, width

TOL = 1e-5
ARCHS = ["llama", "phi3"]   # llama: plain modules; phi3: fused qkv / gate_up, activation_fn
LENGTHS = (40, 33, 30)      # texts of one batch, right-padded to 40
CHUNK = 8                   # main engine's chunk: divides none of the row counts below
VOCAB_CHUNK = 50            # vocab 211 = 4 * 50 + 11: the last vocab chunk is a partial one


# ----------------------------------------------------------------------------- references

def nll_from_logits(logits: np.ndarray, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-token NLL [B, T-1] in float64 from full logits [B, T, V] (0 where not a valid target)."""
    z = np.asarray(logits, np.float64)[:, :-1]
    m = z.max(-1, keepdims=True)
    logp = z - (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    return np.where(valid[:, 1:] & valid[:, :-1], nll, 0.0)


def mean_nll(per_token: np.ndarray, valid: np.ndarray) -> float:
    return float(per_token.sum() / (valid[:, 1:] & valid[:, :-1]).sum())


@functools.partial(jax.jit, static_argnums=0)
def _jax_logits(cfg, params, tokens, valid, masks, values):
    h, _ = dec.forward(cfg, params, dec.embed(cfg, params, tokens), valid, masks=masks, values=values)
    return dec.logits(cfg, params, h)


def entries(abl: Ablations, r: int):
    """The active (site name, layer, channel, scale, value) entries of row r."""
    return [(SITE_NAMES[abl.site[r, k]], int(abl.layer[r, k]), int(abl.channel[r, k]),
             float(abl.scale[r, k]), float(abl.value[r, k]))
            for k in range(abl.site.shape[1]) if abl.active[r, k]]


def hf_module(model, arch: str, cfg, name: str, layer: int) -> tuple[torch.nn.Module, int]:
    """The HF module whose output holds a site, and the site's column offset in that output."""
    module, offset = site_info(name).module, 0
    if arch == "phi3":
        Q, KV, F = cfg.q_dim, cfg.kv_dim, cfg.d_ff
        fused = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", Q),
                 "v_proj": ("self_attn.qkv_proj", Q + KV), "gate_proj": ("mlp.gate_up_proj", 0),
                 "up_proj": ("mlp.gate_up_proj", F), "act_fn": ("mlp.activation_fn", 0)}
        module, offset = fused.get(name, (module, 0))
    return model.get_submodule(f"model.layers.{layer}.{module}"), offset


def edit_hook(edits: list[tuple[int, float, float]]):
    def hook(mod, args, out):
        out = out.clone()
        for col, scale, value in edits:
            out[..., col] = out[..., col] * scale + value
        return out
    return hook


def build_model(arch: str, directory, seed: int = 0):
    return hf_models.build(arch, directory, seed, initializer_range=0.2)


class Setup:
    """One architecture: HF model, its jaxcrit import, texts, the main engine and reference runners."""

    def __init__(self, arch: str, directory):
        self.arch = arch
        self.torch = build_model(arch, directory)
        self.cfg, self.params = load_hf(directory, np.float32)
        rng = np.random.default_rng(1)
        self.texts = Texts.from_ids([rng.integers(0, self.cfg.vocab_size, n).tolist() for n in LENGTHS])
        self.engine = Engine(self.cfg, self.params, self.texts, chunk=CHUNK, vocab_chunk=VOCAB_CHUNK,
                               progress=False)
        self._jax_cache: dict = {}
        self._hf_cache: dict = {}

    # one ablation, unbatched -------------------------------------------------------------
    def jax_row(self, row, texts: Texts | None = None) -> np.ndarray:
        """Per-token NLL [B, T-1] of one row through decoder.forward with dense masks/values."""
        t = texts or self.texts
        key = (tuple(row), t.tokens.tobytes())
        if key not in self._jax_cache:
            cfg = self.cfg
            masks = {n: np.ones((cfg.n_layers, width(cfg, n)), np.float32) for n in SITE_NAMES}
            values = {n: np.zeros((cfg.n_layers, width(cfg, n)), np.float32) for n in SITE_NAMES}
            for name, layer, ch, scale, value in row:
                masks[name][layer, ch] *= scale
                values[name][layer, ch] += value
            logits = _jax_logits(cfg, self.params, jnp.asarray(t.tokens), jnp.asarray(t.valid),
                                 {k: jnp.asarray(v) for k, v in masks.items()},
                                 {k: jnp.asarray(v) for k, v in values.items()})
            self._jax_cache[key] = nll_from_logits(np.asarray(logits), t.tokens, t.valid)
        return self._jax_cache[key]

    def hf_row(self, row, texts: Texts | None = None) -> np.ndarray:
        """Per-token NLL [B, T-1] of one row through transformers with forward hooks."""
        t = texts or self.texts
        key = (tuple(row), t.tokens.tobytes())
        if key not in self._hf_cache:
            per_module: dict[torch.nn.Module, list] = {}
            for name, layer, ch, scale, value in row:
                mod, off = hf_module(self.torch, self.arch, self.cfg, name, layer)
                per_module.setdefault(mod, []).append((off + ch, scale, value))
            handles = [mod.register_forward_hook(edit_hook(e)) for mod, e in per_module.items()]
            try:
                with torch.no_grad():
                    logits = self.torch(torch.tensor(t.tokens.astype(np.int64)),
                                        attention_mask=torch.tensor(t.valid.astype(np.int64))).logits
            finally:
                for h in handles:
                    h.remove()
            self._hf_cache[key] = nll_from_logits(logits.float().numpy(), t.tokens, t.valid)
        return self._hf_cache[key]

    def ref(self, abl: Ablations, which: str = "jax", texts: Texts | None = None) -> np.ndarray:
        """[R] reference mean NLL, one row at a time (on texts, default the setup's)."""
        run = self.jax_row if which == "jax" else self.hf_row
        t = texts or self.texts
        return np.array([mean_nll(run(entries(abl, r), t), t.valid) for r in range(abl.rows)])

    def clean(self, which: str = "jax", texts: Texts | None = None) -> float:
        run = self.jax_row if which == "jax" else self.hf_row
        return mean_nll(run([], texts), (texts or self.texts).valid)

    # the ablation sets -----------------------------------------------------------------
    @functools.cached_property
    def singles(self) -> Ablations:
        """Every site, every layer, first / middle / last channel: 9 x 3 x 3 = 81 rows, K = 1."""
        cfg = self.cfg
        return cat(*[single(cfg, n, channels=[0, width(cfg, n) // 2 + 1, width(cfg, n) - 1])
                     for n in SITE_NAMES])

    @functools.cached_property
    def random(self) -> Ablations:
        """12 random sets of 5 distinct neurons over all sites and layers."""
        return random_sets(self.cfg, SITE_NAMES, n_rows=12, k=5, seed=3)

    @functools.cached_property
    def ranking(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """20 distinct neurons ordered from the last layer down, so prefix rows start at 2, 1, 0."""
        r = random_sets(self.cfg, SITE_NAMES, n_rows=1, k=20, seed=4)
        order = np.argsort(-r.layer[0], kind="stable")
        return np.array(SITE_NAMES)[r.site[0, order]], r.layer[0, order], r.channel[0, order]

    @functools.cached_property
    def prefix(self) -> Ablations:
        return prefixes(self.cfg, *self.ranking, ns=[1, 2, 5, 9, 14, 20])

    @functools.cached_property
    def entries(self) -> Ablations:
        """Rows that start at each entry by the table and the one-hidden-channel rule (entry_rows)."""
        return entry_rows(self.cfg)[0]

    @functools.cached_property
    def combined(self) -> Ablations:
        return cat(self.singles, self.random, self.prefix, self.entries)


def cat(*abls: Ablations) -> Ablations:
    """Rows of several batches in one, entries padded with inactive (scale 1, value 0) ones."""
    K = max(a.site.shape[1] for a in abls)
    fill = {"site": 0, "layer": 0, "channel": 0, "scale": 1.0, "value": 0.0}
    out = {}
    for f in dataclasses.fields(Ablations):
        parts = []
        for a in abls:
            x = getattr(a, f.name)
            parts.append(np.concatenate([x, np.full((x.shape[0], K - x.shape[1]), fill[f.name], x.dtype)], 1))
        out[f.name] = np.concatenate(parts)
    return Ablations(**out)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The HF reference runs ~300 tiny forwards: one thread each is fastest and does not fight XLA."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=ARCHS)
def m(request, tmp_path_factory, one_torch_thread) -> Setup:
    return Setup(request.param, tmp_path_factory.mktemp(request.param))


# ----------------------------------------------------------------------------- checks

def rel(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, np.float64) - b) / np.abs(b)


def assert_rows(got: np.ndarray, want: np.ndarray, what: str):
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}"
    err = rel(got, want)
    bad = np.flatnonzero(err > TOL)
    assert bad.size == 0, (f"{what}: {bad.size}/{len(err)} rows off, worst row {err.argmax()} "
                           f"rel err {err.max():.2e} (got {got[err.argmax()]}, want {want[err.argmax()]})")


def sensitive(m: Setup, want: np.ndarray, what: str, frac: float = 0.8):
    """Most rows of the reference move the loss by far more than the tolerance (a few rows of a
    random model barely matter: e.g. a key channel whose RoPE frequency is ~0 set to a constant)."""
    effect = rel(want, m.clean())
    assert np.median(effect) > 50 * TOL, f"{what}: median effect {np.median(effect):.1e}"
    assert (effect > 10 * TOL).mean() >= frac, f"{what}: ablations barely move the loss: {np.sort(effect)}"


SETS = ["singles", "random", "prefix", "entries"]


def test_texts_and_clean_loss(m):
    t = m.texts
    assert t.tokens.shape == (3, 40) and t.valid.sum(1).tolist() == list(LENGTHS)
    assert t.n_tokens == sum(n - 1 for n in LENGTHS)
    clean = np.float32(m.clean())
    assert rel(m.engine.base_loss, clean) <= TOL
    assert rel(m.clean("hf"), clean) <= TOL
    assert_rows(m.engine.losses(None), np.array([m.clean()]), "clean run")


@pytest.mark.parametrize("which", SETS)
def test_rows_match_unbatched_forward(m, which):
    abl = getattr(m, which)
    want = m.ref(abl)
    sensitive(m, want, which)
    assert_rows(m.engine.losses(abl), want, f"{m.arch} {which}")


def test_singles_cover_every_site_layer(m):
    abl = m.singles
    assert abl.site.shape == (81, 1)
    assert set(SITE_NAMES[i] for i in abl.site[:, 0]) == set(SITE_NAMES)
    assert set(abl.layer[:, 0].tolist()) == set(range(m.cfg.n_layers))
    assert abl.rows % CHUNK and m.random.rows % CHUNK and m.prefix.rows % CHUNK
    # the multi-neuron sets really span several layers and sites within rows
    assert (np.ptp(m.random.layer, 1) > 0).mean() > 0.5 and len(set(m.random.site.ravel().tolist())) > 4
    # prefix rows: row i zeroes exactly the first ns[i] ranked neurons
    assert m.prefix.active.sum(1).tolist() == [1, 2, 5, 9, 14, 20]
    assert sorted(set(m.prefix.first_layer().tolist())) == list(range(m.cfg.n_layers))


@pytest.mark.parametrize("which", SETS)
def test_rows_match_transformers_hooks(m, which):
    abl = getattr(m, which)
    want = m.ref(abl, "hf")
    sensitive(m, want, which)
    assert_rows(m.engine.losses(abl), want, f"{m.arch} {which} vs transformers")


@pytest.mark.parametrize("share, chunk", [(False, 7), (True, 1)])
def test_prefix_sharing_and_chunking_agree(m, share, chunk):
    abl = m.combined
    eng = Engine(m.cfg, m.params, m.texts, chunk=chunk, prefix_sharing=share, vocab_chunk=VOCAB_CHUNK,
                   progress=False)
    assert eng.chunk == chunk
    got = eng.losses(abl)
    assert_rows(got, m.ref(abl), f"{m.arch} share={share} chunk={chunk}")
    singles = np.arange(m.singles.rows)  # every site started where it starts, against transformers
    assert_rows(got[singles], m.ref(m.singles, "hf"), f"{m.arch} share={share} chunk={chunk} singles vs transformers")
    main = m.engine.losses(abl)
    assert np.abs(got.astype(np.float64) - main).max() <= TOL * main.max()


def entry_rows(cfg) -> tuple[Ablations, list[tuple[int, int]]]:
    """Rows whose first layer's edits decide the start entry (the table plus the one-hidden-channel
    rule), with scales and values; and the start point each must get."""
    L, D, F = cfg.n_layers, cfg.d_model, cfg.d_ff
    rows = [  # ([(site, layer, channel, scale, value)], start)
        ([("q_proj", 1, 3, 0.0, 0.0)], (1, LAYER)),
        ([("k_proj", 2, 5, 0.0, 0.0), ("down_proj", 2, 3, 0.0, 0.0)], (2, LAYER)),
        ([("o_proj", 2, D - 2, 0.0, 0.9)], (2, MLP)),
        ([("post_attention_layernorm", 0, 5, 0.0, 0.0), ("q_proj", 1, 0, 0.0, 0.0)], (0, MLP)),
        ([("o_proj", 1, 7, 0.0, 0.0), ("down_proj", 1, 7, 0.0, 0.0)], (1, MLP)),
        ([("act_fn", 2, 9, 0.0, 0.0), ("act_fn", 2, F - 1, 0.0, 0.0)], (2, MLP)),
        ([("gate_proj", 1, 11, 0.5, 0.2), ("up_proj", 1, 11, -1.0, 0.0), ("act_fn", 1, 11, 0.3, -0.4)], (1, OUT)),
        ([("down_proj", 0, 3, 0.0, 0.0), ("down_proj", 0, D - 1, 0.0, 1.1), ("act_fn", 0, 17, 0.0, 0.6)], (0, OUT)),
        ([("up_proj", 2, F // 2, 2.0, 0.0)], (2, OUT)),
        ([("gate_proj", 0, 40, 1.0, 0.7)], (0, OUT)),
        ([("gate_proj", 1, 4, 0.0, 0.0), ("q_proj", 2, 0, 0.0, 0.0), ("act_fn", 2, 4, 0.0, 0.0)], (1, OUT)),
        ([("down_proj", L - 1, 6, 0.0, 0.0)], (L - 1, OUT)),
    ]
    K = max(len(r) for r, _ in rows)
    cols = [[list(e) for e in r] + [["q_proj", 0, 0, 1.0, 0.0]] * (K - len(r)) for r, _ in rows]
    site, layer, chan, scale, value = (np.array([[e[i] for e in r] for r in cols]) for i in range(5))
    return make(site, layer, chan, scale, value, cfg=cfg), [s for _, s in rows]


def test_start_points(cfg):
    abl, want = entry_rows(cfg)
    assert start_points(abl, cfg.n_layers).tolist() == [list(w) for w in want]
    none = make(["q_proj"], [1], [0], scale=1.0, cfg=cfg)  # no edit: the clean output
    assert start_points(none, cfg.n_layers).tolist() == [[cfg.n_layers - 1, OUT]]


def test_chunks_mix_sites_and_entries(m):
    """The singles run as chunks that start at every entry of every layer, and chunks mix rows of
    different sites and start points (a row later than its chunk's start runs from there)."""
    plan = m.engine.plan(m.singles)
    order, starts = plan.order, plan.starts
    L = m.cfg.n_layers
    assert {tuple(s) for s in starts} >= {(L - 1, OUT), (0, LAYER)}
    assert set(starts[:, 1].tolist()) == {LAYER, MLP, OUT}
    assert plan.chunk == CHUNK and (plan.firsts == 0).all()
    assert sorted(order[order >= 0].tolist()) == list(range(m.singles.rows))
    padded = np.where((order >= 0)[:, None], start_points(m.singles, L)[np.maximum(order, 0)], -1)
    per_chunk = padded.reshape(-1, CHUNK, 2)
    mixed = [len({tuple(x) for x in c if x[0] >= 0}) > 1 for c in per_chunk]
    assert sum(mixed) >= 3
    for c, s in zip(per_chunk, starts):
        real = c[c[:, 0] >= 0]
        assert tuple(s) == min(map(tuple, real))
    unshared = Engine(m.cfg, m.params, m.texts, chunk=CHUNK, prefix_sharing=False, vocab_chunk=VOCAB_CHUNK,
                      progress=False)
    p = unshared.plan(m.singles)
    assert (p.order[:m.singles.rows] == np.arange(m.singles.rows)).all() and (p.starts == [0, LAYER]).all()


def test_per_token(m):
    abl = cat(m.random, m.prefix)
    got = m.engine.losses(abl, per_token=True)
    t = m.texts
    B, T = t.tokens.shape
    assert got.shape == (abl.rows, B, T - 1) and got.dtype == np.float32
    target = t.valid[:, 1:] & t.valid[:, :-1]
    assert (got[:, ~target] == 0).all(), "padding positions must carry no loss"
    for r in range(abl.rows):
        for which in ("jax", "hf"):
            want = (m.jax_row if which == "jax" else m.hf_row)(entries(abl, r))
            err = np.linalg.norm(got[r][target] - want[target]) / np.linalg.norm(want[target])
            assert err <= TOL, f"{m.arch} row {r} per-token vs {which}: rel err {err:.2e}"
            worst = rel(got[r][target], want[target]).max()
            assert worst <= 10 * TOL, f"{m.arch} row {r} per-token vs {which}: worst token rel err {worst:.2e}"
    # the per-token values average to the row losses
    mean = got.astype(np.float64).sum((1, 2)) / t.n_tokens
    assert rel(mean, m.engine.losses(abl)).max() <= TOL


def value_rows(cfg) -> Ablations:
    """Rows 0-8: each site alone, one channel set to a constant (scale 0, value v).
    Rows 9-10: three entries each with mixed scale / value (scale 1 + value: a pure shift)."""
    rng = np.random.default_rng(5)
    L = cfg.n_layers
    site = list(SITE_NAMES)
    layer = [i % L for i in range(9)]
    chan = [width(cfg, n) - 1 - 2 * i for i, n in enumerate(SITE_NAMES)]
    v = rng.choice([-1, 1], 9) * rng.uniform(0.5, 2.0, 9)
    one = make(site, layer, chan, scale=0.0, value=v, cfg=cfg)
    multi = make([["down_proj", "q_proj", "act_fn"], ["v_proj", "post_attention_layernorm", "up_proj"]],
                   [[0, 1, 2], [2, 0, 1]], [[3, 5, 7], [1, 2, 4]],
                   scale=[[0.0, 0.5, 1.0], [0.0, -1.0, 1.0]], value=[[1.5, -0.7, 0.3], [-1.2, 0.0, 0.8]], cfg=cfg)
    return cat(one, multi)


def test_values(m):
    abl = value_rows(m.cfg)
    got = m.engine.losses(abl)
    want_hf, want_jax = m.ref(abl, "hf"), m.ref(abl)
    sensitive(m, want_hf, "values")
    assert_rows(got, want_jax, f"{m.arch} values vs forward")
    assert_rows(got, want_hf, f"{m.arch} values vs transformers")
    # setting a channel to v is not zeroing it
    zeroed = m.ref(dataclasses.replace(abl, value=np.zeros_like(abl.value)), "hf")
    assert (rel(got, zeroed)[:9] > 10 * TOL).mean() >= 0.75


def test_deltas(m):
    abl = cat(m.random, m.prefix)
    d = m.engine.deltas(abl)
    losses = m.engine.losses(abl)
    np.testing.assert_allclose(d, (losses.astype(np.float64) - m.engine.base_loss) / math.log(10), rtol=1e-6,
                               atol=1e-9)
    # against transformers: log10(PPL_masked / PPL_clean)
    clean = m.clean("hf")
    want = np.log10(np.exp(m.ref(abl, "hf")) / np.exp(clean))
    np.testing.assert_allclose(d, want, rtol=0, atol=2 * TOL * clean / math.log(10))
    assert (np.abs(want) > 100 * TOL).mean() >= 0.8
    assert LN10 == pytest.approx(math.log(10), rel=1e-15)


def test_unpadded_texts(m):
    """Texts without padding: the engine keeps no validity mask (cuDNN attention then runs without
    sequence lengths), and rows still match transformers: a chunk whose edits all sit at its
    start layer (its tail layers run without masks), mixed singles and multi-layer random sets."""
    t = Texts(m.texts.tokens[:1], m.texts.valid[:1])   # the 40-token text alone
    eng = Engine(m.cfg, m.params, t, chunk=CHUNK, vocab_chunk=VOCAB_CHUNK, progress=False)
    assert eng.valid is None
    abl = cat(single(m.cfg, "down_proj", layers=[0], channels=range(CHUNK)), m.singles.take(np.arange(0, 81, 9)),
              m.random.take(np.arange(4)))
    want = m.ref(abl, "hf", t)
    assert (rel(want, m.clean("hf", t)) > 10 * TOL).mean() >= 0.8
    assert_rows(eng.losses(abl), want, f"{m.arch} unpadded text vs transformers")


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg_llama")
    hf_models.build("llama", d)
    return load_hf(d, np.float32)[0]


def raises(fn, *words: str) -> str:
    with pytest.raises(JaxcritError) as e:
        fn()
    msg = str(e.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def test_channel_out_of_range(cfg):
    kv = cfg.kv_dim
    raises(lambda: make("k_proj", 0, kv, cfg=cfg), f"channel {kv}", "out of range", "k_proj", f"0..{kv - 1}")
    raises(lambda: make("down_proj", 1, -1, cfg=cfg), "channel -1", "out of range", "down_proj")
    raises(lambda: single(cfg, "gate_proj", channels=[0, cfg.d_ff]), f"channel {cfg.d_ff}", "gate_proj",
           f"0..{cfg.d_ff - 1}")
    # one bad entry among good ones, in a multi-entry row; the width is the entry's own site's
    raises(lambda: make([["q_proj", "v_proj"]], [[0, 0]], [[kv, kv]], cfg=cfg), f"channel {kv}", "v_proj")
    make([["q_proj"]], [[0]], [[kv]], cfg=cfg)  # q_dim > kv_dim: the same channel is fine for q_proj


def test_layer_out_of_range(cfg):
    L = cfg.n_layers
    raises(lambda: make("q_proj", L, 0, cfg=cfg), f"layer {L}", "out of range", f"0..{L - 1}")
    raises(lambda: make("o_proj", -1, 0, cfg=cfg), "layer -1", "out of range")
    raises(lambda: single(cfg, "act_fn", layers=[0, L + 2]), f"layer {L + 2}", "out of range")


def test_unknown_site(cfg):
    raises(lambda: make("mlp.down_proj", 0, 0, cfg=cfg), "unknown site", "mlp.down_proj", "down_proj")
    raises(lambda: make([["q_proj", "attn"]], [[0, 0]], [[0, 0]], cfg=cfg), "unknown site", "'attn'")
    raises(lambda: single(cfg, "nope"), "unknown site", "'nope'")
    raises(lambda: random_sets(cfg, ["q_proj", "nope"], 2, 3, 0), "unknown site", "'nope'")
    raises(lambda: make(len(SITE_NAMES), 0, 0, cfg=cfg), "site index", "out of range")


def test_short_text():
    raises(lambda: Texts.from_ids([[1, 2, 3], [7]]), "1 token", "at least 2")
    raises(lambda: Texts.from_ids([[1, 2], []]), "0 token", "at least 2")
    raises(lambda: Texts.from_ids([]), "no text")
    assert Texts.from_ids([[1, 2]]).n_tokens == 1


def test_single_one_entry_per_row(cfg):
    """single() gives each row one entry: R copies of its (site, layer, channel) would be hidden by
    zeroing (0^R = 0) but would turn scale s into s^R and be quadratic in memory."""
    abl = single(cfg, "down_proj", layers=[0, 2], channels=[1, 5, 9])
    assert abl.site.shape == (6, 1), f"single() rows have {abl.site.shape[1]} entries, want 1"
    assert abl.layer[:, 0].tolist() == [0, 0, 0, 2, 2, 2] and abl.channel[:, 0].tolist() == [1, 5, 9] * 2
    assert (abl.site == SITE_INDEX["down_proj"]).all() and (abl.scale == 0).all() and (abl.value == 0).all()
    full = single(cfg, "k_proj")
    assert full.site.shape == (cfg.n_layers * cfg.kv_dim, 1)


def test_single_with_scale(m):
    """single(scale=0.5) halves one channel per row, as a hook scaling that channel by 0.5 does."""
    cfg = m.cfg
    abl = single(cfg, "o_proj", channels=[0, 7, 63], scale=0.5)
    want = np.array([mean_nll(m.hf_row([("o_proj", l, c, 0.5, 0.0)]), m.texts.valid)
                     for l in range(cfg.n_layers) for c in (0, 7, 63)])
    sensitive(m, want, "single(scale=0.5)", frac=0.6)
    assert_rows(m.engine.losses(abl), want, f"{m.arch} single(scale=0.5)")


@pytest.mark.parametrize("how", ["make", "make_str", "make_2d", "single_layers", "single_channels"])
def test_empty_batch(cfg, how):
    fn = {
        "make": lambda: make([], [], [], cfg=cfg),
        "make_str": lambda: make(np.array([], str), np.array([], int), np.array([], int), cfg=cfg),
        "make_2d": lambda: make(np.zeros((0, 3), int), np.zeros((0, 3), int), np.zeros((0, 3), int), cfg=cfg),
        "single_layers": lambda: single(cfg, "q_proj", layers=[]),
        "single_channels": lambda: single(cfg, "q_proj", channels=[]),
    }[how]
    raises(fn, "empty")


@pytest.mark.parametrize("how", ["random_sets", "prefixes"])
def test_empty_batch_helpers(cfg, how):
    fn = {
        "random_sets": lambda: random_sets(cfg, ["q_proj"], n_rows=0, k=2, seed=0),
        "prefixes": lambda: prefixes(cfg, ["q_proj"], [0], [0], ns=[]),
    }[how]
    raises(fn, "empty")


def test_engine_empty_batch(m):
    raises(lambda: m.engine.losses(m.random.take(np.array([], int))), "empty")


def test_prefix_longer_than_ranking(cfg):
    raises(lambda: prefixes(cfg, ["q_proj"] * 2, [0, 1], [0, 0], ns=[3]), "prefix sizes")


def test_rows_redone_exactly_when_shift_is_off(m):
    """The one-pass logsumexp underflows (shift 200 too high: every exp(z - shift) ~ 0) at one
    position and overflows (200 too low) at another: the program flags the rows NaN, and the engine
    redoes them with the exact form."""
    eng, abl, shift = m.engine, m.random, m.engine.shift   # the module's engine: its fast program is compiled
    eng.shift = shift.at[1, 5].add(200.0).at[0, 9].add(-200.0)
    try:
        fast = eng._run(abl, eng.program(abl.sites()), "fast")
        assert np.isnan(fast).all()   # every row predicts those positions
        assert_rows(eng.losses(abl), m.ref(abl), f"{m.arch} shift off")
    finally:
        eng.shift = shift


def test_one_pass_logsumexp_falls_back_when_shift_is_off():
    """The fast path's shift overflows or underflows: the exact two-pass form must take over."""
    from jaxcrit.bench import random_params
    from jaxcrit.engine.loss import logsumexp_vocab
    from jaxcrit.models import decoder
    from jaxcrit.models.config import ModelConfig
    c = ModelConfig(model_type="llama", vocab_size=97, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                    head_dim=8, d_ff=24, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True)
    p = random_params(c, scale=3.0)
    h = jax.random.normal(jax.random.key(1), (2, 5, 16)) * 10
    exact, _ = logsumexp_vocab(c, p, h, 32)
    full = jax.scipy.special.logsumexp(decoder.logits(c, p, h), axis=-1)
    np.testing.assert_allclose(exact, full, rtol=1e-6)
    for shift in (exact - 200.0, exact + 200.0):
        fast, _ = logsumexp_vocab(c, p, h, 32, shift)
        assert np.isnan(np.asarray(fast)).all()   # flagged, never a silently wrong value
    fast, _ = logsumexp_vocab(c, p, h, 32, exact + 1.0)
    np.testing.assert_allclose(fast, full, rtol=1e-6)
