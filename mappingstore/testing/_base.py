"""Fixtures and raw ground-truth helpers shared by every part of :class:`StoreTests`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from .._store import Record, Store
from ._fixtures import FakeClock

__all__ = ["ENCRYPTION", "OpenStore", "StoreFactory", "SuiteBase"]

#: Options for every encrypted store in the suite: argon2id at "low" keeps it fast.
ENCRYPTION: dict[str, Any] = {"password": "correct horse battery staple", "security": "low"}


class StoreFactory(Protocol):
    """What a backend's ``factory`` fixture returns.

    ``factory(name="a", **options)`` opens a store. The same *name* opens the same
    underlying storage again (a reopen); another name opens a different, independent
    store. ``options`` are the common :class:`~mappingstore.Store` options.
    """

    def __call__(self, name: str = "a", **options: Any) -> Store: ...


class OpenStore(Protocol):
    """The suite's wrapper around ``factory``: same signature, and it closes what it opens."""

    def __call__(self, name: str = "a", **options: Any) -> Store: ...


class SuiteBase:
    """Class attributes a backend sets, fixtures, and raw helpers (the ground truth)."""

    #: Closing and reopening the same name keeps the data.
    persistent: bool = True
    #: Several processes can use the same name at once (tested with ``fork``).
    multiprocess: bool = False
    #: The backend uses the injected ``clock=`` for TTL; otherwise TTL tests sleep.
    fake_clock: bool = True
    #: ``encrypt=True`` without a password works (a random in-process key): memory only.
    supports_encryption_without_password: bool = False
    #: A second open of the same name, while the first is still open, sees its data.
    shared_by_name: bool = True

    @pytest.fixture
    def open_store(self, factory: StoreFactory) -> Iterator[OpenStore]:
        """Like ``factory``, but every store it opens is closed at teardown."""
        opened: list[Store] = []

        def open_(name: str = "a", **options: Any) -> Store:
            store = factory(name, **options)
            opened.append(store)
            return store

        yield open_
        errors: list[BaseException] = []
        for store in reversed(opened):
            try:
                store.close()
            except Exception as exc:  # close every store even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]

    @pytest.fixture
    def store(self, open_store: OpenStore) -> Store:
        """A fresh, empty, plain store."""
        return open_store()

    @pytest.fixture
    def clock(self) -> FakeClock:
        """A fake clock; skips the test unless the backend honours ``clock=``."""
        if not self.fake_clock:
            pytest.skip("this backend does not honour an injected clock")
        return FakeClock()

    @pytest.fixture
    def dstore(self, open_store: OpenStore) -> Store:
        """A fresh store with dot names on."""
        return open_store("dots", dot_names=True)

    # -- raw ground truth (override if the backend's raw layer needs it) ----------------

    def raw_record(self, store: Store, key: str, namespace: str | None = None) -> Record | None:
        """The stored record of *key*, read below the codec."""
        return store._get_record(store.namespace if namespace is None else namespace, key)

    def raw_data(self, store: Store, key: str, namespace: str | None = None) -> bytes:
        """The stored bytes of *key* (the test fails if it is missing)."""
        rec = self.raw_record(store, key, namespace)
        assert rec is not None, f"no raw record for {key!r}"
        return bytes(rec[0])

    def raw_put(
        self,
        store: Store,
        key: str,
        data: bytes,
        expires: float | None = None,
        namespace: str | None = None,
    ) -> None:
        """Plant a record below the codec (garbage, a moved ciphertext...)."""
        store._put(store.namespace if namespace is None else namespace, key, data, expires)

    def raw_keys(self, store: Store, namespace: str | None = None) -> set[str]:
        """Every live raw key of a namespace."""
        return set(store._iter_keys(store.namespace if namespace is None else namespace, ""))

    def reopen(self, open_store: OpenStore, store: Store, name: str = "a", **options: Any) -> Store:
        """Close *store* and open *name* again (skips unless the backend is persistent)."""
        if not self.persistent:
            pytest.skip("this backend does not keep data across close and reopen")
        store.close()
        return open_store(name, **options)

    def second(self, open_store: OpenStore, name: str = "a", **options: Any) -> Store:
        """Open *name* again while the first store stays open."""
        if not self.shared_by_name:
            pytest.skip("two opens of one name do not share data on this backend")
        return open_store(name, **options)
