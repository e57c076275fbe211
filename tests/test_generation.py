"""Generation with a perturbation applied (jaxcrit/evaluate/generation.py) against independent references.

References: transformers' `generate(do_sample=False)` with its own KV cache, one prompt at a
time (jaxcrit batches prompts of different lengths); the same with PyTorch forward hooks zeroing
the masked channels; a no-cache loop that recomputes the whole sequence with decoder.forward for
every new token; transformers' logits warpers for the sampling cuts; transformers' log-softmax
for the scored log-probabilities. Prompts are 33-56 tokens (RoPE is nearly the identity on a few).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf

import hf_models
from jaxcrit import engine as E
from jaxcrit.evaluate import generation as G
from jaxcrit.convert.hf import load_hf
from jaxcrit.convert.tokenizer import special_ids
from jaxcrit.models import decoder as dec
from jaxcrit.models.neurons import NeuronSet

NEW = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """arch -> (torch model with no EOS, cfg, params); initializer_range 0.2 so logits have clear winners."""
    @functools.cache
    def get(arch: str):
        d = tmp_path_factory.mktemp(arch)
        model = hf_models.build(arch, d, initializer_range=0.2)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return (model, *load_hf(d, np.float32))
    return get


def prompts(vocab: int, lengths=(33, 41)) -> list[list[int]]:
    rng = np.random.default_rng(sum(lengths))
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def hf_generate(model, prompt: list[int], hooks=()) -> list[int]:
    handles = [mod.register_forward_hook(h) for mod, h in hooks]
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW)
    finally:
        for h in handles:
            h.remove()
    return out[0, len(prompt):].tolist()


def zero(cols: list[int]):
    def hook(mod, args, out):
        out = out.clone()
        out[..., cols] = 0.0
        return out
    return hook


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(cfg, params, tokens, n, masks):
    h, _ = dec.forward(cfg, params, dec.embed(cfg, params, tokens), jnp.arange(tokens.shape[1])[None] < n,
                       masks=masks)
    return dec.logits(cfg, params, h)[0, n - 1]


def recompute(cfg, params, prompt: list[int], masks=None) -> tuple[list[int], list[float]]:
    """Greedy without a cache: the whole sequence (right-padded to a fixed length, so one compile)
    through decoder.forward for every new token."""
    seq, lps = np.zeros(64, np.int32), []
    seq[:len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + NEW):
        z = _last_logits(cfg, params, jnp.asarray(seq[None]), n, masks or {})
        seq[n] = int(jnp.argmax(z))
        lps.append(float(jax.nn.log_softmax(z)[seq[n]]))
    return seq[len(prompt):len(prompt) + NEW].tolist(), lps


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_and_the_no_cache_loop(models, arch):
    model, cfg, params = models(arch)
    ps = prompts(cfg.vocab_size)
    outs = G.generate_ids(cfg, params, ps, max_new_tokens=NEW)
    for p, o in zip(ps, outs):
        assert o.tokens == hf_generate(model, p)
        toks, lps = recompute(cfg, params, p)
        assert o.tokens == toks
        np.testing.assert_allclose(o.logprobs, lps, atol=1e-4)


def test_masked_greedy_equals_transformers_with_hooks(models):
    """Zeroed channels at a k_proj (what the cache keeps), an act_fn and a down_proj, in three layers."""
    model, cfg, params = models("llama")
    where = [("k_proj", 0, 5), ("act_fn", 1, 17), ("down_proj", 2, 40)]
    hooks = [(model.get_submodule(f"model.layers.{l}.{m}"), zero([c])) for (s, l, c), m in
             zip(where, ("self_attn.k_proj", "mlp.act_fn", "mlp.down_proj"))]
    abl = G.ablation(cfg, NeuronSet.of(where))
    ps = prompts(cfg.vocab_size, (37, 43))
    outs = G.generate_ids(cfg, params, ps, abl, max_new_tokens=NEW)
    masks, _ = G._dense(cfg, abl, 1)
    for p, o in zip(ps, outs):
        ref = hf_generate(model, p, hooks)
        assert ref != hf_generate(model, p), "the zeroing changed nothing: the test would not see a wrong mask"
        assert o.tokens == ref
        assert o.tokens == recompute(cfg, params, p, {k: v[0] for k, v in masks.items()})[0]


def test_batch_rows_take_their_own_perturbation(models):
    """One batch of clean and masked rows (the generations stage) equals two separate batches."""
    _, cfg, params = models("llama")
    ps = prompts(cfg.vocab_size)
    neurons = NeuronSet.of([("k_proj", 2, 1), ("act_fn", 0, 9), ("down_proj", 1, 3)])
    both = G.generate_ids(cfg, params, ps * 2, G.ablation(cfg, neurons, [1.0, 1.0, 0.0, 0.0]), max_new_tokens=NEW)
    clean = G.generate_ids(cfg, params, ps, max_new_tokens=NEW)
    masked = G.generate_ids(cfg, params, ps, G.ablation(cfg, neurons), max_new_tokens=NEW)
    assert [o.tokens for o in both] == [o.tokens for o in clean + masked]
    assert [o.tokens for o in clean] != [o.tokens for o in masked]


def test_phi3_restarts_like_transformers_past_the_original_context(models):
    """Longrope: a 56-token prompt crosses rope_original_max (64) at the 9th new token, where
    transformers recomputes the sequence with the long factors; the 41-token one does not cross."""
    model, cfg, params = models("phi3")
    assert cfg.rope_type == "longrope" and cfg.rope_original_max == 64
    ps = prompts(cfg.vocab_size, (56, 41))
    for p, o in zip(ps, G.generate_ids(cfg, params, ps, max_new_tokens=NEW)):
        assert o.tokens == hf_generate(model, p)


def test_stop_tokens_and_finished(models):
    _, cfg, params = models("llama")
    ps = prompts(cfg.vocab_size)
    full = G.generate_ids(cfg, params, ps, max_new_tokens=NEW)
    stop = full[0].tokens[2]
    assert stop not in full[0].tokens[:2]
    cut = G.generate_ids(cfg, params, ps, max_new_tokens=NEW, stop_ids=[stop])
    first = [next((i for i, t in enumerate(f.tokens) if t == stop), NEW - 1) + 1 for f in full]
    assert [c.tokens for c in cut] == [f.tokens[:n] for f, n in zip(full, first)]
    seen = []
    early = G.generate_ids(cfg, params, ps, max_new_tokens=NEW, finished=lambda r, t: seen.append(len(t)) or len(t) > 2)
    assert seen == [1, 1, 1 + G.STEPS, 1 + G.STEPS]       # after the first token, then after each chunk
    assert [e.tokens for e in early] == [f.tokens[:1 + G.STEPS] for f in full]


def test_sampling_cuts_equal_transformers_warpers():
    z = np.random.default_rng(0).normal(size=(5, 211)).astype(np.float32) * 3
    for t, k, p in [(0.7, 0, 1.0), (1.3, 10, 1.0), (0.9, 0, 0.8), (1.0, 25, 0.6)]:
        warpers = [tf.TemperatureLogitsWarper(t)] + ([tf.TopKLogitsWarper(k)] if k else []) + (
            [tf.TopPLogitsWarper(p)] if p < 1 else [])
        ref = torch.tensor(z)
        for w in warpers:
            ref = w(None, ref)
        got = np.asarray(G.filter_logits(jnp.asarray(z), G.Sampling(t, k, p).args()[0]))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref.numpy()))
        assert 0 < np.isinf(got).sum() < z.size or (k, p) == (0, 1.0)
        fin = np.isfinite(got)
        np.testing.assert_allclose(got[fin], ref.numpy()[fin], rtol=1e-6)


def test_sampling_is_seeded_and_top_k_1_is_greedy(models):
    _, cfg, params = models("llama")
    ps = prompts(cfg.vocab_size)
    gen = lambda s: [o.tokens for o in G.generate_ids(cfg, params, ps, max_new_tokens=NEW, sampling=s)]
    hot = G.Sampling(temperature=2.0, seed=3)
    assert gen(hot) == gen(hot)
    assert gen(hot) != gen(G.Sampling(temperature=2.0, seed=4))
    assert gen(G.Sampling(temperature=2.0, top_k=1, seed=3)) == gen(G.Sampling())


def test_token_logprobs_equal_transformers(models):
    """Scored log-probabilities and greedy flags, clean and with a channel zeroed, sequences of
    several lengths in batches of 3 (the short batch repeats its last sequence); the masked ones
    equal the engine's per-token NLL."""
    model, cfg, params = models("llama")
    seqs = prompts(cfg.vocab_size, (33, 41, 40, 37))
    hooks = [(model.get_submodule("model.layers.1.mlp.down_proj"), zero([7]))]
    abl = G.ablation(cfg, NeuronSet.of([("down_proj", 1, 7)]))
    clean, masked = (G.token_logprobs(cfg, params, seqs, a, batch=3) for a in (None, abl))
    for got, hk in [(clean, ()), (masked, hooks)]:
        handles = [mod.register_forward_hook(h) for mod, h in hk]
        try:
            for s, (lp, greedy) in zip(seqs, got):
                with torch.no_grad():
                    z = model(torch.tensor([s])).logits[0, :-1].double()
                ref = torch.log_softmax(z, -1)[torch.arange(len(s) - 1), torch.tensor(s[1:])].numpy()
                np.testing.assert_allclose(lp, ref, atol=2e-5)
                np.testing.assert_array_equal(greedy, (z.argmax(-1) == torch.tensor(s[1:])).numpy())
        finally:
            for h in handles:
                h.remove()
    greedy_seq = seqs[0] + G.generate_ids(cfg, params, seqs[:2], max_new_tokens=NEW)[0].tokens
    assert G.token_logprobs(cfg, params, [greedy_seq], batch=3)[0][1][len(seqs[0]) - 1:].all()
    # the masked model that is scored (and generates) is the one the engine scores
    eng = E.Engine(cfg, params, E.Texts.from_ids(seqs[:1]), chunk=1, progress=False)
    np.testing.assert_allclose(-masked[0][0], eng.losses(abl, per_token=True)[0, 0], atol=2e-5)
    assert np.abs(masked[0][0] - clean[0][0]).max() > 1e-3


def test_special_ids_of_a_checkpoint_dir(tmp_path):
    """generation_config.json's EOS (a list here) over config.json's; BOS from config.json."""
    (tmp_path / "config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    assert special_ids(tmp_path) == (1, (2,))
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [5, 7], "bos_token_id": null}')
    assert special_ids(tmp_path) == (1, (5, 7))
