"""The study on the embedded SmolLM2-135M-Instruct, sized for a 2-core CPU; docs/findings.md is its report.

    python -m jaxcrit.main --config=study:/path/to/wikitext --workdir=runs/study
    python -m jaxcrit.main --config=study:hf-dataset:ORG/NAME/wiki.test.raw --workdir=runs/study
    python -m jaxcrit.findings --workdir=runs/study --out=docs/findings.md

The argument after the colon is the corpus: the WikiText test split in its raw layout (a directory
holding one *.raw file, or the file; tests/data/wikitext is a small one in that layout), or such a
file in a dataset repository on the Hugging Face Hub (hf-dataset:ORG/NAME/path/in/repo[@REVISION],
fetched into the hub cache). Without it the evaluation covers the default text only and there are
no task scores. On top
of the default run (configs/smollm2.py): the full Stage 2 curve to n = 200 in both ranking modes,
the baselines to 100 neurons, Stage 1's 16 best down_proj channels of every layer scanned and greedy
search over the scan's best 32, the whole-model map, the evaluation of the critical sets at epsilon
1 and 3, the greedy and the learned set on the first 100 WikiText paragraphs, Stage 1 + Stage 2
again for seeds 0-2, alpha 1/3/10, K 10/50 and ten texts, the dtype sweep, the learned mask over
Stage 1's 128 best neurons, the largest activations, base vs masked generations, and lm-eval scores
of the clean model and those sets on two tasks built from the corpus (jaxcrit/evaluate/tasks.py; they need
`pip install 'jaxcrit[eval]'`).
"""
from jaxcrit.configs.smollm2 import get_config as smollm2


def get_config(arg=None):
    c = smollm2()
    c.stage2.full_curve = True
    c.stage2.max_steps = 200
    c.baselines.ns = (1, 3, 10, 30, 100)
    c.scan.layers = tuple(range(30))
    c.scan.top = 16
    c.scan.greedy_steps = 8
    c.scan.greedy_pool = 32
    c.map.enabled = True
    c.map.block = 64
    c.evaluate.file = arg or ""
    c.evaluate.limit = 100
    c.evaluate.sets = ("prefix@3", "greedy", "learned")
    c.study.other_ranking = True
    c.study.seeds = (0, 1, 2, 42)
    c.study.alphas = (1.0, 3.0, 5.0, 10.0)
    c.study.samples = (10, 50, 100)
    c.study.texts = ("en_science", "en_history", "en_story", "en_instructions", "en_code", "fr", "de", "es", "it", "zh")
    c.study.dtypes = ("float32", "bfloat16", "float16")
    c.study.massive = 20
    c.learned.candidates = 128
    c.learned.steps = 150
    c.generate.enabled = True
    c.tasks.enabled = bool(arg)
    return c
