"""Series, event logs and blobs in ``copy`` and ``check``.

A plain item is one record, which ``copy`` and ``check`` move and verify record by record
(``_transfer``, ``_admin``). The three other kinds of data a user stores are structures
of several records (a head, chunks, a directory, a manifest) whose layout belongs to
``_series``, ``_events`` and ``_blobs``, and a directory store keeps blobs as files. So
both commands handle them only through the public :class:`~mappingstore.Store` API:
they read a series' points, a log's events, a blob's bytes from the source (which
decodes and authenticates every record on the way) and write them with the
destination's own API (which encodes, and encrypts, them the destination's way).
Copying record by record instead would break on encryption (a record's associated data
binds it to its store) and would tie the CLI to three storage layouts.

An event log cannot be copied with ``apply`` alone when it holds ``snapshot`` events
(written by ``prune``): ``apply`` records only operator events. :func:`_rebuild` makes
each snapshot the way the source did: it applies the snapshot's state as ``setitem``
events at the snapshot's timestamp, then prunes there. A prune compacts *everything* up
to its timestamp, so the log is rebuilt from its last snapshot backwards: when a
snapshot is made, the log holds nothing at or before it yet. The rebuilt events are
compared with the source's before the copy is committed.

A store works in one namespace, so each namespace a job visits gets its own instance of
the same URL (:class:`Instances`), opened with the password the first one was opened with.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as _dt
import itertools
import operator
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from decimal import Decimal
from typing import IO, Any, cast

from .._events import OPS, Event, EventLog
from .._keys import internal_ns
from .._series import Series
from .._store import Store
from ..errors import (
    CorruptValueError,
    IntegrityError,
    PasswordRequiredError,
    ReplayError,
)

__all__ = [
    "DAMAGE",
    "KINDS",
    "Instances",
    "Tally",
    "check_object",
    "copy_object",
    "names",
    "same_value",
]

#: The kinds of stored objects besides plain items: (JSON key, singular, plural, unit).
KINDS = (
    ("series", "series", "series", "point"),
    ("event_logs", "event log", "event logs", "event"),
    ("blobs", "blob", "blobs", "byte"),
)
#: Points read per page of a series, and bytes per piece of a blob, when comparing.
_PAGE = 8192
_PIECE = 1 << 20
#: What a damaged record (or a store opened without its key) raises while being read.
DAMAGE = (CorruptValueError, IntegrityError, PasswordRequiredError, ReplayError)


def same_value(a: Any, b: Any) -> bool:
    """True when two decoded values are the same value *and* the same types.

    Stricter than ``==`` (``1 == 1.0 == True``, ``{1} == frozenset({1})``, and
    ``Decimal("1.0") == Decimal("1.00")`` are all equal there), and NaN equals NaN (in
    sets and dict keys too), so a resumed copy recognises exactly the items it already
    wrote. Iterative, not recursive: a stored list may nest 1,023 levels deep.
    """
    pending = [(a, b)]
    while pending:
        a, b = pending.pop()
        if type(a) is not type(b):
            return False
        if isinstance(a, (list, tuple)):
            if len(a) != len(b):
                return False
            pending.extend(zip(a, b, strict=True))
        elif isinstance(a, dict):
            if len(a) != len(b):
                return False
            # Keys are matched by their canonical form, not by lookup: a NaN key is never
            # found again (NaN != NaN), and 1 and 1.0 (or True) would find each other.
            theirs = _by_key(b)
            for key, values in _by_key(a).items():
                others = theirs.get(key, [])
                if len(values) != len(others):
                    return False
                pending.extend(zip(values, others, strict=True))
        elif isinstance(a, (set, frozenset)):
            if len(a) != len(b) or Counter(map(_canonical, a)) != Counter(map(_canonical, b)):
                return False
        elif isinstance(a, _BY_REPR):
            if repr(a) != repr(b):
                return False
        elif a != b:
            return False
    return True


#: Types whose == hides a difference in the stored value: repr tells 0.0 from -0.0 (and
#: NaN equals NaN), Decimal("1.0") from "1.00", and one instant in two time zones apart.
_BY_REPR = (float, complex, Decimal, _dt.datetime, _dt.time)


def _canonical(x: Any) -> Hashable:
    """A hashable form of the set element or dict key *x* such that two forms are equal
    exactly when :func:`same_value` holds: NaN equals NaN, ``1`` is not ``1.0``."""
    t = type(x)
    if t in _BY_REPR:
        return (t, repr(x))
    if t is tuple:
        return (t, tuple(map(_canonical, x)))
    if t is frozenset:
        return (t, frozenset(Counter(map(_canonical, x)).items()))
    return (t, x)


def _by_key(d: dict[Any, Any]) -> dict[Hashable, list[Any]]:
    # A list per form: a dict may hold several NaN keys (distinct objects), in order.
    grouped: dict[Hashable, list[Any]] = {}
    for k, v in d.items():
        grouped.setdefault(_canonical(k), []).append(v)
    return grouped


class Instances:
    """One store instance per namespace of one URL: the given one for its own namespace,
    others opened on first use by *opener* (and closed by :meth:`close`)."""

    def __init__(self, base: Store, opener: Callable[[str], Store]) -> None:
        self.base = base
        self._opener = opener
        self._opened: dict[str, Store] = {}

    def get(self, ns: str) -> Store:
        if ns == self.base.namespace:
            return self.base
        store = self._opened.get(ns)
        if store is None:
            store = self._opened[ns] = self._opener(ns)
        return store

    def close(self) -> None:
        opened, self._opened = self._opened, {}
        for store in opened.values():
            store.close()


@dataclasses.dataclass
class Tally:
    """What ``copy`` did with the objects of one kind."""

    copied: int = 0
    units: int = 0  # points, events or bytes copied
    present: int = 0
    conflicts: list[str] = dataclasses.field(default_factory=list)

    def as_json(self, unit: str) -> dict[str, Any]:
        return {
            "copied": self.copied,
            unit + "s": self.units,
            "present": self.present,
            "conflicts": self.conflicts,
        }


def names(store: Store, kind: str, prefix: str = "") -> list[str]:
    """Names of the objects of *kind* (a key of :data:`KINDS`) starting with *prefix*."""
    if kind == "series":
        found = store.series_names()
    elif kind == "event_logs":
        found = store.event_names()
    else:
        found = store.blob_names()
    return [name for name in found if name.startswith(prefix)]


def prefixed_names(store: Store, kind: str, prefix: str = "") -> dict[str, list[str]]:
    """The series or event logs (*kind*) kept under a key prefix: those written through
    ``Prefixed`` or a ``?key_prefix=`` URL of *store*, which its own listing never shows
    (the key prefix stands before the record's tag). ``{key prefix: sorted names}``, for
    the objects whose key prefix + name starts with *prefix*; ``{}`` for blobs, which the
    store lists under their full names already."""
    if kind == "blobs":
        return {}
    ns = internal_ns("ts" if kind == "series" else "ev", store._ns)
    keys = sorted(store._rkeys(ns, ""))
    known = set(keys)
    found: dict[str, list[str]] = {}
    for key in keys:
        if _own_record(key) or _other_record(key, known):
            continue
        head = _prefixed_head(key, keys)
        if head is not None and (head[0] + head[1]).startswith(prefix):
            found.setdefault(head[0], []).append(head[1])
    return {p: sorted(found[p]) for p in sorted(found)}


def _own_record(key: str) -> bool:
    """Whether *key* is one of the store's own series or event-log records
    (``H:``/``E:``/``D:<len>:<name>``, or ``C:<len>:<name>:<hex id>``)."""
    if key[1:2] != ":" or key[:1] not in ("H", "E", "D", "C"):
        return False
    length, sep, rest = key[2:].partition(":")
    if not sep or not length.isdigit():
        return False
    tail = rest[int(length) :]
    if key[0] != "C":
        return tail == "" and len(rest) == int(length)
    return tail[:1] == ":" and len(tail) > 1 and all(c in "0123456789abcdef" for c in tail[1:])


def _other_record(key: str, known: set[str]) -> bool:
    """Whether *key* is the edge record, chunk directory or a chunk of an object whose
    head is in *known* (``key prefix + "E:<len>:<name>"`` and so on): such a key may also
    read as the head of another name (``"aH:5:E:1:b"``: the edge record of ``b`` under
    ``"aH:5:"``, or the head of ``"E:1:b"`` under ``"a"``), and the head decides."""
    for tag in ("E:", "D:", "C:"):
        j = key.find(tag)
        while j != -1:
            length, sep, rest = key[j + 2 :].partition(":")
            if sep and length.isdigit():
                n = int(length)
                name, tail = rest[:n], rest[n:]
                whole = tail == "" if tag != "C:" else tail[:1] == ":" and len(tail) > 1
                if len(name) == n and whole and key[:j] + "H:" + f"{n}:{name}" in known:
                    return True
            j = key.find(tag, j + 1)
    return False


def _prefixed_head(key: str, keys: list[str]) -> tuple[str, str] | None:
    """``(key prefix, name)`` when *key* is ``key prefix + "H:<len>:<name>"``.

    A key prefix or a name may itself hold ``H:<len>:``, so a key can split more than one
    way; the split whose other records exist (edge record, chunk directory, chunks: in
    the sorted *keys*) is the one written. A head alone (a log held in its head) reads the
    same whichever split is taken: the first."""
    splits = []
    i = key.find("H:", 1)
    while i != -1:
        length, sep, name = key[i + 2 :].partition(":")
        if sep and length.isdigit() and length == str(len(name)):
            splits.append((key[:i], name))
        i = key.find("H:", i + 1)
    if len(splits) > 1:
        for key_prefix, name in splits:
            if _has_siblings(keys, key_prefix, name):
                return key_prefix, name
    return splits[0] if splits else None


def _has_siblings(keys: list[str], key_prefix: str, name: str) -> bool:
    """Whether *keys* (sorted) hold another record of the object *name* under
    *key_prefix*: its edge record or chunk directory, or a chunk."""
    tail = f"{len(name)}:{name}"
    for tag in ("E:", "D:"):
        j = bisect.bisect_left(keys, key_prefix + tag + tail)
        if j < len(keys) and keys[j] == key_prefix + tag + tail:
            return True
    chunk = key_prefix + "C:" + tail + ":"
    j = bisect.bisect_left(keys, chunk)
    return j < len(keys) and keys[j].startswith(chunk)


# -- reading --------------------------------------------------------------------------------


def _pages(series: Series, start: int | None = None) -> Iterator[list[tuple[int, Any]]]:
    """The points of *series* from *start* on, ascending, a page at a time."""
    lo = start
    while True:
        page = series.range(lo, None, n=_PAGE)
        if page:
            yield page
        if len(page) < _PAGE:
            return
        lo = page[-1][0] + 1


def _points(series: Series) -> Iterator[tuple[int, Any]]:
    return itertools.chain.from_iterable(_pages(series))


def _same_events(a: list[Event], b: list[Event]) -> bool:
    return len(a) == len(b) and all(
        x.timestamp == y.timestamp
        and x.item == y.item
        and x.op == y.op
        and same_value(x.value, y.value)
        for x, y in zip(a, b, strict=True)
    )


def _compare_series(source: Series, target: Series) -> tuple[str, int | None]:
    """``("same", None)``, ``("different", None)``, or ``("prefix", t)`` when *target*
    holds exactly the first points of *source*, the rest starting at ``t``."""
    mine = _points(source)
    last: int | None = None
    for t, v in _points(target):
        p = next(mine, None)
        if p is None or p[0] != t or not same_value(p[1], v):
            return "different", None
        last = t
    if next(mine, None) is None:
        return "same", None
    return "prefix", None if last is None else last + 1


def _same_blob(src: Store, dst: Store, name: str) -> bool:
    with src.open(name) as a, dst.open(name) as b:
        if a.size != b.size:
            return False
        while True:
            piece = a.read(_PIECE)
            if piece != b.read(_PIECE):
                return False
            if not piece:
                return True


# -- copy -----------------------------------------------------------------------------------


def copy_object(
    kind: str,
    src: Store,
    dst: Store | None,
    name: str,
    tally: Tally,
    *,
    held: set[str],
    overwrite: bool,
    dry: bool,
) -> None:
    """Copy the object *name* of *kind* (a key of :data:`KINDS`) from *src* to *dst*,
    counting in *tally*; with *dry*, only count (*dst* is ``None`` when it does not exist).

    *held* is the set of names of this kind in *dst* (:func:`names`, listed once per
    namespace by the caller); a copied name is added to it. Listing the destination per
    object instead made a copy of N objects read O(N²) keys.

    An object the destination already holds with the same content is left alone
    (``present``); one holding other content is a conflict, left alone unless *overwrite*,
    which replaces it whole, never merges into it. The one exception is a series whose
    points are exactly the first points of the source's (what an interrupted copy leaves):
    the rest is appended, which gives exactly the source's series.
    """
    present = dst is not None and name in held
    if kind == "series":
        _copy_series(src, dst, name, tally, present=present, overwrite=overwrite, dry=dry)
    elif kind == "event_logs":
        _copy_events(src, dst, name, tally, present=present, overwrite=overwrite, dry=dry)
    else:
        _copy_blob(src, dst, name, tally, present=present, overwrite=overwrite, dry=dry)
    if not dry:
        held.add(name)  # copied, present or a conflict: the destination holds it now


def _copy_series(
    src: Store,
    dst: Store | None,
    name: str,
    tally: Tally,
    *,
    present: bool,
    overwrite: bool,
    dry: bool,
) -> None:
    source = src.series(name)
    start: int | None = None
    replace = False
    if present:
        assert dst is not None
        state, start = _compare_series(source, dst.series(name))
        if state == "same":
            tally.present += 1
            return
        if state == "different":
            if not overwrite:
                tally.conflicts.append(name)
                return
            replace = True
    if dry:
        tally.units += sum(len(page) for page in _pages(source, start))
        tally.copied += 1
        return
    assert dst is not None  # for mypy: dry covers None
    target = dst.series(name)
    if replace:
        target.remove()
    for page in _pages(source, start):
        target.extend(page)  # atomic per page; a rerun finishes an interrupted copy
        tally.units += len(page)
    tally.copied += 1


def _copy_events(
    src: Store,
    dst: Store | None,
    name: str,
    tally: Tally,
    *,
    present: bool,
    overwrite: bool,
    dry: bool,
) -> None:
    events = src.events(name).events()
    replace = False
    if present:
        assert dst is not None
        if _same_events(dst.events(name).events(), events):
            tally.present += 1
            return
        if not overwrite:
            tally.conflicts.append(name)
            return
        replace = True
    if not dry:
        assert dst is not None
        expected = src.events(name).current()
        # One batch: the log appears (or is replaced) whole, or not at all.
        with dst.batch():
            log = dst.events(name)
            if replace:
                log.remove()
            _rebuild(log, events)
            if not _same_events(log.events(), events) or not same_value(log.current(), expected):
                raise ReplayError(f"event log {name!r} could not be reproduced exactly")
    tally.units += len(events)
    tally.copied += 1


def _change(event: Event) -> Any:
    """The ``apply`` change that records *event* again."""
    if event.op == "setitem":
        return event.value
    fn = OPS.get(event.op)
    if fn is None:
        raise ReplayError(f"event at {event.timestamp}: unknown operator {event.op!r}")
    if event.op in ("delitem", "neg", "not_"):
        return (fn,)
    return (fn, event.value)


def _rebuild(log: EventLog, events: list[Event]) -> None:
    """Record *events* (in replay order) into the empty *log* (see the module docstring)."""
    groups: list[list[Event]] = []  # the events of one timestamp: one apply() each
    for event in events:
        if groups and groups[-1][0].timestamp == event.timestamp:
            groups[-1].append(event)
        else:
            groups.append([event])
    segments: list[tuple[Event | None, list[list[Event]]]] = [(None, [])]
    for group in groups:
        ts = group[0].timestamp
        if any(e.op == "snapshot" for e in group):
            if len(group) != 1 or not isinstance(group[0].value, dict):
                raise ReplayError(f"event at {ts}: a snapshot shares its timestamp")
            segments.append((group[0], []))
        elif len({e.item for e in group}) != len(group):
            raise ReplayError(f"event at {ts}: two events change {group[0].item!r} at once")
        else:
            segments[-1][1].append(group)
    for snapshot, groups_after in reversed(segments):
        if snapshot is not None:
            ts = snapshot.timestamp
            if snapshot.value:
                log._apply(dict(snapshot.value), ts, before_snapshots=True)
            else:  # an empty state: one item set just before, deleted at the snapshot
                log._apply({"_": 0}, ts - 1, before_snapshots=True)
                log._apply({"_": (operator.delitem,)}, ts, before_snapshots=True)
            log.prune(ts)
        for group in groups_after:
            # Events before a later snapshot exist in logs that pruned before and took
            # inserts: reproduced as they are (apply() refuses to add new ones).
            log._apply(
                {e.item: _change(e) for e in group}, group[0].timestamp, before_snapshots=True
            )


def _copy_blob(
    src: Store,
    dst: Store | None,
    name: str,
    tally: Tally,
    *,
    present: bool,
    overwrite: bool,
    dry: bool,
) -> None:
    if present:
        assert dst is not None
        try:
            same = _same_blob(src, dst, name)
        except DAMAGE:
            same = False  # a damaged destination blob is other content
        if same:
            tally.present += 1
            return
        if not overwrite:
            tally.conflicts.append(name)
            return
    with src.open(name) as reader:
        if not dry:
            assert dst is not None
            # put_file streams chunk by chunk and replaces a blob atomically.
            dst.put_file(name, cast(IO[bytes], reader))
        tally.units += reader.size
    tally.copied += 1


# -- check ----------------------------------------------------------------------------------


def check_object(store: Store, kind: str, name: str) -> int:
    """Read every record of the object *name* of *kind*; return how many points, events
    or bytes it holds. Damage raises (one of :data:`DAMAGE`); a blob deleted since it
    was listed raises ``MissingKeyError``."""
    if kind == "series":
        series = store.series(name)
        expected = len(series)  # the head
        edges = (series.first(), series.last())  # the edge record
        got = 0
        data: list[tuple[int, Any] | None] = [None, None]  # the first and last points read
        for page in _pages(series):  # every chunk, every value
            if not got:
                data[0] = page[0]
            data[1] = page[-1]
            got += len(page)
        if got != expected:
            raise CorruptValueError(
                f"series {name!r}: its head counts {expected} points, its chunks hold {got}"
            )
        # The edge record is written beside the chunks, not derived from them on reading:
        # a stale one (left by a bug, or by a writer of another version) makes first() and
        # last() return points the series does not hold.
        if not all(map(_same_point, edges, data)):
            raise CorruptValueError(
                f"series {name!r}: first/last point disagree with the data (first() and "
                f"last() are at {_at(edges[0])} and {_at(edges[1])}, the chunks start at "
                f"{_at(data[0])} and end at {_at(data[1])})"
            )
        return got
    if kind == "event_logs":
        log = store.events(name)
        log.current()  # the head
        return len(log.events())  # the directory and every chunk
    # Every chunk, each with its CRC or tag; a full read also checks the manifest's SHA-256.
    # Not verifiable: an unencrypted blob of a directory store is a plain file of exactly
    # its bytes, with no checksum or digest, so damage to its contents reads as good data.
    with store.open(name) as reader:
        size = 0
        while piece := reader.read(_PIECE):
            size += len(piece)
        if size != reader.size:
            raise CorruptValueError(f"blob {name!r}: {size} bytes read of {reader.size}")
        return size


def _same_point(a: tuple[int, Any] | None, b: tuple[int, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a[0] == b[0] and same_value(a[1], b[1])


def _at(point: tuple[int, Any] | None) -> str:
    # Timestamps only: a value may be large, and the message is one line of a report.
    return "nothing" if point is None else f"t={point[0]}"
