"""Fixtures of the export tests."""

from __future__ import annotations

import pytest

from tests.export.tiny_graphs import TinyGraphs


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory: pytest.TempPathFactory) -> TinyGraphs:
    """Each family's tiny graphs, exported and verified once for every test that reads them."""
    return TinyGraphs(tmp_path_factory.mktemp("tiny-graphs"))
