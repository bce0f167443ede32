"""The directory store keeps each blob as one plain file (``mappingstore/_dir_blobs.py``).

tests/test_blobs.py runs the blob behaviour shared by every backend (the directory store
included); this file checks what is on disk and what the file format defends against.
"""

from __future__ import annotations

import fcntl
import io
import os
import signal
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import DirectoryStore
from mappingstore._directory import encode_name
from mappingstore._keys import internal_ns
from mappingstore.errors import (
    CorruptValueError,
    IntegrityError,
    InvalidOptionError,
    MissingKeyError,
    PasswordRequiredError,
    ReadOnlyError,
    StoreClosedError,
)
from tests.test_blobs import Generated, _data

Opener = Callable[..., DirectoryStore]
HEAD = 32  # the sealed header


@pytest.fixture
def opener(tmp_path: Path) -> Iterator[Opener]:
    opened: list[DirectoryStore] = []

    def open_(**options: Any) -> DirectoryStore:
        store = DirectoryStore(tmp_path / "store", **{"durable": False, **options})
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def _base(store: DirectoryStore, namespace: str = "default") -> Path:
    return Path(store.path) / ".blobs" / encode_name(namespace)


def _files(store: DirectoryStore) -> list[str]:
    """Every file under the store's root except the fixed ones, relative to the root."""
    root = Path(store.path)
    fixed = {".mappingstore", ".lock"}
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in fixed
        and p.name != ".namespace"
        and p.relative_to(root).parts[0] != encode_name("\x00meta\x00")
    )


def _read(store: DirectoryStore, name: str) -> bytes:
    with store.open(name) as f:
        return f.read()


# -- plain files --------------------------------------------------------------------------


@pytest.mark.parametrize("durable", [False, True])
def test_a_blob_is_one_plain_file_with_exactly_its_bytes(opener: Opener, durable: bool) -> None:
    store = opener(durable=durable)
    data = _data(3 * (1 << 20) + 5)
    assert store.put_file("report.pdf", io.BytesIO(data), chunk_size=1000) == len(data)
    path = _base(store) / "report.pdf"
    assert path.read_bytes() == data  # another tool reads the file directly
    assert _files(store) == [".blobs/default/report.pdf"]  # no chunks, no temp file left
    # Replaced by a rename: a new file, never rewritten in place.
    inode = path.stat().st_ino
    store.put_file("report.pdf", io.BytesIO(b"second"))
    assert path.read_bytes() == b"second"
    assert path.stat().st_ino != inode
    store.delete_file("report.pdf")
    assert _files(store) == []


def test_blob_file_and_record_file_of_one_name_are_apart(opener: Opener) -> None:
    store = opener()
    store["k"] = "plain"
    store.put_file("k", io.BytesIO(b"blob"))
    assert _files(store) == [".blobs/default/k", "default/k"]
    store.clear()  # clears the plain keys only, as on every backend
    assert _read(store, "k") == b"blob"
    assert list(store) == []
    assert store.namespaces() == ["default"]  # a namespace holding only blobs is listed
    assert internal_ns("blob", "default") in store._namespaces()
    other = opener(namespace="Other/ns")
    other.put_file("k", io.BytesIO(b"other"))
    assert (_base(store, "Other/ns") / "k").read_bytes() == b"other"
    assert (_base(store, "Other/ns") / ".namespace").read_bytes() == b"Other/ns"
    assert store.namespaces() == ["Other/ns", "default"]
    store.delete_file("k")
    assert store.namespaces() == ["Other/ns"]


def test_hostile_names_stay_inside_the_blob_directory(opener: Opener, tmp_path: Path) -> None:
    store = opener()
    names = ["../../escape", "/etc/passwd", "\x00x", ".sealed", ".names", "a", "A", "é", "ü" * 200]
    names += [".", "..", "con", "nul.txt", "~" + "0" * 64, "%41", "^a", "a\u2028b", "blob-1"]
    for i, name in enumerate(names):
        store.put_file(name, io.BytesIO(_data(40, i)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert store.blob_names() == sorted(names)
    for i, name in enumerate(names):
        assert _read(store, name) == _data(40, i)
    base = _base(store)
    assert (base / "^a").read_bytes() == _data(40, 6)  # case kept apart on any file system
    # A name too long for a file name is hashed; its full name is kept beside it.
    hashed = encode_name("ü" * 200)
    assert hashed[0] == "~" and (base / hashed).read_bytes() == _data(40, 8)
    assert (base / ".names" / hashed).read_bytes() == ("ü" * 200).encode()
    for name in names:
        store.delete_file(name)
    assert _files(store) == []
    assert store.blob_names() == []


def test_files_in_the_blob_directory_that_are_not_ours_are_ignored(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"x"))
    base = _base(store)
    (base / "Capital").write_bytes(b"not a name this backend produces")
    (base / "%61").write_bytes(b"not the canonical spelling of 'a'")
    (base / "subdir").mkdir()
    (base / ".hidden").write_bytes(b"")
    assert store.blob_names() == ["k"]
    with pytest.raises(MissingKeyError):
        store.open("subdir")


def test_reader_is_a_seekable_file_that_keeps_its_version(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"abcdefgh"))
    f = store.open("k")
    assert f.readable() and f.seekable() and not f.writable()
    assert f.size == 8 and f.name == "k"
    assert f.read(3) == b"abc"
    assert f.seek(-2, io.SEEK_END) == 6 and f.read() == b"gh"
    assert f.seek(100) == 100 and f.read() == b""
    f.seek(1)
    buf = bytearray(4)
    assert f.readinto(buf) == 4 and buf == b"bcde"
    # Replaced, then deleted: the open reader still reads the version it opened.
    store.put_file("k", io.BytesIO(b"new content"))
    f.seek(0)
    assert f.read() == b"abcdefgh"
    store.delete_file("k")
    f.seek(0)
    out = io.BytesIO()
    assert f.copy_to(out) == 8 and out.getvalue() == b"abcdefgh"
    with io.BufferedReader(f) as buffered:
        buffered.seek(0)
        assert buffered.read(2) == b"ab"
    assert f.closed
    with pytest.raises(ValueError):
        f.read()


def test_closed_store_stops_its_readers(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"data"))
    f = store.open("k")
    store.close()
    with pytest.raises(StoreClosedError):
        f.read()
    with pytest.raises(StoreClosedError):
        store.open("k")
    f.close()


# -- writers that fail or die -------------------------------------------------------------


def test_failed_upload_keeps_the_old_file_and_leaves_nothing(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"old"))
    for encrypt in (False, True):
        sealed = opener(key=b"k" * 32) if encrypt else store
        with pytest.raises(OSError, match="source failed"):
            sealed.put_file("k", Generated(5000, fail_after=3000), chunk_size=1000)
        assert _read(store, "k") == b"old"
    assert _files(store) == [".blobs/default/k"]
    assert os.listdir(Path(store.path) / ".tmp") == []


def test_no_blob_writes_inside_a_batch_or_on_a_readonly_store(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"data"))
    with store.batch(), pytest.raises(InvalidOptionError):
        store.put_file("k", io.BytesIO(b"x"))
    with store.batch(), pytest.raises(InvalidOptionError):
        store.delete_file("k")
    ro = opener(readonly=True)
    assert _read(ro, "k") == b"data"
    with pytest.raises(MissingKeyError):
        ro.open("missing")  # also takes the path that retries under the shared lock
    for call in (
        lambda: ro.put_file("k", io.BytesIO(b"x")),
        lambda: ro.delete_file("k"),
        lambda: ro.purge_blobs(),
    ):
        with pytest.raises(ReadOnlyError):
            call()
    assert _files(store) == [".blobs/default/k"]


def test_abandoned_uploads_are_removed_and_running_ones_kept(opener: Opener) -> None:
    store = opener()
    tmp = Path(store.path) / ".tmp"
    (tmp / "blob-1-dead").write_bytes(b"left by a writer that died")
    running = tmp / "blob-2-running"
    fd = os.open(running, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert store.purge_blobs() == 1
        assert sorted(os.listdir(tmp)) == ["blob-2-running"]
        (tmp / "blob-3-dead").write_bytes(b"")
        opener().close()  # a writable open cleans .tmp, and keeps the locked upload
        assert sorted(os.listdir(tmp)) == ["blob-2-running"]
    finally:
        os.close(fd)
    assert store.purge_blobs() == 1
    assert os.listdir(tmp) == []


def test_a_writer_killed_mid_upload_leaves_the_old_version(opener: Opener) -> None:
    store = opener()
    store.put_file("k", io.BytesIO(b"old"))
    child = textwrap.dedent(
        """
        import io, sys, time
        from mappingstore import DirectoryStore

        class Slow(io.RawIOBase):
            sent = 0
            def readable(self):
                return True
            def readinto(self, buf):
                if self.sent > 3 << 20:
                    print("uploading", flush=True)
                    time.sleep(60)
                n = len(buf)
                buf[:n] = b"n" * n
                self.sent += n
                return n

        store = DirectoryStore(sys.argv[1], durable=False)
        store.put_file("k", Slow())
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child, store.path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "uploading\n"
        tmp = Path(store.path) / ".tmp"
        uploads = [p for p in tmp.iterdir() if p.name.startswith("blob-")]
        assert len(uploads) == 1 and uploads[0].stat().st_size > 3 << 20
        assert store.purge_blobs() == 0  # still locked by its live writer
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert _read(store, "k") == b"old"
    assert store.blob_names() == ["k"]
    assert store.purge_blobs() == 1
    assert _files(store) == [".blobs/default/k"]


# -- sealed files -------------------------------------------------------------------------


def _frames(raw: bytes) -> list[bytes]:
    """The frames (length prefix included) of a sealed file."""
    out, pos = [], HEAD
    while pos < len(raw):
        (n,) = struct.unpack_from(">I", raw, pos)
        out.append(raw[pos : pos + 4 + n])
        pos += 4 + n
    return out


@pytest.fixture
def sealed(opener: Opener) -> DirectoryStore:
    store = opener(key=b"k" * 32)
    store.put_file("one", io.BytesIO(_data(250, 1)), chunk_size=100)
    store.put_file("two", io.BytesIO(_data(250, 2)), chunk_size=100)
    return store


def test_sealed_file_layout_and_round_trip(sealed: DirectoryStore) -> None:
    path = _base(sealed) / ".sealed" / "one"
    raw = path.read_bytes()
    assert raw[:4] == b"\x93MSB" and raw[4] == 1
    assert struct.unpack_from(">I", raw, 8)[0] == 100  # the chunk size
    frames = _frames(raw)
    assert len(frames) == 3 and len(frames[0]) == len(frames[1]) > len(frames[2])
    assert all(f[4:6] == b"\x01\x01" for f in frames)  # codec records, encrypted
    assert _data(250, 1)[:16] not in raw
    assert _files(sealed) == [".blobs/default/.sealed/one", ".blobs/default/.sealed/two"]
    assert sealed.blob_names() == ["one", "two"]
    with sealed.open("one") as f:
        assert f.size == 250
        f.seek(150)
        assert f.read(60) == _data(250, 1)[150:210]
        f.seek(0)
        assert f.read() == _data(250, 1)
    out = io.BytesIO()
    assert sealed.get_file("two", out) == 250 and out.getvalue() == _data(250, 2)


@pytest.mark.parametrize("size", [0, 1, 100, 200])
def test_sealed_sizes_at_chunk_edges(opener: Opener, size: int) -> None:
    store = opener(key=b"k" * 32)
    store.put_file("k", io.BytesIO(_data(size)), chunk_size=100)
    assert len(_frames((_base(store) / ".sealed" / "k").read_bytes())) == max(1, -(-size // 100))
    assert _read(store, "k") == _data(size)
    with store.open("k") as f:
        assert f.size == size


def _tampered(store: DirectoryStore, change: Callable[[bytes], bytes], name: str = "one") -> None:
    path = _base(store) / ".sealed" / name
    path.write_bytes(change(path.read_bytes()))


def _flip(offset: int) -> Callable[[bytes], bytes]:
    def change(raw: bytes) -> bytes:
        i = offset % len(raw)
        return raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1 :]

    return change


def _rejected(store: DirectoryStore, name: str = "one") -> None:
    """Reading *name* fails (at open or while reading), and never returns bytes."""
    with pytest.raises((IntegrityError, CorruptValueError)), store.open(name) as f:
        f.read()


@pytest.mark.parametrize(
    "offset",
    [0, 4, 9, 20, HEAD + 1, HEAD + 4, HEAD + 40, HEAD + 100, -1, -20],
    ids=lambda o: f"byte{o}",
)
def test_sealed_flipped_bit_is_detected(sealed: DirectoryStore, offset: int) -> None:
    _tampered(sealed, _flip(offset))
    _rejected(sealed)
    assert _read(sealed, "two") == _data(250, 2)


def test_sealed_truncation_reorder_and_splices_are_detected(
    sealed: DirectoryStore, opener: Opener
) -> None:
    path = _base(sealed) / ".sealed" / "one"
    good = path.read_bytes()
    head, frames = good[:HEAD], _frames(good)
    other = (_base(sealed) / ".sealed" / "two").read_bytes()
    cases = {
        "last frame dropped": head + frames[0] + frames[1],
        "cut mid-frame": good[:-7],
        "header only": head,
        "empty": b"",
        "trailing bytes": good + b"\x00",
        "frames swapped": head + frames[1] + frames[0] + frames[2],
        "middle frame dropped": head + frames[0] + frames[2],
        "frame from another blob": head + _frames(other)[0] + frames[1] + frames[2],
        "header of another blob": other[:HEAD] + good[HEAD:],
    }
    # A frame of an earlier upload of the same name, at the same position.
    sealed.put_file("one", io.BytesIO(_data(250, 3)), chunk_size=100)
    newer = path.read_bytes()
    cases["frame of another upload"] = (
        newer[:HEAD] + frames[0] + _frames(newer)[1] + _frames(newer)[2]
    )
    # A plain codec record (it carries a valid CRC) in place of a sealed frame.
    record = sealed._encode("x", "y", _data(100), False)
    cases["plain frame"] = head + struct.pack(">I", len(record)) + record + frames[1] + frames[2]
    for label, raw in cases.items():
        path.write_bytes(raw)
        try:
            _rejected(sealed)
        except BaseException as exc:
            raise AssertionError(label) from exc
    path.write_bytes(good)
    assert _read(sealed, "one") == _data(250, 1)  # the original still reads


def test_sealed_file_moved_to_another_name_or_namespace_is_detected(
    sealed: DirectoryStore, opener: Opener
) -> None:
    base = _base(sealed) / ".sealed"
    (base / "one").write_bytes((base / "two").read_bytes())
    _rejected(sealed, "one")
    other = opener(key=b"k" * 32, namespace="other")
    other.put_file("two", io.BytesIO(b"x"))
    (_base(sealed, "other") / ".sealed" / "two").write_bytes((base / "two").read_bytes())
    _rejected(other, "two")
    assert _read(sealed, "two") == _data(250, 2)


def test_sealed_blob_needs_the_key(sealed: DirectoryStore, opener: Opener) -> None:
    sealed.close()
    locked = opener(encrypt=False)
    assert locked.blob_names() == ["one", "two"]
    with pytest.raises(PasswordRequiredError):
        locked.open("one")
    with pytest.raises(PasswordRequiredError):
        locked.put_file("k", io.BytesIO(b"x"), encrypt=True)
    assert os.listdir(Path(locked.path) / ".tmp") == []


def test_switching_between_plain_and_sealed(sealed: DirectoryStore) -> None:
    base = _base(sealed)
    sealed.put_file("one", io.BytesIO(b"now plain"), encrypt=False)
    assert (base / "one").read_bytes() == b"now plain"
    assert not (base / ".sealed" / "one").exists()
    assert _read(sealed, "one") == b"now plain"
    reader = sealed.open("one")
    sealed.put_file("one", io.BytesIO(b"sealed again"))
    assert not (base / "one").exists()
    assert _read(sealed, "one") == b"sealed again"
    assert reader.read() == b"now plain"  # the open reader keeps its version
    reader.close()
    # A crash between the two steps of a switch leaves both files: the sealed one is the
    # blob, it is listed once, and purge_blobs removes the hidden plain twin.
    (base / "one").write_bytes(b"stale")
    assert _read(sealed, "one") == b"sealed again"
    assert sealed.blob_names() == ["one", "two"]
    assert sealed.purge_blobs() == 1
    assert not (base / "one").exists()
    # delete_file removes both.
    (base / "one").write_bytes(b"stale")
    sealed.delete_file("one")
    with pytest.raises(MissingKeyError):
        sealed.open("one")


def test_orphaned_name_files_are_purged(opener: Opener) -> None:
    store = opener()
    long = "x" * 300
    store.put_file(long, io.BytesIO(b"1"))
    hashed = encode_name(long)
    (_base(store) / hashed).unlink()  # a delete interrupted between its two unlinks
    assert store.blob_names() == []
    assert store.purge_blobs() == 1
    assert _files(store) == []


def test_readers_racing_replacements_and_switches_see_whole_versions(opener: Opener) -> None:
    # Two instances, so the writer and the reader exclude each other through flock(2)
    # as two processes would. The writer alternates plain and sealed files of one name.
    import threading

    writer = opener(key=b"k" * 32)
    reader = opener(key=b"k" * 32)
    versions = {bytes([i]) * (1000 + i): i for i in range(4)}
    contents = list(versions)
    writer.put_file("k", io.BytesIO(contents[0]))
    problems: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            for n in range(200):
                writer.put_file("k", io.BytesIO(contents[n % 4]), encrypt=n % 3 == 0)
        except BaseException as exc:
            problems.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 10:
            got = _read(reader, "k")  # never MissingKeyError, never a mix
            assert got in versions
            reads += 1
    finally:
        thread.join()
    assert not problems
    assert len(_files(writer)) == 1


def test_a_symbolic_link_is_not_a_blob(opener: Opener, tmp_path: Path) -> None:
    store = opener()
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the store to serve")
    store.put_file("k", io.BytesIO(b"x"))
    (_base(store) / "link").symlink_to(secret)
    with pytest.raises(MissingKeyError):
        store.open("link")
    assert store.blob_names() == ["k"]
