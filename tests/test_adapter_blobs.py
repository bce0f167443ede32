"""Blobs through adapters: whose blobs an adapter shows, and in which form.

``ReadOnly`` and ``Cached`` show the wrapped store's own blobs (``Store._blob_backend_for``),
so over a directory store they are its plain or sealed files, the same blob both ways.
``Prefixed`` shows the wrapped store's blobs named ``prefix + name``. ``Tiered`` and
``Sharded`` keep chunk records through themselves (documented in docs/guides/adapters.md).
tests/test_blobs.py checks the blob behaviour itself; this file checks who sees what.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import (
    Cached,
    DirectoryStore,
    MemoryStore,
    Prefixed,
    ReadOnly,
    Sharded,
    SQLiteStore,
    Store,
    Tiered,
)
from mappingstore._directory import encode_name
from mappingstore._keys import internal_ns
from mappingstore.errors import (
    InvalidOptionError,
    MissingKeyError,
    ReadOnlyError,
    StoreClosedError,
)
from tests.test_blobs import _data

KEY = b"k" * 32
BLOB_NS = internal_ns("blob", "default")
Opener = Callable[..., DirectoryStore]


@pytest.fixture
def opener(tmp_path: Path) -> Iterator[Opener]:
    opened: list[DirectoryStore] = []

    def open_(name: str = "store", **options: Any) -> DirectoryStore:
        store = DirectoryStore(tmp_path / name, **{"durable": False, **options})
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(params=["plain", "sealed"])
def encryption(request: pytest.FixtureRequest) -> dict[str, Any]:
    return {"key": KEY} if request.param == "sealed" else {}


def _blob_file(store: DirectoryStore, name: str, namespace: str = "default") -> Path:
    """Where the directory store keeps blob *name* (plain or sealed, whichever it is)."""
    base = Path(store.path) / ".blobs" / encode_name(namespace)
    sealed = base / ".sealed" / encode_name(name)
    return sealed if sealed.exists() else base / encode_name(name)


def _read(store: Store, name: str) -> bytes:
    with store.open(name) as f:
        return f.read()


def _no_chunk_records(store: DirectoryStore) -> bool:
    """No blob was written as chunk records into the store's records."""
    return not (Path(store.path) / encode_name(BLOB_NS)).exists()


# -- ReadOnly and Cached: the wrapped store's own blobs -----------------------------------


@pytest.mark.parametrize("adapter", [ReadOnly, Cached])
def test_a_blob_of_the_directory_store_reads_through_the_adapter(
    opener: Opener, encryption: dict[str, Any], adapter: Callable[[Store], Store]
) -> None:
    store = opener(**encryption)
    store.put_file("report", io.BytesIO(_data(2500, 1)), chunk_size=1000)
    store.put_file("note", io.BytesIO(b"hello"))
    with adapter(store) as view:
        assert view.blob_names() == ["note", "report"]
        with view.open("report") as f:
            assert f.name == "report" and f.size == 2500
            f.seek(1500)
            assert f.read(700) == _data(2500, 1)[1500:2200]
        out = io.BytesIO()
        assert view.get_file("note", out) == 5 and out.getvalue() == b"hello"
        # What the store writes next is seen at once (nothing about blobs is cached).
        store.put_file("report", io.BytesIO(b"second"))
        store.delete_file("note")
        assert _read(view, "report") == b"second"
        assert view.blob_names() == ["report"]
        with pytest.raises(MissingKeyError):
            view.open("note")


def test_a_blob_written_through_the_cache_is_the_directory_stores_file(
    opener: Opener, encryption: dict[str, Any]
) -> None:
    store = opener(**encryption)
    data = _data(2500, 2)
    with Cached(store) as cached:
        assert cached.put_file("report", io.BytesIO(data), chunk_size=1000) == 2500
        assert store.blob_names() == ["report"]
        assert _read(store, "report") == data
        path = _blob_file(store, "report")
        assert path.parent.name == (".sealed" if encryption else "default")
        if not encryption:
            assert path.read_bytes() == data  # exactly its bytes, for any other program
        assert _no_chunk_records(store)
        assert cached.cache_info().currsize == 0
        cached.delete_file("report")
        assert store.blob_names() == [] and not path.exists()
        store.put_file("other", io.BytesIO(b"x"))
        cached.delete_file("other")
        assert store.blob_names() == []
    # Another instance (another process would do the same) reads what the cache wrote.
    with Cached(store) as cached:
        cached.put_file("kept", io.BytesIO(data))
    assert _read(opener(**encryption), "kept") == data


def test_the_adapter_encrypts_as_the_wrapped_store_does(opener: Opener) -> None:
    store = opener(key=KEY)
    with Cached(store) as cached:
        cached.put_file("sealed", io.BytesIO(b"secret"))
        cached.put_file("open", io.BytesIO(b"public"), encrypt=False)
    assert _blob_file(store, "sealed").parent.name == ".sealed"
    assert b"secret" not in _blob_file(store, "sealed").read_bytes()
    assert _blob_file(store, "open").read_bytes() == b"public"
    assert _read(ReadOnly(store), "sealed") == b"secret"


def test_readonly_refuses_every_blob_write(opener: Opener, encryption: dict[str, Any]) -> None:
    store = opener(**encryption)
    store.put_file("k", io.BytesIO(b"v"))
    before = _blob_file(store, "k").read_bytes()
    for view in (ReadOnly(store), Cached(ReadOnly(store)), ReadOnly(Cached(store))):
        with pytest.raises(ReadOnlyError):
            view.put_file("k", io.BytesIO(b"new"))
        with pytest.raises(ReadOnlyError):
            view.put_file("new", io.BytesIO(b"new"))
        with pytest.raises(ReadOnlyError):
            view.delete_file("k")
        with pytest.raises(ReadOnlyError):
            view.purge_blobs()
        assert _read(view, "k") == b"v"
    assert store.blob_names() == ["k"]
    assert _blob_file(store, "k").read_bytes() == before
    store.put_file("k", io.BytesIO(b"the store stays writable"))
    assert _read(ReadOnly(store), "k") == b"the store stays writable"


def test_adapters_use_the_wrapped_stores_namespace(opener: Opener) -> None:
    one = opener(namespace="one")
    default = opener()
    with Cached(one) as cached:
        cached.put_file("k", io.BytesIO(b"in one"))
        assert cached.namespace == "one"
    assert _blob_file(one, "k", "one").read_bytes() == b"in one"
    assert default.blob_names() == []
    with pytest.raises(MissingKeyError):
        ReadOnly(default).open("k")
    assert ReadOnly(opener(namespace="one")).blob_names() == ["k"]
    default.put_file("k", io.BytesIO(b"in default"))
    assert _read(ReadOnly(one), "k") == b"in one"
    assert _read(Cached(default), "k") == b"in default"


def test_an_adapters_reader_stops_when_the_adapter_closes(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(_data(3000)))
    view = ReadOnly(store)
    reader = view.open("k")
    assert reader.read(10) == _data(3000)[:10]
    view.close()
    with pytest.raises(StoreClosedError):
        reader.read(10)
    with pytest.raises(StoreClosedError):
        view.open("k")
    reader.close()
    assert _read(store, "k") == _data(3000)  # the store itself is still open


def test_no_blob_writes_inside_an_adapters_batch(opener: Opener) -> None:
    store = opener()
    cached = Cached(store)
    with cached.batch(), pytest.raises(InvalidOptionError):
        cached.put_file("k", io.BytesIO(b"v"))
    assert store.blob_names() == []


def test_chunked_blobs_are_not_held_in_the_cache() -> None:
    inner = MemoryStore()
    with Cached(inner, maxsize=10_000) as cached:
        cached.put_file("big", io.BytesIO(_data(50_000)), chunk_size=1000)
        assert _read(cached, "big") == _data(50_000)
        assert cached.cache_info().currsize == 0  # 50 chunks, none kept
        assert _read(inner, "big") == _data(50_000)  # the same chunk records
        inner.put_file("big", io.BytesIO(b"replaced"))
        assert _read(cached, "big") == b"replaced"  # never stale


# -- Prefixed: the wrapped store's blobs under prefix + name ------------------------------


def test_prefixed_blobs_are_the_wrapped_stores_under_the_full_name(
    opener: Opener, encryption: dict[str, Any]
) -> None:
    store = opener(**encryption)
    # Look-alike names outside the prefix must stay invisible.
    for name in ("app1", "app10:x", "app1;x", "x"):
        store.put_file(name, io.BytesIO(name.encode()))
    app = Prefixed(store, "app1:")
    assert app.blob_names() == []
    app.put_file("report", io.BytesIO(_data(2500)), chunk_size=1000)
    assert "app1:report" in store.blob_names()
    assert _read(store, "app1:report") == _data(2500)
    if not encryption:
        assert _blob_file(store, "app1:report").read_bytes() == _data(2500)
    assert _no_chunk_records(store)
    store.put_file("app1:b", io.BytesIO(b"from the store"))
    assert app.blob_names() == ["b", "report"]
    with app.open("b") as f:
        assert f.name == "b" and f.read() == b"from the store"
    with pytest.raises(MissingKeyError, match="'x'"):
        app.open("x")
    with pytest.raises(MissingKeyError):
        app.delete_file("x")
    app.delete_file("b")
    assert "app1:b" not in store.blob_names()
    assert store.blob_names() == sorted(["app1", "app1:report", "app10:x", "app1;x", "x"])
    frozen = ReadOnly(Cached(app))
    assert _read(frozen, "report") == _data(2500)
    assert frozen.blob_names() == ["report"]
    with pytest.raises(ReadOnlyError):
        frozen.delete_file("report")
    nested = Prefixed(app, "v2/")
    nested.put_file("n", io.BytesIO(b"deep"))
    assert _read(store, "app1:v2/n") == b"deep"
    assert app.blob_names() == ["report", "v2/n"]


def test_prefixed_readers_stop_when_the_adapter_closes(opener: Opener) -> None:
    store = opener()
    store.put_file("p:k", io.BytesIO(_data(3000)))
    app = Prefixed(store, "p:")
    reader = app.open("k")
    assert repr(reader) == "<PlainFileReader 'k' size=3000>"
    app.close()
    with pytest.raises(StoreClosedError):
        reader.read(1)
    reader.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_prefixed_maps_blob_names_on_every_backend(tmp_path: Path, backend: str) -> None:
    inner: Store = MemoryStore() if backend == "memory" else SQLiteStore(tmp_path / "s.db")
    with inner, Prefixed(inner, "a/") as app:
        app.put_file("k", io.BytesIO(_data(500)), chunk_size=100)
        assert inner.blob_names() == ["a/k"]
        assert _read(inner, "a/k") == _data(500)
        inner.put_file("a/j", io.BytesIO(b"j"))
        assert app.blob_names() == ["j", "k"]


# -- Tiered and Sharded: chunk records through the adapter --------------------------------


def test_tiered_and_sharded_keep_chunk_records_through_themselves(opener: Opener) -> None:
    slow = opener("slow")
    tiered = Tiered([MemoryStore(), slow])
    tiered.put_file("t", io.BytesIO(_data(2500)), chunk_size=1000)
    assert _read(tiered, "t") == _data(2500)
    assert _read(Cached(tiered), "t") == _data(2500)  # nested adapters see the same blob
    # Documented: the chunks are records of the slow tier, not its blob files.
    assert slow.blob_names() == []
    assert not _no_chunk_records(slow)
    assert not (Path(slow.path) / ".blobs").exists()
    slow.put_file("own", io.BytesIO(b"file"))
    assert tiered.blob_names() == ["t"]

    shards = [opener(f"shard{i}") for i in range(3)]
    sharded = Sharded(shards)
    for i in range(4):
        sharded.put_file(f"s{i}", io.BytesIO(_data(300, i)), chunk_size=100)
    assert sharded.blob_names() == [f"s{i}" for i in range(4)]
    assert _read(ReadOnly(sharded), "s2") == _data(300, 2)
    assert all(s.blob_names() == [] for s in shards)
    # Every record of one internal namespace lives on one shard (atomic manifest swaps).
    holders = [s for s in shards if not _no_chunk_records(s)]
    assert len(holders) == 1
    assert sum(1 for _ in os.scandir(Path(holders[0].path) / encode_name(BLOB_NS))) > 4
