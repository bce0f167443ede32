"""Blob defects found in review (``/tmp/review6/blobs/REPORT.md``), each pinned by a test.

1. an unknown outcome of the manifest swap must never destroy the committed blob;
2. a source whose ``read(n)`` returns more than *n* bytes is read correctly;
4. a damaged *encrypted* manifest (``IntegrityError``) does not block the blob;
5. a reader stops at once when its store (or adapter) closes, cached chunk or not;
6. ``seek()`` takes ints only;
7. bad paths raise mappingstore errors that keep the builtin ``OSError`` class;
8. file-API details: ``write()``, ``readinto()`` of a read-only buffer, ``get_file``'s mode;
9. ``Tiered`` never copies blob records into a faster tier;
10. the docs say what exists (no ``Store.blobs()``; blobs on ``AsyncStore``).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import (
    Cached,
    DirectoryStore,
    MemoryStore,
    Prefixed,
    SQLiteStore,
    Store,
    Tiered,
    _blobs,
)
from mappingstore._keys import internal_ns
from mappingstore._store import Op
from mappingstore.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidOptionError,
    MappingStoreError,
    OptionTypeError,
    StoreClosedError,
    StoreNotFoundError,
    UnknownOutcomeError,
)
from tests.test_blobs import _data

KEY = b"k" * 32
BLOB_NS = internal_ns("blob", "default")
ROOT = Path(__file__).resolve().parent.parent

Opener = Callable[..., Store]
KINDS = ["memory", "sqlite", "dir", "dir-sealed", "sqlite-encrypted"]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[[str], Store]]:
    """``make(kind)``: a fresh store of *kind* (closed after the test)."""
    opened: list[Store] = []

    def make_(kind: str) -> Store:
        n = len(opened)
        store: Store
        if kind == "memory":
            store = MemoryStore()
        elif kind == "sqlite":
            store = SQLiteStore(tmp_path / f"{n}.db")
        elif kind == "sqlite-encrypted":
            store = SQLiteStore(tmp_path / f"{n}.db", key=KEY)
        elif kind == "dir":
            store = DirectoryStore(tmp_path / f"d{n}", durable=False)
        else:
            assert kind == "dir-sealed"
            store = DirectoryStore(tmp_path / f"d{n}", durable=False, key=KEY)
        opened.append(store)
        return store

    yield make_
    for store in opened:
        store.close()


def _read(store: Store, name: str) -> bytes:
    with store.open(name) as f:
        return f.read()


def _blob_records(store: Store) -> list[str]:
    return sorted(store._rkeys(BLOB_NS, ""))


# -- 1. the manifest swap's outcome is unknown -------------------------------------------


def _failing_swap(
    monkeypatch: pytest.MonkeyPatch, store: Store, exc: BaseException, *, apply: bool
) -> None:
    """The store's next manifest swap raises *exc*, after applying it if *apply*."""
    original = store._update

    def update(ns: str, key: str, fn: Callable[[Any], Any]) -> None:
        if ns == BLOB_NS and key.startswith("M:"):
            monkeypatch.setattr(store, "_update", original)  # once
            if apply:
                original(ns, key, fn)
            raise exc
        original(ns, key, fn)

    monkeypatch.setattr(store, "_update", update)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "sqlite-encrypted"])
def test_unknown_outcome_after_commit_keeps_the_new_version(
    make: Callable[[str], Store], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    store = make(kind)
    store.put_file("b", io.BytesIO(_data(2500, 1)), chunk_size=1000)
    _failing_swap(monkeypatch, store, UnknownOutcomeError("reply lost"), apply=True)
    with pytest.raises(UnknownOutcomeError):
        store.put_file("b", io.BytesIO(_data(3500, 2)), chunk_size=1000)
    # It committed: the new version is the blob, whole (it used to lose its chunks).
    assert _read(store, "b") == _data(3500, 2)
    # ... and the replaced version's chunks went, as after a success: no orphans.
    assert store.purge_blobs(0) == 0
    assert len(_blob_records(store)) == 1 + 4


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_unknown_outcome_before_commit_keeps_the_old_version(
    make: Callable[[str], Store], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    store = make(kind)
    store.put_file("b", io.BytesIO(_data(2500, 1)), chunk_size=1000)
    _failing_swap(monkeypatch, store, UnknownOutcomeError("reply lost"), apply=False)
    with pytest.raises(UnknownOutcomeError):
        store.put_file("b", io.BytesIO(_data(3500, 2)), chunk_size=1000)
    assert _read(store, "b") == _data(2500, 1)
    assert store.purge_blobs(0) == 0  # the new chunks were removed at once
    assert len(_blob_records(store)) == 1 + 3


def test_interrupt_after_commit_keeps_the_new_version(
    make: Callable[[str], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make("sqlite")
    store.put_file("b", io.BytesIO(_data(2500, 1)), chunk_size=1000)
    _failing_swap(monkeypatch, store, KeyboardInterrupt(), apply=True)
    with pytest.raises(KeyboardInterrupt):
        store.put_file("b", io.BytesIO(_data(1500, 2)), chunk_size=1000)
    assert _read(store, "b") == _data(1500, 2)
    assert store.purge_blobs(0) == 0


def test_unreadable_manifest_after_unknown_outcome_deletes_nothing(
    make: Callable[[str], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make("sqlite")
    store.put_file("b", io.BytesIO(_data(2500, 1)), chunk_size=1000)
    original_rget = store._rget

    def rget(ns: str, key: str) -> bytes | None:
        if ns == BLOB_NS and key.startswith("M:"):
            raise BackendUnavailableError("the server is gone")
        return original_rget(ns, key)

    original_update = store._update

    def update(ns: str, key: str, fn: Callable[[Any], Any]) -> None:
        original_update(ns, key, fn)
        if key.startswith("M:"):
            monkeypatch.setattr(store, "_rget", rget)  # the re-read fails too
            raise UnknownOutcomeError("reply lost")

    monkeypatch.setattr(store, "_update", update)
    with pytest.raises(UnknownOutcomeError):
        store.put_file("b", io.BytesIO(_data(3500, 2)), chunk_size=1000)
    monkeypatch.setattr(store, "_rget", original_rget)
    monkeypatch.setattr(store, "_update", original_update)
    # Nothing was destroyed: the committed blob reads whole, and the old version's
    # chunks are orphans that purge_blobs() removes.
    assert _read(store, "b") == _data(3500, 2)
    assert store.purge_blobs(0) == 3
    assert _read(store, "b") == _data(3500, 2)


def test_swap_function_raising_removes_the_new_chunks(
    make: Callable[[str], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A swap whose function raised never committed: the new chunks are nobody's.
    store = make("sqlite")
    store.put_file("b", io.BytesIO(_data(2500, 1)), chunk_size=1000)
    original_decode = store._decode

    def decode(ns: str, key: str, record: bytes, context: bytes = b"") -> Any:
        if key.startswith("M:"):
            raise RuntimeError("boom")
        return original_decode(ns, key, record, context=context)

    monkeypatch.setattr(store, "_decode", decode)
    with pytest.raises(RuntimeError):
        store.put_file("b", io.BytesIO(_data(3500, 2)), chunk_size=1000)
    monkeypatch.setattr(store, "_decode", original_decode)
    assert _read(store, "b") == _data(2500, 1)
    assert len(_blob_records(store)) == 1 + 3


def test_redis_connection_lost_after_the_manifest_swap() -> None:
    from tests.faultproxy import FaultProxy
    from tests.servers import REDIS_URL, drop_redis_keys, redis_client

    client = redis_client()
    from mappingstore import RedisStore

    url = urllib.parse.urlsplit(REDIS_URL)
    proxy = FaultProxy(url.hostname or "127.0.0.1", url.port or 6379)
    prefix = f"bfix{uuid.uuid4().hex[:10]}"
    proxied = url._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    store = RedisStore(proxied, prefix=prefix)
    try:
        store.put_file("report", io.BytesIO(b"old" * 1000), chunk_size=1000)
        # Only the manifest swap sends a manifest: msgpack {"v", "s", "cs", "n", "h": 32 bytes}.
        proxy.cut_after(b"\xa1h\xc4\x20")
        with pytest.raises(UnknownOutcomeError):
            store.put_file("report", io.BytesIO(b"new" * 1000), chunk_size=1000)
        proxy.cut_after(None)
        assert _read(store, "report") == b"new" * 1000
        assert store.purge_blobs(0) == 0
    finally:
        store.close()
        proxy.close()
        drop_redis_keys(client, prefix)
        client.close()


# -- 2. a source whose read(n) returns more than n bytes ----------------------------------


class _Greedy:
    """A file-like whose ``read()`` ignores the size: it hands out its pieces as they come."""

    def __init__(self, *pieces: bytes) -> None:
        self._pieces = iter(pieces)

    def read(self, n: int = -1) -> bytes:
        return next(self._pieces, b"")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "pieces",
    [
        (_data(3000, 1), _data(3000, 2)),  # pieces longer than a chunk
        (_data(7777, 3),),  # the whole source at once
        (_data(10, 4), _data(2500, 5), b"", _data(5, 6)),  # short, long; b"" ends it
    ],
    ids=["long", "all-at-once", "mixed"],
)
def test_source_returning_more_than_asked(
    make: Callable[[str], Store], kind: str, pieces: tuple[bytes, ...]
) -> None:
    store = make(kind)
    store.put_file("b", io.BytesIO(b"previous version"))
    expected = b"".join(pieces[: pieces.index(b"")] if b"" in pieces else pieces)
    assert store.put_file("b", _Greedy(*pieces), chunk_size=1000) == len(expected)
    assert _read(store, "b") == expected
    out = io.BytesIO()
    assert store.get_file("b", out) == len(expected)  # a full read checks the SHA-256
    assert out.getvalue() == expected


def test_source_reader_pieces() -> None:
    reader = _blobs.SourceReader(_Greedy(b"abcdefg", b"h", b"ijklmnopqrstu"))  # type: ignore[arg-type]
    assert [reader.read(3) for _ in range(8)] == [
        b"abc",
        b"def",
        b"ghi",
        b"jkl",
        b"mno",
        b"pqr",
        b"stu",
        b"",
    ]


class _Stalls:
    """A non-blocking source: one short piece, then no data ready (``None``)."""

    def __init__(self) -> None:
        self.calls = 0

    def read(self, n: int = -1) -> bytes | None:
        self.calls += 1
        return b"abc" if self.calls == 1 else None


@pytest.mark.parametrize("kind", ["memory", "dir", "dir-sealed"])
def test_source_with_no_data_ready_midway_is_refused(
    make: Callable[[str], Store], kind: str
) -> None:
    # None after a short read is not the end of the source (it used to be taken as one).
    store = make(kind)
    store.put_file("b", io.BytesIO(b"previous version"))
    with pytest.raises(InvalidOptionError):
        store.put_file("b", _Stalls(), chunk_size=1000)  # type: ignore[arg-type]
    assert _read(store, "b") == b"previous version"


# -- 4. a damaged encrypted manifest ----------------------------------------------------


def _flip_manifest(store: Store, name: str) -> None:
    mkey = f"M:{len(name)}:{name}"
    record = bytearray(store._rget(BLOB_NS, mkey) or b"")
    record[-5] ^= 1
    store._put(BLOB_NS, mkey, bytes(record), None)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_damaged_manifest_does_not_block_the_blob(
    make: Callable[[str], Store], encrypted: bool
) -> None:
    store = make("sqlite-encrypted" if encrypted else "sqlite")
    for step in ("put_file", "delete_file", "purge_blobs"):
        store.put_file("b", io.BytesIO(_data(2500)), chunk_size=1000)
        store.put_file("other", io.BytesIO(b"o"))
        _flip_manifest(store, "b")
        with pytest.raises(MappingStoreError):
            _read(store, "b")
        if step == "put_file":
            assert store.put_file("b", io.BytesIO(b"v2")) == 2
            assert _read(store, "b") == b"v2"
            assert store.purge_blobs(0) == 3  # the damaged version's chunks
        elif step == "delete_file":
            store.delete_file("b")
            assert store.blob_names() == ["other"]
            assert store.purge_blobs(0) == 3
        else:
            # Cleanup never guesses about the damaged blob, and goes on with the others.
            assert store.purge_blobs(0) == 0
            assert _read(store, "other") == b"o"
            store.delete_file("b")
            assert store.purge_blobs(0) == 3
        store.delete_file("other")
        if "b" in store.blob_names():
            store.delete_file("b")
        assert store.purge_blobs(0) == 0
        assert _blob_records(store) == []


# -- 5. readers stop when their store closes ---------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "prefixed", "cached"])
@pytest.mark.parametrize("call", ["read", "readinto", "readall", "copy_to", "at-end"])
def test_reader_stops_when_the_store_closes(
    make: Callable[[str], Store], kind: str, call: str
) -> None:
    if kind in ("prefixed", "cached"):
        inner = make("sqlite")
        store: Store = Prefixed(inner, "p:") if kind == "prefixed" else Cached(inner)
    else:
        store = make(kind)
    store.put_file("k", io.BytesIO(b"0123456789"))
    with store.open("k") as f:
        assert f.read(1) == b"0"  # the chunk is cached now
        store.close()
        if call == "at-end":
            f.seek(0, io.SEEK_END)  # nothing left to read: still refused
        calls: dict[str, Callable[[], object]] = {
            "read": lambda: f.read(3),
            "readinto": lambda: f.readinto(bytearray(3)),
            "readall": f.readall,
            "copy_to": lambda: f.copy_to(io.BytesIO()),
            "at-end": lambda: f.read(1),
        }
        with pytest.raises(StoreClosedError):
            calls[call]()


# -- 6. seek() takes ints -----------------------------------------------------------------


class _Index:
    def __index__(self) -> int:
        return 4


@pytest.mark.parametrize("kind", ["memory", "dir", "dir-sealed"])
def test_seek_takes_ints_only(make: Callable[[str], Store], kind: str) -> None:
    store = make(kind)
    store.put_file("k", io.BytesIO(b"0123456789"), chunk_size=4)
    with store.open("k") as f:
        for bad in ((1.5,), ("1",), (None,), (0, 1.0), (0, "end")):
            with pytest.raises(TypeError) as info:
                f.seek(*bad)  # type: ignore[arg-type]
            assert isinstance(info.value, OptionTypeError)
            assert f.tell() == 0
        assert f.seek(_Index()) == 4  # type: ignore[arg-type]
        assert f.read(2) == b"45"
        assert f.seek(-1, 2) == 9
        assert f.read() == b"9"


# -- 7. bad paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "dir"])
def test_bad_paths_raise_mappingstore_errors(
    make: Callable[[str], Store], kind: str, tmp_path: Path
) -> None:
    store = make(kind)
    store.put_file("k", io.BytesIO(b"data"))
    src = tmp_path / "no-such-file"
    with pytest.raises(FileNotFoundError) as missing:
        store.put_file("x", src)
    assert isinstance(missing.value, StoreNotFoundError)
    assert missing.value.errno == errno.ENOENT and missing.value.filename == str(src)
    with pytest.raises(BackendError) as a_dir:
        store.put_file("x", tmp_path)
    assert a_dir.value.errno == errno.EISDIR
    assert store.blob_names() == ["k"]

    target = tmp_path / "no" / "such" / "dir" / "out"
    with pytest.raises(FileNotFoundError) as nowhere:
        store.get_file("k", target)
    assert isinstance(nowhere.value, StoreNotFoundError)
    assert nowhere.value.filename == str(target)
    (tmp_path / "target-dir").mkdir()
    with pytest.raises(BackendError) as into_dir:
        store.get_file("k", tmp_path / "target-dir")
    assert into_dir.value.errno == errno.EISDIR
    # No temporary file is left behind.
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mappingstore-")]


# -- 8. file-API details --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_reader_write_and_read_only_buffers(make: Callable[[str], Store], kind: str) -> None:
    store = make(kind)
    store.put_file("k", io.BytesIO(b"data"))
    with store.open("k") as f:
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(TypeError) as info:
            f.readinto(memoryview(b"abcd"))
        assert isinstance(info.value, OptionTypeError)
        with pytest.raises(TypeError):
            f.readinto(b"")  # refused even at no byte
        assert f.tell() == 0
        assert f.read() == b"data"


@pytest.mark.parametrize("kind", ["sqlite", "dir"])
def test_get_file_mode(make: Callable[[str], Store], kind: str, tmp_path: Path) -> None:
    store = make(kind)
    store.put_file("k", io.BytesIO(b"data"))
    old = os.umask(0o022)
    try:
        store.get_file("k", tmp_path / "new")
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o644
        os.umask(0o077)
        store.get_file("k", tmp_path / "private")
        assert stat.S_IMODE(os.stat(tmp_path / "private").st_mode) == 0o600
        # An existing target keeps its permission bits, whatever the umask.
        served = tmp_path / "served"
        served.write_bytes(b"old")
        os.chmod(served, 0o644)
        store.get_file("k", served)
        assert stat.S_IMODE(os.stat(served).st_mode) == 0o644
        assert served.read_bytes() == b"data"
        os.chmod(served, 0o640)
        store.get_file("k", served)
        assert stat.S_IMODE(os.stat(served).st_mode) == 0o640
    finally:
        os.umask(old)


# -- 9. Tiered keeps blobs on the slowest tier --------------------------------------------


def test_tiered_keeps_blob_records_on_the_slowest_tier(tmp_path: Path) -> None:
    fast = MemoryStore()
    slow = SQLiteStore(tmp_path / "slow.db")
    tiers = Tiered([fast, slow])
    try:
        data = _data(5000)
        tiers.put_file("big", io.BytesIO(data), chunk_size=1000)
        assert _blob_records(fast) == []  # not written there...
        assert _read(tiers, "big") == data
        assert _blob_records(fast) == []  # ... nor promoted by a read
        assert len(_blob_records(slow)) == 1 + 5
        # The slowest tier's own blobs: the same records both ways.
        assert slow.blob_names() == ["big"] and _read(slow, "big") == data
        slow.put_file("direct", io.BytesIO(b"direct"))
        assert _read(tiers, "direct") == b"direct"
        # A copy a faster tier holds (left by an earlier version) is never read, and a
        # write of the key drops it.
        mkey = "M:3:big"
        fast._put(BLOB_NS, mkey, slow._rget(BLOB_NS, "M:6:direct") or b"", None)
        assert _read(tiers, "big") == data
        tiers.put_file("big", io.BytesIO(b"v2"))
        assert _blob_records(fast) == []
        assert _read(tiers, "big") == b"v2"
        tiers.delete_file("big")
        assert tiers.blob_names() == ["direct"]
        assert tiers.purge_blobs(0) == 0
        # Ordinary records are still promoted.
        slow["plain"] = 1
        assert tiers["plain"] == 1 and "plain" in fast
    finally:
        tiers.close()
        slow.close()


def test_tiered_blob_memory_stays_bounded(tmp_path: Path) -> None:
    fast = MemoryStore()
    slow = SQLiteStore(tmp_path / "slow.db")
    tiers = Tiered([fast, slow])
    try:
        tiers.put_file("big", io.BytesIO(_data(1 << 20)), chunk_size=64 << 10)
        with tiers.open("big") as f:
            while f.read(50_000):
                pass
        held = sum(
            len(fast._rget(ns, k) or b"") for ns in fast._namespaces() for k in fast._rkeys(ns, "")
        )
        assert held < 64 << 10
    finally:
        tiers.close()
        slow.close()


def test_tiered_blob_writes_drop_fast_copies_with_deletes(tmp_path: Path) -> None:
    fast = MemoryStore()
    slow = SQLiteStore(tmp_path / "slow.db")
    tiers = Tiered([fast, slow])
    try:
        tiers.put_file("b", io.BytesIO(b"x" * 10), chunk_size=4)
        chunk = next(k for k in slow._rkeys(BLOB_NS, "C:"))
        fast._put(BLOB_NS, chunk, b"stale", None)  # a leftover copy
        tiers._apply([Op(BLOB_NS, chunk, None, None)])
        assert fast._rget(BLOB_NS, chunk) is None
    finally:
        tiers.close()
        slow.close()


# -- 10. the docs ---------------------------------------------------------------------------


def test_docs_name_only_blob_api_that_exists() -> None:
    arch = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert "`blobs()`" not in arch and not hasattr(Store, "blobs")
    import mappingstore.aio

    async_doc = (ROOT / "docs" / "guides" / "async.md").read_text(encoding="utf-8")
    methods = ("put_file", "get_file", "open", "delete_file", "blob_names", "purge_blobs")
    if not any(hasattr(mappingstore.aio.AsyncStore, m) for m in methods):
        assert "## Blobs" in async_doc and "`AsyncStore` has no blob methods" in async_doc
    large = (ROOT / "docs" / "guides" / "large-values.md").read_text(encoding="utf-8")
    assert "async.md#blobs" in large
