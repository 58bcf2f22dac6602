"""Pytest fixtures over the shared test fixtures of ``bwskc.testing`` (the model zoo, ``Block``).

The zoo's models, their export and their lowering are built lazily, once per session, and shared by the
tests of ``test_zoo.py`` (a failure in one model's lowering fails that model's tests only). The zoo's
names are re-exported here for the tests that import them from ``conftest``; new code imports
``bwskc.testing``.
"""
from __future__ import annotations

import os

# Under pytest-xdist each worker takes its share of the cores (torch would start one thread a core in
# every worker, oversubscribing them); set before torch is imported, inherited by spawned processes.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_share))

import pytest  # noqa: E402

from bwskc.testing import (  # noqa: F401, E402  (re-exported for ``from conftest import ...``)
    ZOO_NAMES,
    ZOO_SPECS,
    Block,
    Zoo,
    ZooEntry,
    build_zoo_model,
    lower_zoo_model,
)


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    """The session's zoo: ``zoo[name]`` lowers a model on first use and caches it (or its error)."""
    return Zoo()
