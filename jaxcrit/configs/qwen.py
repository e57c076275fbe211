"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen checkpoints (a HF dir or a Hub id), bf16 on a GPU.

    python -m jaxcrit.main --config=qwen:/path/to/Qwen2.5-0.5B-Instruct --workdir=runs/qwen
    python -m jaxcrit.main --config=qwen:Qwen/Qwen2.5-0.5B-Instruct --workdir=runs/qwen
"""
from jaxcrit.configs.common import checkpoint


def get_config(arg=None):
    c = checkpoint(arg, "qwen")
    c.stage1.batch = 20
    return c
