"""Tiny GGUF files written with gguf.GGUFWriter: a random llama model and deliberately bad variants."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

TINY = dict(vocab=96, d=64, heads=4, kv_heads=2, ff=128, layers=2)


def _tokens(n: int) -> list[str]:
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"t{i}" for i in range(3, n)]


def write_llama(path: Path, *, arch: str = "llama", kernel_type=gguf.GGMLQuantizationType.Q8_0,
                tokenizer_model: str = "gpt2", seed: int = 0, vocab_size: bool = True,
                rope_scaling: gguf.RopeScalingType | None = None, rope_freqs: bool = False) -> Path:
    """A random, untied llama model; kernels quantized to kernel_type (Q8_1: raw zero blocks,
    which the gguf package cannot dequantize). vocab_size False leaves out {arch}.vocab_size (the
    token list then gives it); rope_scaling writes rope.scaling.type, rope_freqs a rope_freqs tensor."""
    c = TINY
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_name("tiny")
    w.add_block_count(c["layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["d"])
    w.add_feed_forward_length(c["ff"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    if vocab_size:
        w.add_vocab_size(c["vocab"])
    if rope_scaling is not None:
        w.add_rope_scaling_type(rope_scaling)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(_tokens(c["vocab"]))
    w.add_token_types([3, 3, 3] + [1] * (c["vocab"] - 3))

    def kernel(name: str, out_dim: int, in_dim: int) -> None:
        x = (0.1 * rng.standard_normal((out_dim, in_dim))).astype(np.float32)
        if kernel_type == gguf.GGMLQuantizationType.Q8_1:
            block, size = gguf.GGML_QUANT_SIZES[kernel_type]
            w.add_tensor(name, np.zeros((out_dim, in_dim // block * size), np.uint8), raw_dtype=kernel_type)
        else:
            w.add_tensor(name, gguf.quants.quantize(x, kernel_type), raw_dtype=kernel_type)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(c["d"])).astype(np.float32))

    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(c["d"] // c["heads"] // 2, np.float32))
    w.add_tensor("token_embd.weight", rng.standard_normal((c["vocab"], c["d"])).astype(np.float32))
    norm("output_norm.weight")
    kernel("output.weight", c["vocab"], c["d"])
    hd = c["d"] // c["heads"]
    for i in range(c["layers"]):
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        kernel(f"blk.{i}.attn_q.weight", c["d"], c["d"])
        kernel(f"blk.{i}.attn_k.weight", c["kv_heads"] * hd, c["d"])
        kernel(f"blk.{i}.attn_v.weight", c["kv_heads"] * hd, c["d"])
        kernel(f"blk.{i}.attn_output.weight", c["d"], c["d"])
        kernel(f"blk.{i}.ffn_gate.weight", c["ff"], c["d"])
        kernel(f"blk.{i}.ffn_up.weight", c["ff"], c["d"])
        kernel(f"blk.{i}.ffn_down.weight", c["d"], c["ff"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
