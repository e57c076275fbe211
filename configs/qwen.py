"""Qwen2 / Qwen2.5 / DeepSeek-R1-Distill-Qwen checkpoints (a HF dir or a Hub id), bf16 on a GPU.

The entry point of `--config=configs/qwen.py`; the config itself is jaxcrit/configs/qwen.py (also
`--config=qwen` from any directory or an installed wheel).
"""
from jaxcrit.configs.qwen import get_config  # noqa: F401
