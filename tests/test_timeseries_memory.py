"""Time series and event logs on the memory backend (other backends join via StoreTests)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mappingstore
from mappingstore.testing._timeseries import EventTests, SeriesTests


class TestMemoryTimeSeries(SeriesTests, EventTests):
    @pytest.fixture
    def factory(self, request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
        opened: list[mappingstore.Store] = []
        prefix = f"ts-{request.node.nodeid}"

        def make(name: str = "a", **options: Any) -> mappingstore.Store:
            store = mappingstore.MemoryStore(f"{prefix}/{name}", **options)
            opened.append(store)
            return store

        yield make
        for store in opened:
            store.close()
        for store_name in {s.url[len("memory://") :] for s in opened}:
            mappingstore.MemoryStore.drop(store_name)
