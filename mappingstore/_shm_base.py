"""Shared-memory plumbing for ``shm://`` stores and :class:`SharedBytes` (no pickle, no tracker).

A shared object ``NAME`` is a small **control segment** ``/dev/shm/<prefix>.NAME`` plus one
**data segment** ``/dev/shm/<prefix>.NAME.<generation>``. The control segment holds the
current generation; a writer that needs a bigger (or compacted) data segment builds
generation ``g + 1`` aside, publishes it with one aligned 8-byte store into the control
segment, then unlinks generation ``g``. Readers compare the generation on every operation
and remap when it changed, so nobody ever works on a stale copy.

Why plain ``/dev/shm`` files and ``mmap`` rather than :mod:`multiprocessing.shared_memory`:

* On Python < 3.13 every process that merely *attaches* a ``SharedMemory`` registers it
  with the ``resource_tracker``, which unlinks the segment (and warns about "leaked
  shared_memory") when that process exits: a child that reads the store would destroy it.
  Opening the file ourselves involves no tracker at all.
* Segments must grow; ``SharedMemory`` has a fixed size.
* The permission check must run on the open descriptor *before* mapping (``O_NOFOLLOW``
  plus ``fstat``: owner, mode, regular file), which ``SharedMemory`` does not expose.

On Linux ``shm_open(3)`` is exactly ``open("/dev/shm/NAME", O_NOFOLLOW | O_CLOEXEC)``, so
the segments are the same POSIX shared memory other tools see.

Cross-process locking is ``flock(2)`` on the control segment: the kernel drops it when the
holder dies, so a killed writer never deadlocks the others. Writers order their stores so
that a writer killed at any instruction leaves a state the next writer can use as is
(see ``docs/backends/shm.md``).

Closing while other threads use the object: readers take no lock, so nothing is ever
unmapped or released explicitly. ``close()`` swaps the object's references for closed
sentinels (a generation that matches no segment), and the mappings go when the last
thread holding one drops it (reference counting). The lock's descriptor is closed only
under the lock's thread lock, when no thread of the process is inside a locked section:
closing it under a writer would drop the ``flock`` and let another process write the same
segment at the same time (and a reused descriptor number could be ``flock``-ed by
mistake). A thread that takes the lock after that finds ``fd < 0`` and raises
:class:`StoreClosedError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import mmap
import os
import re
import stat
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import NoReturn, TypeVar

from .errors import (
    BackendError,
    BackendUnavailableError,
    CapacityError,
    InsecureStorageError,
    InvalidKeyError,
    InvalidOptionError,
    LockTimeoutError,
    MappingStoreError,
    OptionTypeError,
    StoreClosedError,
    StoreCorruptError,
    StoreNotFoundError,
)

__all__ = [
    "CLOSED_CTLQ",
    "CLOSED_GEN",
    "CTL_SIZE",
    "DELETED",
    "PAGE",
    "SHM_DIR",
    "Handle",
    "check_flag",
    "check_lock_timeout",
    "check_name",
    "drop_fd",
    "flock_failed",
]

T = TypeVar("T")

SHM_DIR = "/dev/shm"
#: Names are one path component of safe characters; "." separates the generation.
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}\Z")
PAGE = mmap.PAGESIZE
CTL_SIZE = 4096
#: Generation value meaning "this object was unlinked": every open instance then raises.
DELETED = 2**64 - 1
#: Segments up to this size are mapped with MAP_POPULATE: one batched fault-in instead of
#: one page fault per page on first touch (expensive under virtualisation).
_POPULATE_MAX = 64 * 2**20
_Q_GEN = 2  # control segment: magic (8 bytes) | version u32 + kind u32 | generation u64
#: What a closed Handle (and store) reads as its control segment: generation 0, which no
#: data segment has (they start at 1), so every generation check fails over to the
#: closed check. Never released: threads still running may hold it.
CLOSED_CTLQ: memoryview = memoryview(array("Q", bytes(CTL_SIZE)))
#: The generation of a closed object's segment sentinel: above any real one (u64), so it
#: never matches the control segment and never loses to a newly mapped segment.
CLOSED_GEN = 2**64
# _InodeLock.fd values that are not descriptors
_FD_CLOSED = -1  # every instance using it closed
_FD_LOST = -2  # a forked child could not reopen it

# (st_dev, st_ino) of a control segment -> the process-wide lock for it
_LOCKS: dict[tuple[int, int], _InodeLock] = {}
_LOCKS_GUARD = threading.Lock()


def check_name(name: object, what: str) -> str:
    """Validate a shared-memory name (the ``NAME`` of ``shm://NAME``)."""
    if not isinstance(name, str):
        raise InvalidKeyError(f"{what} name must be a str, not {type(name).__qualname__}")
    if not _NAME_RE.match(name):
        raise InvalidKeyError(
            f"invalid {what} name {name!r}: use 1 to 128 characters among A-Z a-z 0-9 _ -"
        )
    return name


def check_flag(value: object, name: str) -> bool:
    """A yes/no option: a bool (or 0/1), never a truthy string such as ``"no"``."""
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    raise OptionTypeError(f"{name} must be True or False, got {value!r}")


def check_lock_timeout(value: object) -> float | None:
    """The ``lock_timeout`` option: seconds >= 0, or None to wait as long as it takes.

    A wait longer than a thread lock can time (``threading.TIMEOUT_MAX``, about 292
    years; ``math.inf`` included) is the same as None.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionTypeError(
            f"lock_timeout must be a number of seconds or None, not {type(value).__qualname__}"
        )
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf if value > 0 else -math.inf
    if not seconds >= 0:  # negative or NaN
        raise InvalidOptionError(f"lock_timeout must be >= 0 seconds, got {value!r}")
    return None if seconds > threading.TIMEOUT_MAX else seconds


def _check_platform() -> None:
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
        raise BackendUnavailableError("shared-memory stores need a little-endian host")
    if not os.path.isdir(SHM_DIR):  # pragma: no cover - Linux always has it
        raise BackendUnavailableError(
            f"shared-memory stores need {SHM_DIR} (Linux); it does not exist here"
        )


def check_safe(fd: int, path: str) -> os.stat_result:
    """Refuse a segment another user could have planted or can modify."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InsecureStorageError(f"{path} is not a regular file; refusing to attach")
    if st.st_uid != os.geteuid():
        raise InsecureStorageError(
            f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}); "
            "refusing to attach"
        )
    if st.st_mode & 0o022:
        raise InsecureStorageError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "refusing to attach"
        )
    return st


def _os_error(exc: OSError, what: str) -> BackendError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
        return CapacityError(f"{what}: {exc.strerror}")
    return BackendError(f"{what}: {exc}")


class _Retry(Exception):
    pass


class _InodeLock:
    """``flock`` on one control segment, shared by every instance in the process.

    Sharing makes the lock re-entrant across instances in one thread (a second instance
    on the same name inside ``modify`` would otherwise wait for itself forever). A
    ``threading.RLock`` orders the threads of this process; ``flock`` orders processes.
    """

    __slots__ = ("depth", "doomed", "fd", "ghost", "key", "refs", "rlock")

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self.fd = fd
        self.key = key
        self.rlock = threading.RLock()
        self.depth = 0
        self.ghost = 0  # levels a forked child inherited without the flock (see fork)
        self.refs = 0
        # The last instance closed while this very thread was inside a locked section:
        # the release that leaves the section closes the descriptor (see _unregister_lock).
        self.doomed = False

    def acquire(self, timeout: float | None) -> None:
        if not self.rlock.acquire(timeout=-1 if timeout is None else timeout):
            raise LockTimeoutError(f"timed out after {timeout}s waiting for the shared-memory lock")
        if self.depth:
            self.depth += 1
            return
        try:
            if self.fd < 0:
                raise self.unusable()
            if timeout is None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                self._acquire_polling(timeout)
        except BaseException as exc:
            self.rlock.release()
            err = self.flock_error(exc)
            if err is exc:
                raise
            raise err from exc
        self.depth = 1

    def unusable(self) -> MappingStoreError:
        """The error for taking a lock whose descriptor is gone (``fd < 0``)."""
        if self.fd == _FD_LOST:  # pragma: no cover - /proc is always mounted on Linux
            return BackendError("the shared-memory lock could not be reopened after fork()")
        return StoreClosedError("the shared-memory store was closed")

    def flock_error(self, exc: BaseException) -> BaseException:
        """The error to raise for *exc*, raised while taking the ``flock`` (the caller
        holds no lock any more): the closed error if the descriptor was closed, ours for
        an OS error, *exc* itself otherwise (ours already, or KeyboardInterrupt...)."""
        if isinstance(exc, MappingStoreError):
            return exc
        if self.fd < 0:
            return self.unusable()
        if isinstance(exc, OSError):
            return _os_error(exc, "cannot take the shared-memory lock")
        return exc

    def _acquire_polling(self, timeout: float) -> None:
        # flock cannot time out by itself; poll with a short, growing sleep.
        deadline = time.monotonic() + timeout
        delay = 0.0001
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"timed out after {timeout}s waiting for the shared-memory lock"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    def release(self) -> None:
        if not self.depth and self.ghost:  # a child leaving a level entered before fork()
            self.ghost -= 1
            self.rlock.release()
            return
        self.depth -= 1
        try:
            if not self.depth:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                if self.doomed:
                    drop_fd(self)
        finally:
            self.rlock.release()


def flock_failed(lock: _InodeLock, exc: BaseException) -> NoReturn:
    """Raise for *exc*, raised by ``flock`` while taking *lock* (for the writers that
    inline :meth:`_InodeLock.acquire`; the caller has released the thread lock)."""
    err = lock.flock_error(exc)
    if err is exc:
        raise exc
    raise err from exc


def _register_lock(fd: int, st: os.stat_result) -> _InodeLock:
    key = (st.st_dev, st.st_ino)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is not None and (lock.fd < 0 or os.fstat(lock.fd).st_nlink == 0):
            # An unlinked store still open here, and tmpfs reused its inode number for
            # this new one: that lock is for another file. (Its holders keep it.)
            lock = None
        if lock is None:
            # A private open file description: flock belongs to it, not to the process.
            lock = _InodeLock(os.dup(fd), key)
            os.set_inheritable(lock.fd, False)
            _LOCKS[key] = lock
        lock.refs += 1
        return lock


def _unregister_lock(lock: _InodeLock) -> None:
    """Drop one instance's share of *lock*; the last one closes its descriptor.

    Closing the descriptor drops the ``flock``: it happens under the thread lock, so never
    while another thread of this process is inside a locked section (writing the segment);
    this waits for it to leave. If this very thread is inside one (``close()`` called from
    a ``modify`` function), the release that leaves the section closes it.
    """
    with _LOCKS_GUARD:
        lock.refs -= 1
        if lock.refs > 0:
            return
    rlock = lock.rlock
    rlock.acquire()
    try:
        if lock.depth:
            lock.doomed = True
        else:
            drop_fd(lock)
    finally:
        rlock.release()


def drop_fd(lock: _InodeLock) -> None:
    """Close the descriptor of an unused *lock* (the caller holds its thread lock and no
    level of it); kept if an instance registered it again meanwhile."""
    with _LOCKS_GUARD:
        lock.doomed = False
        if lock.refs > 0:
            return
        if _LOCKS.get(lock.key) is lock:
            del _LOCKS[lock.key]
        fd, lock.fd = lock.fd, min(lock.fd, _FD_CLOSED)
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _after_fork_in_child() -> None:
    # The child shares the parent's open file descriptions, hence the parent's flock: give
    # it its own (via /proc, same inode), and fresh thread locks (a parent thread may have
    # held one at fork time). A lock the forking thread itself holds (fork() called inside
    # a locked section) keeps its thread lock, but the flock is the parent's: the levels
    # entered before fork() become ``ghost`` levels and depth starts at 0, so a write the
    # child makes inside the section first takes the flock on its own description (it
    # waits for the parent to leave), and leaving the section releases the ghost levels.
    global _LOCKS_GUARD
    _LOCKS_GUARD = threading.Lock()
    for lock in _LOCKS.values():
        old = lock.fd
        try:
            lock.fd = os.open(f"/proc/self/fd/{old}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # pragma: no cover - /proc is always mounted on Linux
            lock.fd = _FD_LOST
        with contextlib.suppress(OSError):
            os.close(old)
        if lock.depth > 0 and lock.rlock._is_owned():  # type: ignore[attr-defined]
            lock.ghost, lock.depth = lock.ghost + lock.depth, 0
        else:
            lock.rlock = threading.RLock()
            lock.depth = lock.ghost = 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def _map(fd: int, size: int, readonly: bool) -> mmap.mmap:
    prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
    flags = mmap.MAP_SHARED
    if size <= _POPULATE_MAX and hasattr(mmap, "MAP_POPULATE"):
        flags |= mmap.MAP_POPULATE
    return mmap.mmap(fd, size, flags=flags, prot=prot)


class Handle:
    """One open shared object: its control segment, lock and data-segment files.

    ``init(handle)`` creates generation 1 of a new object (called under the lock, once).
    """

    def __init__(
        self,
        prefix: str,
        name: str,
        magic: bytes,
        *,
        readonly: bool,
        create: bool,
        lock_timeout: float | None,
        init: Callable[[Handle], None],
    ) -> None:
        # Checked before anything exists: create="no" (truthy) must not create the object.
        create = check_flag(create, "create")
        lock_timeout = check_lock_timeout(lock_timeout)
        _check_platform()
        self.name = name
        self.base = f"{SHM_DIR}/{prefix}.{name}"
        self.readonly = readonly
        self.lock_timeout = lock_timeout
        self._magic = magic
        self._lock: _InodeLock | None = None
        self.ctl: mmap.mmap | None = None
        self.closed = False
        for _ in range(20):
            if self._attach(create, init):
                break
        else:  # pragma: no cover - needs 20 create/unlink races in a row
            raise BackendError(f"{self.base} keeps being removed while opening it")
        self.ctlq: memoryview = memoryview(self._mapped()).cast("Q")

    def _mapped(self) -> mmap.mmap:
        if self.ctl is None:  # pragma: no cover - _attach returned True, so it is set
            raise BackendError(f"{self.base} is not mapped")
        return self.ctl

    # -- opening --------------------------------------------------------------------------

    def _open_ctl(self, create: bool) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDONLY if self.readonly else os.O_RDWR)
        while True:
            if create and not self.readonly:
                try:
                    fd = os.open(self.base, flags | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    pass
                else:
                    os.fchmod(fd, 0o600)  # exact mode whatever the umask
                    return fd
            try:
                return os.open(self.base, flags)
            except FileNotFoundError:
                if not create or self.readonly:
                    raise StoreNotFoundError(f"shared memory {self.base} does not exist") from None
                continue  # removed between our two opens: create it
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InsecureStorageError(f"{self.base} is a symlink; refusing") from exc
                raise _os_error(exc, f"cannot open {self.base}") from exc

    def _attach(self, create: bool, init: Callable[[Handle], None]) -> bool:
        """Map the control segment (initialising it if new); False if it was just unlinked."""
        fd = self._open_ctl(create)
        try:
            st = check_safe(fd, self.base)
            lock = _register_lock(fd, st)
            try:
                # An initialised segment needs no lock to attach (a busy writer must not
                # block openers); a new or half-created one is finished under the lock.
                ctl = self._map_ctl(fd, st.st_size)
                if ctl is None or ctl[0:8] != self._magic:
                    with self._locked(lock):
                        ctl = self._init_ctl(fd, ctl, lock, init)
                self.ctl, self._lock = ctl, lock
                ctlq = memoryview(ctl).cast("Q")
                deleted = ctlq[_Q_GEN] == DELETED
                ctlq.release()
                if deleted:  # unlinked between our open and now: open the name again
                    raise _Retry
                return True
            except BaseException as exc:
                self._lock = None
                if self.ctl is not None:
                    with contextlib.suppress(BufferError):
                        self.ctl.close()
                    self.ctl = None
                _unregister_lock(lock)
                if isinstance(exc, _Retry):
                    return False
                raise
        except OSError as exc:
            if isinstance(exc, MappingStoreError):
                raise
            raise _os_error(exc, f"cannot attach {self.base}") from exc
        finally:
            os.close(fd)

    def _map_ctl(self, fd: int, size: int) -> mmap.mmap | None:
        if size != CTL_SIZE:
            return None
        access = mmap.ACCESS_READ if self.readonly else mmap.ACCESS_WRITE
        return mmap.mmap(fd, CTL_SIZE, access=access)

    def _init_ctl(
        self, fd: int, ctl: mmap.mmap | None, lock: _InodeLock, init: Callable[[Handle], None]
    ) -> mmap.mmap:
        """Finish a new control segment (under the lock); return it mapped."""
        if ctl is None:
            size = os.fstat(fd).st_size
            if size == 0 and not self.readonly:
                os.ftruncate(fd, CTL_SIZE)  # the creator died before this, or is us
                size = CTL_SIZE
            if size == 0:
                raise StoreNotFoundError(f"{self.base} is still being created")
            if size != CTL_SIZE:
                raise StoreCorruptError(f"{self.base} is not a mappingstore segment")
            ctl = self._map_ctl(fd, size)
            assert ctl is not None
        head = ctl[0:8]
        if head == self._magic:  # another opener finished it while we waited
            return ctl
        if head != bytes(8):
            ctl.close()
            raise StoreCorruptError(f"{self.base} is not a mappingstore segment of this kind")
        if self.readonly:
            ctl.close()
            raise StoreNotFoundError(f"{self.base} is still being created")
        self.ctl, self._lock = ctl, lock
        init(self)  # builds data generation 1
        ctlq = memoryview(ctl).cast("Q")
        ctlq[_Q_GEN] = 1
        ctlq.release()
        # The magic goes last: until then the next opener initialises it again.
        ctl[0:8] = self._magic
        return ctl

    # -- locking --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, lock: _InodeLock) -> Iterator[None]:
        lock.acquire(self.lock_timeout)
        try:
            yield
        finally:
            lock.release()

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(f"{self.base} is closed")

    def __enter__(self) -> None:
        # The lock object stays set once attached (close() keeps it): a thread inside the
        # section when another thread closes must still find it to leave the section.
        lock = self._lock
        if lock is None or self.closed:
            raise self._closed_error()
        lock.acquire(self.lock_timeout)

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        lock = self._lock
        if lock is not None:  # always: __enter__ checked it, and nothing unsets it
            lock.release()

    @property
    def inode_lock(self) -> _InodeLock:
        """The process-wide lock object (``acquire(timeout)`` / ``release()``)."""
        if self._lock is None or self.closed:
            raise self._closed_error()
        return self._lock

    # -- generations ----------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The published generation (``DELETED`` once unlinked)."""
        gen = int(self.ctlq[_Q_GEN])
        if not gen:  # CLOSED_CTLQ
            raise self._closed_error()
        return gen

    def data_path(self, gen: int) -> str:
        """The file of data-segment generation *gen*."""
        return f"{self.base}.{gen}"

    def check_not_deleted(self, gen: int) -> None:
        """Raise :class:`StoreNotFoundError` if *gen* says the object was unlinked."""
        if gen == DELETED:
            raise StoreNotFoundError(f"shared memory {self.base} was unlinked")

    def map_current(self, gen: int, wrap: Callable[[int, mmap.mmap], T], what: str) -> T:
        """Map data generation *gen*, following newer generations published meanwhile.

        A writer may replace the segment between reading the generation and opening its
        file; the missing file then means "look again", unless the generation did not
        move, which means the segment is really gone. *what* names the object in errors.
        """
        for _ in range(100):
            if self.closed:
                raise self._closed_error()
            self.check_not_deleted(gen)
            try:
                return wrap(gen, self.open_data(gen))
            except FileNotFoundError:
                newer = self.generation
                if newer == gen:
                    raise StoreCorruptError(f"the data segment of {what} is missing") from None
                gen = newer  # replaced while we opened it: follow
        raise StoreCorruptError(f"{what} keeps changing generation")  # pragma: no cover

    def open_data(self, gen: int) -> mmap.mmap:
        """Map data generation *gen* (``FileNotFoundError`` if it was replaced meanwhile)."""
        path = self.data_path(gen)
        flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDONLY if self.readonly else os.O_RDWR)
        fd = os.open(path, flags)
        try:
            st = check_safe(fd, path)
            if st.st_size < PAGE:
                raise StoreCorruptError(f"{path} is too small to be a data segment")
            return _map(fd, st.st_size, self.readonly)
        finally:
            os.close(fd)

    def create_data(self, gen: int, size: int) -> mmap.mmap:
        """Create data generation *gen* of *size* bytes, memory reserved (not yet published).

        ``posix_fallocate`` reserves the pages now: a full ``/dev/shm`` raises
        :class:`CapacityError` here instead of killing the process with SIGBUS on a later
        write.
        """
        path = self.data_path(gen)
        try:
            if gen > 1:
                self._check_still_named()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # left over by a writer killed while building it
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            if isinstance(exc, MappingStoreError):  # StoreNotFoundError: already ours
                raise
            raise _os_error(exc, f"cannot create {path}") from exc
        try:
            os.fchmod(fd, 0o600)
            os.posix_fallocate(fd, 0, size)
            return _map(fd, size, False)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            what = f"cannot allocate {size} bytes of shared memory for {path}"
            raise _os_error(exc, what) from exc
        finally:
            os.close(fd)

    def _check_still_named(self) -> None:
        """Refuse to create files for an object whose control segment was deleted by hand
        (``rm /dev/shm/...``): nobody could find or remove them later."""
        mine = os.fstat(self.inode_lock.fd)  # under the lock: the descriptor is open
        try:
            st = os.stat(self.base, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            self.ctlq[_Q_GEN] = DELETED  # every attached instance sees it now
            raise StoreNotFoundError(f"{self.base} was removed from {SHM_DIR} behind our back")

    def publish(self, gen: int) -> None:
        """Make *gen* current (one aligned 8-byte store), then drop its predecessor."""
        self.ctlq[_Q_GEN] = gen
        # gen - 2 too: left behind if the previous writer died between these two steps,
        # or if removing it failed then. The write is published: a failure to remove a
        # stale file must not report it as failed (the next publish retries).
        for old in (gen - 1, gen - 2):
            with contextlib.suppress(OSError):
                os.unlink(self.data_path(old))

    def discard(self, gen: int) -> None:
        """Remove an unpublished generation after a failed build (best effort: the error
        being handled is the one to report; ``create_data`` removes a leftover)."""
        with contextlib.suppress(OSError):
            os.unlink(self.data_path(gen))

    # -- removal and closing --------------------------------------------------------------

    def unlink(self) -> None:
        """Remove the object: mark it deleted for every attached instance, delete its files."""
        lock = self._lock
        if lock is None or self.closed:
            raise self._closed_error()
        if self.readonly:
            from .errors import ReadOnlyError

            raise ReadOnlyError(f"{self.base} was opened read-only: it cannot be unlinked")
        with self:
            if self.generation == DELETED:
                return
            mine = os.fstat(lock.fd)
            self.ctlq[_Q_GEN] = DELETED
            try:
                st = os.stat(self.base, follow_symlinks=False)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
                return  # the name now belongs to a newer object: leave it alone
            prefix = os.path.basename(self.base) + "."
            for entry in os.listdir(SHM_DIR):
                if entry.startswith(prefix) and entry[len(prefix) :].isdigit():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f"{SHM_DIR}/{entry}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.base)

    def close(self) -> None:
        """Detach: drop the control segment and this instance's share of the lock.

        Safe while other threads use the object (idempotent, also when two threads close
        at once). Nothing is unmapped or released here: a thread still running may hold
        the mapping (a released ``memoryview`` would fail under it), so the references are
        swapped for :data:`CLOSED_CTLQ` and the mapping goes with its last reference. The
        lock's descriptor is closed once no thread of this process is inside a locked
        section (see :func:`_unregister_lock`); the lock object stays set for the threads
        still inside one.
        """
        with _LOCKS_GUARD:
            if self.closed:
                return
            self.closed = True
        self.ctlq = CLOSED_CTLQ
        self.ctl = None
        if self._lock is not None:
            _unregister_lock(self._lock)


def data_files(prefix: str, name: str) -> list[str]:
    """Every file of shared object *name* in ``/dev/shm`` (for tests and diagnostics)."""
    base = f"{prefix}.{name}"
    return sorted(
        f"{SHM_DIR}/{e}"
        for e in os.listdir(SHM_DIR)
        if e == base or (e.startswith(base + ".") and e[len(base) + 1 :].isdigit())
    )
