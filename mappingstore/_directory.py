"""Directory backend (``dir:///relative/dir``, ``dir:////absolute/dir``): one file per key.

On-disk layout (documented in ``docs/backends/directory.md`` so other languages can read
it)::

    <root>/.mappingstore        marker: "mappingstore-directory 1"
    <root>/.lock                flock(2) target; every writer holds it exclusively
    <root>/.journal             intent log of a batch being applied (transient)
    <root>/.epoch               the last batch's journal, emptied (see DirectoryStore._get_many)
    <root>/.tmp/                temp files; anything here under the lock is garbage
    <root>/<ns-name>/           one directory per namespace (name encoded, see below)
    <root>/<ns-name>/.namespace the namespace in UTF-8 (needed when the name is hashed)
    <root>/<ns-name>/.expiring  present once a record with an expiry was written here
    <root>/<ns-name>/<key-name> one record file per key
    <root>/.blobs/              blobs (``put_file``) as plain files: see ``_dir_blobs``

A record file is a 24-byte header, the full key, then the value record::

    0  4  magic b"\\x93MSD"
    4  1  format version (1)
    5  1  flags: bit 0 = has expiry
    6  2  reserved (0)
    8  8  expiry, IEEE-754 double, big-endian, seconds since the epoch (0 if none)
    16 4  key length in bytes, big-endian
    20 4  CRC-32 of bytes 0..19 followed by the key bytes
    24 .. key (UTF-8), then the value record (see ``mappingstore._codec``)

Names (namespace and key) are encoded injectively and reversibly by :func:`encode_name`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import stat
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack

from ._filelock import (
    LOCKED_FILE_OPTIONS,
    LockHandle,
    current_pid,
    fsync_dir,
    io_errors,
    lock_timeout_option,
    locked_file_url,
)
from ._keys import internal_ns
from ._store import Op, Record, Store
from ._url import file_path, parse_url
from .errors import (
    BackendError,
    CorruptValueError,
    InvalidOptionError,
    MappingStoreError,
    StoreCorruptError,
    StoreNotFoundError,
    UnknownOutcomeError,
)

if TYPE_CHECKING:
    from ._blobs import Blobs

__all__ = ["DirectoryStore", "decode_name", "encode_name"]

# -- names -------------------------------------------------------------------------------

#: Characters kept as they are in file names. Everything else is escaped: ASCII capitals
#: as ``^`` + the lower-case letter (so names stay distinct on case-insensitive file
#: systems), every other character as ``%xx`` per UTF-8 byte (lower-case hex; non-ASCII is
#: always escaped because macOS normalises Unicode file names, which would merge keys).
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_PLAIN = re.compile(r"[a-z0-9_\-][a-z0-9_.\-]*")
_ESCAPED = re.compile(r"(?:[a-z0-9_.\-]|\^[a-z]|%[0-9a-f]{2})+")
#: Windows device names, reserved with any extension and in any case.
_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{d}{i}" for d in ("com", "lpt") for i in range(10)]
)
#: Longest encoded name kept readable; longer ones are hashed. Below 143, the smallest
#: common limit (eCryptfs), so every name fits every usual file system.
MAX_NAME = 140
_HASHED = "~"  # never produced by the escaping above


def encode_name(text: str) -> str:
    """The file name of *text*: injective, reversible, portable.

    Never empty, never ``.``/``..`` or a hidden name (a leading ``.`` is escaped), never
    a path separator, a Windows device name or a trailing dot, never longer than
    :data:`MAX_NAME` bytes (longer names become ``~`` + SHA-256 hex of the text; the full
    text is stored inside the file).
    """
    if len(text) > MAX_NAME:  # escaping never shortens a name: hash without escaping it
        return _HASHED + hashlib.sha256(text.encode("utf-8")).hexdigest()
    if _PLAIN.fullmatch(text):
        out = text
    else:
        parts = []
        for ch in text:
            if ch in _SAFE:
                parts.append(ch)
            elif "A" <= ch <= "Z":
                parts.append("^" + ch.lower())
            else:
                parts.append("".join(f"%{b:02x}" for b in ch.encode("utf-8")))
        out = "".join(parts)
        if out[0] == ".":
            out = "%2e" + out[1:]
    if out[-1] == ".":  # Windows drops trailing dots
        out = out[:-1] + "%2e"
    if out.split(".", 1)[0] in _RESERVED:
        out = f"%{ord(out[0]):02x}" + out[1:]
    if len(out) > MAX_NAME:
        out = _HASHED + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return out


def decode_name(name: str) -> str | None:
    """The text of an encoded name, or ``None`` if *name* is not one we produce (or is
    hashed: then the text is inside the file)."""
    if _PLAIN.fullmatch(name):
        text = name
    elif _ESCAPED.fullmatch(name):
        buf = bytearray()
        i, n = 0, len(name)
        while i < n:
            ch = name[i]
            if ch == "%":
                buf.append(int(name[i + 1 : i + 3], 16))
                i += 3
            elif ch == "^":
                buf.append(ord(name[i + 1].upper()))
                i += 2
            else:
                buf.append(ord(ch))
                i += 1
        try:
            text = buf.decode("utf-8")
        except UnicodeDecodeError:
            return None
    else:
        return None
    # Only the canonical spelling is ours: "%61" is not the name of "a".
    return text if text and encode_name(text) == name else None


# -- record files ------------------------------------------------------------------------

MAGIC = b"\x93MSD"
VERSION = 1
_HEAD = struct.Struct(">4sBBHdII")
_HEAD_SIZE = _HEAD.size  # 24
_FLAG_EXPIRES = 1
_JOURNAL_MAGIC = b"\x93MSJ\x01"
_MARKER_TEXT = b"mappingstore-directory 1\n"
_READ_CHUNK = 16384
#: Opening never follows a symbolic link, nor waits for the writer of a FIFO.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
#: What opening or reading something that is not a regular file may fail with.
_NOT_A_FILE = frozenset(
    {errno.ELOOP, errno.EMLINK, errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EAGAIN}
)


def pack_record(key: str, data: bytes, expires: float | None) -> bytes:
    """The bytes of a record file."""
    kb = key.encode("utf-8")
    flags = _FLAG_EXPIRES if expires is not None else 0
    head = _HEAD.pack(MAGIC, VERSION, flags, 0, expires or 0.0, len(kb), 0)[:20]
    crc = zlib.crc32(kb, zlib.crc32(head))
    return b"".join((head, crc.to_bytes(4, "big"), kb, data))


def parse_record(raw: bytes, where: str = "") -> tuple[str, float | None, bytes]:
    """``(key, expires, data)`` of a record file; :class:`CorruptValueError` if damaged."""
    if len(raw) < _HEAD_SIZE:
        raise CorruptValueError(f"record file {where!r} is truncated")
    magic, version, flags, _, expires, klen, crc = _HEAD.unpack_from(raw)
    end = _HEAD_SIZE + klen
    if magic != MAGIC or version != VERSION or end > len(raw):
        raise CorruptValueError(f"{where!r} is not a mappingstore record file")
    if zlib.crc32(raw[_HEAD_SIZE:end], zlib.crc32(raw[:20])) != crc:
        raise CorruptValueError(f"record file {where!r} is damaged: header checksum mismatch")
    try:
        key = raw[_HEAD_SIZE:end].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptValueError(f"record file {where!r} has an invalid key") from exc
    return key, (expires if flags & _FLAG_EXPIRES else None), raw[end:]


def _read(path: str) -> bytes | None:
    """The bytes of the regular file *path*, or ``None`` when there is none.

    Anything else found there (a directory, a FIFO, a device, a socket, a symbolic link
    someone put in the store) is never read and counts as no file: a record file is
    always a regular file, written by a rename. ``O_NONBLOCK`` keeps the open of a FIFO
    from waiting for a writer; the type is checked (``fstat``) only when the read is not
    that of a plain record (empty or short, or a full first chunk), never on the common
    path.
    """
    # os.open/os.read instead of open(): no buffered-I/O objects, about 3x faster for
    # the small files this backend mostly holds.
    try:
        fd = os.open(path, _READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in _NOT_A_FILE:  # a symbolic link (ELOOP), a socket (ENXIO)...
            return None
        raise
    try:
        try:
            data = os.read(fd, _READ_CHUNK)
        except OSError as exc:
            if exc.errno in _NOT_A_FILE:  # a directory (EISDIR), an idle FIFO (EAGAIN)
                return None
            raise
        size = len(data)
        if (size < _HEAD_SIZE or size == _READ_CHUNK) and not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # a FIFO, a device...: not a record file
        if size == _READ_CHUNK:
            chunks = [data]
            while True:
                more = os.read(fd, 1 << 20)
                if not more:
                    break
                chunks.append(more)
            data = b"".join(chunks)
        return data
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


_counter = itertools.count()

#: Temp files of blob uploads (``_dir_blobs``) start with this. They are written without
#: the store's lock, so each holds an ``flock`` of its own while its upload runs.
UPLOAD_PREFIX = "blob-"
#: Where blobs live: ``<root>/.blobs/<ns-name>/`` and its ``.sealed/`` (see ``_dir_blobs``).
BLOBS_DIR = ".blobs"
SEALED_DIR = ".sealed"


def upload_in_progress(path: str) -> bool:
    """True if the upload file *path* is still locked by its writer. Call under the
    store's lock: uploads create and lock their file under it, so a file found unlocked
    then belongs to a writer that died."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the lock this check took
    return False


class DirectoryStore(Store):
    """Values in a directory, one file per key; shared by every process on the host.

    Every write is atomic (temp file, ``fsync``, ``os.replace``, directory ``fsync``): a
    writer killed at any moment leaves the old or the new value, never a torn file.
    With ``durable=False`` the two ``fsync`` calls are skipped (still atomic against a
    crashed process, not against power loss). A :meth:`batch` (and every multi-key write)
    is all-or-nothing, also across a crash: its intent is written to a journal first and
    replayed by the next process that takes the lock.

    Processes and instances see each other's writes at once: nothing is cached. Writers
    take an exclusive ``flock`` on ``<root>/.lock`` (the kernel drops it if the holder
    dies), so :meth:`modify` is atomic across processes. Readers take no lock unless a
    batch is in flight, so a read-only instance works while others write. :meth:`get_many`
    reads its keys from one state (a batch whole or not at all): lock-free, checking that
    no batch ran meanwhile, else once more under the shared lock.

    Thread-safe. ``len()``, iteration and :meth:`namespaces` list directories; in a
    namespace that has ever held an item with a TTL they also read each file's header.
    Iteration is not a snapshot. Every namespace is a sub-directory; file permissions
    follow the umask. Files written by another program are ignored unless they are
    valid record files with names this backend produces. POSIX only (``flock``).

    Blobs (:meth:`put_file`) are one plain file each under ``<root>/.blobs/``, not chunk
    records (``mappingstore._dir_blobs``); so are the blobs of ``ReadOnly``, ``Cached`` and
    ``Prefixed`` adapters around it (``Tiered`` and ``Sharded`` keep chunk records).
    """

    scheme: ClassVar[str] = "dir"
    durability: ClassVar[str] = (
        "every write is fsynced (file and directory) before it returns; "
        "batches are all-or-nothing through a journal (durable=False: atomic, not power-loss safe)"
    )
    shared_across_processes: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durable: bool = True,
        lock_timeout: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not isinstance(durable, bool):
            raise InvalidOptionError("durable must be True or False")
        self._root = os.path.abspath(os.fspath(path))
        self._durable = durable
        self._lock_timeout = lock_timeout = lock_timeout_option(lock_timeout)
        self._marker = os.path.join(self._root, ".mappingstore")
        self._journal = os.path.join(self._root, ".journal")
        self._epoch = os.path.join(self._root, ".epoch")
        self._tmp = os.path.join(self._root, ".tmp")
        self._tmp_tag = os.urandom(4).hex()
        self._paths: dict[tuple[str, str], str] = {}
        self._ns_dirs: dict[str, str] = {}
        self._cache_lock = threading.Lock()
        self._unlocked_reads = False  # get_many() found no lock file and said so
        if self._readonly:
            if not os.path.isfile(self._marker):
                raise StoreNotFoundError(f"no mappingstore directory at {self._root!r}")
            self._flock = LockHandle.open(
                os.path.join(self._root, ".lock"), create=False, timeout=lock_timeout
            )
        else:
            with io_errors(f"cannot create {self._root!r}"):
                os.makedirs(self._root, exist_ok=True)
            self._flock = LockHandle.open(os.path.join(self._root, ".lock"), timeout=lock_timeout)
            try:
                with self._exclusive():
                    self._init_root()
            except BaseException:
                self._flock.close()
                raise
        self._start()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DirectoryStore:
        """``dir:///relative/dir`` or ``dir:////absolute/dir`` (options in the query)."""
        parsed = parse_url(url, cls.scheme, LOCKED_FILE_OPTIONS)
        return cls(file_path(parsed), **{**parsed.options, **options})

    @property
    def url(self) -> str:
        """docstring inherited"""
        return locked_file_url(self.scheme, self._root, self._durable, self._lock_timeout)

    @property
    def path(self) -> str:
        """The absolute path of the store's directory."""
        return self._root

    # -- opening, locking, recovery -----------------------------------------------------

    def _init_root(self) -> None:
        with io_errors(f"cannot open {self._root!r}"):
            if os.path.exists(self._marker):
                with open(self._marker, "rb") as f:
                    if f.read() != _MARKER_TEXT:
                        raise StoreCorruptError(
                            f"{self._root!r} is not a version-1 mappingstore directory"
                        )
            else:
                # Refuse to scatter namespace directories over a directory that holds
                # somebody else's files (a dir:////home/user slip).
                foreign = [e for e in os.listdir(self._root) if not e.startswith(".")]
                if foreign:
                    raise StoreCorruptError(
                        f"{self._root!r} is not empty and not a mappingstore directory"
                    )
                os.makedirs(self._tmp, exist_ok=True)
                self._replace_file(self._marker, _MARKER_TEXT)
                self._sync_dir(self._root)
            os.makedirs(self._tmp, exist_ok=True)
            # Every temp file is created under the lock we hold now, so any left here
            # belongs to a writer that died: no age heuristic is needed. Blob uploads
            # write without the lock, but lock their own file while they run.
            for entry in os.scandir(self._tmp):
                if entry.name.startswith(UPLOAD_PREFIX) and upload_in_progress(entry.path):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def _write_lock(self) -> None:
        """Take the store's cross-process write lock (re-entrant); on first taking it,
        replay the batch of a writer that died mid-way."""
        if self._flock.acquire(True) and os.access(self._journal, os.F_OK):
            try:
                self._recover()
            except BaseException:
                self._flock.release()
                raise

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """The write lock for a block (see :meth:`_write_lock`)."""
        self._write_lock()
        try:
            yield
        finally:
            self._flock.release()

    def _settle(self) -> None:
        """Called by readers that saw a journal: wait for its writer, or replay it."""
        if self._flock.held:
            return  # our own batch, in this thread
        try:
            with self._flock.shared():  # blocks while a live writer applies its batch
                pending = os.access(self._journal, os.F_OK)
            if pending:  # its writer died mid-batch
                with self._exclusive():
                    pass
        except (OSError, RuntimeError) as exc:
            # A reader without write permission cannot repair the directory; it reads
            # what is there and says so.
            self._log.warning("cannot replay the pending batch in %r: %s", self._root, exc)

    def _recover(self) -> None:
        raw = _read(self._journal)
        ops: list[Op] | None = None
        if raw == b"":
            ops = []  # emptied by _retire_journal: its batch was applied in full
        elif raw is not None:
            ops = _decode_journal(raw)
            if ops is None:
                # Written to a temp file and renamed, a journal is complete or absent: a
                # bad one means damaged storage. It cannot be replayed; say so loudly.
                self._log.error("discarding a damaged batch journal in %r", self._root)
        with io_errors(f"cannot replay the batch journal in {self._root!r}"):
            if ops:
                self._log.warning(
                    "replaying an interrupted batch of %d writes in %r", len(ops), self._root
                )
                self._replay(ops)
            with contextlib.suppress(FileNotFoundError):
                # Renamed, not deleted, even when there was nothing to replay: the dead
                # writer changed files, and readers learn it from a new .epoch.
                self._retire_journal()
            self._sync_dir(self._root)

    # -- paths --------------------------------------------------------------------------

    def _ns_dir(self, ns: str) -> str:
        path = self._ns_dirs.get(ns)
        if path is None:
            path = f"{self._root}/{encode_name(ns)}"
            with self._cache_lock:
                if len(self._ns_dirs) > 1024:
                    self._ns_dirs.clear()
                self._ns_dirs[ns] = path
        return path

    def _path(self, ns: str, key: str) -> str:
        path = self._paths.get((ns, key))
        if path is None:
            path = f"{self._ns_dir(ns)}/{encode_name(key)}"
            with self._cache_lock:
                if len(self._paths) > 65536:
                    self._paths.clear()
                self._paths[(ns, key)] = path
        return path

    def _tmp_path(self) -> str:
        # Unique without a random read per write: pid, a per-instance random part (pids
        # repeat across containers sharing the directory) and a counter.
        return f"{self._tmp}/{current_pid()}-{self._tmp_tag}-{next(_counter)}"

    def _sync_dir(self, path: str) -> None:
        if self._durable:
            fsync_dir(path)

    def _write_file(self, path: str, data: bytes) -> None:
        """Create *path* (a new file) holding *data*; on failure (a full disk...) remove it
        again, so a failed write keeps no space and leaves nothing behind."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            try:
                _write_all(fd, data)
                if self._durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise

    def _replace_file(self, path: str, data: bytes) -> None:
        """Atomically make *data* the content of *path*: a temp file renamed over it. A
        failure at any step leaves no temp file behind."""
        tmp = self._tmp_path()
        self._write_file(tmp, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _retire_journal(self) -> None:
        """End a batch whose files are all written: the journal, emptied (no copy of the
        values left behind), becomes the new ``.epoch`` instead of being deleted; a new
        inode there tells readers that a batch ran (see :meth:`_get_many`). Emptied
        first: ext4 flushes the data of a file renamed over another one."""
        os.truncate(self._journal, 0)
        os.replace(self._journal, self._epoch)

    def _make_ns_dir(self, ns: str, path: str, parent: str | None = None) -> None:
        # Built in .tmp and renamed into place, so a namespace directory never exists
        # without its .namespace file. *parent*: the directory of *path* (default: root).
        tmp = self._tmp_path()
        os.mkdir(tmp)
        try:
            self._write_file(os.path.join(tmp, ".namespace"), ns.encode("utf-8"))
            self._sync_dir(tmp)
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        self._sync_dir(self._root if parent is None else parent)

    # -- reading ------------------------------------------------------------------------

    def _load(self, ns: str, key: str) -> Record | None:
        path = self._path(ns, key)
        raw = _read(path)
        if raw is None:
            return None
        stored, expires, data = parse_record(raw, path)
        if stored != key:
            raise CorruptValueError(f"record file {path!r} holds another key")
        if expires is not None and expires <= self._clock():
            return None
        return data, expires

    def _get_record(self, ns: str, key: str) -> Record | None:
        if os.access(self._journal, os.F_OK):
            self._settle()
        return self._load(ns, key)

    def _get(self, ns: str, key: str) -> bytes | None:
        if os.access(self._journal, os.F_OK):
            self._settle()
        rec = self._load(ns, key)
        return None if rec is None else rec[0]

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        # Key by key, a read could see half of a batch committed between two reads; the
        # journal exists only while a batch is applied, so checking it before and after
        # cannot tell a batch that ran entirely in between. So every batch (and every
        # replay of a dead writer's journal) ends by renaming its journal to .epoch: a
        # new inode there. A read that holds the .epoch it started with open (so its
        # inode cannot be reused), or found none, then finds no journal and the same
        # .epoch: any batch that changed a file it read after it started has ended (no
        # journal), hence replaced .epoch; none did, so it saw no half batch.
        # Otherwise it reads again, once, under the shared lock (batches are applied
        # under the exclusive one). Lock-free first, so readers never hold writers back.
        # One key needs no check (a file is replaced atomically): that stays _get.
        if len(keys) < 2:
            return [self._get(ns, key) for key in keys]
        try:
            fd = os.open(self._epoch, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = -1  # no batch has run yet: its appearance is the change to look for
        except OSError:
            return self._get_many_locked(ns, keys)
        try:
            out = self._load_many(ns, keys)
            if not os.access(self._journal, os.F_OK) and self._same_epoch(fd):
                return out
        finally:
            if fd >= 0:
                os.close(fd)
        return self._get_many_locked(ns, keys)

    def _same_epoch(self, fd: int) -> bool:
        """Whether ``.epoch`` is still the file open as *fd* (``-1``: still absent)."""
        with io_errors(f"cannot read from {self._root!r}"):
            try:
                now = os.stat(self._epoch)
            except FileNotFoundError:
                return fd < 0
            if fd < 0:
                return False
            then = os.fstat(fd)
            return (now.st_ino, now.st_dev) == (then.st_ino, then.st_dev)

    def _load_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        with io_errors(f"cannot read from {self._root!r}"):
            out: list[bytes | None] = []
            for key in keys:
                rec = self._load(ns, key)
                out.append(None if rec is None else rec[0])
            return out

    def _get_many_locked(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        """Read *keys* under the shared lock: no batch can be applied meanwhile."""
        for settled in (False, True):
            try:
                self._flock.acquire(False)
            except TimeoutError:
                raise  # LockTimeoutError: lock_timeout= bounds this wait as any other
            except OSError as exc:
                # The lock file cannot be opened (a read-only copy without it): read key
                # by key, as single reads do, and say so once.
                if not self._unlocked_reads:
                    self._unlocked_reads = True
                    self._log.warning(
                        "cannot lock %r: get_many() reads key by key: %s", self._root, exc
                    )
                return [self._get(ns, key) for key in keys]
            try:
                # Under the shared lock a journal belongs to a writer that died mid-batch
                # (a live one holds the exclusive lock until it removes it): replay it
                # (once; a reader that cannot reads what is there, as _get does).
                if settled or not os.access(self._journal, os.F_OK):
                    return self._load_many(ns, keys)
            finally:
                self._flock.release()
            self._settle()
        raise AssertionError("unreachable")  # pragma: no cover

    def _entries(self, ns: str, prefix: str, with_data: bool) -> list[tuple[str, bytes]]:
        """Live ``(key, data)`` of *ns* (data empty unless *with_data*), sorted by key."""
        if os.access(self._journal, os.F_OK):
            self._settle()
        directory = self._ns_dir(ns)
        names = _record_names(directory)
        if names is None:
            return []
        expiring = os.access(os.path.join(directory, ".expiring"), os.F_OK)
        now = self._clock()
        out: list[tuple[str, bytes]] = []
        for name in names:
            key: str | None = None
            if name[0] != _HASHED:
                key = decode_name(name)
                if key is None or not key.startswith(prefix):
                    continue  # not ours, or filtered without reading the file
                if not (with_data or expiring):
                    out.append((key, b""))
                    continue
            path = os.path.join(directory, name)
            raw = _read(path)
            if raw is None:
                continue  # deleted since the listing
            try:
                stored, expires, data = parse_record(raw, path)
                if stored != key if key is not None else encode_name(stored) != name:
                    raise CorruptValueError(f"record file {path!r} holds another key")
            except CorruptValueError:
                # A damaged file is never skipped silently: a listing of values raises, as
                # store[key] does; a listing of keys names the key its file name gives (its
                # read then raises) and raises only when the key is inside the damaged file.
                if with_data or key is None:
                    raise
                out.append((key, b""))
                continue
            if not stored.startswith(prefix):
                continue
            if expires is not None and expires <= now:
                continue
            out.append((stored, data))
        out.sort()
        return out

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        for key, _ in self._entries(ns, prefix, False):
            yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        yield from self._entries(ns, prefix, True)

    def _count(self, ns: str) -> int:
        return len(self._entries(ns, "", False))

    def _namespaces(self) -> Iterable[str]:
        found = [ns for ns, path in _ns_dirs(self._root) if _holds_entries(path)]
        # A namespace's blobs are plain files under .blobs/ (see _dir_blobs), reported as
        # the internal namespace the chunked blobs of other backends live in.
        for ns, path in _ns_dirs(os.path.join(self._root, BLOBS_DIR)):
            if _holds_entries(path) or _holds_entries(os.path.join(path, SEALED_DIR)):
                found.append(internal_ns("blob", ns))
        return found

    def _holds_live(self, ns: str) -> bool:
        """Whether *ns* has a live record, stopping at the first (``namespaces()`` asks):
        without a TTL ever set in it, any record file; otherwise the first file that is not
        expired. A damaged file counts as data (it is there to be repaired), never as an
        error that would hide every namespace from the listing."""
        if self._nbatch:
            return super()._holds_live(ns)
        directory = self._ns_dir(ns)
        names = _record_names(directory)
        if names is None:
            return False
        if not os.access(os.path.join(directory, ".expiring"), os.F_OK):
            return any(n[0] == _HASHED or decode_name(n) is not None for n in names)
        now = self._clock()
        for name in names:
            if name[0] != _HASHED and decode_name(name) is None:
                continue  # not a record file of ours
            raw = _read(os.path.join(directory, name))
            if raw is None:
                continue  # deleted since the listing
            try:
                _, expires, _ = parse_record(raw, name)
            except CorruptValueError:
                return True
            if expires is None or expires > now:
                return True
        return False

    def _blob_backend_for(self, facade: Store) -> Blobs:
        """Blobs as one plain file each, not chunk records (see ``_dir_blobs``), also
        through ``ReadOnly`` and ``Cached`` adapters (*facade*)."""
        from ._dir_blobs import DirectoryBlobs

        return DirectoryBlobs(facade, files=self)

    # -- writing ------------------------------------------------------------------------

    def _store_file(self, ns: str, key: str, data: bytes, expires: float | None) -> str:
        """Atomically replace the record file of *key*; return its directory (unsynced)."""
        path = self._path(ns, key)
        directory = self._ns_dir(ns)
        if path[len(directory) + 1] == _HASHED:
            raw = _read(path)
            if raw is not None and parse_record(raw, path)[0] != key:
                raise StoreCorruptError(f"{path!r} holds another key (hash collision or damage)")
        if expires is not None:
            marker = os.path.join(directory, ".expiring")
            if not os.access(marker, os.F_OK):
                if not os.path.isdir(directory):
                    self._make_ns_dir(ns, directory)
                self._write_file(marker, b"")
                self._sync_dir(directory)
        tmp = self._tmp_path()
        self._write_file(tmp, pack_record(key, data, expires))
        try:
            try:
                os.replace(tmp, path)
            except FileNotFoundError:
                # First write to this namespace (or after clear()): create its directory.
                self._make_ns_dir(ns, directory)
                os.replace(tmp, path)
        except BaseException:
            # No temp file outlives a failed write (it would keep its disk space until
            # the store is opened again).
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return directory

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        # The hot write path: the lock by hand rather than two context managers.
        self._write_lock()
        try:
            directory = self._store_file(ns, key, data, expires)
            if self._durable:
                fsync_dir(directory)
        except MappingStoreError:
            raise
        except OSError as exc:
            raise BackendError(f"cannot write to {self._root!r}: {exc}") from exc
        finally:
            self._flock.release()

    def _remove_file(self, ns: str, key: str) -> bool:
        path = self._path(ns, key)
        try:
            live = self._load(ns, key) is not None
        except CorruptValueError:
            live = True  # a damaged record is still a record: deleting it is the fix
        try:
            if not live and not stat.S_ISREG(os.lstat(path).st_mode):
                return False  # a directory, a FIFO...: not a record, not ours to remove
            os.unlink(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return live

    def _delete(self, ns: str, key: str) -> bool:
        with self._exclusive(), io_errors(f"cannot delete from {self._root!r}"):
            existed = self._remove_file(ns, key)
            if existed or os.path.isdir(self._ns_dir(ns)):
                self._sync_dir(self._ns_dir(ns))
            return existed

    def _replay(self, ops: Sequence[Op]) -> None:
        touched: set[str] = set()
        for op in ops:
            if op.data is None:
                self._remove_file(op.ns, op.key)
                touched.add(self._ns_dir(op.ns))
            else:
                touched.add(self._store_file(op.ns, op.key, op.data, op.expires))
        for directory in touched:
            if os.path.isdir(directory):
                self._sync_dir(directory)

    def _apply(self, ops: Sequence[Op]) -> None:
        # docstring inherited
        if not ops:
            return
        with self._exclusive(), io_errors(f"cannot write to {self._root!r}"):
            if len(ops) == 1:  # one os.replace is atomic on its own: no journal
                op = ops[0]
                if op.data is None:
                    self._delete(op.ns, op.key)
                else:
                    self._put(op.ns, op.key, op.data, op.expires)
                return
            # Redo log: the whole batch is durable in .journal before any file changes;
            # a writer killed while applying it leaves the journal, and the next process
            # to take the lock (a reader waits for that) applies it again (idempotent:
            # every op is a whole-file replace or delete). Readers that see the journal
            # wait for the lock, so none sees a half-applied batch.
            for op in ops:
                # A directory where a key's file goes (another program's) would fail the
                # replay, and every later replay: refuse before anything is journaled.
                if op.data is not None and _is_dir(path := self._path(op.ns, op.key)):
                    raise BackendError(f"cannot write {op.key!r}: {path!r} is a directory")
            self._replace_file(self._journal, _encode_journal(ops))
            self._sync_dir(self._root)
            try:
                self._replay(ops)
                self._retire_journal()
            except (OSError, MappingStoreError) as exc:
                # The journal is durable: the batch is committed, and the next write or
                # open replays it. "Failed" would be a lie a caller might act on.
                raise UnknownOutcomeError(
                    f"a batch written to {self._root!r} is journaled but not yet applied "
                    f"({exc}); the next write or open of the store completes it"
                ) from exc
            # Must be durable before any later write: a journal that reappeared after a
            # power cut would overwrite newer values when replayed.
            self._sync_dir(self._root)

    def _clear(self, ns: str) -> None:
        directory = self._ns_dir(ns)
        doomed = self._tmp_path()
        with self._exclusive(), io_errors(f"cannot clear {directory!r}"):
            try:
                os.rename(directory, doomed)  # one atomic step, however many keys
            except FileNotFoundError:
                return
            self._sync_dir(self._root)
        shutil.rmtree(doomed, ignore_errors=True)  # outside the lock: others go on

    def _purge_expired(self, ns: str) -> int:
        directory = self._ns_dir(ns)
        marker = os.path.join(directory, ".expiring")
        removed = 0
        with self._exclusive(), io_errors(f"cannot purge {directory!r}"):
            if not os.access(marker, os.F_OK):
                return 0
            now = self._clock()
            left = 0
            for name in _record_names(directory) or ():
                path = os.path.join(directory, name)
                raw = _read(path)
                if raw is None:
                    continue
                try:
                    _, expires, _ = parse_record(raw, path)
                except CorruptValueError:
                    continue
                if expires is None:
                    continue
                if expires <= now:
                    os.unlink(path)
                    removed += 1
                else:
                    left += 1
            if not left:
                os.unlink(marker)
            self._sync_dir(directory)
        return removed

    def _close(self) -> None:
        self._flock.close()


def _ns_dirs(parent: str) -> Iterator[tuple[str, str]]:
    """``(namespace, path)`` of the namespace directories in *parent*."""
    try:
        names = [n for n in os.listdir(parent) if n[0] != "."]
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        path = os.path.join(parent, name)
        if name[0] == _HASHED:
            raw = _read(os.path.join(path, ".namespace"))
            ns = None if raw is None else raw.decode("utf-8", "replace")
        else:
            ns = decode_name(name)
        if ns is not None and encode_name(ns) == name:
            yield ns, path


def _record_names(directory: str) -> list[str] | None:
    """Names of the regular files of *directory* that may be record files (no dot name),
    or ``None`` if it does not exist. Anything else there (a subdirectory, a FIFO, a
    symbolic link) is foreign, as are files whose names this backend does not produce.
    The type comes with the listing (``d_type``): no ``stat`` per entry on the usual
    file systems."""
    try:
        with os.scandir(directory) as entries:
            return [
                e.name for e in entries if e.name[0] != "." and e.is_file(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return None


def _holds_entries(path: str) -> bool:
    try:
        return any(n[0] != "." for n in os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return False


def _is_dir(path: str) -> bool:
    """Whether *path* itself (not a link's target) is a directory."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _encode_journal(ops: Sequence[Op]) -> bytes:
    payload: bytes = msgpack.packb(
        [[op.ns, op.key, op.data, op.expires] for op in ops], use_bin_type=True
    )
    return _JOURNAL_MAGIC + zlib.crc32(payload).to_bytes(4, "big") + payload


def _decode_journal(raw: bytes) -> list[Op] | None:
    head = len(_JOURNAL_MAGIC)
    if raw[:head] != _JOURNAL_MAGIC or len(raw) < head + 4:
        return None
    payload = raw[head + 4 :]
    if zlib.crc32(payload).to_bytes(4, "big") != raw[head : head + 4]:
        return None
    try:
        items = msgpack.unpackb(payload, raw=False)
        return [Op(str(ns), str(key), data, expires) for ns, key, data, expires in items]
    except (ValueError, TypeError):
        return None
