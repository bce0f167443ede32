"""``SharedBytes``: one bytes value in POSIX shared memory, shared by name between processes.

Data-segment layout (little-endian)::

    header  64 bytes: magic "MSSHMBY1", then u64 generation, heap offset (64), heap end
            (committed), segment size, offset of the current record (0: nothing set yet)
    heap    records, 8-byte aligned, never modified once published:
            u32 crc32 of the rest | u32 flags (0) | u64 length | the bytes

``set`` appends a record, commits the heap end, then publishes the record's offset with
one aligned 8-byte store: readers (lock-free) see the old or the new value, never a mix,
even if the writer is killed. When the heap is full the next generation is built with
just the new value and published through the control segment (see :mod:`._shm_base`).
"""

from __future__ import annotations

import contextlib
import mmap
import struct
import zlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

from ._shm_base import CLOSED_GEN, PAGE, Handle, check_flag, check_name, data_files
from .errors import (
    CapacityError,
    InvalidOptionError,
    OptionTypeError,
    SerializationError,
    StoreClosedError,
    StoreCorruptError,
)

__all__ = ["SharedBytes"]

PREFIX = "mappingstore-bytes"


def _payload(data: object, what: str) -> bytes:
    """*data* as bytes; anything but bytes, bytearray or memoryview (an int would be that
    many NUL bytes, a list of ints some bytes) raises SerializationError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"SharedBytes holds bytes: {what} got {type(data).__qualname__}")
    return bytes(data)


_MAGIC_CTL = b"MSSHMBC1"
_MAGIC_DATA = b"MSSHMBY1"
_HEAD = 64
_Q_GEN, _Q_HEAP, _Q_END, _Q_SIZE, _Q_CUR = 1, 2, 3, 4, 5
_REC = struct.Struct("<IIQ")  # crc, flags, length
_REC_SIZE = 16
_TAIL = struct.Struct("<IQ")  # flags, length (what the crc covers, with the bytes)
#: Largest value by default (``max_size`` changes it, up to the 32 GiB format limit).
DEFAULT_MAX_SIZE = 2**30
_FORMAT_MAX = 2**35


class _BSeg:
    __slots__ = ("gen", "mm", "mv", "q", "size")

    def __init__(self, gen: int, mm: mmap.mmap, *, fresh: bool = False) -> None:
        self.gen = gen
        self.mm = mm
        self.mv = memoryview(mm)
        self.q = self.mv.cast("Q")
        self.size = len(mm)
        if fresh:
            mm[0:8] = _MAGIC_DATA
            q = self.q
            q[_Q_GEN], q[_Q_HEAP], q[_Q_END] = gen, _HEAD, _HEAD
            q[_Q_SIZE], q[_Q_CUR] = self.size, 0
            return
        q = self.q
        if (
            mm[0:8] != _MAGIC_DATA
            or q[_Q_GEN] != gen
            or q[_Q_SIZE] != self.size
            or not _HEAD <= q[_Q_END] <= self.size
        ):
            raise StoreCorruptError(f"SharedBytes data segment {gen} has a bad header")


def _closed_seg() -> _BSeg:
    """What a closed object holds: no mapping, and a generation that never matches the
    control segment nor loses to a segment a thread still running maps."""
    seg = _BSeg.__new__(_BSeg)
    seg.gen = CLOSED_GEN
    return seg


def _seg_size(nbytes: int) -> int:
    return (_HEAD + nbytes + PAGE - 1) // PAGE * PAGE


class SharedBytes:
    """One ``bytes`` value in shared memory, seen by every process that opens *name*.

    ``SharedBytes(name, size)`` attaches to *name*, creating it if needed with room for
    *size* bytes; it grows when a bigger value is set, up to ``max_size`` (default 1 GiB,
    at most 32 GiB), beyond which :meth:`set` raises
    :class:`~mappingstore.errors.CapacityError` and changes nothing. A fresh object holds
    ``b""``. Opening never wipes the value.

    :meth:`get` returns exactly the bytes last set (no padding) and takes no lock: values
    are published by an atomic pointer store, so a reader never sees a torn value, even
    if a writer is killed mid-write. :meth:`set` and :meth:`update` serialise on an
    ``flock`` that the kernel releases when its holder dies; :meth:`update` is an atomic
    read-modify-write across processes, and releases the lock if *fn* raises.

    Thread-safe, including :meth:`close` while other threads use the object (calls already
    running finish or raise :class:`~mappingstore.errors.StoreClosedError`, later ones
    raise it); fork-safe. Linux only (``/dev/shm``). Segments are mode 0600; attaching to
    one that another user owns or others can write raises
    :class:`~mappingstore.errors.InsecureStorageError`. Remove it with :meth:`unlink` (or
    ``delete_on_close=True``).
    """

    def __init__(
        self,
        name: str,
        size: int = 4096,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        readonly: bool = False,
        create: bool = True,
        delete_on_close: bool = False,
        lock_timeout: float | None = None,
    ) -> None:
        self._name = check_name(name, "SharedBytes")
        for option, value in (("size", size), ("max_size", max_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionTypeError(f"{option} must be an int, got {value!r}")
        if size < 0:
            raise InvalidOptionError(f"size must be an int >= 0, got {size!r}")
        if max_size < 1:
            raise InvalidOptionError(f"max_size must be an int >= 1, got {max_size!r}")
        if max_size > _FORMAT_MAX - _HEAD - _REC_SIZE - PAGE:
            raise InvalidOptionError(f"max_size is above the format limit of {_FORMAT_MAX} bytes")
        self._initial = min(size, max_size)
        self._max = max_size
        self._readonly = check_flag(readonly, "readonly")
        self._delete_on_close = check_flag(delete_on_close, "delete_on_close")
        self._closed = True
        self._checked: tuple[int, int] = (0, 0)  # (generation, offset) whose crc passed
        self._h = Handle(
            PREFIX,
            self._name,
            _MAGIC_CTL,
            readonly=self._readonly,
            create=create,
            lock_timeout=lock_timeout,
            init=self._init_segment,
        )
        self._ilock = self._h.inode_lock
        try:
            self._seg = self._map(self._h.generation)
        except BaseException:
            self._h.close()
            raise
        self._closed = False

    # -- segments -------------------------------------------------------------------------

    def _init_segment(self, handle: Handle) -> None:
        _BSeg(1, handle.create_data(1, _seg_size(2 * (_REC_SIZE + self._initial))), fresh=True)

    def _map(self, gen: int) -> _BSeg:
        return self._h.map_current(gen, _BSeg, f"SharedBytes {self._name!r}")

    def _current(self) -> _BSeg:
        if self._closed:
            raise StoreClosedError(f"SharedBytes {self._name!r} is closed")
        seg = self._seg
        gen = self._h.ctlq[2]
        if gen != seg.gen:
            new = self._map(gen)  # StoreClosedError if closed meanwhile (generation 0)
            seg = self._seg
            if new.gen > seg.gen:  # never over the closed sentinel (CLOSED_GEN)
                self._seg = seg = new
            if seg.gen == CLOSED_GEN:
                raise StoreClosedError(f"SharedBytes {self._name!r} is closed")
        return seg

    def _read(self, seg: _BSeg) -> bytes:
        off = seg.q[_Q_CUR]
        if off == 0:
            return b""
        for _ in range(3):
            crc, _flags, n = _REC.unpack_from(seg.mm, off)
            end = off + _REC_SIZE + n
            if end <= seg.size:
                if self._checked == (seg.gen, off):
                    return seg.mm[off + _REC_SIZE : end]
                if zlib.crc32(seg.mv[off + 4 : end]) == crc:
                    self._checked = (seg.gen, off)
                    return seg.mm[off + _REC_SIZE : end]
        raise StoreCorruptError(f"the value of SharedBytes {self._name!r} fails its checksum")

    # -- public API -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name this object was opened with."""
        return self._name

    @property
    def size(self) -> int:
        """The size in bytes of the current value."""
        seg = self._current()
        off = seg.q[_Q_CUR]
        return 0 if off == 0 else int(_REC.unpack_from(seg.mm, off)[2])

    @property
    def capacity(self) -> int:
        """The largest value the current segment holds without growing."""
        return self._current().size - _HEAD - _REC_SIZE

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def get(self) -> bytes:
        """The current value: exactly the bytes last set (``b""`` if none yet)."""
        return self._read(self._current())

    def set(self, data: bytes | bytearray | memoryview) -> None:
        """Replace the value (atomically for every reader)."""
        self._check_writable()
        payload = _payload(data, "set()")
        self._check_size(payload)
        with self._h:
            self._set_locked(payload)

    def update(self, fn: Callable[[bytes], bytes | bytearray | memoryview]) -> bytes:
        """Atomically replace the value with ``fn(value)`` and return the new value.

        Runs under the cross-process lock: no other writer interleaves. If *fn* raises,
        nothing changes and the lock is released.
        """
        self._check_writable()
        with self._h:
            new = fn(self._read(self._current()))
            payload = _payload(new, "update()'s fn")
            self._check_size(payload)
            self._set_locked(payload)
        return payload

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreClosedError(f"SharedBytes {self._name!r} is closed")
        if self._readonly:
            from .errors import ReadOnlyError

            raise ReadOnlyError(f"SharedBytes {self._name!r} was opened read-only")

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self._max:
            raise CapacityError(
                f"{len(payload)} bytes exceed the max_size of SharedBytes {self._name!r} "
                f"({self._max} bytes); nothing was changed"
            )

    def _set_locked(self, payload: bytes) -> None:
        seg = self._current()
        self._h.check_not_deleted(self._h.generation)
        need = (_REC_SIZE + len(payload) + 7) & ~7
        end = seg.q[_Q_END]
        if end + need > seg.size:
            gen = seg.gen + 1
            size = _seg_size(max(2 * need, _REC_SIZE + self._initial))
            if size > _seg_size(self._max + _REC_SIZE):
                size = _seg_size(need)
            new = _BSeg(gen, self._h.create_data(gen, size), fresh=True)
            try:
                self._write(new, _HEAD, payload)
                new.q[_Q_END] = _HEAD + need
                new.q[_Q_CUR] = _HEAD
            except BaseException:
                self._h.discard(gen)
                raise
            self._h.publish(gen)
            if self._seg.gen != CLOSED_GEN:  # never over the closed sentinel
                self._seg = new
            return
        self._write(seg, end, payload)
        seg.q[_Q_END] = end + need  # commit the space, then publish
        seg.q[_Q_CUR] = end

    @staticmethod
    def _write(seg: _BSeg, off: int, payload: bytes) -> None:
        n = len(payload)
        seg.mm[off + 4 : off + _REC_SIZE] = _TAIL.pack(0, n)
        seg.mm[off + _REC_SIZE : off + _REC_SIZE + n] = payload
        crc = zlib.crc32(seg.mv[off + 4 : off + _REC_SIZE + n])
        seg.mm[off : off + 4] = crc.to_bytes(4, "little")

    def files(self) -> list[str]:
        """The ``/dev/shm`` files of this object."""
        return data_files(PREFIX, self._name)

    def unlink(self) -> None:
        """Remove the object from the system and close this instance.

        Other open instances raise :class:`~mappingstore.errors.StoreNotFoundError` on
        their next use; a later open of the name creates a new, empty object.
        """
        if self._closed:
            raise StoreClosedError(f"SharedBytes {self._name!r} is closed")
        self._h.unlink()
        self.close()

    def close(self) -> None:
        """Detach (idempotent). With ``delete_on_close=True``, also :meth:`unlink`."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._delete_on_close and not self._readonly:
                with contextlib.suppress(StoreClosedError):  # closed by another thread
                    self._h.unlink()
        finally:
            # A set or update running now finishes first (the lock's thread lock); nothing
            # is unmapped under readers: they hold their own references to the segment,
            # and the mapping goes with the last one (see Handle.close).
            rlock = self._ilock.rlock
            rlock.acquire()
            try:
                self._seg = _closed_seg()
            finally:
                rlock.release()
            self._h.close()

    def __enter__(self) -> SharedBytes:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<SharedBytes {self._name!r}{state}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"SharedBytes cannot be pickled; open SharedBytes({self._name!r}) again")
