"""Tiny random transformers models of every supported family, saved with save_pretrained."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import transformers as tf

from jaxcrit.models.config import ModelConfig
from jaxcrit.models.sites import SITE_NAMES, module_path

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=120, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0, tie_word_embeddings=False),
    "qwen2": lambda: tf.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=24, tie_word_embeddings=False),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),
    "gemma": lambda: tf.GemmaConfig(**{**COMMON, "num_key_value_heads": 1}, head_dim=32,
                                    hidden_activation="gelu_pytorch_tanh"),
    "phi3": lambda: tf.Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0,
                                  rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                "long_factor": [2.0 + 0.1 * i for i in range(8)]},
                                  original_max_position_embeddings=64, tie_word_embeddings=False),
}


def build(arch: str, directory: Path, seed: int = 0, *, layers: int | None = None,
          initializer_range: float | None = None):
    """Saves a random model of `arch` to directory; returns the torch model (f32, eval).

    initializer_range 0.2 (instead of 0.02) makes single channels move the loss visibly.
    """
    torch.manual_seed(seed)
    cfg = CONFIGS[arch]()
    if layers is not None:
        cfg.num_hidden_layers = layers
    if initializer_range is not None:
        cfg.initializer_range = initializer_range
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # make norms and biases non-trivial so their mapping is checked
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def shapes_config() -> ModelConfig:
    """A llama ModelConfig with no weights behind it, for host-side logic that reads only shapes:
    3 layers and site widths that all differ (q_proj 24 = 4 heads x 6, k/v_proj 12, d_model 10,
    d_ff 14)."""
    return ModelConfig(model_type="llama", vocab_size=50, d_model=10, n_layers=3, n_heads=4, n_kv_heads=2,
                       head_dim=6, d_ff=14, norm_eps=1e-6, rope_theta=1e4, tie_embeddings=True)


def hf_site(model, arch: str, cfg, name: str, layer: int) -> tuple[torch.nn.Module, int]:
    """The HF module whose output holds a site of a layer, and the site's first column in it
    (phi3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj); cfg: jaxcrit's ModelConfig."""
    from jaxcrit.models.sites import site
    Q, KV, F = cfg.q_dim, cfg.kv_dim, cfg.d_ff
    module, offset = site(name).module, 0
    if arch == "phi3":
        fused = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", Q),
                 "v_proj": ("self_attn.qkv_proj", Q + KV), "gate_proj": ("mlp.gate_up_proj", 0),
                 "up_proj": ("mlp.gate_up_proj", F), "act_fn": ("mlp.activation_fn", 0)}
        module, offset = fused.get(name, (module, 0))
    return model.get_submodule(f"model.layers.{layer}.{module}"), offset


@contextlib.contextmanager
def zeroed(model, neurons: Iterable[tuple[str, int, int]], on: bool = True) -> Iterator:
    """The transformers model with these (site, layer, channel) outputs zeroed by forward hooks
    while inside (on=False: untouched); module paths from jaxcrit's site table."""
    from jaxcrit.models.sites import site
    by_module: dict[str, list[int]] = {}
    for s, layer, c in neurons if on else ():
        by_module.setdefault(f"model.layers.{layer}.{site(s).module}", []).append(c)

    def zero(channels):
        def hook(mod, args, out):
            out = out.clone()
            out[..., channels] = 0.0
            return out
        return hook
    handles = [model.get_submodule(m).register_forward_hook(zero(cs)) for m, cs in by_module.items()]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one intra-op thread while inside. A tiny model's forward has next to nothing to
    share out, and next to jax's threads a second OpenMP thread mostly spins: on 2 busy cores a
    2-layer forward of 35 tokens took ~30x the CPU time of a single thread's."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def hooked_importance(model, ids: np.ndarray, noise: np.ndarray, alpha: float) -> dict[str, np.ndarray]:
    """{hf module path: [T, C] mean_k |clean - noisy_k|}: one unbatched torch forward per sample,
    inputs_embeds = (E(x) + alpha * noise_k) * the model's embedding scale (1 if it has none)."""
    names = [module_path(s, i) for i in range(model.config.num_hidden_layers) for s in SITE_NAMES]
    embed = model.model.embed_tokens
    scale = getattr(embed, "embed_scale", torch.tensor(1.0))
    raw = embed.weight[torch.tensor(ids[None], dtype=torch.long)]                        # E(x) [1, T, D]
    cur: dict[str, np.ndarray] = {}

    def keep(name: str):
        return lambda mod, args, out: cur.__setitem__(name, out[0].detach().double().numpy())
    hooks = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    try:
        with torch.no_grad():
            model(inputs_embeds=raw * scale)
            clean = dict(cur)
            acc = {n: np.zeros_like(v) for n, v in clean.items()}
            for eps in noise:
                model(inputs_embeds=(raw + alpha * torch.from_numpy(eps)[None]) * scale)
                for n in names:
                    acc[n] += np.abs(clean[n] - cur[n])
    finally:
        for h in hooks:
            h.remove()
    return {n: v / len(noise) for n, v in acc.items()}
