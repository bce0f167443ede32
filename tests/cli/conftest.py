"""Fixtures of the CLI tests: a clean environment and private ``memory://`` URLs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from mappingstore import MemoryStore


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``MAPPINGSTORE_*`` variable of the caller's shell reaches a test."""
    for name in list(os.environ):
        if name.startswith("MAPPINGSTORE_"):
            monkeypatch.delenv(name)


def _memory_url() -> Iterator[str]:
    name = f"cli-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    MemoryStore.drop(name)


url = pytest.fixture(_memory_url, name="url")
other_url = pytest.fixture(_memory_url, name="other_url")
