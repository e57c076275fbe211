"""Mutation-testing glue for pytest-gremlins (docs/mutation.md); inert in ordinary test runs.

pytest-gremlins picks, for each mutant, the tests that covered its line in one in-process run of the
suite. Two kinds of sharing would credit a line to the first test that ran it alone: a module-scoped
fixture (its setup runs under the first test that asks for it) and jax's jit cache (a program traced
by one test is reused by later tests without running its Python again). Later tests that check what
such a line computed would never run against the mutant, which would then survive falsely.
"""
from __future__ import annotations

import os

import pytest

_SELECTED = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    """In a mutant's process (ACTIVE_GREMLIN set), collect every test of each selected file."""
    if os.environ.get("ACTIVE_GREMLIN"):
        config.stash[_SELECTED] = [a for a in config.args if "::" in a]
        config.args = list(dict.fromkeys(a.split("::")[0] for a in config.args))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the selected tests first, in the order given (the most specific first, so -x stops
    early), then the rest of their files; each file's tests stay together."""
    selected = {nodeid: i for i, nodeid in enumerate(config.stash.get(_SELECTED, []))}
    if not selected:
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
