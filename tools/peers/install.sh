#!/usr/bin/env bash
# Installs the peers of the interventions benchmark (nnsight 0.8.1, transformer-lens 4.3.0) with no
# network, from a folder of wheels, into a target folder to put on PYTHONPATH:
#
#     bash tools/peers/install.sh .whl/peers /tmp/peers-site && export PYTHONPATH=/tmp/peers-site
#
# The folder holds the two packages and those of their requirements that a machine with torch,
# transformers, numpy, pandas, pyarrow, einops, jaxtyping and accelerate lacks (cp312 manylinux
# wheels). Two requirements are left out because nothing the peer scripts run imports them:
# wandb (TransformerLens' training loop only) and transformers-stream-generator (no wheel exists).
# Each wheel is installed without resolving (--no-deps); then every requirement of the two is
# checked against what is importable, and the two are imported.
set -euo pipefail
wheels=${1:?usage: install.sh WHEELS_DIR TARGET_DIR}
target=${2:?usage: install.sh WHEELS_DIR TARGET_DIR}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$wheels"/*.whl
PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" python3 - <<'EOF'
"""Each requirement of nnsight and transformer-lens, and of those installed with them, against the
versions importable now."""
import os
from importlib.metadata import PackageNotFoundError, distribution
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

LEFT_OUT = {"wandb", "transformers-stream-generator"}
TARGET = os.path.realpath(os.environ["PYTHONPATH"].split(":")[0])
todo, seen, problems = ["nnsight", "transformer-lens"], set(), []
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    for line in distribution(name).requires or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        dep = canonicalize_name(req.name)
        try:
            got = distribution(dep).version
        except PackageNotFoundError:
            if dep not in LEFT_OUT:
                problems.append(f"{name} needs {req}: not installed")
            continue
        if not req.specifier.contains(got, prereleases=True):
            problems.append(f"{name} needs {req}: {got} is installed")
        if os.path.realpath(distribution(dep).locate_file("")).startswith(TARGET):
            todo.append(dep)
for p in problems:
    print("warning:", p)
import nnsight, transformer_lens.model_bridge  # noqa: E401,F401  (fails here if a needed module is missing)
print("nnsight", distribution("nnsight").version, "and transformer-lens", distribution("transformer-lens").version,
      "import;", len(seen), "distributions checked,", len(problems), "warnings")
EOF
