"""Shared fixtures. Tests under tests/unit are marked `unit`, tests/integration `integration`,
tests/e2e `e2e`, so `-m` selects them by folder as well as by explicit marks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_FOLDER_MARKS = {"unit": pytest.mark.unit, "integration": pytest.mark.integration, "e2e": pytest.mark.e2e}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in _FOLDER_MARKS and folder not in item.keywords:
            item.add_marker(_FOLDER_MARKS[folder])


@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with random weights: it answers with all 128 tokens of its budget, in
    several segments, which makes a turn long enough to interrupt or to crash a worker in."""
    from echox.checkpoint import EchoX
    from echox.models.presets import get_preset

    return EchoX.random_init(get_preset("tiny"), seed=0).save_pretrained(tmp_path_factory.mktemp("rand") / "tiny")
