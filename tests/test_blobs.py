"""Large values as streams: ``put_file``, ``get_file`` and ``open`` on every backend."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import DirectoryStore, IniStore, SharedMemoryStore, SQLiteStore, Store, _blobs
from mappingstore._directory import encode_name
from mappingstore._keys import internal_ns
from mappingstore.errors import (
    CorruptValueError,
    IntegrityError,
    InvalidOptionError,
    MissingKeyError,
    OptionTypeError,
    ReadOnlyError,
)
from tests.servers import POSTGRES_URL, REDIS_URL, drop_redis_keys, redis_client, unavailable

MiB = 1 << 20
Factory = Callable[..., Store]
BACKENDS = ["memory", "sqlite", "dir", "ini", "shm", "redis", "postgres"]


def _redis_factory(stack: list[Callable[[], None]]) -> Factory:
    client = redis_client(socket_timeout=10)  # skips (laptop) without redis-py
    from mappingstore import RedisStore

    prefix = f"b{uuid.uuid4().hex[:12]}"

    def drop() -> None:
        drop_redis_keys(client, prefix)
        client.close()

    stack.append(drop)
    return lambda name="a", **options: RedisStore(REDIS_URL, prefix=f"{prefix}{name}", **options)


def _postgres_factory(stack: list[Callable[[], None]]) -> Factory:
    psycopg = pytest.importorskip("psycopg")
    from mappingstore import PostgresStore

    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable("PostgreSQL", exc)
    table = f"msb_{uuid.uuid4().hex[:10]}"
    made: set[str] = set()

    def drop() -> None:
        for name in made:
            admin.execute(
                psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(name))
            )
        admin.close()

    stack.append(drop)

    def open_(name: str = "a", **options: Any) -> Store:
        made.add(f"{table}_{name}")
        return PostgresStore(POSTGRES_URL, table=f"{table}_{name}", **options)

    return open_


def _make_factory(kind: str, tmp_path: Path, stack: list[Callable[[], None]]) -> Factory:
    if kind == "memory":
        prefix = f"b{uuid.uuid4().hex}-"
        used: set[str] = set()
        stack.append(lambda: [mappingstore.MemoryStore.drop(n) for n in used] and None)

        def memory(name: str = "a", **options: Any) -> Store:
            used.add(prefix + name)
            return mappingstore.open(f"memory://{prefix}{name}", **options)

        return memory
    if kind == "sqlite":
        return lambda name="a", **options: SQLiteStore(tmp_path / f"{name}.db", **options)
    if kind == "dir":
        return lambda name="a", **options: DirectoryStore(
            tmp_path / name, **{"durable": False, **options}
        )
    if kind == "ini":
        return lambda name="a", **options: IniStore(
            tmp_path / f"{name}.ini", **{"durable": False, **options}
        )
    if kind == "shm":
        prefix = f"b{uuid.uuid4().hex[:12]}"
        names: set[str] = set()

        def unlink() -> None:
            for n in names:
                with SharedMemoryStore(n) as s:
                    s.unlink()

        stack.append(unlink)

        def shm(name: str = "a", **options: Any) -> Store:
            names.add(f"{prefix}-{name}")
            return SharedMemoryStore(f"{prefix}-{name}", **options)

        return shm
    if kind == "redis":
        return _redis_factory(stack)
    assert kind == "postgres"
    return _postgres_factory(stack)


@pytest.fixture
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """``opener(name="a", **options)``: a store of the parametrised backend, closed after."""
    stack: list[Callable[[], None]] = []
    factory = _make_factory(request.param, tmp_path, stack)
    opened: list[Store] = []

    def open_(name: str = "a", **options: Any) -> Store:
        store = factory(name, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
    for undo in reversed(stack):
        undo()


every_backend = pytest.mark.parametrize("opener", BACKENDS, indirect=True)
local_backends = pytest.mark.parametrize("opener", ["memory", "sqlite", "dir"], indirect=True)


def _stored(store: Store) -> list[str]:
    """What holds the blobs of *store*'s namespace: chunk and manifest record keys, or for
    the directory store (one plain file per blob) the blob files and upload temp files."""
    if not isinstance(store, DirectoryStore):
        return sorted(store._iter_keys(internal_ns("blob", store.namespace)))
    root = Path(store.path)
    base = root / ".blobs" / encode_name(store.namespace)
    files = [p for p in base.rglob("*") if p.is_file() and p.name != ".namespace"]
    uploads = [p for p in (root / ".tmp").iterdir() if p.name.startswith("blob-")]
    # The generic chunk records are never used by the directory store itself.
    assert list(store._iter_keys(internal_ns("blob", store.namespace))) == []
    return sorted(str(p.relative_to(root)) for p in files + uploads)


def _data(n: int, seed: int = 0) -> bytes:
    """*n* deterministic, non-repeating bytes (a repeated pattern could hide a chunk mix-up)."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


class Generated(io.RawIOBase):
    """A readable stream of *size* generated bytes that never holds more than one read.

    ``fail_after``: raise ``OSError`` once that many bytes have been handed out.
    """

    def __init__(self, size: int, fail_after: int | None = None) -> None:
        super().__init__()
        self.size, self.pos, self.fail_after = size, 0, fail_after
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError("source failed")
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self.pos)
        block = (self.pos // 4096).to_bytes(8, "big") * 512
        start = self.pos % 4096
        piece = (block[start:] + block * (1 + n // 4096))[:n]
        view[:n] = piece
        self.digest.update(piece)
        self.pos += n
        return n


# -- round trips ------------------------------------------------------------------------


@every_backend
@pytest.mark.parametrize("size", [0, 1, 64, 65, 64 * 5 + 7])
def test_round_trip_small_chunks(opener: Factory, size: int) -> None:
    store = opener()
    data = _data(size)
    assert store.put_file("blob", io.BytesIO(data), chunk_size=64) == size
    with store.open("blob") as f:
        assert f.read() == data
    out = io.BytesIO()
    assert store.get_file("blob", out) == size
    assert out.getvalue() == data
    assert store.blob_names() == ["blob"]


@pytest.mark.parametrize("opener", [b for b in BACKENDS if b != "ini"], indirect=True)
@pytest.mark.parametrize("size", [MiB, MiB + 1, 3 * MiB + 5])
def test_round_trip_default_chunk_size(opener: Factory, size: int, tmp_path: Path) -> None:
    store = opener()
    src = tmp_path / "src.bin"
    data = _data(size, seed=size)
    src.write_bytes(data)
    assert store.put_file("k", src) == size
    assert src.read_bytes() == data  # the source is never moved, truncated or deleted
    target = tmp_path / "out.bin"
    assert store.get_file("k", str(target)) == size
    assert target.read_bytes() == data
    with store.open("k") as f:
        f.seek(MiB - 2)
        assert f.read(4) == data[MiB - 2 : MiB + 2]
    if isinstance(store, DirectoryStore):
        # One plain file holding exactly the bytes (tests/test_directory_blobs.py).
        assert _stored(store) == [".blobs/default/k"]
        assert (Path(store.path) / ".blobs/default/k").read_bytes() == data
        return
    # Stored as chunks in the blob namespace: the chunk size really is 1 MiB.
    assert len([k for k in _stored(store) if k.startswith("C:")]) == -(-size // MiB)


@every_backend
def test_reopened_store_reads_the_blob(opener: Factory) -> None:
    with opener() as store:
        store.put_file("k", io.BytesIO(_data(300)), chunk_size=128)
    with opener() as again, again.open("k") as f:
        assert f.read() == _data(300)


@every_backend
def test_blob_and_plain_key_are_independent(opener: Factory) -> None:
    store = opener()
    store["k"] = "plain"
    store.put_file("k", io.BytesIO(b"blob"), chunk_size=64)
    assert store["k"] == "plain"
    assert store.open("k").read() == b"blob"
    assert list(store) == ["k"]
    del store["k"]
    assert store.open("k").read() == b"blob"
    store.delete_file("k")
    assert store.blob_names() == []
    with pytest.raises(MissingKeyError):
        store.open("k")
    with pytest.raises(KeyError):
        store.delete_file("k")
    # Deleting removed every chunk record (or the file) too.
    assert _stored(store) == []


@every_backend
def test_replace_deletes_old_chunks(opener: Factory) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(_data(1000, 1)), chunk_size=100)
    store.put_file("k", io.BytesIO(_data(250, 2)), chunk_size=100)
    assert store.open("k").read() == _data(250, 2)
    assert len(_stored(store)) == (1 if isinstance(store, DirectoryStore) else 1 + 3)


@every_backend
def test_names_may_hold_any_text(opener: Factory) -> None:
    with opener() as store:
        names = ["a:1:b", "a", "a:1", "\x00x", "../..", "ü" * 3000]
        for i, name in enumerate(names):
            store.put_file(name, io.BytesIO(_data(30, i)), chunk_size=7)
        assert store.blob_names() == sorted(names)
        for i, name in enumerate(names):
            assert store.open(name).read() == _data(30, i)


@local_backends
def test_namespaces_are_separate_and_listed(opener: Factory) -> None:
    one = opener()
    other = opener(namespace="other")
    one.put_file("k", io.BytesIO(b"1"))
    assert one.namespaces() == ["default"]  # a namespace holding only blobs is listed
    assert other.blob_names() == []
    with pytest.raises(MissingKeyError):
        other.open("k")
    other.put_file("k", io.BytesIO(b"2"))
    assert one.open("k").read() == b"1"
    assert other.open("k").read() == b"2"
    assert one.namespaces() == ["default", "other"]


def test_blobs_work_through_adapters() -> None:
    from mappingstore._adapters import Prefixed, ReadOnly, Sharded

    shards = [mappingstore.open("memory://") for _ in range(3)]
    with Sharded(shards) as sharded, Prefixed(sharded, "p/") as store:
        for i in range(5):
            store.put_file(f"b{i}", io.BytesIO(_data(500, i)), chunk_size=50)
        assert store.blob_names() == [f"b{i}" for i in range(5)]
        for i in range(5):
            assert store.open(f"b{i}").read() == _data(500, i)
        with ReadOnly(store) as ro:
            assert ro.open("b1").read() == _data(500, 1)
            with pytest.raises(ReadOnlyError):
                ro.put_file("b1", io.BytesIO(b""))


# -- sources and targets ----------------------------------------------------------------


def test_path_and_file_object_sources_and_targets(tmp_path: Path) -> None:
    data = _data(1000)
    src = tmp_path / "src"
    src.write_bytes(data)
    before = os.stat(src)
    with mappingstore.open("memory://") as store:
        assert store.put_file("a", str(src), chunk_size=100) == 1000
        assert store.put_file("b", src, chunk_size=100) == 1000
        with open(src, "rb") as f:
            f.seek(10)
            # A file object is read from its current position, and left open.
            assert store.put_file("c", f, chunk_size=100) == 990
            assert not f.closed
        with open(src, "rb", buffering=0) as raw:  # raw files may return short reads
            assert store.put_file("d", raw, chunk_size=100) == 1000
        after = os.stat(src)
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
        )
        assert src.read_bytes() == data
        assert store.open("c").read() == data[10:]
        assert store.open("d").read() == data

        target = tmp_path / "t"
        target.write_bytes(b"old content, longer than nothing")
        store.get_file("a", target)
        assert target.read_bytes() == data
        with open(tmp_path / "u", "wb") as out:
            out.write(b"head:")
            store.get_file("b", out)
        assert (tmp_path / "u").read_bytes() == b"head:" + data
        # No temporary file is left behind.
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "t", "u"]


def test_bad_sources_and_options(tmp_path: Path) -> None:
    with mappingstore.open("memory://") as store:
        with pytest.raises(OptionTypeError):
            store.put_file("k", io.StringIO("text"))
        with pytest.raises(OptionTypeError):
            store.put_file("k", 42)  # type: ignore[arg-type]
        with pytest.raises(InvalidOptionError):
            store.put_file("k", io.BytesIO(b"x"), chunk_size=0)
        with pytest.raises(FileNotFoundError):
            store.put_file("k", tmp_path / "missing")
        with pytest.raises(MissingKeyError):
            store.get_file("nope", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        with store.batch(), pytest.raises(InvalidOptionError):
            store.put_file("k", io.BytesIO(b"x"))
        assert store.blob_names() == []


# -- the file object --------------------------------------------------------------------


@every_backend
def test_reader_seek_tell_read(opener: Factory) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"abcdefgh"), chunk_size=3)
    with store.open("k") as f:
        assert f.readable() and f.seekable() and not f.writable()
        assert f.read(3) == b"abc"
        assert f.tell() == 3
        assert f.read(2) == b"de"
        assert f.read(3) == b"fgh"
        assert f.read(3) == b""
        assert f.seek(0) == 0
        assert f.read() == b"abcdefgh"
        assert f.seek(-2, io.SEEK_END) == 6
        assert f.read() == b"gh"
        assert f.seek(-3, io.SEEK_CUR) == 5
        assert f.read(1) == b"f"
        assert f.seek(100) == 100
        assert f.read() == b""
        assert f.read(5) == b""
        assert f.tell() == 100
        with pytest.raises(OSError):
            f.seek(-1)
        with pytest.raises(OSError):
            f.seek(-200, io.SEEK_END)
        with pytest.raises(ValueError):
            f.seek(0, 7)
        f.seek(1)
        buf = bytearray(4)
        assert f.readinto(buf) == 4
        assert buf == b"bcde"
        assert f.size == 8 and f.name == "k"
    assert f.closed
    for call in (f.tell, f.read, lambda: f.seek(0), lambda: f.readinto(bytearray(1))):
        with pytest.raises(ValueError):
            call()
    f.close()  # idempotent


def test_reader_works_with_buffered_and_text_wrappers() -> None:
    with mappingstore.open("memory://") as store:
        store.put_file("k", io.BytesIO(b"line one\nline two\n"), chunk_size=4)
        with io.TextIOWrapper(io.BufferedReader(store.open("k")), encoding="utf-8") as t:
            assert t.readlines() == ["line one\n", "line two\n"]
        with store.open("k") as f:
            assert list(f) == [b"line one\n", b"line two\n"]


def test_reader_fetches_only_the_chunks_it_needs() -> None:
    with mappingstore.open("memory://") as store:
        store.put_file("k", io.BytesIO(_data(1000)), chunk_size=100)
        fetched: list[str] = []
        real = store._rget

        def spy(ns: str, key: str) -> bytes | None:
            fetched.append(key)
            return real(ns, key)

        store._rget = spy  # type: ignore[method-assign]
        with store.open("k") as f:
            f.seek(950)
            assert f.read(10) == _data(1000)[950:960]
            assert f.read(10) == _data(1000)[960:970]  # the cached chunk: no fetch
        assert [k for k in fetched if k.startswith("C:")] == [
            _blobs._chunk_key("k", _blobs._read_manifest(store, "k").version, 9)  # type: ignore[union-attr]
        ]


def test_reader_of_a_replaced_blob_raises_instead_of_mixing_versions() -> None:
    with mappingstore.open("memory://") as store:
        store.put_file("k", io.BytesIO(_data(300, 1)), chunk_size=100)
        with store.open("k") as f:
            assert f.read(10) == _data(300, 1)[:10]
            store.put_file("k", io.BytesIO(_data(300, 2)), chunk_size=100)
            with pytest.raises(MissingKeyError):
                f.read()


# -- encryption -------------------------------------------------------------------------


def _chunks(store: Store, name: str) -> tuple[str, list[str]]:
    m = _blobs._read_manifest(store, name)
    assert m is not None
    return m.version, [_blobs._chunk_key(name, m.version, i) for i in range(m.count)]


@pytest.mark.parametrize("opener", ["memory", "sqlite"], indirect=True)
def test_encrypted_chunks_detect_swaps_and_truncation(opener: Factory) -> None:
    # The directory store's sealed blob files: tests/test_directory_blobs.py.
    store = opener(password="pw", security="low")
    ns = internal_ns("blob", store.namespace)
    one, two = _data(300, 1), _data(300, 2)
    store.put_file("one", io.BytesIO(one), chunk_size=100)
    store.put_file("two", io.BytesIO(two), chunk_size=100)
    _, c1 = _chunks(store, "one")
    _, c2 = _chunks(store, "two")
    raw1 = [store._get(ns, k) for k in c1]
    # Every chunk is sealed: no plaintext on disk.
    assert all(r is not None and one[:100] not in r for r in raw1)

    # Swapping two positions of one blob.
    store._put(ns, c1[0], raw1[1], None)  # type: ignore[arg-type]
    store._put(ns, c1[1], raw1[0], None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError), store.open("one") as f:
        f.read()
    # A chunk of another blob at the same position.
    store._put(ns, c1[0], store._get(ns, c2[0]), None)  # type: ignore[arg-type]
    store._put(ns, c1[1], raw1[1], None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError), store.open("one") as f:
        f.read(5)
    # Restored: reads again.
    store._put(ns, c1[0], raw1[0], None)  # type: ignore[arg-type]
    assert store.open("one").read() == one
    # The last chunk dropped.
    store._delete(ns, c1[2])
    with pytest.raises(CorruptValueError), store.open("one") as f:
        f.read()
    with pytest.raises(CorruptValueError):
        store.get_file("one", io.BytesIO())
    # The last chunk replaced by a middle one (a truncated blob that ends cleanly).
    store._put(ns, c1[2], raw1[1], None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):
        store.get_file("one", io.BytesIO())


def test_encrypted_blob_round_trips_and_needs_the_password(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "e.db", password="pw", security="low") as store:
        store.put_file("k", io.BytesIO(_data(1000)), chunk_size=256)
        assert store.open("k").read() == _data(1000)
    assert _data(1000)[:64] not in (tmp_path / "e.db").read_bytes()
    with (
        SQLiteStore(tmp_path / "e.db", encrypt=False) as plain,
        pytest.raises(mappingstore.errors.PasswordRequiredError),
    ):
        plain.open("k")


def test_plain_chunk_damage_and_content_mismatch_are_detected() -> None:
    with mappingstore.open("memory://") as store:
        ns = internal_ns("blob", store.namespace)
        store.put_file("k", io.BytesIO(_data(300)), chunk_size=100)
        _, keys = _chunks(store, "k")
        raw = store._get(ns, keys[1])
        assert raw is not None
        store._put(ns, keys[1], raw[:-1] + bytes([raw[-1] ^ 1]), None)
        with pytest.raises(CorruptValueError):
            store.open("k").read()
        # Without encryption a chunk moved between positions passes its CRC; the
        # content hash of a sequential read still catches it.
        store._put(ns, keys[1], store._get(ns, keys[0]), None)  # type: ignore[arg-type]
        with pytest.raises(CorruptValueError):
            store.get_file("k", io.BytesIO())


# -- crash safety, read-only ------------------------------------------------------------


@every_backend
def test_failed_upload_keeps_the_previous_version(opener: Factory) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"old"), chunk_size=64)
    with pytest.raises(OSError, match="source failed"):
        store.put_file("k", Generated(1000, fail_after=300), chunk_size=64)
    with pytest.raises(OSError, match="source failed"):
        store.put_file("new", Generated(1000, fail_after=300), chunk_size=64)
    assert store.open("k").read() == b"old"
    assert store.blob_names() == ["k"]
    with pytest.raises(MissingKeyError):
        store.open("new")
    # The aborted upload cleaned its own chunks (or temp file) up.
    assert len(_stored(store)) == (1 if isinstance(store, DirectoryStore) else 2)


def test_orphans_of_a_crashed_upload_are_purged_after_the_grace_period() -> None:
    with mappingstore.open("memory://") as store:
        ns = internal_ns("blob", store.namespace)
        store.put_file("k", io.BytesIO(_data(200)), chunk_size=100)
        # Simulate a process killed mid-upload: chunks written, manifest never swapped.
        crashed = "1-00ff00ff00ff00ff"  # started in 1970
        for i in range(3):
            key = _blobs._chunk_key("k", crashed, i)
            store._put(ns, key, store._encode(ns, key, b"x"), None)
        recent = _blobs._new_version()
        key = _blobs._chunk_key("other", recent, 0)
        store._put(ns, key, store._encode(ns, key, b"y"), None)
        assert store.open("k").read() == _data(200)
        assert store.purge_blobs() == 3  # the recent one may be an upload in progress
        assert store.purge_blobs(older_than=0) == 1
        assert store.open("k").read() == _data(200)
        assert sorted(store._iter_keys(ns)) == sorted([*_chunks(store, "k")[1], "M:1:k"])


@every_backend
def test_readonly_store_reads_blobs_but_refuses_writes(opener: Factory) -> None:
    with opener() as store:
        store.put_file("k", io.BytesIO(b"data"), chunk_size=64)
    ro = opener(readonly=True)
    assert ro.open("k").read() == b"data"
    with pytest.raises(ReadOnlyError):
        ro.put_file("k", io.BytesIO(b"x"))
    with pytest.raises(ReadOnlyError):
        ro.delete_file("k")
    with pytest.raises(ReadOnlyError):
        ro.purge_blobs()
    assert ro.open("k").read() == b"data"


def test_closed_store_raises() -> None:
    store = mappingstore.open("memory://")
    store.put_file("k", io.BytesIO(b"data"))
    f = store.open("k")
    store.close()
    with pytest.raises(mappingstore.errors.StoreClosedError):
        store.open("k")
    with pytest.raises(mappingstore.errors.StoreClosedError):
        f.read()


# -- bounded memory ---------------------------------------------------------------------


def open_for_stream(spec: str) -> Store:
    """Open the store named by *spec* (``kind:location``) for the streaming subprocess."""
    kind, _, where = spec.partition(":")
    if kind == "sqlite":
        return SQLiteStore(where)
    if kind == "dir":
        return DirectoryStore(where, durable=False)
    if kind == "dir-sealed":  # encrypted: framed chunks in one file
        return DirectoryStore(where, durable=False, key=b"k" * 32)
    if kind == "redis":
        from mappingstore import RedisStore

        return RedisStore(REDIS_URL, prefix=where)
    from mappingstore import PostgresStore

    return PostgresStore(POSTGRES_URL, table=where)


def stream_and_measure(spec: str, size: int) -> dict[str, Any]:
    """In a fresh process (so the peak RSS is this test's own): stream *size* generated
    bytes into the store, read them back through ``open()``; return hashes and RSS."""
    import resource

    store = open_for_stream(spec)
    try:
        # Warm up (imports, connections, schema) before taking the baseline.
        store.put_file("warm", io.BytesIO(b"x" * 1000))
        store.open("warm").read()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        src = Generated(size)
        assert store.put_file("big", src) == size
        digest = hashlib.sha256()
        with store.open("big") as f:
            while block := f.read(256 * 1024):
                digest.update(block)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store.delete_file("big")
    finally:
        store.close()
    return {
        "written": src.digest.hexdigest(),
        "read": digest.hexdigest(),
        "growth_kib": peak - base,  # ru_maxrss is in KiB on Linux
    }


def _run_streaming(spec: str, size: int) -> dict[str, Any]:
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss in KiB is Linux behaviour")
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_blobs import stream_and_measure;"
        "print(json.dumps(stream_and_measure(sys.argv[2], int(sys.argv[3]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, root, spec, str(size)],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["read"] == result["written"]
    assert result["growth_kib"] < 64 * 1024, result
    return result


def test_64_mib_stream_to_sqlite_with_bounded_memory(tmp_path: Path) -> None:
    _run_streaming(f"sqlite:{tmp_path / 'big.db'}", 64 * MiB)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "dir", "dir-sealed"])
def test_1_gib_stream_with_bounded_memory(kind: str, tmp_path: Path) -> None:
    where = tmp_path / ("big.db" if kind == "sqlite" else "big")
    _run_streaming(f"{kind}:{where}", 1024 * MiB)


@pytest.mark.slow
@pytest.mark.parametrize("opener", ["redis", "postgres"], indirect=True)
def test_256_mib_stream_to_servers_with_bounded_memory(opener: Factory) -> None:
    # The opener fixture checks the server and drops the prefix/table afterwards.
    with opener("big") as probe:
        spec = probe.url
    kind = "redis" if "redis" in spec else "postgres"
    raw = probe._prefix.decode() if kind == "redis" else probe._table  # type: ignore[attr-defined]
    where = str(raw)
    _run_streaming(f"{kind}:{where}", 256 * MiB)
