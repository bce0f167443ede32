"""Shared-memory backend (``shm://NAME``): one hash table in POSIX shared memory.

Every process that opens ``shm://NAME`` maps the same segments: a write is visible to
every reader at once, with no synchronisation step and no private copy to go stale.

The data segment is a hash table plus a heap of immutable records (layout in
:mod:`._shm_table` and ``docs/backends/shm.md``).

Writers (one at a time, under ``flock``) append a record past the committed heap end,
commit the heap end, then publish it with one aligned 8-byte store into its slot. A
reader that loads a slot therefore finds a complete, immutable record; a writer killed
at any point leaves the old or the new value. When the heap or the table is full, or
for a multi-key :meth:`_apply` (which must be all-or-nothing for readers too), the writer
builds the next generation aside (compacted, bigger) and publishes it in the control
segment (see :mod:`._shm_base`).
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import fcntl
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Any, ClassVar

from . import _codec
from ._codec import _HEADER_CRC, _PACKERS, PLAIN_HEADER, pack
from ._keys import MISSING
from ._shm_base import (
    CLOSED_CTLQ,
    CLOSED_GEN,
    PAGE,
    SHM_DIR,
    Handle,
    check_flag,
    check_lock_timeout,
    check_name,
    drop_fd,
    flock_failed,
)
from ._shm_bytes import SharedBytes
from ._shm_table import (
    EMPTY,
    FIRST_HEAP,
    INF,
    M32,
    MAX_SEGMENT,
    MIN_HEAP,
    Q_END,
    Q_USED,
    REC,
    TAIL,
    TOMB,
    Segment,
    closed_segment,
    fill,
    find_slot,
    intact,
    record_size,
    segment_size,
    write_record,
)
from ._store import Op, Record, Store
from ._url import parse_bool, parse_float, parse_int, parse_url
from .errors import (
    CapacityError,
    InvalidOptionError,
    InvalidURLError,
    OptionTypeError,
    StoreClosedError,
    StoreCorruptError,
)

__all__ = ["SharedBytes", "SharedMemoryStore"]

PREFIX = "mappingstore"
_MAGIC_CTL = b"MSSHMST1"
_HOT_MAX = 4096  # cached locations per instance (values: <= 16 MiB in all)
_HOT_DATA_MAX = 4096  # largest value kept in the read cache
_IMMUTABLE: frozenset[type] = frozenset(
    {str, int, float, bool, bytes, type(None), Decimal, uuid.UUID, complex}
    | {_dt.datetime, _dt.date, _dt.time, _dt.timedelta}
)
_NOVALUE: Any = MISSING  # hot entry: payload not checked by the codec yet
_CHECKED: Any = object()  # hot entry: payload checked, value mutable (decode per read)
_CRC = struct.Struct("<I")  # a record's first field
_RECORD_PACKERS: dict[tuple[int, int], Callable[[int, bytes, bytes], bytes]] = {}
_HEAD = struct.Struct("<IQ").pack  # flags, len(data): the record header after the crc
_TAIL_NAMES = struct.Struct("<dII").pack  # expires, len(ns), len(key): the rest of it
_crc32 = zlib.crc32
_flock, _LOCK_EX, _LOCK_UN = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN


def _record_packer(head: int, data: int) -> Callable[[int, bytes, bytes], bytes]:
    """``pack(crc, head, data)``: a small record (crc first) of these field lengths."""
    key = (head, data)
    fn = _RECORD_PACKERS.get(key)
    if fn is None:
        if len(_RECORD_PACKERS) >= 1024:  # bounded: lengths vary without limit
            _RECORD_PACKERS.clear()
        fn = _RECORD_PACKERS[key] = struct.Struct(f"<I{head}s{data}s").pack
    return fn


def _immutable(value: Any, depth: int = 0) -> bool:
    """True if *value* can be handed out twice (nothing inside it can be mutated)."""
    t = type(value)
    if t in _IMMUTABLE:
        return True
    if (t is tuple or t is frozenset) and depth < 4 and len(value) <= 64:
        return all(_immutable(v, depth + 1) for v in value)
    return False


class SharedMemoryStore(Store):
    """A store in POSIX shared memory, shared by every process that opens ``shm://NAME``.

    Multi-process behaviour: every process sees every write at once (no sync call, no
    private copy). Writers serialise on an ``flock`` of the control segment, which the
    kernel releases if the holder dies; :meth:`modify`, ``setdefault``, ``pop`` and
    :meth:`batch` are atomic across processes. Readers take no lock: they read immutable
    records published by an atomic pointer store, so they never see a torn value, even
    when a writer is killed mid-write. Each instance caches the *location* of values it
    has read, validated against the live slot on every read, so a cached read is never
    stale.

    Thread-safe, including :meth:`close` while other threads use the instance: calls
    already running finish (or raise :class:`~mappingstore.errors.StoreClosedError`
    before they touch the segment), later ones raise it, and the cross-process lock is
    never dropped under a thread of this process that is writing. Works after ``fork()``
    (the child gets its own lock). Linux only (``/dev/shm``).

    Limits: the data survives until :meth:`unlink` (or ``delete_on_close=True``) or a
    reboot, not a power cut. A data segment holds at most 32 GiB; ``max_size`` sets a
    lower cap. Beyond it, or when ``/dev/shm`` is full, writes raise
    :class:`~mappingstore.errors.CapacityError` and change nothing. ``len()`` and
    iteration scan the table (O(capacity)). A multi-key write (``update``, ``batch``,
    ``clear``) rewrites the data segment, so its cost grows with the store's size.

    Every record has a checksum. A damaged record raises
    :class:`~mappingstore.errors.StoreCorruptError` when its key is read and when a
    listing (iteration, ``items()``, ``namespaces()``) reaches it; a write or delete of
    its key replaces it, and a rewrite of the data segment leaves it out (with a warning
    on the store's logger).

    Segments are created mode 0600; attaching to one owned by another user, writable by
    group or others, or not a regular file raises
    :class:`~mappingstore.errors.InsecureStorageError`.

    Options (besides the common ones): ``delete_on_close`` removes the store when this
    instance closes; ``max_size`` caps the data segment in bytes; ``lock_timeout``
    (seconds, default: wait) raises :class:`~mappingstore.errors.LockTimeoutError` instead
    of waiting for a live writer forever; ``create=False`` raises
    :class:`~mappingstore.errors.StoreNotFoundError` if the store does not exist.
    """

    scheme: ClassVar[str] = "shm"
    durability: ClassVar[str] = (
        "survives the processes (and kill -9) until unlinked or reboot; lost on power cut"
    )
    shared_across_processes: ClassVar[bool] = True

    _find = staticmethod(find_slot)
    _write = staticmethod(write_record)

    def __init__(
        self,
        name: str,
        *,
        delete_on_close: bool = False,
        max_size: int | None = None,
        lock_timeout: float | None = None,
        create: bool = True,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._name = check_name(name, "shared-memory store")
        # Every option is checked before the store is opened (or created).
        if max_size is not None:
            if isinstance(max_size, bool) or not isinstance(max_size, int):
                raise OptionTypeError(
                    f"max_size must be an int (bytes) or None, not {type(max_size).__qualname__}"
                )
            if max_size < PAGE:
                raise InvalidOptionError(
                    f"max_size must be an int >= {PAGE} bytes, got {max_size!r}"
                )
        lock_timeout = check_lock_timeout(lock_timeout)
        create = check_flag(create, "create")
        self._max_size = min(max_size or MAX_SEGMENT, MAX_SEGMENT)
        self._delete_on_close = check_flag(delete_on_close, "delete_on_close")
        self._ns_cache: dict[str, tuple[bytes, int]] = {}
        self._hot: dict[str, tuple[Any, ...]] = {}
        self._plain_dot = not self._dot
        self._plain_set = False  # see __setitem__; set once the store is open
        self._nsb, self._nsh = self._ns_entry(self._ns)
        self._h = Handle(
            PREFIX,
            self._name,
            _MAGIC_CTL,
            readonly=self._readonly,
            create=create,
            lock_timeout=lock_timeout,
            init=self._init_segment,
        )
        self._ctlq = self._h.ctlq
        self._ilock = self._h.inode_lock
        self._lock_timeout = lock_timeout
        try:
            self._seg = self._map(self._h.generation)
        except BaseException:
            self._h.close()
            raise
        self._start()
        self._plain_set = not (
            self._readonly
            or self._dot
            or self._encrypt_default
            or self._default_ttl is not None
            or lock_timeout is not None
        )

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SharedMemoryStore:
        """``shm://NAME?namespace=...&delete_on_close=1&max_size=...&lock_timeout=...``."""
        parsed = parse_url(
            url,
            cls.scheme,
            {
                "delete_on_close": parse_bool,
                "max_size": parse_int,
                "lock_timeout": parse_float,
                "create": parse_bool,
            },
        )
        if parsed.path not in ("", "/") or not parsed.netloc:
            raise InvalidURLError(f"expected shm://NAME, got {url!r}")
        try:
            name = check_name(parsed.netloc, "shared-memory store")
        except ValueError as exc:
            raise InvalidURLError(str(exc)) from exc
        return cls(name, **{**parsed.options, **options})

    @property
    def url(self) -> str:
        return f"shm://{self._name}"

    @property
    def name(self) -> str:
        """The store's name (``NAME`` of ``shm://NAME``)."""
        return self._name

    def files(self) -> list[str]:
        """The ``/dev/shm`` files of this store (control segment and data generations)."""
        from ._shm_base import data_files

        return data_files(PREFIX, self._name)

    def unlink(self) -> None:
        """Remove the store from the system and close this instance.

        Every other open instance (in any process) raises
        :class:`~mappingstore.errors.StoreNotFoundError` on its next use; a later open of
        the name creates a new, empty store. On a closed instance it raises
        :class:`~mappingstore.errors.StoreClosedError` (it used to do nothing, leaving the
        store in place): open the name again to remove it.
        """
        self._check_open()
        self._h.unlink()
        self.close()

    # -- segments -----------------------------------------------------------------------

    def _init_segment(self, handle: Handle) -> None:
        seg = Segment(1, handle.create_data(1, segment_size(16, FIRST_HEAP)), fresh=True)
        seg.init(16)

    def _map(self, gen: int) -> Segment:
        return self._h.map_current(gen, Segment, f"shm://{self._name} ({SHM_DIR})")

    def _current(self) -> Segment:
        """The published segment, remapped if a writer replaced it (cheap when not)."""
        seg = self._seg
        gen = self._ctlq[2]
        if gen == seg.gen:
            return seg
        if self._closed:
            self._check_open()
        new = self._map(gen)
        with self._lock:
            if self._closed:  # closed while we mapped (self._seg is closed_segment())
                self._check_open()
            if new.gen > self._seg.gen:
                self._seg = new
                self._hot.clear()
            return self._seg

    def _name_of(self, ns: str, key: str) -> tuple[bytes, bytes, int]:
        hit = self._ns_cache.get(ns) or self._ns_entry(ns)
        kb = key.encode("utf-8")
        return hit[0], kb, zlib.crc32(kb, hit[1])

    def _read(self, seg: Segment, v: int) -> tuple[bytes, float]:
        """The (data, expires) of the record slot value *v* points to, checked."""
        off = (v & M32) << 3
        if off + 32 > seg.size:
            raise self._corrupt()
        for _ in range(3):
            crc, _flags, dl, exp, nl, kl = REC.unpack_from(seg.mm, off)
            start = off + 32 + nl + kl
            end = start + dl
            if end <= seg.size and zlib.crc32(seg.mv[off + 4 : end]) == crc:
                return seg.mm[start:end], exp
            # Only a weakly ordered CPU could show a record before its bytes: look again.
        raise self._corrupt()

    def _corrupt(self) -> StoreCorruptError:
        return StoreCorruptError(
            f"shm://{self._name} has a damaged record (bad offset or checksum)"
        )

    # -- backend contract: reads (lock-free) ---------------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        seg = self._current()
        nsb, kb, h = self._name_of(ns, key)
        idx, _ = self._find(seg, nsb, kb, h)
        if idx < 0:
            return None
        v = seg.q[idx]
        if v <= TOMB:  # deleted since we found it
            return None
        data, exp = self._read(seg, v)
        if exp != INF and exp <= self._clock():
            return None
        if ns == self._ns and len(data) <= _HOT_DATA_MAX:
            if len(self._hot) >= _HOT_MAX:
                self._hot.clear()
            self._hot[key] = (
                seg.gen,
                seg.q,
                idx,
                v,
                None if exp == INF else exp,
                data,
                _NOVALUE,
                None,
                v >> 32 << 32,
            )
        return data, None if exp == INF else exp

    def _get(self, ns: str, key: str) -> bytes | None:
        if ns == self._ns:
            e = self._hot.get(key)
            if (
                e is not None
                and self._ctlq[2] == e[0]
                and e[1][e[2]] == e[3]
                and (e[4] is None or e[4] > self._clock())
            ):
                return e[5]  # type: ignore[no-any-return]
        rec = self._get_record(ns, key)
        return None if rec is None else rec[0]

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        # Every key is read in one generation: a multi-key write (batch(), update, clear)
        # builds the next generation aside and publishes it with one store, and a
        # generation no longer current is never written again (writers check it under the
        # lock). So the reads see the whole batch or none of it, with no lock. (Reading key
        # by key, as the default does, can hop to the next generation halfway.)
        seg = self._current()
        gen, q = seg.gen, seg.q
        hot = self._hot if ns == self._ns else None
        now = self._clock()
        find = self._find
        out: list[bytes | None] = []
        append = out.append
        for key in keys:
            e = hot.get(key) if hot is not None else None
            if e is not None and e[0] == gen and e[1][e[2]] == e[3]:
                append(e[5] if e[4] is None or e[4] > now else None)
                continue
            nsb, kb, h = self._name_of(ns, key)
            idx, _ = find(seg, nsb, kb, h)
            v = q[idx] if idx >= 0 else EMPTY
            if v <= TOMB:  # missing, or deleted since we found it
                append(None)
                continue
            data, exp = self._read(seg, v)
            if exp != INF and exp <= now:
                append(None)
                continue
            append(data)
            if hot is not None and len(data) <= _HOT_DATA_MAX:
                if len(hot) >= _HOT_MAX:
                    hot.clear()
                expires = None if exp == INF else exp
                hot[key] = (gen, q, idx, v, expires, data, _NOVALUE, None, v >> 32 << 32)
        return out

    def __getitem__(self, key: str) -> Any:
        # Fast path: a value this instance has read before, still in the same slot (the
        # slot check makes it exact: records are immutable, offsets never reused within
        # a generation). Immutable values are returned as is; others are decoded again,
        # so every caller still gets its own copy. Entries: (generation, table view,
        # slot index, slot value, expires, data, decoded value | _NOVALUE | _CHECKED,
        # the record's writer for __setitem__ or None, the slot value's hash half
        # (v >> 32 << 32), payload when _CHECKED).
        e = self._hot.get(key) if type(key) is str else None
        if (
            e is not None
            and self._plain_dot
            and not self._nbatch
            and self._ctlq[2] == e[0]
            and e[1][e[2]] == e[3]
            and (e[4] is None or e[4] > self._clock())
        ):
            value = e[6]
            if value is _CHECKED:
                return _codec._unpackb(e[9])  # decoded fine before: cannot fail now
            if value is not _NOVALUE:
                return value
            data = e[5]
            if data[:2] == PLAIN_HEADER:
                value = _codec.decode_plain(data)
                if _immutable(value):
                    self._hot[key] = (*e[:6], value, e[7], e[8])
                else:
                    self._hot[key] = (*e[:6], _CHECKED, e[7], e[8], data[6:])
                return value
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        # Fast path for the common set: a str key, no TTL, no encryption, no dot names,
        # not read-only, no lock_timeout, no batch, a small value. It writes exactly the
        # record Store.set -> _put writes (check_key passes an ASCII key as is; _encode
        # is pack + wrap_plain), with _put inlined and specialised: each Python call or
        # attribute lookup saved is 1-3% of a set (docs/benchmarks.md, shared memory).
        if not self._plain_set or self._nbatch or type(key) is not str:
            Store.set(self, key, value)
            return
        # head: the record after its crc and before the data (flags, len(data), expires,
        # the names' lengths, the names). The same for every record of this key without
        # expiry and with data of this length, so the entry keeps a writer: (head, its
        # crc32, a packer of crc + head + data, len(data)). With the head's crc the
        # record's is only computed over the data (~80 ns less); one packer call makes
        # the record (~60 ns less than concatenating).
        hot = self._hot
        e = hot.get(key)
        if e is not None and e[7] is not None:  # the key was checked when e was made
            writer = e[7]
            head, hcrc, rpack, hdl = writer
        elif key.isascii() and key:
            head, hdl = b"", -1  # made below, once the data's length is known
        else:
            Store.set(self, key, value)  # check_key decides
            return
        # pack() and wrap_plain() inlined (two Python calls: ~70 ns). The same Packer pool
        # protocol: a Packer that raised is dropped, and pack() then runs again to raise
        # the codec's error, exactly as the general path would.
        try:
            packer = _PACKERS.pop()
        except IndexError:
            payload = pack(value)
        else:
            try:
                payload = packer.pack(value)
            except Exception:
                payload = pack(value)
            else:
                _PACKERS.append(packer)
        data = _HEADER_CRC(PLAIN_HEADER, _crc32(payload)) + payload
        dl = len(data)
        if dl > 4096:
            self._put(self._ns, key, data, None)
            return
        if dl != hdl:
            if hdl < 0:
                kb = key.encode("ascii")
                head = _HEAD(0, dl) + _TAIL_NAMES(INF, len(self._nsb), len(kb)) + self._nsb + kb
            else:
                head = _HEAD(0, dl) + head[12:]
            hcrc, rpack = _crc32(head), _record_packer(len(head), dl)
            writer = (head, hcrc, rpack, dl)
        # The whole record, built before taking the lock: nothing in it depends on where
        # it goes.
        rec = rpack(_crc32(data, hcrc), head, data)
        size = (len(rec) + 7) & ~7
        lock = self._ilock  # _InodeLock.acquire(None) and release(), inlined
        rlock = lock.rlock
        rlock.acquire()
        depth = lock.depth  # only this thread changes it while it holds rlock
        if not depth:
            try:
                _flock(lock.fd, _LOCK_EX)  # fd -1 (closed): ValueError, see flock_failed
            except BaseException as exc:
                rlock.release()
                flock_failed(lock, exc)
        lock.depth = depth + 1
        try:
            seg = self._seg
            if self._ctlq[2] != seg.gen:
                seg = self._wseg()
            q = seg.q
            end = q[Q_END]
            if e is not None and e[0] == seg.gen and q[e[2]] == e[3] and end + size <= seg.size:
                # The slot this instance last saw the key in still holds that very record
                # (see _put): no probing, and the key is already counted in the table.
                idx, hb = e[2], e[8]
            else:
                nsb = self._nsb
                kb = head[28 + len(nsb) :]
                h = _crc32(kb, self._nsh)
                hb = h << 32
                idx, free = self._find(seg, nsb, kb, h)
                if end + size > seg.size or (
                    idx < 0 and q[free] == EMPTY and (q[Q_USED] + 1) * 2 > seg.cap
                ):
                    self._rebuild_with(seg, [(nsb, kb, data, INF)], {idx} if idx >= 0 else set())
                    return
                if idx < 0:
                    idx = free
                    if q[idx] == EMPTY:
                        q[Q_USED] += 1  # before publishing: a crash may only over-count
            v = hb | (end >> 3)
            seg.mm[end : end + len(rec)] = rec
            q[Q_END] = end + size  # commit the space before anyone can point at it
            q[idx] = v  # publish
        finally:
            lock.depth = depth
            try:
                if not depth:
                    _flock(lock.fd, _LOCK_UN)
                    if lock.doomed:  # closed by this thread inside the section
                        drop_fd(lock)
            finally:
                rlock.release()
        if e is None and len(hot) >= _HOT_MAX:
            hot.clear()
        hot[key] = (seg.gen, q, idx, v, None, data, _NOVALUE, writer, hb)

    def set(
        self, key: str, value: Any, *, ttl: float | None = None, encrypt: bool | None = None
    ) -> None:
        # docstring inherited
        if ttl is None and encrypt is None:
            self.__setitem__(key, value)
        else:
            Store.set(self, key, value, ttl=ttl, encrypt=encrypt)

    def _contains(self, ns: str, key: str) -> bool:
        return self._get(ns, key) is not None

    def _scan(
        self, seg: Segment, nsb: bytes | None
    ) -> Iterator[tuple[int, int, int, int, int, float]]:
        """(slot value, offset, len ns, len key, len data, expires) of every record of
        *nsb* (all: None), as its header says: not checked (see :meth:`_checked`)."""
        q, mm = seg.q, seg.mm
        slots = q[seg.t0 : seg.t0 + seg.cap].tolist()  # a snapshot of the table
        unpack = REC.unpack_from
        for v in slots:
            if v <= TOMB:
                continue
            off = (v & M32) << 3
            if off + 32 > seg.size:
                raise self._corrupt()
            _crc, _flags, dl, exp, nl, kl = unpack(mm, off)
            if nsb is not None and (nl != len(nsb) or mm[off + 32 : off + 32 + nl] != nsb):
                continue
            yield v, off, nl, kl, dl, exp

    def _checked(self, seg: Segment, v: int) -> tuple[int, int, int, float]:
        """``(len ns, len key, len data, expires)`` of the record of slot value *v*, whose
        checksum (and the slot's hash of its names) holds; :class:`StoreCorruptError` if
        it does not. Listings check every record they hand out, as a read by key does
        (:meth:`_read`), so a damaged record is reported, never listed under a name
        nobody wrote (or decoded into a raw ``UnicodeDecodeError``)."""
        for _ in range(3):  # a weakly ordered CPU may show a record before its bytes
            rec = intact(seg, v)
            if rec is not None:
                return rec
        raise self._corrupt()

    def _listed(self, seg: Segment, ns: str, prefix: str) -> Iterator[tuple[bytes, int, int]]:
        """(key, offset of the data, len data) of every live record of *ns* whose key
        starts with *prefix*, each checked as :meth:`_checked` does (inlined: a listing
        checks every record it hands out, as a read by key does)."""
        nsb, nsh = self._ns_cache.get(ns) or self._ns_entry(ns)
        now = self._clock()
        pb = prefix.encode("utf-8")  # (UTF-8 keeps prefixes: bytes and str ones agree)
        mm, mv, size = seg.mm, seg.mv, seg.size
        heap = (seg.t0 + seg.cap) * 8  # where the heap starts: after the table
        unpack, crc32, lns = REC.unpack_from, zlib.crc32, len(nsb)
        for v in seg.q[seg.t0 : seg.t0 + seg.cap].tolist():  # a snapshot of the table
            if v <= TOMB:
                continue
            off = (v & M32) << 3
            if off + 32 > size:
                raise self._corrupt()
            crc, _flags, dl, exp, nl, kl = unpack(mm, off)
            if nl != lns or mm[off + 32 : off + 32 + nl] != nsb:
                continue
            names = off + 32 + nl + kl
            kb = mm[names - kl : names]
            if pb and not kb.startswith(pb):
                continue
            end = names + dl
            if (
                off < heap
                or end > size
                # (a copy is cheaper than a memoryview for a small record)
                or crc32(mm[off + 4 : end] if dl <= 4096 else mv[off + 4 : end]) != crc
                or crc32(kb, nsh) != v >> 32  # the slot's hash: crc32(ns + key)
            ):
                nl, kl, dl, exp = self._checked(seg, v)  # look again, or raise
                names = off + 32 + nl + kl
                kb = mm[names - kl : names]
            if exp > now:
                yield kb, names, dl

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        seg = self._current()
        for kb, _at, _dl in self._listed(seg, ns, prefix):
            try:
                key = kb.decode("utf-8")
            except UnicodeDecodeError:  # a sound checksum over bytes no writer wrote
                raise self._corrupt() from None
            yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        seg = self._current()
        mm = seg.mm
        for kb, at, dl in self._listed(seg, ns, prefix):
            try:
                key = kb.decode("utf-8")
            except UnicodeDecodeError:
                raise self._corrupt() from None
            yield key, mm[at : at + dl]

    def _count(self, ns: str) -> int:
        # Counts the slots (O(capacity), no checksum): a damaged record is counted, and
        # reported by whatever reads it.
        seg = self._current()
        nsb = self._name_of(ns, "")[0]
        now = self._clock()
        return sum(1 for r in self._scan(seg, nsb) if r[5] > now)

    def _namespaces(self) -> Iterable[str]:
        seg = self._current()
        mm = seg.mm
        found: dict[bytes, int] = {}  # namespace -> the slot value of one of its records
        for v, off, nl, *_ in self._scan(seg, None):
            found.setdefault(bytes(mm[off + 32 : off + 32 + nl]), v)
        out = []
        for n, v in found.items():  # a name is listed once one record vouches for it
            self._checked(seg, v)
            try:
                out.append(n.decode("utf-8"))
            except UnicodeDecodeError:
                raise self._corrupt() from None
        return out

    # -- backend contract: writes (under the cross-process lock) -------------------------

    def _exclusive(self) -> Any:
        return self._h

    def _wseg(self) -> Segment:
        seg = self._seg
        gen = self._ctlq[2]
        if gen != seg.gen:
            self._h.check_not_deleted(gen)
            seg = self._current()
        return seg

    def _ns_entry(self, ns: str) -> tuple[bytes, int]:
        hit = self._ns_cache.get(ns)
        if hit is None:
            nsb = ns.encode("utf-8")
            hit = self._ns_cache[ns] = (nsb, zlib.crc32(nsb))
        return hit

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        # Every write but __setitem__'s fast path. The lock and the small-record write are
        # inlined (each Python call saved is ~3% of a set). Same lock protocol as
        # _InodeLock.acquire/release.
        hot = self._hot
        e = hot.get(key) if ns == self._ns else None
        kb = key.encode("utf-8")
        lock = self._ilock
        rlock = lock.rlock
        if self._lock_timeout is not None:
            lock.acquire(self._lock_timeout)
        else:
            rlock.acquire()
            if not lock.depth:
                try:
                    _flock(lock.fd, _LOCK_EX)  # fd -1 (closed): see flock_failed
                except BaseException as exc:
                    rlock.release()
                    flock_failed(lock, exc)
            lock.depth += 1
        try:
            seg = self._seg
            if self._ctlq[2] != seg.gen:
                seg = self._wseg()
            nsb, nsh = self._ns_cache.get(ns) or self._ns_entry(ns)
            q = seg.q
            if e is not None and e[0] == seg.gen and q[e[2]] == e[3]:
                # The slot this instance last saw the key in still holds that very record
                # (records are immutable, offsets never reused within a generation): it
                # is the key's slot, and its hash is in the slot value. No probing.
                idx, free, h = e[2], -1, e[3] >> 32
            else:
                h = _crc32(kb, nsh)
                idx, free = self._find(seg, nsb, kb, h)
            exp = INF if expires is None else expires
            dl = len(data)
            rest = TAIL.pack(0, dl, exp, len(nsb), len(kb)) + nsb + kb
            size = (4 + len(rest) + dl + 7) & ~7
            end = q[Q_END]
            if end + size > seg.size or (
                idx < 0 and q[free] == EMPTY and (q[Q_USED] + 1) * 2 > seg.cap
            ):
                self._rebuild_with(seg, [(nsb, kb, data, exp)], {idx} if idx >= 0 else set())
                return
            if dl <= 4096:
                rest += data
                mm = seg.mm
                mm[end + 4 : end + 4 + len(rest)] = rest
                _CRC.pack_into(mm, end, _crc32(rest))
                v = (h << 32) | (end >> 3)
            else:
                v = self._write(seg, end, nsb, kb, data, exp, h)
            q[Q_END] = end + size  # commit the space before anyone can point at it
            if idx < 0:
                idx = free
                if q[idx] == EMPTY:
                    q[Q_USED] += 1  # before publishing: a crash may only over-count
            q[idx] = v
        finally:
            depth = lock.depth = lock.depth - 1  # lock.release() inlined
            try:
                if not depth:
                    _flock(lock.fd, _LOCK_UN)
                    if lock.doomed:  # closed by this thread inside the section
                        drop_fd(lock)
            finally:
                rlock.release()
        if ns == self._ns and dl <= _HOT_DATA_MAX:
            if e is None and len(hot) >= _HOT_MAX:
                hot.clear()
            hot[key] = (seg.gen, q, idx, v, expires, data, _NOVALUE, None, v >> 32 << 32)

    def _delete(self, ns: str, key: str) -> bool:
        with self._h:
            seg = self._wseg()
            nsb, kb, h = self._name_of(ns, key)
            idx, _ = self._find(seg, nsb, kb, h)
            if idx < 0:
                return False
            v = seg.q[idx]
            off = (v & M32) << 3
            seg.q[idx] = TOMB
            if off + 32 > seg.size:  # a damaged slot of this key (see find_slot): gone now
                return True
            exp: float = REC.unpack_from(seg.mm, off)[3]
            return exp == INF or exp > self._clock()

    def _apply(self, ops: Sequence[Op]) -> None:
        if len(ops) == 1:
            op = ops[0]
            if op.data is None:
                self._delete(op.ns, op.key)
            else:
                self._put(op.ns, op.key, op.data, op.expires)
            return
        if not ops:
            return
        final = {(op.ns, op.key): op for op in ops}
        with self._h:
            seg = self._wseg()
            drop: set[int] = set()
            adds: list[tuple[bytes, bytes, bytes, float]] = []
            for (ns, key), op in final.items():
                nsb, kb, h = self._name_of(ns, key)
                idx, _ = self._find(seg, nsb, kb, h)
                if idx >= 0:
                    drop.add(idx)
                if op.data is not None:
                    adds.append((nsb, kb, op.data, INF if op.expires is None else op.expires))
            # All-or-nothing for readers too: the next generation carries every op and
            # becomes visible with one store.
            self._rebuild_with(seg, adds, drop)

    def _clear(self, ns: str) -> None:
        with self._h:
            seg = self._wseg()
            self._rebuild_with(seg, [], set(), drop_ns=self._name_of(ns, "")[0])

    def _purge_expired(self, ns: str) -> int:
        with self._h:
            seg = self._wseg()
            nsb = self._name_of(ns, "")[0]
            now = self._clock()
            q, mm = seg.q, seg.mm
            n = 0
            for i in range(seg.t0, seg.t0 + seg.cap):
                v = q[i]
                if v <= TOMB:
                    continue
                off = (v & M32) << 3
                if off + 32 > seg.size:
                    raise self._corrupt()
                _crc, _f, _dl, exp, nl, _kl = REC.unpack_from(mm, off)
                if exp <= now and nl == len(nsb) and mm[off + 32 : off + 32 + nl] == nsb:
                    q[i] = TOMB
                    n += 1
            return n

    def _rebuild_with(
        self,
        seg: Segment,
        adds: list[tuple[bytes, bytes, bytes, float]],
        drop: builtins.set[int],  # (the class's own set() method hides the builtin here)
        drop_ns: bytes | None = None,
    ) -> None:
        """Build the next generation from the live records of *seg* minus *drop*, plus
        *adds*, and publish it (called under the lock)."""
        now = self._clock()
        q, mm = seg.q, seg.mm
        # The rebuild's cost is a per-write constant (see the head room below), so these
        # loops are kept tight: empty slots (most of the table) are filtered in one
        # comprehension, and the size arithmetic is inline.
        live = [v for v in q[seg.t0 : seg.t0 + seg.cap].tolist() if v > TOMB]
        if drop:
            gone = {q[i] for i in drop}  # slot values are unique: one record each
            live = [v for v in live if v not in gone]
        keep: list[tuple[int, int, int]] = []  # (slot value, offset, size)
        append = keep.append
        unpack = REC.unpack_from
        mv, crc32 = seg.mv, zlib.crc32
        total = damaged = 0
        heap = (seg.t0 + seg.cap) * 8  # where the heap starts: after the table
        limit, seg_size = seg.size - 32, seg.size
        for v in live:
            off = (v & M32) << 3
            if off > limit or off < heap:
                damaged += 1
                continue
            crc, _f, dl, exp, nl, kl = unpack(mm, off)
            if exp <= now:
                continue  # expired: invisible already, reclaim it
            if (
                drop_ns is not None
                and nl == len(drop_ns)
                and mm[off + 32 : off + 32 + nl] == drop_ns
            ):
                continue
            # Only sound records are copied (see _shm_table.intact, inlined): a damaged
            # one belongs to no key that can be trusted, and copying it blind could copy
            # garbage or overrun the segment. Under the lock every record is complete.
            names = off + 32 + nl + kl
            end = names + dl
            if (
                end > seg_size
                # (a copy is cheaper than a memoryview for a small record)
                or crc32(mm[off + 4 : end] if dl <= 4096 else mv[off + 4 : end]) != crc
                or crc32(mm[off + 32 : names]) != v >> 32  # the slot's hash
            ):
                damaged += 1
                continue
            size = (39 + nl + kl + dl) & ~7  # record_size(nl + kl + dl)
            append((v, off, size))
            total += size
        if damaged:
            self._log.warning(
                "shm://%s: %d damaged record(s) left out of the rebuilt data segment "
                "(their keys, which read as damaged until now, read as missing)",
                self._name,
                damaged,
            )
        extra = sum(record_size(len(a[0]) + len(a[1]) + len(a[2])) for a in adds)
        nkeys = len(keep) + len(adds)
        cap = 16
        while cap < 4 * nkeys:
            cap *= 2
        need = total + extra
        # Head room of 3x the live data (1x above 64 MiB), at least MIN_HEAP (1 MiB):
        # rebuilds stay rare, so their cost (a copy of the live records, plus ~0.4 ms to
        # create and map a segment) is a small constant per write. For 1,000 small items
        # a 256 KiB minimum meant a rebuild every ~3,700 writes, 0.3-0.45 us of each
        # write's ~3 us; 1 MiB makes it every ~15,000 writes, ~0.1 us (docs/benchmarks.md).
        room = max(MIN_HEAP, need * (3 if need < 64 * 2**20 else 1))
        size = segment_size(cap, need + room)
        if size > self._max_size:
            size = self._max_size // PAGE * PAGE  # less head room, as much as allowed
            if segment_size(cap, need) > size:
                raise CapacityError(
                    f"shm://{self._name} would need a {segment_size(cap, need)}-byte data "
                    f"segment; the limit is "
                    f"{self._max_size} bytes (max_size); nothing was changed"
                )
        gen = seg.gen + 1
        new = Segment(gen, self._h.create_data(gen, size), fresh=True)
        try:
            new.init(cap)
            moved = fill(new, mm, keep, adds)
        except BaseException:
            self._h.discard(gen)
            raise
        self._h.publish(gen)
        old, nq = seg.gen, new.q
        with self._lock:
            if self._seg.gen == CLOSED_GEN:
                # Closed by this very thread inside the section (close() waits for every
                # other one): the write is published; keep the closed sentinel. (Closing
                # by another thread is not checked here: the rest of a locked section
                # that is running, such as a series append, must go on on this segment.)
                return
            self._seg = new
            # Carry the read cache over: the entries of records that were copied point at
            # their new slots, so the next set or get of each key skips the table probe
            # (clearing it cost ~1.7 ms after each rebuild of 1,000 keys, more than the
            # rebuild's own copy). Other entries (stale, dropped, expired) go.
            # Reader threads add entries without this lock: if one does so during the
            # loop (RuntimeError: the dict changed size), nothing is carried over.
            hot = self._hot
            try:
                carried = {
                    key: (gen, nq, i, nq[i], *e[4:])
                    for key, e in hot.items()
                    if e[0] == old and (i := moved.get(e[3])) is not None
                }
            except RuntimeError:
                carried = {}
            hot.clear()
            hot.update(carried)

    def _close(self) -> None:
        # Other threads may be inside any method. Writers: the sentinels are swapped in
        # under the lock's thread lock, so a locked section running now (a modify, a
        # series append, a rebuild) finishes whole first, and one entered later fails
        # over to the closed check (_wseg -> _current) before it touches the segment.
        # Readers take no lock: nothing is unmapped under them (they hold references to
        # the segment they read; the mapping goes with the last one). The lock's
        # descriptor is closed only when no thread of this process is inside a locked
        # section (Handle.close): that would drop the flock under a writer.
        self._plain_set = False
        try:
            if self._delete_on_close and not self._readonly:
                with contextlib.suppress(StoreClosedError):  # closed by another thread
                    self._h.unlink()
        finally:
            rlock = self._ilock.rlock
            rlock.acquire()  # re-entrant: close() inside this thread's own section is fine
            try:
                with self._lock:
                    self._seg = closed_segment()
                    self._ctlq = CLOSED_CTLQ
                    self._hot = {}
            finally:
                rlock.release()
            self._h.close()
