"""The data segment of a ``shm://`` store: an open-addressing hash table plus a heap of
immutable records, in one shared-memory file per generation (no I/O here besides the
mapped memory; files and locks are in :mod:`._shm_base`).

Layout (little-endian; documented for other readers in ``docs/backends/shm.md``)::

    header   64 bytes: magic "MSSHMDT1", then u64 generation, table offset, table
             capacity (a power of two), heap offset, heap end (committed), segment size,
             used slots (live + deleted)
    table    capacity x u64 slots: 0 empty, 1 deleted, else
             (crc32(ns, key) << 32) | (record offset >> 3)
    heap     records, 8-byte aligned, never modified once published:
             u32 crc32 of the rest of the record | u32 flags (0) | u64 len(data)
             | f64 expires (inf: never) | u32 len(ns) | u32 len(key) | ns UTF-8 | key UTF-8
             | data
"""

from __future__ import annotations

import math
import mmap
import struct
import zlib
from array import array

from ._shm_base import CLOSED_GEN, PAGE
from .errors import StoreCorruptError

MAGIC_DATA = b"MSSHMDT1"
HEAD = 64
# header words (u64 index into the segment)
Q_GEN, Q_TABLE, Q_CAP, Q_HEAP, Q_END, Q_SIZE, Q_USED = 1, 2, 3, 4, 5, 6, 7
REC = struct.Struct("<IIQdII")  # crc, flags, len(data), expires, len(ns), len(key)
TAIL = struct.Struct("<IQdII")  # the record header after its crc
LENS = struct.Struct("<II")  # len(ns), len(key): right before the names
REC_SIZE = 32
M32 = 0xFFFFFFFF
#: Record offsets are stored >> 3 in 32 bits: a data segment holds at most 32 GiB.
MAX_SEGMENT = 2**35
MIN_HEAP = 2**20  # smallest free heap a rebuild leaves (see _rebuild_with)
FIRST_HEAP = 64 * 1024  # heap of a new store
_RUN = 2**20  # a rebuild copies records in runs of about this many bytes
INF = math.inf
EMPTY, TOMB = 0, 1


def record_size(n: int) -> int:
    return (REC_SIZE + n + 7) & ~7


class Segment:
    """One mapped data-segment generation (replaced wholesale, never mutated in shape)."""

    __slots__ = ("cap", "gen", "mask", "mm", "mv", "q", "size", "t0")

    def __init__(self, gen: int, mm: mmap.mmap, *, fresh: bool = False) -> None:
        self.gen = gen
        self.mm = mm
        self.mv = memoryview(mm)
        self.q = self.mv.cast("Q")
        self.size = len(mm)
        if fresh:
            return
        q = self.q
        if mm[0:8] != MAGIC_DATA or q[Q_GEN] != gen or q[Q_SIZE] != self.size:
            raise StoreCorruptError(f"shared-memory data segment {gen} has a bad header")
        cap, table = q[Q_CAP], q[Q_TABLE]
        if cap < 1 or cap & (cap - 1) or table != HEAD or q[Q_HEAP] != table + 8 * cap:
            raise StoreCorruptError(f"shared-memory data segment {gen} has a bad table")
        if not q[Q_HEAP] <= q[Q_END] <= self.size:
            raise StoreCorruptError(f"shared-memory data segment {gen} has a bad heap")
        self._set_table(cap)

    def _set_table(self, cap: int) -> None:
        self.cap = cap
        self.mask = cap - 1
        self.t0 = HEAD // 8

    def init(self, cap: int) -> None:
        """Write the header of a fresh (unpublished) segment."""
        q = self.q
        self.mm[0:8] = MAGIC_DATA
        q[Q_GEN], q[Q_TABLE], q[Q_CAP] = self.gen, HEAD, cap
        q[Q_HEAP] = q[Q_END] = HEAD + 8 * cap
        q[Q_SIZE], q[Q_USED] = self.size, 0
        self._set_table(cap)


def segment_size(cap: int, heap: int) -> int:
    return (HEAD + 8 * cap + heap + PAGE - 1) // PAGE * PAGE


def find_slot(seg: Segment, nsb: bytes, kb: bytes, h: int) -> tuple[int, int]:
    """(table word index of the key or -1, index where it could be inserted)."""
    q, mm, t0, mask = seg.q, seg.mm, seg.t0, seg.mask
    name = LENS.pack(len(nsb), len(kb)) + nsb + kb  # == record bytes 24 .. 32 + names
    end = 24 + len(name)
    i = h & mask
    free = -1
    for _ in range(seg.cap):
        v = q[t0 + i]
        if v == EMPTY:
            return -1, (free if free >= 0 else t0 + i)
        if v == TOMB:
            if free < 0:
                free = t0 + i
        elif v >> 32 == h:
            off = (v & M32) << 3
            if mm[off + 24 : off + end] == name or _taken(seg, v, name):
                return t0 + i, free
        i = (i + 1) & mask
    return -1, free


def intact(seg: Segment, v: int) -> tuple[int, int, int, float] | None:
    """``(len(ns), len(key), len(data), expires)`` of the record the slot value *v* points
    to, or None if the record or the slot is damaged: the record is outside the heap or
    fails its checksum, or its names do not hash to the slot's hash (the slot points at
    another key's record)."""
    off = (v & M32) << 3
    rec = sound(seg, off)
    if rec is None or zlib.crc32(seg.mv[off + REC_SIZE : off + REC_SIZE + rec[0] + rec[1]]) != (
        v >> 32
    ):
        return None
    return rec


def sound(seg: Segment, off: int) -> tuple[int, int, int, float] | None:
    """``(len(ns), len(key), len(data), expires)`` of the record at *off*, or None if it
    is outside the heap or fails its checksum."""
    if off < HEAD + 8 * seg.cap or off + REC_SIZE > seg.size:
        return None
    crc, _flags, dl, exp, nl, kl = REC.unpack_from(seg.mm, off)
    end = off + REC_SIZE + nl + kl + dl
    if end > seg.size or zlib.crc32(seg.mv[off + 4 : end]) != crc:
        return None
    return nl, kl, dl, exp


def _taken(seg: Segment, v: int, name: bytes) -> bool:
    """Whether the record of slot value *v*, whose hash is the key's but whose names
    were not the key's (*name*: ``len(ns), len(key), ns, key``), is the key's record.

    Only a hash collision, or damage, comes here. A record that fails its checksum, in
    a slot with the key's hash, is taken as the key's own (another key with the same
    32-bit hash is the rare case): a read then reports it as damaged and a write
    replaces it, instead of the read missing it and the write adding a second record.
    A sound record with other names is another key's (a collision, or a damaged slot
    pointing at it). A reader on a weakly ordered CPU may see a record before its
    bytes, so this looks again before calling a record damaged.
    """
    off = (v & M32) << 3
    for _ in range(3):
        ok = sound(seg, off) is not None
        if seg.mm[off + 24 : off + 24 + len(name)] == name:
            return True  # the key's own record after all (its bytes had not arrived)
        if ok:
            return False
    return True


def write_record(
    seg: Segment, off: int, nsb: bytes, kb: bytes, data: bytes, exp: float, h: int
) -> int:
    """Write a record at *off* (past the committed end); return its slot value."""
    nl, kl, dl = len(nsb), len(kb), len(data)
    mm = seg.mm
    if dl <= 4096:  # small: one buffer, one checksum, two copies into shared memory
        rest = TAIL.pack(0, dl, exp, nl, kl) + nsb + kb + data
        mm[off + 4 : off + 4 + len(rest)] = rest
        mm[off : off + 4] = zlib.crc32(rest).to_bytes(4, "little")
    else:  # big: never concatenate the value
        tail = TAIL.pack(0, dl, exp, nl, kl)
        crc = zlib.crc32(data, zlib.crc32(kb, zlib.crc32(nsb, zlib.crc32(tail))))
        start = off + 32 + nl + kl
        mm[off : off + 32] = crc.to_bytes(4, "little") + tail
        mm[off + 32 : start] = nsb + kb
        mm[start : start + dl] = data
    return (h << 32) | (off >> 3)


def fill(
    new: Segment,
    mm: mmap.mmap,
    keep: list[tuple[int, int, int]],
    adds: list[tuple[bytes, bytes, bytes, float]],
) -> dict[int, int]:
    """Copy the *keep* records ``(slot value, offset, size)`` of *mm* and write the *adds*
    ``(ns, key, data, expires)`` into the fresh, unpublished segment *new*; return
    {old slot value: its table word index in *new*} for the copied records."""
    nq, nmm, t0, mask = new.q, new.mm, new.t0, new.mask
    pos = flushed = nq[Q_HEAP]
    # The table is built in a list, then stored in one slice, and records are copied in
    # runs of up to 1 MiB: fewer, bigger stores into the mapping (this loop runs once per
    # live record per rebuild; its cost is part of every write's, see _rebuild_with).
    table = [EMPTY] * new.cap
    moved: dict[int, int] = {}
    chunks: list[bytes] = []
    append = chunks.append
    for v, off, rsize in keep:
        append(mm[off : off + rsize])
        h = v >> 32
        i = h & mask
        while table[i]:
            i = (i + 1) & mask
        table[i] = (h << 32) | (pos >> 3)
        moved[v] = t0 + i
        pos += rsize
        if pos - flushed >= _RUN:
            nmm[flushed:pos] = b"".join(chunks)
            chunks.clear()
            flushed = pos
    nmm[flushed:pos] = b"".join(chunks)
    for nsb, kb, data, exp in adds:
        v = write_record(new, pos, nsb, kb, data, exp, zlib.crc32(kb, zlib.crc32(nsb)))
        i = (v >> 32) & mask
        while table[i]:
            i = (i + 1) & mask
        table[i] = v
        pos += record_size(len(nsb) + len(kb) + len(data))
    nq[t0 : t0 + new.cap] = array("Q", table)
    nq[Q_END] = pos
    nq[Q_USED] = len(keep) + len(adds)
    return moved


def closed_segment() -> Segment:
    """The segment a closed store holds: no mapping, and a generation above any real one,
    so it never matches the control segment (every access falls through to the closed
    check) and a segment mapped by a thread still running never replaces it."""
    seg = Segment.__new__(Segment)
    seg.gen = CLOSED_GEN
    return seg
