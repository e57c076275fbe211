"""ModelConfig: the architecture facts of one checkpoint, read from a Hugging Face config.json.

One spec row per family (`FAMILIES`) holds what differs between architectures; everything the
decoder branches on is a field here, never a `model_type` string test in the forward.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxcrit.errors import JaxcritError


@dataclasses.dataclass(frozen=True)
class Family:
    """What one HF `model_type` means for the decoder and the importer."""
    act: str                 # MLP gate activation: "silu" | "gelu_tanh"
    qkv_bias: bool           # q/k/v projections carry biases
    qk_norm: bool            # per-head RMSNorm on q and k (Qwen3)
    norm_plus_one: bool      # RMSNorm scales by (1 + w) (Gemma)
    embed_scale: bool        # embeddings multiplied by sqrt(d_model) (Gemma)
    fused: bool              # checkpoint stores qkv_proj and gate_up_proj fused (Phi-3)


FAMILIES: dict[str, Family] = {
    "llama":   Family("silu", False, False, False, False, False),
    "mistral": Family("silu", False, False, False, False, False),
    "qwen2":   Family("silu", True, False, False, False, False),
    "qwen3":   Family("silu", False, True, False, False, False),
    "gemma":   Family("gelu_tanh", False, False, True, True, False),
    "phi3":    Family("silu", False, False, False, False, True),
}

ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer. Hashable: it is a static jit argument."""
    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max: int = 0
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    max_position_embeddings: int = 4096
    attention_bias: bool = False   # Llama's attention_bias: biases on q, k, v and o
    sliding_window: int = 0        # 0: none

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def _need(cfg: dict, key: str, where: str) -> Any:
    if key not in cfg:
        raise JaxcritError(f"{where}: config.json lacks '{key}'; is this a decoder-only causal LM checkpoint?")
    return cfg[key]


def _rope(cfg: dict, where: str) -> dict:
    """Reads rope_theta/rope_scaling (hub checkpoints) or rope_parameters (transformers >= 5)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise JaxcritError(f"{where}: rope type '{rtype}' is not supported; supported: {', '.join(ROPE_TYPES)}")
    out = {"rope_theta": float(theta), "rope_type": rtype}
    if rtype in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rtype == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max"] = int(params["original_max_position_embeddings"])
    if rtype == "longrope":
        out["rope_short_factor"] = tuple(float(x) for x in params["short_factor"])
        out["rope_long_factor"] = tuple(float(x) for x in params["long_factor"])
        out["rope_original_max"] = int(params.get("original_max_position_embeddings")
                                       or cfg["original_max_position_embeddings"])
        if "factor" in params:
            out["rope_factor"] = float(params["factor"])
        else:
            out["rope_factor"] = cfg["max_position_embeddings"] / out["rope_original_max"]
    prf = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if prf != 1.0:
        raise JaxcritError(f"{where}: partial_rotary_factor={prf} is not supported (only 1.0)")
    return out


def from_hf_config(cfg: dict, where: str = "config.json") -> ModelConfig:
    """Maps a HF config.json dict to a ModelConfig; refuses what it does not understand."""
    mtype = cfg.get("model_type")
    if mtype not in FAMILIES:
        raise JaxcritError(f"{where}: unknown model_type '{mtype}'; supported: {', '.join(sorted(FAMILIES))}")
    if cfg.get("mlp_bias"):
        raise JaxcritError(f"{where}: mlp_bias=true is not supported")
    if mtype == "gemma":
        act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise JaxcritError(f"{where}: Gemma hidden_activation '{act}' is not supported")
    else:
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise JaxcritError(f"{where}: hidden_act '{act}' is not supported for {mtype} (only silu)")
    layer_types = cfg.get("layer_types") or []
    window = 0
    if mtype == "mistral" or (cfg.get("use_sliding_window") and "sliding_attention" in layer_types):
        if mtype != "mistral" and any(t != "sliding_attention" for t in layer_types):
            raise JaxcritError(f"{where}: mixed sliding/full attention layers are not supported")
        window = int(cfg.get("sliding_window") or 0)
    d = int(_need(cfg, "hidden_size", where))
    heads = int(_need(cfg, "num_attention_heads", where))
    head_dim = cfg.get("head_dim") or d // heads
    return ModelConfig(
        model_type=mtype,
        vocab_size=int(_need(cfg, "vocab_size", where)),
        d_model=d,
        n_layers=int(_need(cfg, "num_hidden_layers", where)),
        n_heads=heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        d_ff=int(_need(cfg, "intermediate_size", where)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", mtype == "gemma")),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        attention_bias=bool(cfg.get("attention_bias", False)) and mtype in ("llama", "qwen3"),
        sliding_window=window,
        **_rope(cfg, where),
    )


def to_hf_config(cfg: ModelConfig) -> dict:
    """The config.json fields from_hf_config reads, for a shape without rope scaling, sliding
    window or attention bias (what a model shape for a memory plan needs; tools/model_shape.py)."""
    return {"model_type": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings,
            "hidden_act": "gelu_pytorch_tanh" if cfg.family.act == "gelu_tanh" else "silu"}


def rope_inv_freq(cfg: ModelConfig, seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim/2] (float32, as transformers computes them) and the cos/sin scale."""
    dim = cfg.head_dim
    base = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    if cfg.rope_type == "linear":
        return base / np.float32(cfg.rope_factor), 1.0
    if cfg.rope_type == "llama3":
        low_wl = cfg.rope_original_max / cfg.rope_low_freq_factor
        high_wl = cfg.rope_original_max / cfg.rope_high_freq_factor
        wl = np.float32(2 * math.pi) / base
        scaled = np.where(wl > low_wl, base / np.float32(cfg.rope_factor), base)
        smooth = (cfg.rope_original_max / wl - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / np.float32(cfg.rope_factor) + smooth * scaled
        medium = ~(wl < high_wl) & ~(wl > low_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if cfg.rope_type == "longrope":
        ext = cfg.rope_long_factor if seq_len > cfg.rope_original_max else cfg.rope_short_factor
        scale = 1.0 if cfg.rope_factor <= 1.0 else math.sqrt(
            1 + math.log(cfg.rope_factor) / math.log(cfg.rope_original_max))
        inv = np.float32(1.0) / (np.asarray(ext, np.float32) * (np.float32(cfg.rope_theta) ** (
            np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))))
        return inv.astype(np.float32), scale
    return base.astype(np.float32), 1.0
