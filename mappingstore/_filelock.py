"""A small cross-process lock on a lock file (``flock``), re-entrant within a thread.

Used by the file backends (:mod:`._directory`, :mod:`._ini`). Why ``flock`` and not
``fcntl.lockf`` (POSIX record locks): record locks belong to the *process*, so two
instances in one process would not exclude each other, and closing *any* descriptor of
the file drops every lock the process holds on it. ``flock`` locks belong to an open
file description: each :class:`FileLock` opens its own, so instances, threads and
processes all exclude each other, and the kernel releases the lock when its holder dies
(no stale lock after ``kill -9``, nothing to clean up).

Stores take their lock through :meth:`LockHandle.open`: every store of one lock file in a
process shares one :class:`FileLock` (with its own timeout), so it is re-entrant across
them in a thread. With a description each, a write made through a second store of the
same file from inside a write of the first, in one thread, would wait for itself.

After ``fork()`` a child shares its parent's open file description (and so its lock
state); the lock notices the new pid and opens a fresh description before first use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from ._url import file_url, parse_bool
from .errors import BackendError, InvalidOptionError, LockTimeoutError, MappingStoreError

__all__ = [
    "LOCKED_FILE_OPTIONS",
    "FileLock",
    "LockHandle",
    "current_pid",
    "fsync_dir",
    "io_errors",
    "lock_timeout_option",
    "locked_file_url",
    "renew_after_fork",
]

# os.getpid() is a system call (glibc no longer caches it); locks check it on every use.
_pid = [os.getpid()]

# (owner, names of its thread-lock attributes) to replace in a forked child: see
# renew_after_fork. Weak references, so a registered object can still be collected.
_RENEW: list[tuple[weakref.ref[Any], tuple[str, ...]]] = []
_RENEW_LOCK = [threading.Lock()]


def renew_after_fork(owner: object, *attrs: str) -> None:
    """Give *owner* fresh ``threading`` locks in its attributes *attrs* in a forked child.

    ``fork()`` copies a lock held by another thread of the parent, and nothing in the
    child will ever release it: the child's first use of the object would hang forever.
    In the child, every such lock that the forking thread itself does not hold is
    replaced by a new one of the same kind (the forking thread's own locks stay: it goes
    on to release them).
    """
    ref = weakref.ref(owner)
    with _RENEW_LOCK[0]:
        _RENEW[:] = [entry for entry in _RENEW if entry[0]() is not None]
        _RENEW.append((ref, attrs))


def _is_rlock(lock: Any) -> bool:
    return hasattr(lock, "_is_owned")


def _owned(lock: Any) -> bool:
    is_owned = getattr(lock, "_is_owned", None)  # RLock; a plain Lock has no owner
    return bool(is_owned()) if is_owned is not None else False


def _after_fork() -> None:
    _pid[0] = os.getpid()
    _RENEW_LOCK[0] = threading.Lock()  # another thread may have held it at the fork
    for ref, attrs in _RENEW:
        owner = ref()
        if owner is None:
            continue
        for attr in attrs:
            lock = getattr(owner, attr, None)
            if lock is None or _owned(lock):
                continue
            if not lock.acquire(blocking=False):  # held by a thread the child does not have
                setattr(owner, attr, threading.RLock() if _is_rlock(lock) else threading.Lock())
            else:
                lock.release()


os.register_at_fork(after_in_child=_after_fork)


def fsync_dir(path: str) -> None:
    """Flush the directory *path*, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_pid() -> int:
    """This process's id, kept up to date across ``fork()`` without a system call."""
    return _pid[0]


def lock_timeout_option(value: object) -> float | None:
    """Check a ``lock_timeout`` option (seconds >= 0, or ``None``: wait forever); URL
    text is accepted too."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidOptionError(f"lock_timeout must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidOptionError(f"lock_timeout must be a number of seconds >= 0, got {value!r}")
    return float(value)


#: URL query options of the stores built on this lock (directory, INI), with parsers.
LOCKED_FILE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "durable": parse_bool,
    "lock_timeout": lock_timeout_option,
}


def locked_file_url(scheme: str, path: str, durable: bool, lock_timeout: float | None) -> str:
    """The URL of a directory or INI store: its path, and the options that differ from
    the defaults (``durable=True``, ``lock_timeout=None``)."""
    query = []
    if not durable:
        query.append("durable=false")
    if lock_timeout is not None:
        query.append(f"lock_timeout={lock_timeout:g}")
    return file_url(scheme, path, query)


class _Default:
    """The type of :data:`_DEFAULT`: "the lock's own timeout"."""


_DEFAULT = _Default()


class _Blocks:
    """``exclusive()`` and ``shared()`` blocks over ``acquire(exclusive)`` and ``release()``."""

    def acquire(self, exclusive: bool = True) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the exclusive lock for the block."""
        self.acquire(True)
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the shared lock for the block (or the exclusive one if already held)."""
        self.acquire(False)
        try:
            yield
        finally:
            self.release()


class FileLock(_Blocks):
    """An exclusive or shared ``flock`` on *path*, re-entrant in the owning thread.

    Threads of one process are serialised by an ``RLock`` first, so a thread that
    already holds the lock may take it again (nested ``exclusive()`` blocks); only the
    outermost release unlocks the file. A thread holding the shared lock that asks for
    the exclusive one is refused (upgrading ``flock`` is not atomic and could deadlock).

    *timeout* (seconds, ``None``: wait forever) bounds how long an acquire waits for
    another process; on expiry :class:`~mappingstore.errors.LockTimeoutError`.
    """

    def __init__(self, path: str, *, create: bool = True, timeout: float | None = None) -> None:
        self.path = path
        self._create = create
        self._timeout = timeout
        self._rlock = threading.RLock()
        renew_after_fork(self, "_rlock")
        self._fd = -1
        self._pid = -1
        self._depth = 0
        self._mode = 0  # fcntl.LOCK_EX or LOCK_SH while held

    def _descriptor(self) -> int:
        if self._fd >= 0 and self._pid == _pid[0]:
            return self._fd
        # A forked child must not reuse (or unlock!) the parent's description: leave the
        # inherited descriptor alone and open a new one.
        flags = os.O_RDWR | os.O_CLOEXEC
        if self._create:
            flags |= os.O_CREAT
        try:
            fd = os.open(self.path, flags, 0o666)
        except FileNotFoundError as exc:
            raise BackendError(f"cannot open lock file {self.path!r}: {exc}") from exc
        except OSError:
            # Read-only file or file system: flock works on a read-only descriptor too.
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise BackendError(f"cannot open lock file {self.path!r}: {exc}") from exc
        self._fd, self._pid, self._depth = fd, _pid[0], 0
        return fd

    def _flock(self, fd: int, mode: int, timeout: float | None) -> None:
        if timeout is None:
            fcntl.flock(fd, mode)
            return
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"lock {self.path!r} still held by another process after {timeout} s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def acquire(self, exclusive: bool = True, timeout: float | _Default | None = _DEFAULT) -> bool:
        """Take the lock (blocking up to the timeout: the lock's own unless *timeout* is
        given); True if this call locked the file (the outermost level), False if the
        thread already held it."""
        self._rlock.acquire()
        try:
            fd = self._descriptor()
            outermost = not self._depth
            if outermost:
                mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
                wait = self._timeout if isinstance(timeout, _Default) else timeout
                self._flock(fd, mode, wait)
                self._mode = mode
            elif exclusive and self._mode != fcntl.LOCK_EX:
                raise RuntimeError("cannot upgrade a shared file lock to an exclusive one")
            self._depth += 1
            return outermost
        except BaseException:
            self._rlock.release()
            raise

    def release(self) -> None:
        """Release one level; the file is unlocked when the outermost level ends."""
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd >= 0 and self._pid == _pid[0]:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._rlock.release()

    @property
    def held(self) -> bool:
        """True if the calling thread holds the lock."""
        if not self._rlock.acquire(blocking=False):
            return False
        try:
            return self._depth > 0 and self._pid == _pid[0]
        finally:
            self._rlock.release()

    def close(self) -> None:
        """Close the lock file (releasing the lock if held)."""
        with self._rlock:
            if self._fd >= 0 and self._pid == _pid[0]:
                os.close(self._fd)
            self._fd, self._depth = -1, 0


class LockHandle(_Blocks):
    """One store's use of the process's :class:`FileLock` on a lock file.

    :meth:`open` hands out handles on one shared lock per file (by real path), counted;
    each handle waits for other processes with its own *timeout*; the last
    :meth:`close` closes the lock.
    """

    __slots__ = ("_closed", "_key", "_lock", "_timeout")

    _locks: ClassVar[dict[str, tuple[FileLock, int]]] = {}
    _guard: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, key: str, lock: FileLock, timeout: float | None) -> None:
        self._key, self._lock, self._timeout, self._closed = key, lock, timeout, False

    @classmethod
    def open(cls, path: str, *, create: bool = True, timeout: float | None = None) -> LockHandle:
        """A handle on the process's lock of *path*."""
        key = os.path.realpath(path)
        with cls._guard:
            entry = cls._locks.get(key)
            if entry is None:
                lock, users = FileLock(path, create=create), 0
            else:
                lock, users = entry
                if create:
                    lock._create = True
            cls._locks[key] = (lock, users + 1)
        return cls(key, lock, timeout)

    @property
    def lock(self) -> FileLock:
        """The shared lock."""
        return self._lock

    def acquire(self, exclusive: bool = True) -> bool:
        """:meth:`FileLock.acquire` with this handle's timeout."""
        return self._lock.acquire(exclusive, self._timeout)

    def release(self) -> None:
        """:meth:`FileLock.release`."""
        self._lock.release()

    @property
    def held(self) -> bool:
        """True if the calling thread holds the lock (through any handle)."""
        return self._lock.held

    def close(self) -> None:
        """Give the handle back (idempotent); the last one closes the lock file."""
        cls = type(self)
        with cls._guard:
            if self._closed:
                return
            self._closed = True
            entry = cls._locks.get(self._key)
            if entry is None or entry[0] is not self._lock:
                last = True  # not registered as ours any more: nobody else shares it
            elif entry[1] > 1:
                cls._locks[self._key] = (self._lock, entry[1] - 1)
                last = False
            else:
                del cls._locks[self._key]
                last = True
        if last:  # outside the guard: closing waits for a thread inside the lock
            self._lock.close()


renew_after_fork(LockHandle, "_guard")


@contextlib.contextmanager
def io_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` (not already one of ours) into :class:`BackendError`
    ("*what*: reason"), once, at the file backends' boundary."""
    try:
        yield
    except MappingStoreError:
        raise
    except OSError as exc:
        raise BackendError(f"{what}: {exc}") from exc
