"""The study on the embedded SmolLM2 (docs/findings.md is its report).

The entry point of `--config=configs/study.py[:corpus]` (a local corpus or
hf-dataset:ORG/NAME/path[@REVISION]); the config itself is jaxcrit/configs/study.py (also
`--config=study` from any directory or an installed wheel).
"""
from jaxcrit.configs.study import get_config  # noqa: F401
