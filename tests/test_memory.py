"""MemoryStore: the conformance suite, plus what only the memory backend promises."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import mappingstore
from mappingstore import MemoryStore, Store
from mappingstore._codec import ENCRYPTED_HEADER
from mappingstore.errors import PasswordRequiredError
from mappingstore.testing import StoreFactory, StoreTests


class TestMemory(StoreTests):
    """``memory://NAME``: shared by every open of NAME in the process, kept across close."""

    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        # Named memory stores live as long as the process: give each test its own names
        # and free them afterwards.
        prefix = f"t{uuid.uuid4().hex}-"
        used: set[str] = set()

        def open_(name: str = "a", **options: Any) -> Store:
            used.add(prefix + name)
            return mappingstore.open(f"memory://{prefix}{name}", **options)

        yield open_
        for name in used:
            MemoryStore.drop(name)


def test_private_memory_stores_are_isolated() -> None:
    with mappingstore.open("memory://") as one, mappingstore.open("memory://") as two:
        one["k"] = 1
        assert "k" not in two
        assert one.url == "memory://"
        assert isinstance(one, MemoryStore)
    with MemoryStore() as three:
        assert len(three) == 0


def test_private_store_data_goes_with_close() -> None:
    store = MemoryStore()
    store["k"] = 1
    store.close()
    with MemoryStore() as again:
        assert "k" not in again


def test_named_store_shared_and_kept() -> None:
    name = f"shared-{uuid.uuid4().hex}"
    try:
        with MemoryStore(name) as one:
            one["k"] = [1]
            with mappingstore.open(f"memory://{name}") as two:
                assert two["k"] == [1]
                assert two.url == f"memory://{name}"
        with MemoryStore(name) as again:  # reopening never wipes data
            assert again["k"] == [1]
    finally:
        MemoryStore.drop(name)


def test_drop() -> None:
    name = f"drop-{uuid.uuid4().hex}"
    with MemoryStore(name) as store:
        store["k"] = 1
    assert MemoryStore.drop(name) is True
    assert MemoryStore.drop(name) is False
    with MemoryStore(name) as fresh:
        assert len(fresh) == 0
    MemoryStore.drop(name)


def test_encrypt_without_password_uses_a_process_key() -> None:
    name = f"eph-{uuid.uuid4().hex}"
    try:
        with MemoryStore(name, encrypt=True) as store:
            store["k"] = "secret"
            rec = store._get_record("default", "k")
            assert rec is not None and rec[0].startswith(ENCRYPTED_HEADER)
            assert b"secret" not in rec[0]
            assert store.encrypted
            with pytest.raises(PasswordRequiredError):
                store.change_password("x", security="low")
        with MemoryStore(name, encrypt=True) as again:  # same name, same in-process key
            assert again["k"] == "secret"
    finally:
        MemoryStore.drop(name)


def test_threads_modify_exact_count() -> None:
    n_threads, n_each = 8, 500
    with MemoryStore() as store:
        barrier = threading.Barrier(n_threads)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                barrier.wait()
                for _ in range(n_each):
                    store.modify("n", lambda v: v + 1, default=0)
                    store.modify(f"own-{threading.get_ident()}", lambda v: v + 1, default=0)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store["n"] == n_threads * n_each
        assert len(store) == n_threads + 1
        assert all(v == n_each for k, v in store.items() if k != "n")


def test_threads_mixed_writers_and_iterators() -> None:
    with MemoryStore() as store:
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer(tag: int) -> None:
            try:
                for i in range(300):
                    store[f"{tag}-{i % 20}"] = i
                    store.pop(f"{tag}-{(i + 7) % 20}", None)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        def reader() -> None:
            try:
                while not stop.is_set():
                    for key, value in store.items():
                        assert isinstance(key, str) and isinstance(value, int)
                    len(store)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert errors == []


def test_memory_url_options() -> None:
    with mappingstore.open("memory://?namespace=x&dot_names=true&ttl=60") as store:
        assert store.namespace == "x"
        assert store.dot_names
        assert store.info()["default_ttl"] == 60.0
