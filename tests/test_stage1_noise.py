"""Stage 1's seeded noise: the contract of its draws, against transformers.

Contract (critical/stage1.py): noise sample k is alpha * N(0, I) of shape [T, D], f32, drawn as
jax.random.normal(jax.random.fold_in(jax.random.key(seed), k)), added to the input embeddings
E(x) before any model-internal embedding scale (Gemma's sqrt(d_model)); the importance is
mean_k |A_clean - A_noisy_k| at every site. The draws depend on (seed, k) alone, so the chunk
size (samples per batched forward) changes nothing but f32 rounding.

Reference: the draws made here with jax.random one sample at a time, converted to torch; the
transformers model (eager attention) run once clean and once per sample on inputs_embeds =
(E(x) + alpha * noise_k) * its embedding scale, with forward hooks on the nine sites of every
layer. jaxcrit runs the seeded path (no noise_array), on Gemma: its sqrt(d_model) embedding
scale is what tells noise added before it from noise added after.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_models
from jaxcrit.convert.hf import load_hf
from jaxcrit.critical import stage1
from jaxcrit.models.sites import SITE_NAMES, module_path, width

ALPHA = 0.5
SEED = 7
K = 5          # noise samples: chunks of 3 leave a partial last chunk
T = 31         # tokens
CHUNKS = (1, 3, K)
ARCH = "gemma"  # its embedding scale tells noise added before it from noise added after


def reference_noise(seed: int, samples: int, shape: tuple[int, int]) -> np.ndarray:
    """Standard normal draws [samples, T, D], sample k from fold_in(key(seed), k), one at a time."""
    key = jax.random.key(seed)
    return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32))
                     for k in range(samples)])


class Setup:
    """A random two-layer model (initializer_range 0.2: activations well above rounding), saved and
    loaded by jaxcrit, and a token sequence [T]."""

    def __init__(self, arch: str, directory):
        self.torch = hf_models.build(arch, directory, layers=2, initializer_range=0.2)
        self.cfg, self.params = load_hf(directory, np.float32)
        self.ids = np.random.default_rng(5).integers(0, self.cfg.vocab_size, T).astype(np.int32)

    def importance(self, chunk: int, **kw) -> stage1.Importance:
        return stage1.importance(self.cfg, self.params, self.ids, alpha=ALPHA, samples=K, seed=SEED,
                                 chunk=chunk, progress=False, **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    return Setup(ARCH, tmp_path_factory.mktemp(ARCH))


def test_seeded_noise_does_not_depend_on_chunking(setup, monkeypatch):
    """Chunks of 1, 3 (a partial last one) and all K samples: each run draws exactly samples
    0..K-1 of the contract (stage1.noise's results, recorded), counts K, and gives the same sums
    up to f32 rounding."""
    want = reference_noise(SEED, K, (T, setup.cfg.d_model))
    draw = stage1.noise
    runs = {}
    for chunk in CHUNKS:
        drawn, seen = [], []

        def recorded(*args):
            eps = draw(*args)
            drawn.append(np.asarray(eps))
            return eps
        monkeypatch.setattr(stage1, "noise", recorded)
        runs[chunk] = setup.importance(chunk, on_chunk=seen.append)
        assert [st.k for st in seen] == list(range(chunk, K, chunk)) + [K], f"chunk {chunk}"
        assert runs[chunk].k == K
        np.testing.assert_allclose(np.concatenate(drawn), want, rtol=1e-6, atol=1e-6, err_msg=f"chunk {chunk}")
    first = runs[CHUNKS[0]].scores()
    assert min(v.max() for v in first.values()) > 1e-3, "the noise barely moved some site"
    for chunk in CHUNKS[1:]:
        for site, v in runs[chunk].scores().items():
            np.testing.assert_allclose(v, first[site], rtol=2e-5, atol=1e-6, err_msg=f"chunk {chunk} {site}")


def test_seeded_importance_matches_transformers(setup):
    """stage1.importance(seed=...) without noise_array equals the reference on the contract's draws."""
    s = setup
    ref = hf_models.hooked_importance(s.torch, s.ids, reference_noise(SEED, K, (T, s.cfg.d_model)), ALPHA)
    scores = s.importance(3).scores()
    top = max(v.max() for v in ref.values())
    for site in SITE_NAMES:
        for layer in range(s.cfg.n_layers):
            np.testing.assert_allclose(scores[site][layer], ref[module_path(site, layer)], rtol=1e-4,
                                       atol=1e-6 * top, err_msg=f"{site} layer {layer}")


def test_partial_chunk_is_padded_with_zero_noise_and_weight(monkeypatch):
    """K = 5 samples in chunks of 3: batches of exactly 3 rows, samples 0-2 then 3-4 and a padding
    row of zero noise with weight 0, so each sample counts once. `differences` is replaced by
    one that returns, at every entry, the sum of the weights it gets: the scores are then exactly 1."""
    cfg = hf_models.shapes_config()
    noise = np.random.default_rng(0).standard_normal((K, T, cfg.d_model)).astype(np.float32)
    calls = []

    def differences(cfg_, params, tokens, eps, alpha, weight):
        calls.append((np.asarray(eps), np.asarray(weight)))
        assert len(calls) <= 2, "more batches than ceil(5 / 3)"
        return {s: jnp.full((cfg.n_layers, T, width(cfg, s)), weight.sum()) for s in SITE_NAMES}
    monkeypatch.setattr(stage1, "differences", differences)
    imp = stage1.importance(cfg, {}, np.arange(T) % cfg.vocab_size, alpha=ALPHA, samples=K, seed=SEED, chunk=3,
                            noise_array=noise, progress=False)
    assert imp.k == K and [w.tolist() for _, w in calls] == [[1, 1, 1], [1, 1, 0]]
    np.testing.assert_array_equal(calls[0][0], noise[:3])
    np.testing.assert_array_equal(calls[1][0], np.concatenate([noise[3:], np.zeros((1, T, cfg.d_model))]))
    assert all((v == 1).all() for v in imp.scores().values())
    eps, alpha, weight = stage1.batch_shapes(cfg, T, 3, None)   # what the memory plan compiles for
    assert (eps.shape, alpha.shape, weight.shape) == (calls[0][0].shape, (), calls[0][1].shape)
    assert eps.dtype == alpha.dtype == weight.dtype == jnp.float32
