"""Event sequences: changes to a dict recorded as timestamped events, replayable to any time.

Layer 3 of the architecture, built only on the backend contract (like ``_series``).

An event is ``(timestamp_ms, item, op, value)``. ``op`` is stored by *name*, never
pickled: ``setitem``, ``delitem``, ``add``, ``sub``, ``mul``, ``truediv``, ``floordiv``,
``mod``, ``pow``, ``concat``, ``neg``, ``not_``, plus ``snapshot`` (written by
:meth:`EventLog.prune`: the whole state at that time).

Storage (in the internal namespace ``"\\0ev\\0" + namespace``):

* a **head** record ``H:<len(name)>:<name>`` with the next chunk id, the number of
  chunks, the timestamp of the last event, the **current state** itself, the *pending* tail
  of fewer than :data:`CHUNK_SIZE` events not yet moved into a chunk (with the state before
  it), and a write version (``"v"``, changed by every write);
* a **directory** record ``D:<len(name)>:<name>``, the chunk directory
  ``[[first_timestamp, chunk_id, count], ...]`` (absent while there is no chunk);
* **chunk** records ``C:<len(name)>:<name>:<chunk_id>`` with events sorted by time and
  the *base* state (the state before the chunk's first event). A chunk is written with
  :data:`CHUNK_SIZE` events when the tail fills up (or with more, when one ``apply``
  brings many changes at once), and grows past it when events are inserted before the
  tail: a chunk is never split.

So ``current()`` reads one record; ``apply`` at the end of the sequence validates the
change against the current state and rewrites the head (and, once every CHUNK_SIZE events,
writes a chunk and the directory): O(1) in the length of the history. ``past(t)`` replays
one chunk (or the tail) from its base: usually at most CHUNK_SIZE events, more in a chunk
grown by inserts in the past. Inserting an event in the past replays the chunks after it
(to validate and to refresh their bases).
Every change is validated *before* anything is stored, so a sequence can never be
poisoned by an event that does not replay.

Reads that need more than the head (``past(t)`` before the tail, ``events()``, ``len``)
are validated like series reads (see ``_series``): every write changes the head's bytes,
the read re-reads the head after its directory and chunk reads and starts again when it
changed (a ``prune`` rewrites every chunk under new ids), and falls back to the store's
exclusive section after a few tries. ``current()`` and ``past(t)`` in the tail read the
head only.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

from ._codec import pack, unpack
from ._keys import check_key, internal_ns, tagged_key, tagged_names
from ._series import _Changed, consistent_read, next_version
from .errors import (
    CorruptValueError,
    EventConflictError,
    InvalidOptionError,
    KeyTypeError,
    OptionTypeError,
    ReplayError,
)

if TYPE_CHECKING:
    from ._store import Op, Store

__all__ = ["CHUNK_SIZE", "OPS", "Event", "EventLog"]

CHUNK_SIZE = 32

_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "concat": operator.concat,
}
_UNARY: dict[str, Callable[[Any], Any]] = {"neg": operator.neg, "not_": operator.not_}

#: Operator functions accepted in a change tuple, by the name they are stored under.
OPS: dict[str, Callable[..., Any]] = {
    "setitem": operator.setitem,
    "delitem": operator.delitem,
    **_BINARY,
    **_UNARY,
}
_NAME_OF: dict[Any, str] = {fn: name for name, fn in OPS.items()}
#: The operator names an event may carry in storage.
_STORED_OPS = frozenset(OPS) | {"snapshot"}


class Event(NamedTuple):
    """One recorded change: ``op`` is the operator's name (``"add"``, ``"setitem"``...)."""

    timestamp: int
    item: str
    op: str
    value: Any


def _parse_change(item: Any, change: Any) -> tuple[str, str, Any]:
    item = check_key(item)
    if type(change) is tuple and change and _is_op(change[0]):
        name = _NAME_OF[change[0]]
        rest = change[1:]
        if name in ("delitem", "neg", "not_"):
            if len(rest) > 1 or (rest and rest[0] is not None):
                raise InvalidOptionError(
                    f"{name} takes no value: use ({name}_function,) or (fn, None)"
                )
            return item, name, None
        if len(rest) != 1:
            raise InvalidOptionError(f"{name} needs exactly one value: (operator.{name}, value)")
        value = rest[0]
    else:
        name, value = "setitem", change
    # A deep copy through the codec: validates the value now (SerializationError before
    # anything is stored) and detaches the state from the caller's objects.
    return item, name, unpack(pack(value))


def _is_op(obj: Any) -> bool:
    try:
        return obj in _NAME_OF
    except TypeError:  # unhashable first element: a plain tuple value
        return False


def _replay(state: dict[str, Any], ts: int, item: str, op: str, value: Any) -> None:
    if op == "setitem":
        state[item] = value
        return
    if op == "snapshot":
        state.clear()
        state.update(unpack(pack(value)))
        return
    if item not in state:
        raise ReplayError(f"event at {ts}: {op} on missing item {item!r}")
    if op == "delitem":
        del state[item]
        return
    try:
        if op in _BINARY:
            state[item] = _BINARY[op](state[item], value)
        elif op in _UNARY:
            state[item] = _UNARY[op](state[item])
        else:
            raise ReplayError(f"event at {ts}: unknown operator {op!r}")
        pack(state[item])
    except ReplayError:
        raise
    except Exception as exc:  # the operator itself failed (TypeError, ZeroDivisionError...)
        raise ReplayError(f"event at {ts}: {op} on {item!r} failed: {exc}") from exc


def _check_ts(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, int):
        raise KeyTypeError("timestamps must be int milliseconds")
    return int(t)


def _valid_events(events: Any) -> TypeGuard[list[list[Any]]]:
    """Whether *events*, as decoded from storage, is a list of ``[timestamp, item, op,
    value]`` in time order, each with a known operator (a snapshot's value a dict)."""
    if type(events) is not list:
        return False
    previous: Any = -math.inf
    try:
        for event in events:
            if type(event) is not list or len(event) != 4:
                return False
            ts, item, op, value = event
            if (
                type(ts) is not int
                or ts < previous
                or type(item) is not str
                or op not in _STORED_OPS  # TypeError if unhashable
                or (op == "snapshot" and type(value) is not dict)
            ):
                return False
            previous = ts
    except TypeError:
        return False
    return True


def _valid_head(head: Any) -> bool:
    """Whether *head*, as decoded from storage, has the shape :class:`EventLog` writes
    (see its storage notes): checked whole, so damage (or a hand edit of a readable
    store, such as an INI file) is reported as such and never replayed into a state."""
    if type(head) is not dict:
        return False
    try:
        last, pending = head["l"], head["p"]
        return (
            type(head["n"]) is int
            and type(head["k"]) is int
            and head["k"] >= 0
            and (last is None or type(last) is int)
            and type(head["s"]) is dict
            and type(head["b"]) is dict
            and type(head.get("v", 0)) is int  # no "v": written before versions existed
            and type(head.get("r", 0)) is int  # no "r": before epochs, or no chunk yet
            and _valid_events(pending)
            # The tail holds the latest events: none is after the last timestamp.
            and (not pending or (last is not None and pending[-1][0] <= last))
        )
    except KeyError:
        return False


def _valid_directory(chunks: Any) -> TypeGuard[list[list[int]]]:
    """Whether *chunks* is a chunk directory: ``[first_timestamp, chunk_id, count]``
    entries (ints, count at least 1) in time order.

    Checked with C loops only (``map``, ``set``, slices): a directory grows with the log
    and is read at every flush, so a Python step per entry made a long log's appends
    cost O(n) (250 µs a flush at 300 chunks)."""
    if type(chunks) is not list:
        return False
    if not chunks:
        return True
    if set(map(type, chunks)) != {list} or set(map(len, chunks)) != {3}:
        return False
    flat = list(itertools.chain.from_iterable(chunks))
    if set(map(type, flat)) != {int}:  # exact ints: not bool, not float
        return False
    firsts = flat[0::3]
    return min(flat[2::3]) >= 1 and firsts == sorted(firsts)


def _copy(state: Mapping[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = unpack(pack(dict(state)))
    return result


class EventLog:
    """The event sequence *name* of a store (get one with :meth:`Store.events`).

    An unknown sequence reads as an empty state. Thread-safe, and multi-process safe on
    backends shared between processes: two processes applying events lose none. Every read
    (:meth:`current`, :meth:`past`, :meth:`events`, ``len``, iteration) sees one version
    of the sequence, even while another thread or process applies or prunes.
    """

    __slots__ = ("_dir_key", "_head_key", "_made_head", "_name", "_ns", "_store")

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = check_key(name)
        self._ns = internal_ns("ev", store._ns)
        self._head_key = tagged_key("H", self._name)
        self._made_head: bytes | None = None  # the head record this object last encoded
        self._dir_key = tagged_key("D", self._name)

    @property
    def name(self) -> str:
        """The sequence name."""
        return self._name

    # -- storage ------------------------------------------------------------------------
    # head = {"n": next chunk id, "l": last timestamp or None, "s": current state,
    #         "p": pending events (the tail, not yet in a chunk), "b": state before "p",
    #         "k": number of chunks, "v": write version (absent in heads written before
    #         versions existed), "r": directory epoch (see below; absent until the first
    #         chunk of a log written before epochs existed)}
    # directory record = {"r": epoch, "c": [[first_ts, chunk_id, count], ...]} (the list
    #         loaded into head["c"]; a directory written before epochs is the bare list)
    # A chunk id is never reused: ids count up from a random base per log (so a removed
    # and re-created log does not reuse its ids either), and a write that changes chunks
    # (an event inserted in the past, a prune) writes them under new ids and deletes the
    # old ones. The epoch changes exactly when such a write changes the directory's
    # existing entries; otherwise the directory only grows. So a reader holding a head
    # whose epoch the directory still has sees that head's chunks, unchanged, in the
    # directory's first head["k"] entries, and needs no second look at the head (_read).
    # Keeping the tail in the head means an apply reads and writes one small record; a
    # chunk and the directory are written once per CHUNK_SIZE events. The directory grows
    # with the history, so it stays out of the per-apply path.

    def _chunk_key(self, cid: int) -> str:
        return f"{tagged_key('C', self._name)}:{cid:x}"

    def _load_head(self) -> tuple[bytes, dict[str, Any]] | None:
        """``(raw head record, head without the directory)``, or None for no sequence."""
        data = self._store._rget(self._ns, self._head_key)
        if data is None:
            return None
        head = self._store._decode(self._ns, self._head_key, data)
        # A head this object encoded itself (the one its last apply wrote, read back by the
        # next) is sound by construction: only other bytes are checked, which spares every
        # apply of a busy log the check of its pending tail.
        if data != self._made_head and not _valid_head(head):
            raise CorruptValueError(f"event log {self._name!r}: damaged head record")
        head["c"] = None
        return data, head

    def _head(self, *, directory: bool = True) -> dict[str, Any] | None:
        """The head; with *directory*, ``head["c"]`` holds the chunk directory (else None).

        For writes (under the exclusive section) and single-record reads: a read of the
        directory or chunks outside it goes through :meth:`_read`."""
        loaded = self._load_head()
        if loaded is None:
            return None
        head = loaded[1]
        if directory:
            head["c"] = self._directory(head["k"])
        return head

    def _read(self, fn: Callable[[dict[str, Any], list[bool]], Any], empty: Any) -> Any:
        """``fn(head, used)`` computed from one version of the sequence (*empty* when there
        is no sequence).

        *fn* reads the directory with :meth:`_read_directory`, which checks it against the
        head (see the storage notes above). An error while reading (a chunk deleted, a
        directory of another epoch) means a write committed meanwhile if the head's bytes
        changed, and the read starts again (see ``_series.consistent_read``); otherwise it
        is damage. A directory from before epochs sets ``used[0]``: the head is then read
        again after *fn*, and any change starts the read again.
        """

        def attempt() -> Any:
            loaded = self._load_head()
            if loaded is None:
                return empty
            raw, head = loaded
            used = [False]
            try:
                result = fn(head, used)
            except CorruptValueError:
                if self._changed(raw):
                    raise _Changed from None
                raise
            if used[0] and self._changed(raw):
                raise _Changed
            return result

        return consistent_read(self._store, attempt)

    def _changed(self, raw: bytes) -> bool:
        return self._store._rget(self._ns, self._head_key) != raw

    def _load_directory(self) -> tuple[Any, Any]:
        """``(epoch, entries)`` of the directory record (epoch None: written before epochs,
        or no directory)."""
        data = self._store._rget(self._ns, self._dir_key)
        record = None if data is None else self._store._decode(self._ns, self._dir_key, data)
        if isinstance(record, dict):
            return record.get("r"), record.get("c")
        return None, record

    def _directory(self, expected: int) -> list[list[int]]:
        """The directory, for a writer (inside the exclusive section)."""
        if not expected:
            return []
        chunks = self._load_directory()[1]
        # The head records how many chunks exist; a directory that disagrees (only a
        # tampered store can produce one: both are written in one atomic write) is refused.
        if not _valid_directory(chunks) or len(chunks) != expected:
            raise CorruptValueError(f"event log {self._name!r}: damaged chunk directory")
        return chunks

    def _read_directory(self, head: dict[str, Any], used: list[bool]) -> list[list[int]]:
        """The directory as *head* knew it, for a reader (see :meth:`_read`)."""
        epoch, chunks = self._load_directory()
        expected = head["k"]
        if not _valid_directory(chunks):
            pass
        elif epoch is None:  # from before epochs: only the exact count can be checked
            used[0] = True
            if len(chunks) == expected:
                return chunks
        elif epoch == head.get("r") and len(chunks) >= expected:
            return chunks[:expected]  # chunks flushed since the head was read: not ours
        raise CorruptValueError(f"event log {self._name!r}: damaged chunk directory")

    def _refuse_before(self, ts: int, later: Iterable[list[Any]]) -> None:
        """EventConflictError if a snapshot is among the events *later* than an insert at
        *ts* (every event after it is replayed anyway, so this costs no read)."""
        for e in later:
            if e[2] == "snapshot":
                raise EventConflictError(
                    f"event log {self._name!r} was pruned up to {e[0]}: an event at {ts} "
                    "would be reset by that snapshot and never reach current()"
                )

    def _need_directory(self, head: dict[str, Any]) -> list[list[int]]:
        if head["c"] is None:
            head["c"] = self._directory(head["k"])
        chunks: list[list[int]] = head["c"]
        return chunks

    def _chunk(self, entry: list[int]) -> tuple[dict[str, Any], list[list[Any]]]:
        """``(base state, events)`` of the chunk of directory *entry*, checked against it
        (its first timestamp and its count of events)."""
        first, cid, count = entry
        key = self._chunk_key(cid)
        data = self._store._rget(self._ns, key)
        if data is None:
            raise CorruptValueError(f"event log {self._name!r}: chunk {cid} is missing")
        chunk = self._store._decode(self._ns, key, data)
        if type(chunk) is dict:
            base, events = chunk.get("b"), chunk.get("e")
            if (
                type(base) is dict
                and _valid_events(events)
                and len(events) == count
                and events[0][0] == first
            ):
                return base, events
        raise CorruptValueError(f"event log {self._name!r}: damaged chunk {cid}")

    def _put_chunk(self, cid: int, base: dict[str, Any], events: list[list[Any]]) -> Op:
        from ._store import Op

        key = self._chunk_key(cid)
        return Op(self._ns, key, self._store._encode(self._ns, key, {"b": base, "e": events}), None)

    def _put_head(self, head: dict[str, Any]) -> Op:
        from ._store import Op

        stored = {k: v for k, v in head.items() if k != "c"}
        # Every write changes the head's bytes, which lets a reader see that it overlapped
        # a write (see _read); the state alone may not change (an event inserted in the
        # past and overwritten later).
        stored["v"] = next_version(head.get("v"))
        data = self._store._encode(self._ns, self._head_key, stored)
        self._made_head = data
        return Op(self._ns, self._head_key, data, None)

    def _put_directory(self, head: dict[str, Any], *, rewritten: bool = False) -> Op:
        """Write the directory; *rewritten*: its existing entries changed (a new epoch)."""
        from ._store import Op

        head["k"] = len(head["c"])
        if rewritten or "r" not in head:
            head["r"] = next_version(head.get("r"))
        if not head["c"]:
            return Op(self._ns, self._dir_key, None, None)
        record = {"r": head["r"], "c": head["c"]}
        data = self._store._encode(self._ns, self._dir_key, record)
        return Op(self._ns, self._dir_key, data, None)

    @staticmethod
    def _in_pending(head: dict[str, Any], ts: int) -> bool:
        """True if time *ts* belongs to the pending tail (or there are no chunks at all)."""
        return not head["k"] or bool(head["p"] and ts >= head["p"][0][0])

    # -- writes -------------------------------------------------------------------------

    def apply(self, changes: Mapping[str, Any], timestamp: int | None = None) -> dict[str, Any]:
        """Record one change set and return the new current state.

        ``changes[item]`` is a plain value (set it) or a tuple whose first element is a
        supported :mod:`operator` function: ``(operator.add, 1)``,
        ``(operator.delitem, None)``, ``(operator.neg,)``. Any other tuple is a plain value.
        The default timestamp is now in milliseconds, bumped past the last event; an
        explicit timestamp that already has an event raises :class:`EventConflictError`, and
        so does one before a snapshot that a :meth:`prune` left (replaying the snapshot
        would reset the state, so the change would never reach :meth:`current`). A change
        that cannot replay raises :class:`ReplayError` and nothing is stored.
        """
        return self._apply(changes, timestamp, before_snapshots=False)

    def _apply(
        self, changes: Mapping[str, Any], timestamp: int | None, *, before_snapshots: bool
    ) -> dict[str, Any]:
        """:meth:`apply`; with *before_snapshots*, an event may also go before a snapshot
        (what a copy of a log that holds such events must do to reproduce it exactly)."""
        store = self._store
        store._check_writable()
        if not isinstance(changes, Mapping):
            raise OptionTypeError("changes must be a mapping {item: value or (op, value)}")
        parsed = [_parse_change(item, change) for item, change in changes.items()]
        explicit = None
        if timestamp is not None:
            if isinstance(timestamp, bool) or not isinstance(timestamp, int):
                raise KeyTypeError("timestamps must be int milliseconds")
            explicit = int(timestamp)
        with store._atomic():
            head = self._head(directory=False) or {
                "c": [],
                "n": next_version(None),  # the random base of chunk ids (see above)
                "l": None,
                "s": {},
                "p": [],
                "b": {},
                "k": 0,
            }
            last = head["l"]
            ts = explicit
            if ts is None:
                now = int(store._clock() * 1000)
                ts = now if last is None or now > last else last + 1
            elif last is not None and ts <= last and self._exists(head, ts):
                raise EventConflictError(f"event log {self._name!r} already has an event at {ts}")
            if not parsed:
                return _copy(head["s"])
            new_events = [[ts, item, op, value] for item, op, value in parsed]
            if last is None or ts > last:
                ops = self._append(head, ts, new_events)
            elif self._in_pending(head, ts):
                ops = self._insert_pending(head, ts, new_events, before_snapshots)
            else:
                self._need_directory(head)
                ops = self._insert_chunks(head, ts, new_events, before_snapshots)
            store._rapply(ops)
            # The head was decoded for this call only and is now encoded: hand it over.
            state: dict[str, Any] = head["s"]
            return state

    def _exists(self, head: dict[str, Any], ts: int) -> bool:
        if any(e[0] == ts for e in head["p"]):
            return True
        if head["p"] and ts >= head["p"][0][0]:
            return False
        chunks = self._need_directory(head)
        i = bisect.bisect_right([c[0] for c in chunks], ts) - 1
        if i < 0:
            return False
        return any(e[0] == ts for e in self._chunk(chunks[i])[1])

    def _append(self, head: dict[str, Any], ts: int, new_events: list[list[Any]]) -> list[Op]:
        state = head["s"]
        for _, item, op, value in new_events:
            _replay(state, ts, item, op, value)
        head["p"].extend(new_events)
        head["l"] = ts
        ops = []
        if len(head["p"]) >= CHUNK_SIZE:
            ops += self._flush(head)
        ops.append(self._put_head(head))
        return ops

    def _flush(self, head: dict[str, Any]) -> list[Op]:
        """Move the pending tail into a new chunk (and record it in the directory)."""
        cid = head["n"]
        head["n"] = cid + 1
        pending = head["p"]
        self._need_directory(head).append([pending[0][0], cid, len(pending)])
        op = self._put_chunk(cid, head["b"], pending)
        head["p"], head["b"] = [], _copy(head["s"])
        return [op, self._put_directory(head)]

    def _insert_pending(
        self, head: dict[str, Any], ts: int, new_events: list[list[Any]], before_snapshots: bool
    ) -> list[Op]:
        pending = head["p"]
        # Stable: the new events go after every existing event at an earlier or equal time.
        pos = bisect.bisect_right([e[0] for e in pending], ts)
        if not before_snapshots:
            self._refuse_before(ts, pending[pos:])
        pending[pos:pos] = new_events
        state = _copy(head["b"])
        for e_ts, item, op, value in pending:
            _replay(state, e_ts, item, op, value)
        head["s"] = state
        ops = []
        if len(pending) >= CHUNK_SIZE:
            ops += self._flush(head)
        ops.append(self._put_head(head))
        return ops

    def _insert_chunks(
        self, head: dict[str, Any], ts: int, new_events: list[list[Any]], before_snapshots: bool
    ) -> list[Op]:
        from ._store import Op

        chunks = head["c"]
        i = max(bisect.bisect_right([c[0] for c in chunks], ts) - 1, 0)
        loaded = [self._chunk(c) for c in chunks[i:]]
        if not before_snapshots:
            self._refuse_before(
                ts,
                itertools.chain(
                    (e for _, events in loaded for e in events if e[0] > ts), head["p"]
                ),
            )
        state = _copy(loaded[0][0])
        ops: list[Op] = []
        for offset, (_, events) in enumerate(loaded):
            if offset == 0:
                pos = bisect.bisect_right([e[0] for e in events], ts)
                events[pos:pos] = new_events
            entry = chunks[i + offset]
            base = _copy(state)
            for e_ts, item, op, value in events:
                _replay(state, e_ts, item, op, value)
            # Under a new id: a reader of the old version may still be reading the old.
            ops.append(Op(self._ns, self._chunk_key(entry[1]), None, None))
            entry[:] = [events[0][0], head["n"], len(events)]
            head["n"] += 1
            ops.append(self._put_chunk(entry[1], base, events))
        head["b"] = _copy(state)
        for e_ts, item, op, value in head["p"]:
            _replay(state, e_ts, item, op, value)
        head["s"] = state
        ops.append(self._put_directory(head, rewritten=True))
        ops.append(self._put_head(head))
        return ops

    def _all_events(self, head: dict[str, Any]) -> list[list[Any]]:
        return [e for c in head["c"] for e in self._chunk(c)[1]] + list(head["p"])

    def prune(self, before: int) -> int:
        """Compact every event at or before *before* into one ``snapshot`` event.

        ``current()`` and every ``past(t)`` for ``t >= before`` are unchanged. Returns the
        number of events removed (0 when nothing is at or before *before*). The snapshot
        takes the timestamp of the last event it replaces; :meth:`apply` then refuses an
        event before it (:class:`EventConflictError`): its history is gone.
        """
        store = self._store
        store._check_writable()
        if isinstance(before, bool) or not isinstance(before, int):
            raise KeyTypeError("timestamps must be int milliseconds")
        with store._atomic():
            head = self._head()
            if head is None:
                return 0
            everything = self._all_events(head)
            old = [e for e in everything if e[0] <= before]
            if len(old) <= 1 and not (old and old[0][2] != "snapshot"):
                return 0
            state: dict[str, Any] = {}
            for e_ts, item, op, value in old:
                _replay(state, e_ts, item, op, value)
            rest = [[old[-1][0], "", "snapshot", state], *(e for e in everything if e[0] > before)]
            store._rapply(self._rewrite(head, rest))
            return len(old) - 1

    def _rewrite(self, head: dict[str, Any], events: list[list[Any]]) -> list[Op]:
        from ._store import Op

        ops: list[Op] = [Op(self._ns, self._chunk_key(c[1]), None, None) for c in head["c"]]
        head.update({"c": [], "p": [], "b": {}, "s": {}})
        state: dict[str, Any] = {}
        for e_ts, item, op, value in events:
            _replay(state, e_ts, item, op, value)
            head["p"].append([e_ts, item, op, value])
            head["s"] = state
            if len(head["p"]) >= CHUNK_SIZE:
                ops += self._flush(head)
        ops.append(self._put_directory(head, rewritten=True))
        ops.append(self._put_head(head))
        return ops

    def remove(self) -> None:
        """Delete the whole sequence (it leaves :meth:`Store.event_names`)."""
        from ._store import Op

        store = self._store
        store._check_writable()
        with store._atomic():
            head = self._head()
            if head is None:
                return
            ops = [Op(self._ns, self._chunk_key(c[1]), None, None) for c in head["c"]]
            ops.append(Op(self._ns, self._dir_key, None, None))
            ops.append(Op(self._ns, self._head_key, None, None))
            store._rapply(ops)

    # -- reads --------------------------------------------------------------------------

    def current(self, *, with_timestamp: bool = False) -> Any:
        """The current state (``{}`` for an unknown sequence); with ``with_timestamp=True``
        a pair ``(timestamp of the last event or None, state)``."""
        self._store._check_open()
        head = self._head(directory=False)
        state: dict[str, Any] = {} if head is None else head["s"]  # freshly decoded: a copy
        if with_timestamp:
            return (None if head is None else head["l"]), state
        return state

    def past(self, t: int, *, with_timestamp: bool = False) -> Any:
        """The state after every event at or before *t*; with ``with_timestamp=True`` a pair
        ``(timestamp of the last event applied or None, state)``."""
        self._store._check_open()
        t = _check_ts(t)

        def read(head: dict[str, Any], used: list[bool]) -> tuple[dict[str, Any] | None, Any]:
            if head["p"] and t >= head["p"][0][0]:
                return head["b"], head["p"]  # in the tail: the head alone answers
            if not head["k"]:
                return None, []
            chunks = self._read_directory(head, used)
            i = bisect.bisect_right([c[0] for c in chunks], t) - 1
            if i < 0:
                return None, []
            return self._chunk(chunks[i])

        base, events = self._read(read, (None, []))
        state: dict[str, Any] = {}
        applied: int | None = None
        if base is not None:
            state = base  # freshly decoded: the caller's own copy
            for e_ts, item, op, value in events:
                if e_ts > t:
                    break
                _replay(state, e_ts, item, op, value)
                applied = e_ts
        return (applied, state) if with_timestamp else state

    def events(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        ops: str | Callable[..., Any] | Collection[str | Callable[..., Any]] | None = None,
    ) -> list[Event]:
        """Events with ``start <= timestamp <= end`` (inclusive), in replay order.

        ``ops`` filters by one operator or a collection of them (functions or names).
        """
        self._store._check_open()
        lo = None if start is None else _check_ts(start)
        hi = None if end is None else _check_ts(end)
        wanted = _op_filter(ops)

        def read(head: dict[str, Any], used: list[bool]) -> list[Event]:
            out: list[Event] = []
            pending = head["p"]
            blocks: list[list[int] | None] = []  # directory entries, then None: the tail
            # Chunk events are at or before the tail's first one: after it, skip them all.
            if head["k"] and not (lo is not None and pending and lo > pending[0][0]):
                chunks = self._read_directory(head, used)
                for i, c in enumerate(chunks):
                    nxt = chunks[i + 1][0] if i + 1 < len(chunks) else None
                    if lo is not None and nxt is not None and nxt < lo:
                        continue  # the whole chunk is before start
                    blocks.append(c)
            blocks.append(None)
            for entry in blocks:
                block = pending if entry is None else self._chunk(entry)[1]
                for e_ts, item, op, value in block:
                    if lo is not None and e_ts < lo:
                        continue
                    if hi is not None and e_ts > hi:
                        return out
                    if wanted is None or op in wanted:
                        out.append(Event(e_ts, item, op, value))
            return out

        result: list[Event] = self._read(read, [])
        return result

    def __len__(self) -> int:
        self._store._check_open()

        def read(head: dict[str, Any], used: list[bool]) -> int:
            if not head["k"]:
                return len(head["p"])
            return sum(c[2] for c in self._read_directory(head, used)) + len(head["p"])

        count: int = self._read(read, 0)
        return count

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())

    def __repr__(self) -> str:
        return f"<EventLog {self._name!r} of {self._store!r}>"


def _op_filter(ops: Any) -> set[str] | None:
    if ops is None:
        return None
    if isinstance(ops, str) or callable(ops):
        items = [ops]
    elif isinstance(ops, Iterable):
        items = list(ops)
    else:
        raise OptionTypeError(
            f"ops must be an operator, an operator name or a collection of them, not {ops!r}"
        )
    if not items:
        return None
    names = set()
    for op in items:
        if isinstance(op, str):
            if op not in OPS and op != "snapshot":
                raise InvalidOptionError(f"unknown operator name {op!r}")
            names.add(op)
        elif _is_op(op):
            names.add(_NAME_OF[op])
        else:
            raise InvalidOptionError(f"unsupported operator {op!r}")
    return names


def event_names(store: Store) -> list[str]:
    """Names of the event sequences of *store*'s namespace, sorted."""
    return tagged_names(store._rkeys(internal_ns("ev", store._ns), "H:"), "H")
