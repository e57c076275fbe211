#!/usr/bin/env bash
# Mutation testing of the core modules with pytest-gremlins (docs/mutation.md). The modules, the
# operators and the timeouts are in pyproject.toml's [tool.pytest-gremlins]. Arguments go to pytest:
# `--gremlin-targets jaxcrit/critical/maps.py tests/test_maps.py` mutates one module against one
# test file; with no test path given, the test set is the fast files of tests/ (below).
#
# Each mutant runs in a fresh interpreter (never a fork of one that ran jax), one at a time, at the
# lowest CPU priority, with -x, on the test files that covered its line in one coverage run.
# Left out of the default set: files that start subprocesses or many devices (their coverage is not
# seen, and each takes minutes) and the GPU kernels' tests (those modules are not mutated).
#
# jax's persistent compilation cache is shared by the mutants' processes: its key is the compiled
# program (HLO) itself, never the Python function, so a mutant that changes what a jitted function
# computes compiles its own program, and the unchanged programs are not compiled again.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.gremlins_cache/jax}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
tests=(tests --ignore=tests/test_bad_input.py --ignore=tests/test_cli.py --ignore=tests/test_coordinator.py
       --ignore=tests/test_engine_sharding.py --ignore=tests/test_host_reading.py
       --ignore=tests/test_multiprocess.py --ignore=tests/test_peer_death.py --ignore=tests/test_plan.py
       --ignore=tests/test_sharding.py --ignore=tests/test_lmeval.py --ignore=tests/test_resume_faults.py
       --ignore=tests/test_structure.py
       --ignore=tests/test_fused_loss.py --ignore=tests/test_fused_mlp.py --ignore=tests/test_hopper.py)
for a in "$@"; do [[ $a == tests/* ]] && tests=(); done
exec nice -n 19 python -m pytest --gremlins -q -p no:cacheprovider "$@" "${tests[@]}"
