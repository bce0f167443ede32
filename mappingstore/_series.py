"""Time series: a sorted ``MutableMapping[int, Any]`` of timestamped values per name.

Layer 3 of the architecture: built only on the backend contract, so every backend (and
every future one) stores series the same way, and the CLI's ``copy`` carries them between
backends (decoded and re-encoded through the public API).

Storage (in the internal namespace ``"\\0ts\\0" + namespace``):

* a **head** record ``H:<len(name)>:<name>`` holding the sorted chunk directory
  ``[[first_timestamp, chunk_id, count], ...]``, the next chunk id and a write version
  (``"v"``: a different number after every write, see "Consistent reads" below);
* an **edge** record ``E:<len(name)>:<name>`` holding the first and last points
  themselves (so ``first()``/``last()`` read one small record, and the head, read by every
  operation, stays small whatever the values hold);
* **chunk** records ``C:<len(name)>:<name>:<chunk_id>`` holding up to :data:`CHUNK_SIZE`
  points as two parallel arrays, timestamps and values (decoded in one msgpack call).

Why chunks: one record per point costs a round trip (or a B-tree insert) per point; a
time-series store writes points in blocks. Appending 100,000 points writes about 100
records; a 1% range reads one or two chunks; ``len`` reads the head and
``first``/``last`` the edge record.
Head and chunks are ordinary values: checksummed, and encrypted and authenticated when
the store encrypts (the key name and chunk id are bound as associated data, and the
timestamps live inside the authenticated payload). The length prefix in the key makes the
(name, chunk) encoding injective for any name, NUL included.

Writes run under the store's exclusive section and commit all changed records with one
atomic ``_apply``, so a crash leaves the old or the new series, and two processes
extending one series lose no point (on backends shared between processes).

Consistent reads (optimistic validation). Reads take no lock: a read that needs the head
and then some chunks could otherwise mix two versions (a concurrent ``extend`` that splits
a chunk moves points to a chunk id the reader never visits; a ``remove`` deletes a chunk
the reader is about to fetch). Every write therefore changes the head's bytes (the write
version ``"v"`` is incremented; a new series starts from a random 48-bit number, so a
removed and re-created series repeats an old head with a chance of 2**-48 at most),
and a read checks, after its chunk reads, that the head's bytes are still the ones it
started from:

* a read that returns a list or a value (``range``, ``missing``/``iscomplete``,
  ``series[t]``, ``t in series``) re-reads the head once at the end (one extra head read
  per call, none when no chunk was read) and starts again from scratch when it changed, so
  it is a snapshot of one version. A chunk missing while the head did not change is real
  damage (:class:`~mappingstore.errors.CorruptValueError`);
* a lazy iteration (``iter(series)``, ``items()``) cannot start again after it has yielded,
  so it checks the head after each chunk it reads (one extra head read per chunk) and,
  when it changed, re-reads the directory and resumes strictly after the last timestamp
  it yielded. It yields each point at most once, in ascending order, and never misses a
  point that was present for the whole iteration; points written or removed during the
  iteration may or may not be seen;
* ``len``, ``first`` and ``last`` read one record and are consistent as they are.

A read that keeps losing the race (a steady stream of writes) backs off (up to
``_BACKOFF_MAX`` seconds between tries) and, after ``_OPTIMISTIC_TRIES`` tries, takes the
store's exclusive section for its next try, as a write does, so it finishes; a read-only
store (which may not take that lock) and a read inside a batch keep retrying with
backoff instead.
"""

from __future__ import annotations

import bisect
import gc
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

from ._codec import pack, unpack_slice
from ._keys import internal_ns, tagged_key, tagged_names
from .errors import (
    CorruptValueError,
    InvalidOptionError,
    KeyTypeError,
    MissingFrequencyError,
    MissingKeyError,
    OptionTypeError,
)

if TYPE_CHECKING:
    from ._store import Op, Store

__all__ = ["CHUNK_SIZE", "Series"]

#: Points per chunk. Larger chunks make appends of single points dearer (the tail chunk is
#: rewritten); smaller ones make bulk loads and scans issue more records.
CHUNK_SIZE = 1024

#: Tries of a read without a lock before it takes the store's exclusive section.
_OPTIMISTIC_TRIES = 8
#: Longest pause between two tries of a read (seconds); the first retry is immediate and
#: the pause doubles from 0.5 ms.
_BACKOFF_MAX = 0.05

_T = TypeVar("_T")


class _Changed(Exception):
    """Internal: the head changed while a read was reading; the read tries again."""


def next_version(old: Any) -> int:
    """The write version of a head record after a write: the old one plus one, or a random
    48-bit number for a new head (or one written before versions existed), so a removed and
    re-created series or log repeats the bytes of an old head with a chance of 2**-48."""
    if type(old) is int:
        return old + 1
    return int.from_bytes(os.urandom(6), "big")


def consistent_read(
    store: Store, attempt: Callable[[], _T], fallback: Callable[[], _T] | None = None
) -> _T:
    """Run *attempt* until it returns; it raises :class:`_Changed` when a write overlapped.

    Optimistic: no lock, so readers never block writers (or each other). The first retry is
    immediate (the overlapping write has committed by then), later ones back off. After
    :data:`_OPTIMISTIC_TRIES` tries a writable store runs each further try inside its
    exclusive section, which excludes the writers (they hold it for their whole
    read-modify-write), so a steady stream of writes cannot starve the read. A read-only
    store may be unable to take that lock (a read-only SQLite connection cannot begin a
    write transaction), and inside a batch the section is a no-op, so those keep retrying
    with backoff, or, given a *fallback* (a read that always makes progress, with a weaker
    guarantee), return what it returns: a read longer than the gap between two writes
    would otherwise never finish.
    """
    tries = 0
    delay = 0.0005
    while True:
        tries += 1
        locked = not store._readonly and store._batch() is None
        if tries > _OPTIMISTIC_TRIES and not locked and fallback is not None:
            return fallback()
        if tries > _OPTIMISTIC_TRIES and locked:
            with store._atomic():
                try:
                    return attempt()
                except _Changed:
                    pass  # only a writer that ignores the lock gets here
        else:
            try:
                return attempt()
            except _Changed:
                pass
        if tries > 1:
            time.sleep(delay)
            delay = min(delay * 2, _BACKOFF_MAX)


def _check_ts(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, int):
        raise KeyTypeError(f"timestamps must be int, not {type(t).__qualname__}")
    return int(t)


def _check_freq(freq: Any) -> int:
    if isinstance(freq, bool) or not isinstance(freq, int):
        raise InvalidOptionError(f"freq must be a positive int, got {freq!r}")
    if freq <= 0:
        raise InvalidOptionError(f"freq must be > 0, got {freq!r}")
    return freq


class _GCPause:
    """Pause CPython's cyclic garbage collector while a window of values is decoded.

    Why: a 1,000-point window builds 1,000 values and 1,000 result tuples, and every 700
    container allocations (the default threshold) start a collection that walks the young
    objects again; when the caller keeps the windows, the survivors also pile up into
    full collections. msgpack's own performance tips say the same ("CPython's GC starts
    when growing allocated object. This means unpacking may cause useless GC. You can use
    gc.disable() when unpacking large message": msgpack-python's README, "Performance
    tips"). msgpack once did this inside ``unpack()`` and stopped because it restored the
    state wrongly, hence the care below. Nothing decoded here can form a
    reference cycle, so a pass during the decode finds no garbage. The collector is
    paused, never skipped: the allocations still count, and the next allocation after the
    pause collects as usual.

    The collector switch is process-wide, so this keeps one count of open pauses across
    threads under a lock: the first pause records whether the collector was enabled and
    disables it, the last one re-enables it only if it was enabled then. A collector the
    application disabled stays disabled; if two threads decode at once the collector stays
    off until both are done. Limitation: an application thread that calls
    ``gc.disable()`` *during* a decode of another thread has that call undone when the
    decode ends (``gc.isenabled()`` cannot tell who disabled it).

    Use as ``pause = _GCPause()`` then ``try: pause.start(); ... finally: pause.stop()``
    (not a ``with`` block: ``__exit__`` does not run when ``__enter__`` is interrupted).
    ``stop`` undoes exactly what ``start`` did, however far it got: a KeyboardInterrupt
    between two bytecodes of ``start`` leaves neither the count nor the collector changed
    for good. Each pause covers one chunk's decode (a few hundred µs), never a ``yield``
    or I/O, so a lazy iteration or a slow backend cannot hold the collector off. A child
    forked while another thread was decoding starts with no pause open (see
    :meth:`_after_fork`): that thread does not exist there to end its pause.
    """

    __slots__ = ("_counted",)

    _lock = threading.RLock()  # re-entrant: a signal handler may decode in the same thread
    _depth = 0  # open pauses, all threads
    _resume = False  # the first open pause found the collector enabled

    def __init__(self) -> None:
        self._counted = False

    def start(self) -> None:
        cls = _GCPause
        with cls._lock:
            # No call between these two statements, so no asynchronous exception either.
            cls._depth += 1
            self._counted = True
            if cls._depth == 1:
                cls._resume = gc.isenabled()
                gc.disable()

    def stop(self) -> None:
        cls = _GCPause
        with cls._lock:
            if not self._counted:
                return
            self._counted = False
            cls._depth -= 1
            if cls._depth == 0 and cls._resume:
                cls._resume = False
                gc.enable()

    @staticmethod
    def _after_fork() -> None:
        """In a forked child: drop the pauses of the threads that were not copied (the
        forking thread is not decoding), with a fresh lock in case one of them held it."""
        cls = _GCPause
        cls._lock = threading.RLock()
        if cls._depth:
            cls._depth = 0
            if cls._resume:
                cls._resume = False
                gc.enable()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_GCPause._after_fork)


class Series(MutableMapping[int, Any]):
    """A time series: integer timestamps (negative and zero included) to values.

    Iteration is in ascending timestamp order. ``series[t]`` returns a fresh copy of the
    value. Get one with :meth:`Store.series`. Thread-safe and (on backends shared between
    processes) multi-process safe like the store itself; a series of a read-only store
    raises :class:`~mappingstore.errors.ReadOnlyError` from every mutator.

    Reads that return a list or a value (:meth:`range`, :meth:`missing`, ``series[t]``,
    ``t in series``, ``len``, :meth:`first`, :meth:`last`) see one version of the series,
    even while other threads or processes write. A lazy iteration (``iter``,
    :meth:`items`) yields each point at most once, in ascending order, and never misses a
    point present for the whole iteration (see the module docstring).
    """

    __slots__ = ("_cache", "_edge_key", "_freq", "_head_key", "_name", "_ns", "_store")

    def __init__(self, store: Store, name: str, freq: int | None = None) -> None:
        from ._keys import check_key

        self._store = store
        self._name = check_key(name)
        self._ns = internal_ns("ts", store._ns)
        self._head_key = tagged_key("H", self._name)
        # The first and last points live in a small record of their own: first()/last()
        # read only it, and the head (read by every operation) stays small whatever the
        # values hold (a head over about 1 KB spills to an overflow page in SQLite).
        self._edge_key = tagged_key("E", self._name)
        self._freq = None if freq is None else _check_freq(freq)
        # (raw head record, decoded head, chunk start timestamps) of the last head read
        self._cache: tuple[bytes, dict[str, Any], list[int]] | None = None

    # -- storage helpers ----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The series name."""
        return self._name

    @property
    def freq(self) -> int | None:
        """The default frequency used by :meth:`missing` and :meth:`iscomplete`."""
        return self._freq

    def _chunk_key(self, cid: int) -> str:
        return f"{tagged_key('C', self._name)}:{cid:x}"

    def _head_entry(self) -> tuple[bytes, dict[str, Any], list[int]] | None:
        """``(raw head record, head, chunk start timestamps)``, or None for no series."""
        data = self._store._rget(self._ns, self._head_key)
        if data is None:
            return None
        # The head is read by every operation: decode (and check) it once per version.
        # Equal raw bytes mean an equal head (an encrypted head has a fresh nonce per write).
        cached = self._cache
        if cached is not None and cached[0] == data:
            return cached
        head = self._store._decode(self._ns, self._head_key, data)
        try:
            if not (
                isinstance(head, dict)
                and type(head["n"]) is int
                and type(head.get("v", 0)) is int  # no "v": written before versions existed
                and all(len(c) == 3 and all(type(x) is int for x in c) for c in head["c"])
            ):
                raise ValueError("bad structure")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptValueError(f"series {self._name!r}: damaged head record") from exc
        # One tuple, replaced whole: a thread reading it never mixes two versions.
        cached = self._cache = (data, head, [c[0] for c in head["c"]])
        return cached

    def _head(self) -> tuple[list[list[int]], int, int | None]:
        """The chunk directory (shared with the cache: never mutate it), the next id and
        the write version (None: no head, or one written before versions existed)."""
        entry = self._head_entry()
        if entry is None:
            return [], 0, None
        head = entry[1]
        return head["c"], head["n"], head.get("v")

    def _changed(self, raw: bytes) -> bool:
        """True if a write committed since the head record *raw* was read.

        Every write rewrites the head and the edge record together, with the same write
        version, so a head with a version is checked against the small edge record (the
        head holds the whole chunk directory: re-reading it after every chunk made a walk
        of a long series read its directory quadratically). A head written before versions
        existed is compared whole."""
        cached = self._cache
        version = cached[1].get("v") if cached is not None and cached[0] == raw else None
        if version is None:
            return self._store._rget(self._ns, self._head_key) != raw
        data = self._store._rget(self._ns, self._edge_key)
        if data is not None:
            try:
                edges = self._store._decode(self._ns, self._edge_key, data)
            except CorruptValueError:
                edges = None
            if isinstance(edges, dict) and edges.get("v") == version:
                return False  # a write sets both to a new version: none committed
        # Another version (or a damaged or missing edge record): the head decides, so an
        # edge record that disagrees with its head is never taken for a write forever.
        return self._store._rget(self._ns, self._head_key) != raw

    def _directory(self) -> tuple[list[list[int]], list[int]]:
        """The chunk directory and its chunk start timestamps (both shared with the cache:
        never mutate them). The starts let a read find its first chunk by bisection."""
        entry = self._head_entry()
        if entry is None:
            return [], []
        return entry[1]["c"], entry[2]

    def _chunk_raw(self, cid: int, entry: list[int] | None = None) -> tuple[list[int], bytes]:
        """Timestamps and the packed value array of chunk *cid* (values not decoded),
        checked against its directory *entry* (first timestamp, id, count) when given."""
        key = self._chunk_key(cid)
        data = self._store._rget(self._ns, key)
        if data is None:
            raise CorruptValueError(f"series {self._name!r}: chunk {cid} is missing")
        chunk = self._store._decode(self._ns, key, data)
        try:
            ts, packed = chunk["t"], chunk["v"]
            if type(ts) is not list or type(packed) is not bytes:
                raise TypeError("bad chunk types")
            if entry is not None and (len(ts) != entry[2] or not ts or ts[0] != entry[0]):
                # A chunk that disagrees with its head (a hand edit, damage) would make
                # len() and iteration disagree: damage, unless a write changed the head.
                raise TypeError("chunk does not match its directory entry")
            return ts, packed
        except (KeyError, TypeError) as exc:
            raise CorruptValueError(f"series {self._name!r}: damaged chunk {cid}") from exc

    def _chunk(self, cid: int, entry: list[int] | None = None) -> tuple[list[int], list[Any]]:
        ts, packed = self._chunk_raw(cid, entry)
        values = unpack_slice(packed, 0, len(ts))
        if len(values) != len(ts):
            raise CorruptValueError(f"series {self._name!r}: damaged chunk {cid}")
        return ts, values

    def _chunk_op(self, cid: int, ts: list[int], vs: list[Any], written: dict[int, Any]) -> Op:
        from ._store import Op

        key = self._chunk_key(cid)
        written[cid] = (ts, vs)
        # Values travel as one packed array inside the chunk, so a reader can decode just
        # the slice it needs (see unpack_slice).
        payload = {"t": ts, "v": pack(vs)}
        return Op(self._ns, key, self._store._encode(self._ns, key, payload), None)

    def _edges(self, polled: bool = False) -> tuple[list[Any], list[Any]] | None:
        """The first and last ``[timestamp, value]`` of the series (decoded afresh: the
        values are the caller's own copies), or None when it is empty. *polled*: for
        ``first()``/``last()``, which callers repeat (see ``Store._rget_polled``)."""
        store = self._store
        read = store._rget_polled if polled else store._rget
        data = read(self._ns, self._edge_key)
        if data is None:
            return None
        edges = store._decode(self._ns, self._edge_key, data)
        try:
            first, last = edges["f"], edges["z"]
            # Spelled out: a generator over the two points cost about 1 µs of a 7 µs call.
            if (
                len(first) != 2
                or len(last) != 2
                or type(first[0]) is not int
                or type(last[0]) is not int
            ):
                raise ValueError("bad edges")
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptValueError(f"series {self._name!r}: damaged edge record") from exc
        return first, last

    def _edge_point(self, cid: int, last: bool) -> list[Any]:
        """The first (or last) ``[timestamp, value]`` of chunk *cid*, read from storage."""
        ts, packed = self._chunk_raw(cid)
        if not ts:
            raise CorruptValueError(f"series {self._name!r}: damaged chunk {cid}")
        j = len(ts) - 1 if last else 0
        values = unpack_slice(packed, j, j + 1)
        if len(values) != 1:
            raise CorruptValueError(f"series {self._name!r}: damaged chunk {cid}")
        return [ts[j], values[0]]

    def _head_ops(
        self,
        old_chunks: list[list[int]],
        version: int | None,
        chunks: list[list[int]],
        next_id: int,
        written: dict[int, Any],
    ) -> list[Op]:
        """The new head and edge records (*old_chunks* and *version*: the head before).

        An edge point comes from the chunk written now if the new edge chunk was written;
        else, if that chunk is the old edge chunk, untouched, from the old edge record;
        else (a remove deleted the old edge chunk whole, and the next one is untouched) from
        the new edge chunk itself.
        """
        from ._store import Op

        if not chunks:
            return [
                Op(self._ns, self._head_key, None, None),
                Op(self._ns, self._edge_key, None, None),
            ]
        first_cid, last_cid = chunks[0][1], chunks[-1][1]
        keep_first = first_cid not in written and bool(old_chunks) and old_chunks[0][1] == first_cid
        keep_last = last_cid not in written and bool(old_chunks) and old_chunks[-1][1] == last_cid
        old = self._edges() if keep_first or keep_last else None
        first: Any
        last: Any
        if first_cid in written:
            ts, vs = written[first_cid]
            first = [ts[0], vs[0]]
        elif keep_first and old is not None:
            first = old[0]
        else:
            first = self._edge_point(first_cid, last=False)
        if last_cid in written:
            ts, vs = written[last_cid]
            last = [ts[-1], vs[-1]]
        elif keep_last and old is not None:
            last = old[1]
        else:
            last = self._edge_point(last_cid, last=True)
        # Every write changes the head's bytes (see "Consistent reads" in the module
        # docstring): the version, not the directory, guarantees it (a value overwritten in
        # place leaves the directory as it was).
        v = next_version(version)
        head = {"c": chunks, "n": next_id, "v": v}
        # The edge record carries the same version: a read validates against this small
        # record instead of the head, whose directory grows with the series.
        edges = {"f": first, "z": last, "v": v}
        store = self._store
        return [
            Op(self._ns, self._head_key, store._encode(self._ns, self._head_key, head), None),
            Op(self._ns, self._edge_key, store._encode(self._ns, self._edge_key, edges), None),
        ]

    def _delete_op(self, cid: int) -> Op:
        from ._store import Op

        return Op(self._ns, self._chunk_key(cid), None, None)

    def _locate(self, chunks: list[list[int]], t: int) -> int:
        """Index of the chunk that holds (or would hold) timestamp *t*."""
        i = bisect.bisect_right([c[0] for c in chunks], t) - 1
        return max(i, 0)

    # -- writes -------------------------------------------------------------------------

    def extend(self, points: Iterable[tuple[int, Any]]) -> None:
        """Add ``(timestamp, value)`` pairs in any order; a repeated timestamp keeps the last.

        Atomic: every point is stored, or (on any error) none.
        """
        store = self._store
        store._check_writable()
        try:
            it = iter(points)
        except TypeError as exc:
            raise OptionTypeError(
                f"points must be an iterable of (timestamp, value) pairs, got {points!r}"
            ) from exc
        new: dict[int, Any] = {}
        for point in it:
            try:
                t, v = point
            except (TypeError, ValueError) as exc:
                raise InvalidOptionError(
                    f"points must be (timestamp, value) pairs, got {point!r}"
                ) from exc
            new[t if type(t) is int else _check_ts(t)] = v
        if not new:
            return
        # Values are serialised when their chunk is encoded, all before the one atomic
        # write: an unsupported value raises SerializationError and stores nothing.
        with store._atomic():
            chunks, next_id, version = self._head()
            written: dict[int, Any] = {}
            groups: dict[int, dict[int, Any]] = {}
            if chunks:
                starts = [c[0] for c in chunks]
                for t, v in new.items():
                    i = max(bisect.bisect_right(starts, t) - 1, 0)
                    groups.setdefault(i, {})[t] = v
            ops: list[Op] = []
            new_chunks: list[list[int]] = []
            for i, entry in enumerate(chunks):
                if i not in groups:
                    new_chunks.append(entry)
                    continue
                ts, vs = self._chunk(entry[1], entry)
                merged = dict(zip(ts, vs, strict=True))
                merged.update(groups[i])
                pieces, next_id = self._pieces(merged, entry[1], next_id, ops, written)
                new_chunks.extend(pieces)
            if not chunks:
                new_chunks, next_id = self._pieces(new, None, next_id, ops, written)
            ops.extend(self._head_ops(chunks, version, new_chunks, next_id, written))
            store._rapply(ops)

    def _pieces(
        self,
        merged: dict[int, Any],
        reuse: int | None,
        next_id: int,
        ops: list[Op],
        written: dict[int, Any],
    ) -> tuple[list[list[int]], int]:
        """Write *merged* points as chunks of at most CHUNK_SIZE; return their directory."""
        order = sorted(merged)
        out: list[list[int]] = []
        for start in range(0, len(order), CHUNK_SIZE):
            part = order[start : start + CHUNK_SIZE]
            if reuse is not None and start == 0:
                cid = reuse
            else:
                cid, next_id = next_id, next_id + 1
            ops.append(self._chunk_op(cid, part, [merged[t] for t in part], written))
            out.append([part[0], cid, len(part)])
        return out, next_id

    def __setitem__(self, t: int, value: Any) -> None:
        self.extend([(t, value)])

    # The mutators MutableMapping provides write only when there is something to change:
    # clear() of an empty series, update({}), pop(t, default) of a missing point or
    # setdefault() of a present one returned without asking the store, so they
    # "succeeded" on a read-only store. They refuse first, as every mutator of Store does.

    def clear(self) -> None:
        """Delete every point (one atomic write, as :meth:`remove` with no bounds)."""
        self._store._check_writable()
        self.remove()

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like ``dict.update``: one atomic :meth:`extend` of every point."""
        self._store._check_writable()
        if kwargs:  # keywords are str keys: never timestamps
            raise KeyTypeError("timestamps must be int, not str")
        from ._store import _update_pairs

        self.extend(_update_pairs(other))

    # pop, popitem and setdefault read and then write: each is one exclusive section (as
    # Store.pop and Store.setdefault are), so a point is popped once, pop(t, default)
    # never raises KeyError, and of two setdefault calls on a new point only one stores.

    def pop(self, t: int, *default: Any) -> Any:
        """Remove the point at *t* and return its value; *default* (if given) or
        ``KeyError`` when there is none. Atomic."""
        store = self._store
        store._check_writable()
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        with store._atomic():
            try:
                value = self[t]
            except MissingKeyError:
                if default:
                    return default[0]
                raise
            del self[t]
        return value

    def popitem(self) -> tuple[int, Any]:
        """Remove and return the earliest ``(timestamp, value)``; ``KeyError`` when empty.
        Atomic."""
        store = self._store
        store._check_writable()
        with store._atomic():
            first = self.first()
            if first is None:
                raise MissingKeyError(f"popitem(): series {self.name!r} is empty")
            del self[first[0]]
        return first

    def setdefault(self, t: int, default: Any = None) -> Any:
        """The value at *t*; if there is none, store *default* there and return it. Atomic."""
        store = self._store
        store._check_writable()
        with store._atomic():
            try:
                return self[t]
            except MissingKeyError:
                self[t] = default
        return default

    def __delitem__(self, t: int) -> None:
        t = _check_ts(t)
        if not self._remove(t, t):
            raise MissingKeyError(t)

    def remove(self, start: int | None = None, end: int | None = None) -> int:
        """Delete the points with ``start <= t <= end`` (inclusive; ``None``: unbounded).

        With no bounds the whole series is deleted and leaves :meth:`Store.series_names`.
        Returns the number of points removed.
        """
        lo = None if start is None else _check_ts(start)
        hi = None if end is None else _check_ts(end)
        return self._remove(lo, hi)

    def _remove(self, lo: int | None, hi: int | None) -> int:
        store = self._store
        store._check_writable()
        if lo is not None and hi is not None and lo > hi:
            return 0
        removed = 0
        with store._atomic():
            chunks, next_id, version = self._head()
            written: dict[int, Any] = {}
            ops: list[Op] = []
            kept: list[list[int]] = []
            for i, entry in enumerate(chunks):
                nxt = chunks[i + 1][0] if i + 1 < len(chunks) else None
                if (hi is not None and entry[0] > hi) or (
                    lo is not None and nxt is not None and nxt <= lo
                ):
                    kept.append(entry)
                    continue
                ts, vs = self._chunk(entry[1], entry)
                keep = [
                    j
                    for j, t in enumerate(ts)
                    if (lo is not None and t < lo) or (hi is not None and t > hi)
                ]
                if len(keep) == len(ts):
                    kept.append(entry)
                    continue
                removed += len(ts) - len(keep)
                if keep:
                    nts = [ts[j] for j in keep]
                    ops.append(self._chunk_op(entry[1], nts, [vs[j] for j in keep], written))
                    kept.append([nts[0], entry[1], len(nts)])
                else:
                    ops.append(self._delete_op(entry[1]))
            if removed:
                ops.extend(self._head_ops(chunks, version, kept, next_id, written))
                store._rapply(ops)
        return removed

    # -- reads --------------------------------------------------------------------------

    def _spans_of(
        self,
        entry: tuple[bytes, dict[str, Any], list[int]],
        lo: int | None,
        hi: int | None,
        fetched: list[int],
    ) -> Iterator[tuple[int, list[int], bytes, int, int]]:
        """``(chunk_id, timestamps, packed values, a, b)`` for each chunk of the head *entry*
        holding points of ``lo <= t <= hi``: its points ``a:b`` are the ones in range (values
        not decoded). Appends each chunk id it fetches to *fetched*. Not validated: see
        :meth:`_read`."""
        chunks, starts = entry[1]["c"], entry[2]
        # The first chunk that can hold lo is the last one starting at or before it.
        first = 0 if lo is None else max(bisect.bisect_right(starts, lo) - 1, 0)
        for i in range(first, len(chunks)):
            c = chunks[i]
            if hi is not None and c[0] > hi:
                return
            fetched.append(c[1])
            ts, packed = self._chunk_raw(c[1], c)
            a = 0 if lo is None else bisect.bisect_left(ts, lo)
            b = len(ts) if hi is None else bisect.bisect_right(ts, hi)
            if a < b:
                yield c[1], ts, packed, a, b

    def _read(
        self,
        lo: int | None,
        hi: int | None,
        consume: Callable[[Iterator[tuple[int, list[int], bytes, int, int]]], _T],
    ) -> _T:
        """``consume(spans of lo..hi)`` computed from one version of the series.

        Reads the head, lets *consume* pull the chunks it needs, then reads the head's bytes
        again: if a write committed meanwhile, the result may mix two versions, so it is
        dropped and the whole read starts again (see :func:`consistent_read`). One extra
        head read per call, and none when no chunk was read (the result then depends on the
        head alone). An error while reading chunks (a chunk deleted by the write) counts as
        damage only when the head did not change.
        """
        self._store._check_open()

        def attempt() -> _T:
            entry = self._head_entry()
            if entry is None:
                return consume(iter(()))
            fetched: list[int] = []
            try:
                result = consume(self._spans_of(entry, lo, hi, fetched))
            except CorruptValueError:
                if self._changed(entry[0]):
                    raise _Changed from None
                raise
            if fetched and self._changed(entry[0]):
                raise _Changed
            return result

        # Starved without the lock (a read-only store, or inside a batch): the chunk-by-chunk
        # walk of a lazy iteration, which always progresses (see _walk for its guarantee).
        return consistent_read(self._store, attempt, lambda: consume(self._walk(lo, hi)))

    def _walk(
        self, lo: int | None, hi: int | None
    ) -> Iterator[tuple[int, list[int], bytes, int, int]]:
        """Like :meth:`_spans_of` for a lazy iteration, each chunk validated as it is read.

        A lazy iteration cannot start again once it has yielded, so after each chunk read
        it checks the head; if a write committed, it re-reads the directory and resumes
        strictly after the last timestamp it yielded. Each point is yielded at most once, in
        ascending order, and a point present for the whole iteration is never missed (it is
        in every version, and every version's chunks after the resume point are walked).
        One head read per chunk on top of the chunk read. No lock is held across a yield.
        """
        self._store._check_open()
        # [head entry (None: read it again), index of the next chunk in its directory]
        pos: list[Any] = [None, 0]

        def step() -> tuple[int, list[int], bytes, int, int] | None:
            entry = pos[0]
            if entry is None:
                entry = self._head_entry()
                if entry is None:
                    return None
                pos[0] = entry
                pos[1] = 0 if lo is None else max(bisect.bisect_right(entry[2], lo) - 1, 0)
            chunks = entry[1]["c"]
            i = pos[1]
            span = None
            fetched = False
            # Chunks with nothing left in range (the one a resume lands in may hold only
            # points already yielded) are passed over within the same try: so a try made
            # under the lock always yields a point or ends the iteration.
            while i < len(chunks) and (hi is None or chunks[i][0] <= hi):
                cid = chunks[i][1]
                fetched = True
                try:
                    ts, packed = self._chunk_raw(cid, chunks[i])
                except CorruptValueError:
                    if self._changed(entry[0]):
                        pos[0] = None
                        raise _Changed from None
                    raise
                i += 1
                a = 0 if lo is None else bisect.bisect_left(ts, lo)
                b = len(ts) if hi is None else bisect.bisect_right(ts, hi)
                if a < b:
                    span = cid, ts, packed, a, b
                    break
            # Ending with no chunk read is fine even on a stale head: a point present for
            # the whole iteration is in it, so none lies beyond its last chunk.
            if fetched and self._changed(entry[0]):
                pos[0] = None
                raise _Changed
            pos[1] = i
            return span

        store = self._store
        while True:
            span = consistent_read(store, step)
            if span is None:
                return
            yield span
            # Resume strictly after the last point yielded, whatever version comes next.
            lo = span[1][span[4] - 1] + 1

    def _decode_into(
        self, out: list[tuple[int, Any]], cid: int, ts: list[int], packed: bytes, a: int, b: int
    ) -> None:
        """Append points ``a:b`` of chunk *cid* to *out* as ``(timestamp, value)`` pairs.

        One call decodes the values and ``list.extend(zip(...))`` builds the pairs without a
        Python step per point, with the collector paused (see :class:`_GCPause`).
        """
        pause = _GCPause()
        try:
            pause.start()
            values = unpack_slice(packed, a, b)
            if len(values) != b - a:
                raise CorruptValueError(f"series {self._name!r}: damaged chunk {cid}")
            out.extend(zip(ts[a:b], values, strict=True))
        finally:
            pause.stop()

    def _scan(self, lo: int | None, hi: int | None) -> Iterator[tuple[int, Any]]:
        # Decoded a chunk's slice at a time: the collector is never paused across a yield.
        for cid, ts, packed, a, b in self._walk(lo, hi):
            points: list[tuple[int, Any]] = []
            self._decode_into(points, cid, ts, packed, a, b)
            yield from points

    def _points(self, lo: int | None, hi: int | None, n: int | None) -> list[tuple[int, Any]]:
        """The first *n* (``None``: all) points of ``lo <= t <= hi`` as one list."""

        def consume(spans: Iterator[tuple[int, list[int], bytes, int, int]]) -> list[Any]:
            out: list[tuple[int, Any]] = []
            for cid, ts, packed, a, b in spans:
                if n is not None:
                    b = min(b, a + n - len(out))
                self._decode_into(out, cid, ts, packed, a, b)
                if n is not None and len(out) >= n:
                    break
            return out

        return self._read(lo, hi, consume)

    def _thinned(
        self, lo: int | None, hi: int | None, n: int | None, step: int
    ) -> list[tuple[int, Any]]:
        """``range(lo, hi, n=n, freq=step)``: see :meth:`range`."""

        def consume(spans: Iterator[tuple[int, list[int], bytes, int, int]]) -> list[Any]:
            out: list[tuple[int, Any]] = []
            last_kept: int | None = None
            for cid, ts, packed, a, b in spans:
                points: list[tuple[int, Any]] = []
                self._decode_into(points, cid, ts, packed, a, b)
                for t, v in points:
                    if last_kept is not None and t < last_kept + step:
                        continue
                    out.append((t, v))
                    last_kept = t
                    if n is not None and len(out) >= n:
                        return out
            return out

        return self._read(lo, hi, consume)

    def __getitem__(self, t: int) -> Any:
        t = _check_ts(t)

        def consume(spans: Iterator[tuple[int, list[int], bytes, int, int]]) -> list[Any]:
            out: list[tuple[int, Any]] = []
            for cid, ts, packed, a, b in spans:
                self._decode_into(out, cid, ts, packed, a, b)
                break
            return out

        found = self._read(t, t, consume)
        if not found:
            raise MissingKeyError(t)
        return found[0][1]

    def __contains__(self, t: object) -> bool:
        if isinstance(t, bool) or not isinstance(t, int):
            return False
        # Timestamps only: the chunk's values are not decoded (nor in __iter__, missing).
        return self._read(t, t, lambda spans: any(True for _ in spans))

    def __iter__(self) -> Iterator[int]:
        for _, ts, _, a, b in self._walk(None, None):
            yield from ts[a:b]

    def __len__(self) -> int:
        self._store._check_open()
        return sum(c[2] for c in self._head()[0])

    def items(self) -> Any:
        """``(timestamp, value)`` pairs in ascending order (one pass over the chunks)."""
        return _SeriesItems(self)

    def values(self) -> Any:
        """The values in ascending timestamp order (one pass over the chunks)."""
        return _SeriesValues(self)

    def first(self) -> tuple[int, Any] | None:
        """The earliest ``(timestamp, value)``, or ``None`` when the series is empty."""
        self._store._check_open()
        edges = self._edges(polled=True)
        return None if edges is None else (edges[0][0], edges[0][1])

    def last(self) -> tuple[int, Any] | None:
        """The latest ``(timestamp, value)``, or ``None`` when the series is empty."""
        self._store._check_open()
        edges = self._edges(polled=True)
        return None if edges is None else (edges[1][0], edges[1][1])

    def range(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        n: int | None = None,
        freq: int | None = None,
    ) -> list[tuple[int, Any]]:
        """Points with ``start <= t <= end`` (inclusive; ``None``: unbounded), ascending.

        ``n`` caps the count from the start (``n=0`` returns nothing). ``freq`` thins the
        result: the first point is kept, then only points at least ``freq`` after the last
        kept one. ``start > end`` gives ``[]``.
        """
        lo = None if start is None else _check_ts(start)
        hi = None if end is None else _check_ts(end)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise InvalidOptionError(f"n must be an int >= 0, got {n!r}")
        step = None if freq is None else _check_freq(freq)
        if n == 0 or (lo is not None and hi is not None and lo > hi):
            return []
        if step is None:
            return self._points(lo, hi, n)
        return self._thinned(lo, hi, n, step)

    def missing(self, start: int, end: int | None = None, *, freq: int | None = None) -> list[int]:
        """Grid timestamps ``start, start+freq, ...`` up to and including *end* that have no
        point exactly there. ``end=None`` means *start*. The frequency comes from the call or
        the series' default; with neither, :class:`MissingFrequencyError`.
        """
        lo = _check_ts(start)
        hi = lo if end is None else _check_ts(end)
        step = freq if freq is not None else self._freq
        if step is None:
            raise MissingFrequencyError(
                f"series {self._name!r} has no frequency: pass freq= or open it with "
                "store.series(name, freq=...)"
            )
        step = _check_freq(step)
        if lo > hi:
            return []
        present = self._read(lo, hi, lambda spans: {t for _, ts, _, a, b in spans for t in ts[a:b]})
        return [t for t in range(lo, hi + 1, step) if t not in present]

    def iscomplete(self, start: int, end: int | None = None, *, freq: int | None = None) -> bool:
        """``not missing(start, end, freq=freq)``."""
        return not self.missing(start, end, freq=freq)

    def __repr__(self) -> str:
        return f"<Series {self._name!r} of {self._store!r}>"

    __hash__ = None  # type: ignore[assignment]


from collections.abc import ItemsView, ValuesView  # noqa: E402


class _SeriesItems(ItemsView[int, Any]):
    _mapping: Series

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        yield from self._mapping._scan(None, None)


class _SeriesValues(ValuesView[Any]):
    _mapping: Series

    def __iter__(self) -> Iterator[Any]:
        # One pass, as items(): never a listing, then a read per timestamp (which a point
        # removed in between would turn into a KeyError).
        for _, value in self._mapping._scan(None, None):
            yield value

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self)


def series_names(store: Store) -> list[str]:
    """Names of the non-empty series of *store*'s namespace, sorted."""
    return tagged_names(store._rkeys(internal_ns("ts", store._ns), "H:"), "H")
