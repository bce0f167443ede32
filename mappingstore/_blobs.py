"""Large values as streams: ``put_file``, ``get_file`` and ``open`` on every backend.

Layer 3 of the architecture. :class:`Blobs` is the backend hook behind the blob methods of
:class:`~mappingstore.Store`: ``Store._blob_backend()`` returns one, and the store's
public methods only dispatch to it. :class:`Blobs` does the checks every backend shares
(closed, read-only, key text, ``chunk_size``, no batch) and ``get_file``; a subclass
stores the bytes. :class:`ChunkedBlobs` (here, the default: chunk records through the
backend contract, for every backend and for ``Tiered`` and ``Sharded``) and the
directory store's plain files (``_dir_blobs``) keep them; the ``Prefixed`` adapter maps
names onto its wrapped store's blobs. ``Store._blob_backend_for(facade)`` builds one for
*facade*, the store the caller holds: the backend itself, or a ``ReadOnly`` or ``Cached``
adapter over it, which thereby shares the backend's own blobs (one blob, seen both ways).

:class:`ChunkedBlobs` is built only on the backend contract (like ``_series``), so a
multi-GB value never has to fit in memory, whatever the backend. Storage (in the internal
namespace ``"\\0blob\\0" + namespace``, so a blob and a plain key of the same name are
independent, like series):

* a **manifest** record ``M:<len(name)>:<name>`` holding the size, the chunk size, the
  chunk count, a version id and the SHA-256 of the content;
* **chunk** records ``C:<len(name)>:<name>:<version>:<index>`` of :data:`CHUNK_SIZE` bytes
  each (the last one shorter).

Why versions: ``put_file`` writes every chunk of a *new* version first, then swaps the
manifest with one atomic read-modify-write, then deletes the chunks of the version it
replaced. A crash (or an exception from the source) mid-upload therefore never exposes a
half blob: readers see the old version or the new one. The chunks of an upload that never
committed are orphans, invisible to every read; ``cleanup`` (``Store.purge_blobs``)
removes them once they are older than a grace period. The version id starts with the
upload's start time so that cleanup can tell an abandoned upload from one in progress.
If the swap itself fails with an unknown outcome (a lost reply), the new chunks may
already be the blob: the manifest is read back before anything is removed, and if it
cannot be, nothing is (``ChunkedBlobs._abandon``).

Every chunk goes through the store's codec with ``(version, index, final)`` as extra
associated data: with encryption each chunk is authenticated and bound to its blob,
version and position, so a chunk moved to another position or blob fails with
:class:`~mappingstore.errors.IntegrityError`, and a dropped last chunk is detected (the
manifest, itself authenticated, gives the count, and only the last chunk carries the final
flag). A plain chunk under an encrypted manifest is refused (no downgrade of one chunk).
Without encryption each chunk's CRC catches damage, the manifest's size and count catch
truncation, and full sequential reads check the SHA-256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import operator
import os
import stat
import struct
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from ._codec import ENCRYPTED_HEADER
from ._filelock import fsync_dir
from ._keys import check_key, internal_ns, tagged_key, tagged_names
from .errors import (
    BackendError,
    CorruptValueError,
    IntegrityError,
    InvalidOptionError,
    MappingStoreError,
    MissingKeyError,
    OptionTypeError,
    StoreNotFoundError,
)

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["CHUNK_SIZE", "BlobReader", "Blobs", "ChunkedBlobs"]

#: Bytes per chunk record. 1 MiB keeps every backend's record small (Redis strings,
#: PostgreSQL TOAST, SQLite overflow pages) while a 1 GiB blob is only 1024 records.
CHUNK_SIZE = 1 << 20
#: Largest accepted ``chunk_size=``: one chunk is held in memory (a few times, while encoded).
MAX_CHUNK_SIZE = 64 << 20
#: Orphaned chunks younger than this are left alone by :func:`cleanup`: they may belong
#: to an upload still in progress.
DEFAULT_GRACE = 24 * 3600.0
#: Chunk deletions are committed in groups of this many records.
_DELETE_GROUP = 256
#: What reading a damaged manifest raises: a plain one fails its CRC or its own checks
#: (``CorruptValueError``), an encrypted one its authentication (``IntegrityError``).
_DAMAGED = (CorruptValueError, IntegrityError)

Source = str | os.PathLike[str] | IO[bytes]


def _ns(store: Store) -> str:
    return internal_ns("blob", store._ns)


def _manifest_key(name: str) -> str:
    return tagged_key("M", name)


def _chunk_prefix(name: str) -> str:
    return tagged_key("C", name) + ":"


def _chunk_key(name: str, version: str, index: int) -> str:
    return f"{_chunk_prefix(name)}{version}:{index:x}"


def _context(version: str, index: int, final: bool) -> bytes:
    return b"blob\x00" + version.encode("ascii") + struct.pack(">QB", index, final)


def _new_version() -> str:
    # Start time (for cleanup's grace period) + 64 random bits (uniqueness).
    return f"{int(time.time()):x}-{os.urandom(8).hex()}"


def _version_time(version: str) -> float | None:
    try:
        return float(int(version.partition("-")[0], 16))
    except ValueError:
        return None


class _Manifest:
    __slots__ = ("chunk_size", "count", "digest", "sealed", "size", "version")

    def __init__(self, version: str, size: int, chunk_size: int, count: int, digest: bytes):
        self.version = version
        self.size = size
        self.chunk_size = chunk_size
        self.count = count
        self.digest = digest
        self.sealed = False  # read from an encrypted record: every chunk must be one too

    def to_value(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "s": self.size,
            "cs": self.chunk_size,
            "n": self.count,
            "h": self.digest,
        }

    @classmethod
    def from_value(cls, name: str, value: Any) -> _Manifest:
        try:
            m = cls(value["v"], value["s"], value["cs"], value["n"], value["h"])
            ok = (
                type(m.version) is str
                and all(type(x) is int for x in (m.size, m.chunk_size, m.count))
                and type(m.digest) is bytes
                and m.size >= 0
                and m.chunk_size > 0
                and m.count == -(-m.size // m.chunk_size)
            )
        except (KeyError, TypeError) as exc:
            raise CorruptValueError(f"blob {name!r}: damaged manifest") from exc
        if not ok:
            raise CorruptValueError(f"blob {name!r}: damaged manifest")
        return m


def _read_manifest(store: Store, name: str) -> _Manifest | None:
    ns, key = _ns(store), _manifest_key(name)
    data = store._rget(ns, key)
    if data is None:
        return None
    m = _Manifest.from_value(name, store._decode(ns, key, data))
    m.sealed = data[:2] == ENCRYPTED_HEADER
    return m


def _check_chunk_size(chunk_size: Any) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise OptionTypeError(f"chunk_size must be an int, not {type(chunk_size).__qualname__}")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidOptionError(f"chunk_size must be 1..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")
    return chunk_size


class SourceReader:
    """Reads a source in pieces of exactly the size asked, fewer bytes only at its end.

    A raw file may return short reads, so a short piece is not the end: only ``b""`` is.
    A file-like whose ``read(n)`` returns *more* than *n* bytes (one that ignores the
    size, a common shortcut) is handled too: the excess is kept for the next piece.
    Taking such a piece whole would make a chunk longer than ``chunk_size``, which the
    one-chunk look-ahead of the writers then took for the last one: a truncated blob
    behind a manifest that fails its own check. After the first ``b""`` the source is
    never read again (the end is the end, for every writer alike).
    """

    __slots__ = ("_end", "_extra", "_offset", "_src")

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self._extra = b""  # bytes read beyond what was asked, from _offset on
        self._offset = 0
        self._end = False

    def _read(self, n: int) -> bytes:
        data = self._src.read(n)
        if data is None:
            raise InvalidOptionError("the source is a non-blocking file with no data ready")
        if not isinstance(data, bytes | bytearray | memoryview):
            raise OptionTypeError("the source must be a binary file (opened with 'rb')")
        return bytes(data)  # the same object for bytes: no copy

    def read(self, n: int) -> bytes:
        """*n* bytes (``n >= 1``); fewer only at the end of the source, ``b""`` at it."""
        parts: list[bytes] = []
        got = 0
        if self._extra:
            # A slice per piece, never a copy of the whole rest: a source may hand over
            # a GiB at once.
            piece = self._extra[self._offset : self._offset + n]
            self._offset += len(piece)
            if self._offset >= len(self._extra):
                self._extra, self._offset = b"", 0
            parts.append(piece)
            got = len(piece)
        while got < n and not self._end:
            data = self._read(n - got)
            if not data:
                self._end = True
                break
            if len(data) > n - got:
                self._extra, self._offset = data, n - got
                data = data[: n - got]
            parts.append(data)
            got += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)


@contextlib.contextmanager
def _file_errors(what: str, path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` about the caller's file *path* (not already one of ours) into
    ours, keeping the builtin: :class:`StoreNotFoundError` (a ``FileNotFoundError``) for
    a missing file or directory, :class:`BackendError` (an ``OSError``) otherwise, with
    the errno, and *path* as the file name (not the temporary file beside it)."""
    try:
        yield
    except MappingStoreError:
        raise
    except OSError as exc:
        cls = StoreNotFoundError if isinstance(exc, FileNotFoundError) else BackendError
        if exc.errno is None or exc.strerror is None:
            raise cls(f"{what} {os.fspath(path)!r}: {exc}") from exc
        raise cls(exc.errno, f"{what}: {exc.strerror}", os.fspath(path)) from exc


@contextlib.contextmanager
def _opened(target: IO[bytes], mode: str) -> Iterator[IO[bytes]]:
    """*target*, a file object (not a path), checked for ``read`` or ``write``."""
    if callable(getattr(target, "read" if mode == "rb" else "write", None)):
        yield target
    else:
        raise OptionTypeError(
            f"expected a path or a binary file object, not {type(target).__qualname__}"
        )


def _create_beside(path: str) -> tuple[int, str]:
    """A new temporary file in *path*'s directory, with the mode *path* will have.

    Not ``mkstemp``: its 0600 would survive the rename, so ``get_file`` would make a file
    nobody else can read whatever the umask, and turn an existing 0644 target into 0600.
    A new file gets what ``open(path, "wb")`` gives (0666 minus the umask, applied by
    ``os.open``), an existing target keeps its permission bits.

    The file is created with no permission bit the target lacks (``os.open`` applies the
    mode atomically; the umask can only take bits away, which ``fchmod`` then puts back):
    created wider and narrowed afterwards, it could be opened by another user in between,
    who would keep reading through that descriptor what is written to a 0600 target.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = os.path.join(directory, f".mappingstore-{os.urandom(8).hex()}.part")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666 if mode is None else mode & 0o777)
    if mode is not None:
        try:
            os.fchmod(fd, mode)  # the bits the umask took away (and setgid, sticky...)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
    return fd, tmp


def _delete_chunks(store: Store, keys: list[str]) -> None:
    from ._store import Op

    ns = _ns(store)
    for i in range(0, len(keys), _DELETE_GROUP):
        store._apply([Op(ns, k, None, None) for k in keys[i : i + _DELETE_GROUP]])


def _check_no_batch(store: Store, what: str) -> None:
    if store._batch() is not None:
        # A batch buffers every write in memory until it ends: exactly what streaming avoids.
        raise InvalidOptionError(f"{what}() cannot run inside a batch()")


class Blobs:
    """How a store keeps its blobs: the object ``Store._blob_backend()`` returns.

    The public methods check what every backend checks the same way (closed, read-only,
    the name, ``chunk_size``, no batch), open the source, and call one primitive a
    subclass implements: ``_put(name, src, encrypt, chunk_size)``, ``_open(name)``,
    ``_delete(name)``, ``_names()`` and ``_cleanup(older_than)``. ``get_file`` is built
    on ``open``. Names reach the primitives checked (``check_key``).
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- the checks, then the primitive --------------------------------------------------

    def put_file(self, name: str, source: Source, *, encrypt: bool | None, chunk_size: int) -> int:
        """Stream *source* into blob *name*; return the number of bytes stored."""
        store = self.store
        store._check_writable()
        name = check_key(name)
        chunk_size = _check_chunk_size(chunk_size)
        _check_no_batch(store, "put_file")
        if isinstance(source, str | os.PathLike):
            # The caller's file: a missing one is a StoreNotFoundError (a
            # FileNotFoundError), any other failure to open or read it a BackendError.
            with _file_errors("cannot read the source", source), open(source, "rb") as f:
                return self._put(name, f, encrypt, chunk_size)
        with _opened(source, "rb") as src:
            return self._put(name, src, encrypt, chunk_size)

    def open(self, name: str) -> BlobReader:
        """A seekable binary reader of blob *name* (``MissingKeyError`` if there is none)."""
        self.store._check_open()
        return self._open(check_key(name))

    def get_file(self, name: str, target: Source) -> int:
        """Write blob *name* to *target* (a path, replaced atomically, or a binary file)."""
        with self.open(name) as reader:
            if isinstance(target, str | os.PathLike):
                path = os.fspath(target)
                with _file_errors("cannot write the target", path):
                    fd, tmp = _create_beside(path)
                    try:
                        with os.fdopen(fd, "wb") as f:
                            n = reader.copy_to(f)
                            f.flush()
                            os.fsync(f.fileno())
                        os.replace(tmp, path)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.unlink(tmp)
                        raise
                    with contextlib.suppress(OSError):  # best effort: not every file
                        fsync_dir(os.path.dirname(os.path.abspath(path)))  # system can
                return n
            with _opened(target, "wb") as f:
                return reader.copy_to(f)

    def delete(self, name: str) -> None:
        """Delete blob *name* (``MissingKeyError`` if there is none)."""
        store = self.store
        store._check_writable()
        name = check_key(name)
        _check_no_batch(store, "delete_file")
        self._delete(name)

    def names(self) -> list[str]:
        """Names of the blobs of the store's namespace, sorted."""
        self.store._check_open()
        return self._names()

    def cleanup(self, older_than: float = DEFAULT_GRACE) -> int:
        """Remove what crashed uploads left behind; return how many records or files."""
        self.store._check_writable()
        if (
            isinstance(older_than, bool)
            or not isinstance(older_than, int | float)
            or older_than < 0
        ):
            raise InvalidOptionError(f"older_than must be >= 0 seconds, got {older_than!r}")
        return self._cleanup(float(older_than))

    # -- primitives ----------------------------------------------------------------------

    def _put(self, name: str, src: IO[bytes], encrypt: bool | None, chunk_size: int) -> int:
        raise NotImplementedError

    def _open(self, name: str) -> BlobReader:
        raise NotImplementedError

    def _delete(self, name: str) -> None:
        raise NotImplementedError

    def _names(self) -> list[str]:
        raise NotImplementedError

    def _cleanup(self, older_than: float) -> int:
        raise NotImplementedError


class ChunkedBlobs(Blobs):
    """Blobs as a manifest record plus chunk records (see the module docstring): the
    default of every backend and adapter, built only on the backend contract."""

    def _put(self, name: str, src: IO[bytes], encrypt: bool | None, chunk_size: int) -> int:
        store = self.store
        ns = _ns(store)
        version = _new_version()
        written: list[str] = []
        digest = hashlib.sha256()
        size = 0
        reader = SourceReader(src)
        replaced: list[_Manifest | None] = []
        swapping = False
        try:
            data = reader.read(chunk_size)
            index = 0
            while data:
                # Read one chunk ahead: the last chunk carries the final flag in its AAD.
                following = reader.read(chunk_size) if len(data) == chunk_size else b""
                key = _chunk_key(name, version, index)
                record = store._encode(
                    ns, key, data, encrypt, context=_context(version, index, not following)
                )
                store._check_open()
                store._put(ns, key, record, None)
                written.append(key)
                digest.update(data)
                size += len(data)
                index += 1
                data = following
            manifest = _Manifest(version, size, chunk_size, index, digest.digest())
            mkey = _manifest_key(name)
            encoded = store._encode(ns, mkey, manifest.to_value(), encrypt)

            def swap(rec: Any) -> Any:
                replaced.clear()  # empty while this runs: if it raises, nothing committed
                old = None
                if rec is not None:
                    # A damaged old manifest (damaged plain, or failing authentication)
                    # must not block a new upload: its chunks are orphans for cleanup().
                    with contextlib.suppress(*_DAMAGED):
                        old = _Manifest.from_value(name, store._decode(ns, mkey, rec[0]))
                replaced.append(old)
                return (encoded, None)

            store._check_open()
            swapping = True
            store._update(ns, mkey, swap)
        except BaseException:
            # The swap may have committed only if its function returned a new manifest.
            self._abandon(name, version, written, replaced if swapping and replaced else None)
            raise
        old = replaced[0] if replaced else None
        if old is not None and old.version != version:
            _delete_chunks(store, [_chunk_key(name, old.version, i) for i in range(old.count)])
        return size

    def _abandon(
        self, name: str, version: str, written: list[str], replaced: list[_Manifest | None] | None
    ) -> None:
        """Clean up after an upload that raised; best effort: what cannot be removed now
        is an orphan for cleanup().

        *replaced* is ``None`` if the manifest swap cannot have committed (never tried, or
        its function raised): then the chunks in *written* are nobody's and go.
        Otherwise the swap's outcome may be unknown (``UnknownOutcomeError``: the
        connection was lost before the reply; or an interrupt between the commit and the
        return), and deleting the chunks under a committed manifest would leave a blob
        that is neither the old version nor the new one. So the manifest decides: ours,
        the upload happened (the chunks stay, and the replaced version's go, as after a
        success); another one, ours is not (or no longer) the blob (the chunks go). If
        it cannot be read, nothing is deleted: orphans are recoverable by
        ``purge_blobs``, a destroyed blob is not.
        """
        store = self.store
        with contextlib.suppress(Exception):
            if store.closed:
                return
            if replaced is not None:
                current = _read_manifest(store, name)
                if current is not None and current.version == version:
                    old = replaced[0]
                    if old is not None and old.version != version:
                        doomed = [_chunk_key(name, old.version, i) for i in range(old.count)]
                        _delete_chunks(store, doomed)
                    return
            _delete_chunks(store, written)

    def _open(self, name: str) -> BlobReader:
        manifest = _read_manifest(self.store, name)
        if manifest is None:
            raise MissingKeyError(name)
        return ChunkedReader(self.store, name, manifest)

    def _delete(self, name: str) -> None:
        store = self.store
        ns, mkey = _ns(store), _manifest_key(name)
        removed: list[_Manifest | None] = []

        def drop(rec: Any) -> Any:
            removed.clear()
            if rec is None:
                raise MissingKeyError(name)
            old = None
            with contextlib.suppress(*_DAMAGED):  # its chunks are orphans for cleanup()
                old = _Manifest.from_value(name, store._decode(ns, mkey, rec[0]))
            removed.append(old)
            return None

        store._update(ns, mkey, drop)
        old = removed[0] if removed else None
        if old is not None:
            _delete_chunks(store, [_chunk_key(name, old.version, i) for i in range(old.count)])

    def _names(self) -> list[str]:
        return tagged_names(self.store._rkeys(_ns(self.store), "M:"), "M")

    def _cleanup(self, older_than: float) -> int:
        """Delete orphaned chunks (of uploads that never committed, or of versions whose
        deletion was interrupted) started more than *older_than* seconds ago."""
        store = self.store
        ns = _ns(store)
        limit = time.time() - older_than
        live: dict[str, str | None] = {}
        doomed: list[str] = []
        for key in list(store._rkeys(ns, "C:")):
            length, _, rest = key[2:].partition(":")
            try:
                n = int(length)
            except ValueError:
                continue
            name, tail = rest[:n], rest[n + 1 :]
            version = tail.rpartition(":")[0]
            if name not in live:
                try:
                    m = _read_manifest(store, name)
                except _DAMAGED:
                    continue  # never guess about a blob whose manifest cannot be read
                live[name] = None if m is None else m.version
            started = _version_time(version)
            if version != live[name] and started is not None and started <= limit:
                doomed.append(key)
        _delete_chunks(store, doomed)
        return len(doomed)


def _index(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise OptionTypeError(f"{what} must be an int, not {type(value).__qualname__}") from None


def _writable(buffer: Any) -> memoryview:
    """*buffer* as a writable memoryview of bytes; a read-only one is refused before
    any read (as ``FileIO.readinto`` does), the same way by every reader."""
    out = memoryview(buffer)
    if out.readonly:
        raise OptionTypeError("readinto() needs a writable buffer, not a read-only one")
    return out.cast("B")


class BlobReader(io.RawIOBase):
    """A read-only, seekable binary file over one version of a blob.

    Reads fetch only the chunks they need; a subclass provides them (``_chunk(index)``
    of ``_chunk_size`` bytes, the last one shorter) or overrides ``_piece``. Not
    thread-safe: use one reader per thread (readers are cheap). Wrap it in
    :class:`io.BufferedReader` for small reads. Any call after ``close()`` raises
    ``ValueError``; a read after the store was closed raises ``StoreClosedError``.
    """

    def __init__(self, store: Store, name: str, size: int, chunk_size: int) -> None:
        super().__init__()
        self._store = store
        self._name = name
        self._size = size
        self._chunk_size = chunk_size
        self._pos = 0
        self._cached: tuple[int, bytes] | None = None
        # What the caller sees: the store that opened it and the name it asked for. Not
        # the same as ``_store``/``_name`` (which read the bytes) through ``Prefixed``.
        self._owner = store
        self._shown = name

    def _present(self, owner: Store, name: str) -> BlobReader:
        """Show this reader as opened by *owner* under *name*: its name is *name*, and
        it stops when *owner* closes too (a ``Prefixed`` adapter hands out its wrapped
        store's readers)."""
        self._owner = owner
        self._shown = name
        return self

    def _check_store(self) -> None:
        self._owner._check_open()
        self._store._check_open()

    @property
    def name(self) -> str:
        """The blob name."""
        return self._shown

    @property
    def size(self) -> int:
        """The blob's size in bytes."""
        return self._size

    def readable(self) -> bool:
        self._check()
        return True

    def seekable(self) -> bool:
        self._check()
        return True

    def writable(self) -> bool:
        self._check()
        return False

    def _check(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed blob reader")

    def tell(self) -> int:
        self._check()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check()
        # As a file does: an int (or an object with __index__), never a float.
        offset = _index(offset, "the seek offset")
        whence = _index(whence, "whence")
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence ({whence!r}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(22, f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _chunk(self, index: int) -> bytes:
        """The plaintext of chunk *index* (the store is open; *index* is in range)."""
        raise NotImplementedError

    def _cached_chunk(self, index: int) -> bytes:
        cached = self._cached
        if cached is not None and cached[0] == index:
            return cached[1]
        self._check_store()
        value = self._chunk(index)
        self._cached = (index, value)
        return value

    def _piece(self, pos: int, limit: int) -> bytes:
        """At most *limit* bytes (at least one) from *pos* < size, within one chunk."""
        index, offset = divmod(pos, self._chunk_size)
        return self._cached_chunk(index)[offset : offset + limit]

    def _track(self, piece: bytes) -> None:
        """Called with each piece read, before the position moves past it."""

    def write(self, data: Any) -> int:
        """Not writable: raises :class:`io.UnsupportedOperation`, as a file opened for
        reading does (and as ``truncate()`` and ``fileno()`` of this reader do)."""
        self._check()
        raise io.UnsupportedOperation("write: blob readers are read-only")

    def readinto(self, buffer: Any) -> int:
        self._check()
        out = _writable(buffer)
        # Before any byte, also one from the cached chunk: a closed store reads nothing.
        self._check_store()
        want = len(out)
        done = 0
        while done < want and self._pos < self._size:
            piece = self._piece(self._pos, want - done)
            out[done : done + len(piece)] = piece
            self._track(piece)
            self._pos += len(piece)
            done += len(piece)
        return done

    def readall(self) -> bytes:
        self._check()
        remaining = max(self._size - self._pos, 0)
        buf = bytearray(remaining)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def copy_to(self, target: IO[bytes]) -> int:
        """Write the rest of the blob to *target* chunk by chunk; return the bytes written."""
        self._check()
        self._check_store()
        total = 0
        while self._pos < self._size:
            piece = self._piece(self._pos, self._size - self._pos)
            self._track(piece)
            self._pos += len(piece)
            target.write(piece)
            total += len(piece)
        return total

    def close(self) -> None:
        self._cached = None
        super().close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else ""
        return f"<{type(self).__name__} {self._shown!r} size={self._size}{state}>"


class ChunkedReader(BlobReader):
    """A :class:`BlobReader` over the chunk records of one version of a blob.

    Caches one chunk. It reads the version that was current when it was opened; if that
    version is replaced or deleted meanwhile, a later read of an uncached chunk raises
    :class:`~mappingstore.errors.MissingKeyError`. Reading the whole blob sequentially from
    the start also checks its SHA-256 (a mismatch raises
    :class:`~mappingstore.errors.CorruptValueError`).
    """

    def __init__(self, store: Store, name: str, manifest: _Manifest) -> None:
        super().__init__(store, name, manifest.size, manifest.chunk_size)
        self._ns = _ns(store)
        self._m = manifest
        self._hash = hashlib.sha256()
        self._hashed = 0

    def _chunk(self, index: int) -> bytes:
        m = self._m
        key = _chunk_key(self._name, m.version, index)
        store = self._store
        data = store._rget(self._ns, key)
        if data is None:
            current = _read_manifest(store, self._name)
            if current is None or current.version != m.version:
                raise MissingKeyError(
                    f"blob {self._name!r} was replaced or deleted while this reader was open"
                )
            raise CorruptValueError(f"blob {self._name!r}: chunk {index} is missing")
        if m.sealed and data[:2] != ENCRYPTED_HEADER:
            # A plain record passes its CRC: without this check anyone who can write the
            # storage could replace one chunk of an encrypted blob with chosen bytes.
            raise IntegrityError(f"blob {self._name!r}: chunk {index} is not encrypted")
        final = index == m.count - 1
        value = store._decode(self._ns, key, data, context=_context(m.version, index, final))
        expected = m.size - index * m.chunk_size if final else m.chunk_size
        if type(value) is not bytes or len(value) != expected:
            raise CorruptValueError(f"blob {self._name!r}: damaged chunk {index}")
        return value

    def _track(self, piece: bytes) -> None:
        # Only bytes read in order from the start feed the hash; seeks never break it.
        if self._pos != self._hashed:
            return
        self._hash.update(piece)
        self._hashed += len(piece)
        if self._hashed == self._m.size and self._hash.digest() != self._m.digest:
            raise CorruptValueError(f"blob {self._name!r}: content does not match its SHA-256")
