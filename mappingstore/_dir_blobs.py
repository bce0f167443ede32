"""Blobs of the directory store as plain files: the ``_blob_backend_for`` of ``DirectoryStore``.

Every other backend keeps a blob as chunk records (``_blobs.ChunkedBlobs``). A directory
already is a file store, so here a blob is **one file** (layout in
``docs/backends/directory.md``), also when it is written or read through a ``ReadOnly``
or ``Cached`` adapter (the *facade*, see :class:`DirectoryBlobs`)::

    <root>/.blobs/<ns-name>/                 one directory per namespace holding blobs
    <root>/.blobs/<ns-name>/.namespace       the namespace in UTF-8
    <root>/.blobs/<ns-name>/<name>           an unencrypted blob: exactly its bytes
    <root>/.blobs/<ns-name>/.sealed/<name>   an encrypted blob: framed, see below
    <root>/.blobs/<ns-name>/.names/<~hash>   the full name of a blob whose name is hashed
    <root>/.tmp/blob-*                       uploads in progress (each flock()ed)

Names are ``encode_name`` of the namespace and the blob name, as for records, so hostile
names cannot escape and never collide with the dot entries.

**Writes.** ``put_file`` streams into ``.tmp/blob-*`` *without* the store's lock (a
multi-GB upload must not stop every other writer), ``fsync``\\s it (``durable``), then,
under the lock, renames it into place and ``fsync``\\s the directory. The upload file is
created and ``flock``\\ed while the lock is held, so whoever holds the lock knows exactly
which upload files are abandoned (unlocked: their writer died) and removes them; no age
heuristic. A source that raises removes its upload file; nothing is ever half visible.

**Plain or sealed.** ``put_file(encrypt=...)`` chooses per blob, so one name may switch
kind. When both files exist (only between the two steps of a switch, or after a crash
there) the sealed one is the blob: a switch renames the new file in, then unlinks the
other, so with that rule the switch is atomic for readers, and ``purge_blobs`` removes a
stale plain twin. A reader that finds neither file retries under the shared lock (a switch
in progress could hide both from a lock-free reader).

**Sealed file format** (every number big-endian)::

    header  32 bytes: magic b"\\x93MSB", format 1, flags 0, 2 reserved, chunk size (4),
            4 reserved, upload id (16 random bytes)
    frames  one per chunk, at least one: length (4) + a codec record made by
            Store._encode(ns="\\0blob\\0" + namespace, key="F:<len>:<name>", chunk,
            encrypt=True, context=b"dirblob\\0" + header + index (8) + final (1))

So every chunk is XChaCha20-Poly1305-sealed with the store's data key and associated data
binding it to the store, the namespace, the blob name, this upload (the header, random
id included), its position and whether it is the last: a flipped bit, a frame moved,
dropped or taken from another blob or upload, or a file cut at any point fails with
:class:`~mappingstore.errors.IntegrityError` or :class:`~mappingstore.errors.CorruptValueError`.
``open`` authenticates the last frame at once (it gives the size).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from typing import IO, TYPE_CHECKING, Any

from ._blobs import BlobReader, Blobs, SourceReader, _ns, _writable
from ._codec import ENCRYPTED_HEADER
from ._directory import (
    BLOBS_DIR,
    SEALED_DIR,
    UPLOAD_PREFIX,
    _read,
    _write_all,
    decode_name,
    encode_name,
    upload_in_progress,
)
from ._filelock import current_pid, io_errors
from ._keys import tagged_key
from .errors import CorruptValueError, IntegrityError, MissingKeyError, StoreCorruptError

if TYPE_CHECKING:
    from ._directory import DirectoryStore
    from ._store import Store

__all__ = ["DirectoryBlobs", "remove_abandoned_uploads"]

NAMES_DIR = ".names"
SEAL_MAGIC = b"\x93MSB"
SEAL_VERSION = 1
_HEAD = struct.Struct(">4sBBHII16s")  # 32 bytes
_LEN = struct.Struct(">I")
#: Bytes per read and write when copying a plain blob.
_COPY = 1 << 20
_MISSING = (FileNotFoundError, NotADirectoryError)


def _context(header: bytes, index: int, final: bool) -> bytes:
    return b"dirblob\x00" + header + struct.pack(">QB", index, final)


def _aad_key(name: str) -> str:
    return tagged_key("F", name)


def _pread_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    data = os.pread(fd, n, offset)
    while len(data) < n:
        more = os.pread(fd, n - len(data), offset + len(data))
        if not more:
            raise CorruptValueError(f"{what} is truncated")
        data += more
    return data


class DirectoryBlobs(Blobs):
    """Blobs of a :class:`~mappingstore.DirectoryStore` as plain files (module docstring).

    Two stores take part. *files*, the directory store, owns everything on disk: the
    root, its lock, the temp directory, ``durable``. ``store`` (the facade: *files*
    itself, or a ``ReadOnly`` or ``Cached`` adapter over it) is the store the caller
    holds, and supplies what depends on who asks: the namespace, the closed, read-only
    and batch checks, the codec and the ``encrypt`` default. So a blob written through
    an adapter is the directory store's own file, and an adapter's read-only view or
    closing applies to blobs as to records.
    """

    def __init__(self, store: Store, files: DirectoryStore) -> None:
        super().__init__(store)
        self.files = files

    # -- paths --------------------------------------------------------------------------

    def _base(self) -> str:
        return f"{self.files._root}/{BLOBS_DIR}/{encode_name(self.store._ns)}"

    def _paths(self, name: str) -> tuple[str, str, str | None]:
        """(plain file, sealed file, name file or None) of blob *name*."""
        base, file = self._base(), encode_name(name)
        hashed = f"{base}/{NAMES_DIR}/{file}" if file[0] == "~" else None
        return f"{base}/{file}", f"{base}/{SEALED_DIR}/{file}", hashed

    def _ensure_dir(self, path: str, parent: str) -> None:
        if not os.path.isdir(path):
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
            self.files._sync_dir(parent)

    # -- writing ------------------------------------------------------------------------

    def _put(self, name: str, src: IO[bytes], encrypt: bool | None, chunk_size: int) -> int:
        files = self.files
        sealed = self.store._encrypt_default if encrypt is None else encrypt
        tmp = f"{files._tmp}/{UPLOAD_PREFIX}{current_pid()}-{os.urandom(8).hex()}"
        with files._exclusive(), io_errors(f"cannot start an upload in {files._root!r}"):
            # Created and locked under the store's lock: see upload_in_progress().
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        try:
            reader = SourceReader(src)  # whole pieces even from a read() that ignores n
            if sealed:
                size = self._write_sealed(fd, name, reader, chunk_size)
            else:
                size = self._write_plain(fd, reader)
            with io_errors(f"cannot write to {files._root!r}"):
                if files._durable:
                    os.fsync(fd)
            self._commit(name, tmp, sealed)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)  # releases the upload's flock
        return size

    def _write_plain(self, fd: int, src: SourceReader) -> int:
        size = 0
        while data := src.read(_COPY):
            self.store._check_open()
            with io_errors(f"cannot write to {self.files._root!r}"):
                _write_all(fd, data)
            size += len(data)
        return size

    def _write_sealed(self, fd: int, name: str, src: SourceReader, chunk_size: int) -> int:
        store, where = self.store, f"cannot write to {self.files._root!r}"
        header = _HEAD.pack(SEAL_MAGIC, SEAL_VERSION, 0, 0, chunk_size, 0, os.urandom(16))
        ns, key = _ns(store), _aad_key(name)
        with io_errors(where):
            _write_all(fd, header)
        size = index = 0
        data = src.read(chunk_size)
        while True:
            # Read one chunk ahead: the last frame carries the final flag in its AAD. An
            # empty blob is one empty final frame, so a file is never validly frameless.
            following = src.read(chunk_size) if len(data) == chunk_size else b""
            final = not following
            record = store._encode(ns, key, data, True, context=_context(header, index, final))
            store._check_open()
            with io_errors(where):
                _write_all(fd, _LEN.pack(len(record)) + record)
            size += len(data)
            index += 1
            if final:
                return size
            data = following

    def _commit(self, name: str, tmp: str, sealed: bool) -> None:
        files = self.files
        plain, seal, named = self._paths(name)
        base = self._base()
        # A closed store's lock must not be reopened (an adapter is closed with its store).
        self.store._check_open()
        files._check_open()
        with files._exclusive(), io_errors(f"cannot store blob {name!r} in {files._root!r}"):
            blobs = f"{files._root}/{BLOBS_DIR}"
            self._ensure_dir(blobs, files._root)
            if not os.path.isdir(base):
                files._make_ns_dir(self.store._ns, base, parent=blobs)
            if named is not None:
                self._write_name(named, name)
            target, other = (seal, plain) if sealed else (plain, seal)
            if sealed:
                self._ensure_dir(os.path.dirname(seal), base)
            os.replace(tmp, target)
            files._sync_dir(os.path.dirname(target))
            # The sealed file wins while both exist: plain -> sealed is visible at the
            # rename above, sealed -> plain at this unlink (see the module docstring).
            try:
                os.unlink(other)
            except _MISSING:
                return
            files._sync_dir(os.path.dirname(other))

    def _write_name(self, path: str, name: str) -> None:
        data = name.encode("utf-8")
        held = _read(path)
        if held == data:
            return
        if held is not None:
            raise StoreCorruptError(f"{path!r} names another blob (hash collision or damage)")
        files = self.files
        self._ensure_dir(os.path.dirname(path), self._base())
        files._replace_file(path, data)
        files._sync_dir(os.path.dirname(path))

    # -- reading ------------------------------------------------------------------------

    def _try_open(self, name: str) -> tuple[int, bool] | None:
        plain, seal, _ = self._paths(name)
        for path, sealed in ((seal, True), (plain, False)):
            try:
                # Never through a symbolic link: whoever can write the directory must not
                # make the store serve another file it can read.
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except _MISSING:
                continue
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue
                raise
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
            except BaseException:
                os.close(fd)
                raise
            if regular:
                return fd, sealed
            os.close(fd)  # a directory or device someone put there: not a blob
        return None

    def _open(self, name: str) -> BlobReader:
        files = self.files
        with io_errors(f"cannot open blob {name!r} in {files._root!r}"):
            found = self._try_open(name)
            if found is None and not files._flock.held:
                # A plain -> sealed switch between our two opens hides both files from a
                # lock-free reader; under the shared lock no switch is half done. A reader
                # that cannot take the lock (no access to .lock) answers from what it saw.
                try:
                    files._flock.acquire(False)
                except (OSError, RuntimeError):
                    pass
                else:
                    try:
                        found = self._try_open(name)
                    finally:
                        files._flock.release()
        if found is None:
            raise MissingKeyError(name)
        fd, sealed = found
        # The reader owns the descriptor from here on (and closes it if it fails).
        if sealed:
            return SealedFileReader(self.store, name, fd)
        return PlainFileReader(self.store, name, fd)

    def _names(self) -> list[str]:
        base = self._base()
        found: set[str] = set()
        with io_errors(f"cannot list the blobs of {self.files._root!r}"):
            for directory in (base, f"{base}/{SEALED_DIR}"):
                try:
                    entries = list(os.scandir(directory))
                except _MISSING:
                    continue
                for entry in entries:
                    if entry.name[0] == "." or not entry.is_file(follow_symlinks=False):
                        continue
                    name = self._name_of(base, entry.name)
                    if name is not None:
                        found.add(name)
        return sorted(found)

    def _name_of(self, base: str, file: str) -> str | None:
        if file[0] != "~":
            return decode_name(file)
        raw = _read(f"{base}/{NAMES_DIR}/{file}")
        if raw is None:
            return None
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return name if encode_name(name) == file else None

    # -- deleting -----------------------------------------------------------------------

    def _delete(self, name: str) -> None:
        files = self.files
        plain, seal, named = self._paths(name)
        with files._exclusive(), io_errors(f"cannot delete blob {name!r} in {files._root!r}"):
            removed = False
            # The plain file first: while the sealed one exists it hides the plain one.
            for path in (plain, seal):
                try:
                    os.unlink(path)
                except _MISSING:
                    continue
                removed = True
                files._sync_dir(os.path.dirname(path))
            if not removed:
                raise MissingKeyError(name)
            if named is not None:
                with contextlib.suppress(*_MISSING):
                    os.unlink(named)

    def _cleanup(self, older_than: float) -> int:
        # Upload files are locked by their writer, so an abandoned one is known for sure:
        # no grace period is needed and *older_than* is not used.
        files = self.files
        base = self._base()
        removed = 0
        with files._exclusive(), io_errors(f"cannot purge the blobs of {files._root!r}"):
            removed += remove_abandoned_uploads(files._tmp)
            sealed_dir = f"{base}/{SEALED_DIR}"
            # A plain file beside a sealed one of the same name is hidden by it (a kind
            # switch interrupted by a crash).
            with contextlib.suppress(*_MISSING):
                for entry in os.scandir(sealed_dir):
                    twin = f"{base}/{entry.name}"
                    if entry.name[0] != "." and os.path.isfile(twin):
                        with contextlib.suppress(*_MISSING):
                            os.unlink(twin)
                            removed += 1
            # Name files whose blob is gone (a delete interrupted by a crash).
            with contextlib.suppress(*_MISSING):
                for entry in os.scandir(f"{base}/{NAMES_DIR}"):
                    file = entry.name
                    if not (
                        os.path.exists(f"{base}/{file}") or os.path.exists(f"{sealed_dir}/{file}")
                    ):
                        with contextlib.suppress(*_MISSING):
                            os.unlink(entry.path)
                            removed += 1
        return removed


def remove_abandoned_uploads(tmp_dir: str) -> int:
    """Remove the upload files of dead writers from *tmp_dir*; call under the store lock."""
    removed = 0
    try:
        entries = list(os.scandir(tmp_dir))
    except _MISSING:
        return 0
    for entry in entries:
        if entry.name.startswith(UPLOAD_PREFIX) and not upload_in_progress(entry.path):
            with contextlib.suppress(*_MISSING):
                os.unlink(entry.path)
                removed += 1
    return removed


class PlainFileReader(BlobReader):
    """A :class:`BlobReader` over an open plain blob file (``pread``: no shared offset).

    Keeps reading the version it opened when the blob is replaced or deleted (the file
    it holds is only unlinked). Reads straight into the caller's buffer.
    """

    def __init__(self, store: Store, name: str, fd: int) -> None:
        self._fd = fd
        super().__init__(store, name, 0, _COPY)
        try:
            self._size = os.fstat(fd).st_size
        except BaseException:
            self.close()
            raise

    def _piece(self, pos: int, limit: int) -> bytes:
        self._check_store()
        n = min(limit, _COPY, self._size - pos)
        with io_errors(f"cannot read blob {self._name!r}"):
            data = os.pread(self._fd, n, pos)
        if not data:
            raise CorruptValueError(f"blob file of {self._name!r} shrank while open")
        return data

    def readinto(self, buffer: Any) -> int:
        self._check()
        out = _writable(buffer)  # not preadv's BufferError: TypeError, as every reader
        self._check_store()
        want = min(len(out), max(self._size - self._pos, 0))
        done = 0
        with io_errors(f"cannot read blob {self._name!r}"):
            while done < want:
                n = os.preadv(self._fd, [out[done:want]], self._pos)
                if not n:
                    raise CorruptValueError(f"blob file of {self._name!r} shrank while open")
                self._pos += n
                done += n
        return done

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        super().close()


class SealedFileReader(BlobReader):
    """A :class:`BlobReader` over an open sealed blob file: frames are authenticated one
    by one as they are read (one cached); the last one at open."""

    def __init__(self, store: Store, name: str, fd: int) -> None:
        self._fd = fd
        self._what = what = f"blob file of {name!r}"
        super().__init__(store, name, 0, 1)
        try:
            with io_errors(f"cannot read {what}"):
                file_size = os.fstat(fd).st_size
                header = _pread_exact(fd, _HEAD.size, 0, what)
                # Every frame but the last has the length of the first one.
                first = _LEN.unpack(_pread_exact(fd, 4, _HEAD.size, what))[0]
            magic, version, flags, reserved, chunk_size, reserved2, _ = _HEAD.unpack(header)
            if magic != SEAL_MAGIC or version != SEAL_VERSION or flags or reserved or reserved2:
                raise CorruptValueError(f"{what} is not a sealed mappingstore blob")
            if chunk_size < 1:
                raise CorruptValueError(f"{what} has a damaged header")
            self._chunk_size = chunk_size
            self._header = header
            self._ns = _ns(store)
            self._key = _aad_key(name)
            self._stride = 4 + first
            body = file_size - _HEAD.size
            if body < self._stride:
                raise CorruptValueError(f"{what} is truncated")
            self._count = -(-body // self._stride)
            # Authenticating the last frame now gives the size and catches a cut file.
            last = self._frame(self._count - 1, final=True)
        except BaseException:
            self.close()
            raise
        self._size = (self._count - 1) * chunk_size + len(last)
        self._cached = (self._count - 1, last)

    def _frame(self, index: int, final: bool) -> bytes:
        offset = _HEAD.size + index * self._stride
        with io_errors(f"cannot read {self._what}"):
            length = _LEN.unpack(_pread_exact(self._fd, 4, offset, self._what))[0]
            end = offset + 4 + length
            if final and end != os.fstat(self._fd).st_size:
                raise CorruptValueError(f"{self._what} is truncated or has trailing bytes")
            if not final and length != self._stride - 4:
                raise CorruptValueError(f"{self._what}: damaged frame {index}")
            record = _pread_exact(self._fd, length, offset + 4, self._what)
        if record[:2] != ENCRYPTED_HEADER:
            raise IntegrityError(f"{self._what}: frame {index} is not encrypted")
        value = self._store._decode(
            self._ns, self._key, record, context=_context(self._header, index, final)
        )
        chunk = self._chunk_size
        if type(value) is not bytes or len(value) > chunk or (not final and len(value) != chunk):
            raise CorruptValueError(f"{self._what}: damaged frame {index}")
        if final and index and not value:
            raise CorruptValueError(f"{self._what}: damaged frame {index}")
        return value

    def _chunk(self, index: int) -> bytes:
        return self._frame(index, index == self._count - 1)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        super().close()
