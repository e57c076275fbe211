"""llama.cpp GGUF file -> (ModelConfig, params): dequantized to float, placed like a HF checkpoint.

The metadata is turned into the HF config.json dict transformers' GGUF loader builds, so the one
`from_hf_config` decides what is supported. llama.cpp permutes the rows of q and k for its RoPE
layout (interleaved pairs); that is undone here so the decoder's rotate-half RoPE applies.
"""
from __future__ import annotations

import functools

from pathlib import Path
from typing import Any, Callable

import gguf
import jax
import numpy as np
from jax.sharding import Mesh

from jaxcrit.convert.hf import place
from jaxcrit.errors import JaxcritError
from jaxcrit.models.config import ModelConfig, from_hf_config
from jaxcrit.models.params import param_table
from jaxcrit.dist.sharding import DEFAULT_RULES, make_mesh

SUPPORTED_ARCHS = ("llama",)

GLOBAL_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
LAYER_TENSORS = {
    "input_norm": "attn_norm", "q_w": "attn_q", "k_w": "attn_k", "v_w": "attn_v", "o_w": "attn_output",
    "post_norm": "ffn_norm", "gate_w": "ffn_gate", "up_w": "ffn_up", "down_w": "ffn_down",
}


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A memory-mapped reader; a missing or malformed file is a user error, not a traceback.

    Readers are kept per (file, mtime, size) until load_gguf has read the weights: parsing the
    metadata of a vocabulary-sized GGUF takes seconds, and a run reads it for validation,
    tokenizer and weights, in that order.
    """
    p = Path(path)
    if not p.is_file():
        raise JaxcritError(f"{p}: no such GGUF file")
    st = p.stat()
    return _open(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, ... on a bad file
        raise JaxcritError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def architecture(reader: gguf.GGUFReader, where: str) -> str:
    arch = field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise JaxcritError(f"{where}: GGUF architecture '{arch}' is not supported; "
                           f"supported: {', '.join(SUPPORTED_ARCHS)}")
    return arch


def hf_config(reader: gguf.GGUFReader, where: str) -> dict:
    """The HF config.json dict equivalent to the GGUF metadata (as transformers' loader reads it)."""
    arch = architecture(reader, where)
    names = {t.name for t in reader.tensors}

    def need(key: str) -> Any:
        v = field(reader, f"{arch}.{key}")
        if v is None:
            raise JaxcritError(f"{where}: GGUF metadata lacks '{arch}.{key}'; the file is incomplete")
        return v

    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in names:
        raise JaxcritError(f"{where}: GGUF RoPE scaling is not supported (rope.scaling.type={scaling}, "
                           f"rope_freqs tensor {'present' if 'rope_freqs.weight' in names else 'absent'}); "
                           "load the HF checkpoint with load_hf instead")
    heads = int(need("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise JaxcritError(f"{where}: GGUF metadata gives no vocabulary size ({arch}.vocab_size or tokens)")
    cfg = {
        "model_type": "llama",
        "num_hidden_layers": int(need("block_count")),
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(need("context_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
    }
    head_dim = field(reader, f"{arch}.rope.dimension_count")
    if head_dim is not None:
        cfg["head_dim"] = int(head_dim)
    return cfg


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the gguf package can dequantize this type (probed on one zero block)."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _tensors(reader: gguf.GGUFReader, cfg: ModelConfig, where: str) -> dict[str, dict[int | None, Any]]:
    """param name -> {layer (None if unstacked) -> ReaderTensor}, checked against the param table."""
    by_name = {t.name: t for t in reader.tensors}
    out: dict[str, dict[int | None, Any]] = {}
    for name, (shape, axes) in param_table(cfg).items():
        stacked = axes[0] == "layers"
        keys = ({i: f"blk.{i}.{LAYER_TENSORS[name]}.weight" for i in range(cfg.n_layers)} if stacked
                else {None: GLOBAL_TENSORS[name]})
        per = shape[1:] if stacked else shape
        want = per[::-1] if name.endswith("_w") else per
        for key in keys.values():
            t = by_name.get(key)
            if t is None:
                raise JaxcritError(f"{where}: tensor {key} is missing; the GGUF does not match its metadata")
            got = tuple(int(n) for n in t.shape[::-1])
            if got != tuple(want):
                raise JaxcritError(f"{where}: tensor {key} has shape {got} but the metadata implies {want}")
        out[name] = {i: by_name[k] for i, k in keys.items()}
    used = {t.name for ts in out.values() for t in ts.values()}
    extra = sorted(set(by_name) - used)
    if extra:
        raise JaxcritError(f"{where}: {len(extra)} GGUF tensors have no place in a llama model "
                           f"(e.g. {', '.join(extra[:3])})")
    bad = sorted({t.tensor_type.name for t in by_name.values() if not _dequantizable(t.tensor_type)})
    if bad:
        raise JaxcritError(f"{where}: quantization type {', '.join(bad)} cannot be dequantized by the installed "
                           "gguf package; upgrade gguf or use a Q4_0/Q4_1/Q5_*/Q8_0/K-quant/F16/F32 file")
    return out


def _reader(cfg: ModelConfig, name: str, tensors: dict[int | None, Any]) -> Callable[..., np.ndarray]:
    """read(layer, index) -> that tensor dequantized, q/k unpermuted, kernels transposed to [in, out],
    the part index names (quantized blocks are dequantized whole, then sliced)."""
    heads = {"q_w": cfg.n_heads, "k_w": cfg.n_kv_heads}.get(name)

    def read(i: int | None, index: tuple[slice, ...]) -> np.ndarray:
        t = tensors[i]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in t.shape[::-1]))
        if np.shares_memory(w, t.data):  # F32 comes back as a view of the file's mmap: own the params
            w = w.copy()
        if heads:
            w = unpermute(w, heads)
        return (w.T if name.endswith("_w") else w)[index]

    return read


def load_gguf(path: str | Path, dtype=np.float32, mesh: Mesh | None = None,
              rules=DEFAULT_RULES) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Reads a llama-architecture GGUF into (ModelConfig, params), params placed on `mesh`."""
    where = str(path)
    reader = open_gguf(path)
    cfg = from_hf_config(hf_config(reader, where), where)
    tensors = _tensors(reader, cfg, where)
    read = {name: _reader(cfg, name, ts) for name, ts in tensors.items()}
    params = place(cfg, read, mesh or make_mesh(), rules, dtype)
    _open.cache_clear()   # the parsed metadata holds ~200 MB for a 49k-token vocabulary: let it go
    return cfg, params
