"""The tests' compilation cache, and mutation-testing glue for pytest-gremlins (docs/mutation.md).

JAX's persistent compilation cache (jaxcrit/dist/compile_cache.py) goes to a directory of the
session's own, never the user's ~/.cache: JAX_COMPILATION_CACHE_DIR, which jax itself and the
cache's "auto" setting honour and subprocesses inherit, is set before any test runs. Every program
is kept (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, jaxcrit's own floor), and pytest-xdist's
workers share the directory their controller made: most test files compile the same programs of
the same tiny models, so a program one worker compiled the other reads. The cache is keyed on the
compiled program itself, so a changed program is compiled anew.

XLA compiles the tests' many small programs with its cheap settings (XLA_FLAGS gains
--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true, appended to any flags
already set, and inherited by subprocesses; a test that needs more CPU devices sets
JAX_NUM_CPU_DEVICES, not XLA_FLAGS): compiling is most of a tiny model's run, and the tests compare
results, never speed.

Files of one or a few tests that each run for minutes (whole runs in subprocesses, FIRST) are
collected first, and pytest-xdist keeps the collection's order: its default for --dist loadfile
orders the files by their number of tests, which queued exactly these last, one of them trailing
the run on one worker while the other had nothing left.

The mutation-testing glue is inert in ordinary test runs.

pytest-gremlins picks, for each mutant, the tests that covered its line in one in-process run of the
suite. Two kinds of sharing would credit a line to the first test that ran it alone: a module-scoped
fixture (its setup runs under the first test that asks for it) and jax's jit cache (a program traced
by one test is reused by later tests without running its Python again). Later tests that check what
such a line computed would never run against the mutant, which would then survive falsely.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_SELECTED = pytest.StashKey[list]()


_CACHE = pytest.StashKey[str]()
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
FIRST = ("test_multiprocess.py", "test_plan.py", "test_engine_sharding.py", "test_peer_death.py", "test_study.py",
         "test_resume_faults.py", "test_compile_cache.py")


def pytest_configure(config: pytest.Config) -> None:
    """XLA's cheap compile settings; xdist's order of files kept; the session's compilation cache
    directory (an xdist worker keeps its controller's, which the controller removes); in a
    mutant's process (ACTIVE_GREMLIN set), collect every test of each selected file."""
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    if hasattr(config.option, "loadscopereorder"):   # pytest-xdist: keep the collection's order of files
        config.option.loadscopereorder = False
    if CHEAP_XLA not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CHEAP_XLA).strip()
    if not hasattr(config, "workerinput"):
        config.stash[_CACHE] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcrit-jax-cache-")
    if os.environ.get("ACTIVE_GREMLIN"):
        config.stash[_SELECTED] = [a for a in config.args if "::" in a]
        config.args = list(dict.fromkeys(a.split("::")[0] for a in config.args))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE in config.stash:
        shutil.rmtree(config.stash[_CACHE], ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """FIRST's files first (the rest in their order); in a mutant's process, the selected tests
    first, in the order given (the most specific first, so -x stops early), then the rest of their
    files. Each file's tests stay together, in their order."""
    selected = {nodeid: i for i, nodeid in enumerate(config.stash.get(_SELECTED, []))}
    if not selected:
        rank = {name: i for i, name in enumerate(FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))
        return
    first = {}
    for item in items:
        first[item.path] = min(first.get(item.path, len(selected)), selected.get(item.nodeid, len(selected)))
    items.sort(key=lambda item: (first[item.path], selected.get(item.nodeid, len(selected))))


@pytest.fixture(autouse=True)
def _trace_per_test(request: pytest.FixtureRequest):
    """In the coverage pre-scan (the process pytest-gremlins records per-test coverage in), drop jax's
    compiled programs after each test, so every test traces (runs the Python of) each jitted
    function it calls."""
    yield
    if request.config.pluginmanager.has_plugin("pytest_gremlins.coverage.subprocess_bootstrap"):
        import jax
        jax.clear_caches()
