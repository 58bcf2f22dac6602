"""Pytest fixtures over the shared test fixtures of ``bwskc.testing`` (the model zoo, ``Block``).

The zoo's models, their export and their lowering are built lazily, once per session, and shared by the
tests of ``test_zoo.py`` (a failure in one model's lowering fails that model's tests only). The zoo's
names are re-exported here for the tests that import them from ``conftest``; new code imports
``bwskc.testing``.
"""
from __future__ import annotations

import pytest

from bwskc.testing import (  # noqa: F401  (re-exported for ``from conftest import ...``)
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
