"""Benchmarks of the engine, the pipeline, the map, multi-GPU scaling, the fused kernels and
conversion, on Qwen2.5-shaped models with random weights: `python -m jaxcrit.bench --help`.

model.py holds what they share with the tests: the shapes (SHAPES) and the one generator of
random params, drawn on the devices and placed by a params layout.
"""
from jaxcrit.bench.model import QWEN_05B, SHAPES, random_params, random_text, random_tokens

__all__ = ["QWEN_05B", "SHAPES", "random_params", "random_text", "random_tokens"]
