"""Series and event-log reads while other handles write, edge points after removes, and
argument checks.

Reads take no lock; every write changes the head record's bytes, and a read re-reads the
head after its chunk reads and starts again when it changed (``_series`` module
docstring, "Consistent reads"). The deterministic tests here put a write by another handle
exactly between a reader's head read and its chunk reads (a hook on ``Store._rget``); two
short real-thread races back them up. The behaviour of series and logs as such is in the
conformance suite (``mappingstore/testing/_timeseries.py``).
"""

from __future__ import annotations

import contextlib
import operator
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import _events, _series
from mappingstore._store import Store
from mappingstore.errors import (
    CorruptValueError,
    KeyTypeError,
    MappingStoreError,
    OptionTypeError,
)

SMALL = 8  # points (events) per chunk in these tests: many chunks from few points


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_series, "CHUNK_SIZE", SMALL)
    monkeypatch.setattr(_events, "CHUNK_SIZE", SMALL)


@pytest.fixture(params=["memory", "sqlite"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """(reader, writer): two handles on one store (one object for memory://)."""
    if request.param == "memory":
        store = mappingstore.open("memory://")
        yield store, store
        store.close()
        return
    url = f"sqlite:///{tmp_path}/s.db"
    reader, writer = mappingstore.open(url), mappingstore.open(url)
    yield reader, writer
    reader.close()
    writer.close()


class Hook:
    """Runs ``action()`` right before chosen raw reads of *reader* (not its own writes'
    reads, and never while the reader holds its exclusive section)."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        reader: Store,
        prefix: str,
        action: Callable[[], Any],
        *,
        nth: int = 1,
        times: int | None = 1,
    ) -> None:
        self.reader, self.prefix, self.action = reader, prefix, action
        self.nth, self.times = nth, times
        self.seen = 0  # matching reads
        self.fired = 0
        self.busy = False
        self.locked = 0  # depth of the reader's exclusive sections
        self.locked_reads = 0  # matching reads made inside one
        orig_rget, orig_atomic = Store._rget, Store._atomic
        hook = self

        def rget(store: Store, ns: str, key: str) -> bytes | None:
            if store is reader and not hook.busy and key.startswith(prefix):
                if hook.locked:
                    hook.locked_reads += 1
                else:
                    hook.seen += 1
                    if hook.seen >= hook.nth and (hook.times is None or hook.fired < hook.times):
                        hook.busy = True
                        try:
                            hook.fired += 1
                            action()
                        finally:
                            hook.busy = False
            return orig_rget(store, ns, key)

        @contextlib.contextmanager
        def atomic(store: Store) -> Iterator[None]:
            mine = store is reader and not hook.busy
            with orig_atomic(store):
                hook.locked += mine
                try:
                    yield
                finally:
                    hook.locked -= mine

        monkeypatch.setattr(Store, "_rget", rget)
        monkeypatch.setattr(Store, "_atomic", atomic)


def _even(n: int) -> list[tuple[int, int]]:
    return [(t, t) for t in range(0, 2 * n, 2)]


# -- first() / last() after a remove that empties an edge chunk --------------------------


def _cut_first_chunk(ser: mappingstore.Series) -> None:
    ser.remove(None, 7)  # chunk 0 (0..7) goes whole, chunk 1 is untouched


def _cut_last_chunk(ser: mappingstore.Series) -> None:
    ser.remove(16, None)  # chunk 2 (16..23) goes whole


def _pop_lone_first(ser: mappingstore.Series) -> None:
    ser.remove(1, 7)  # chunk 0 keeps only 0...
    ser.popitem()  # ...then loses it


def _del_lone_last(ser: mappingstore.Series) -> None:
    ser.remove(16, 22)  # chunk 2 keeps only 23...
    del ser[23]  # ...then loses it


@pytest.mark.parametrize(
    "cut", [_cut_first_chunk, _cut_last_chunk, _pop_lone_first, _del_lone_last]
)
def test_edges_after_a_remove_that_deletes_an_edge_chunk(
    pair: tuple[Store, Store], cut: Callable[[mappingstore.Series], None]
) -> None:
    ser = pair[0].series("s")
    ser.extend((t, f"v{t}") for t in range(24))  # chunks 0..7, 8..15, 16..23
    cut(ser)
    points = ser.range()
    assert ser.first() == points[0]
    assert ser.last() == points[-1]
    ser[12] = "x"  # a later write that touches neither edge chunk keeps them right
    points = ser.range()
    assert ser.first() == points[0] and ser.last() == points[-1]


def test_edges_match_a_model_under_random_writes(pair: tuple[Store, Store]) -> None:
    ser = pair[0].series("s")
    model: dict[int, int] = {}
    rnd = random.Random(5)
    for step in range(150):
        kind = rnd.random()
        if kind < 0.45:
            new = {rnd.randrange(200): step for _ in range(rnd.randrange(1, 12))}
            ser.extend(new.items())
            model.update(new)
        elif kind < 0.8:
            lo = rnd.choice([None, rnd.randrange(200)])
            hi = rnd.choice([None, rnd.randrange(200)])
            if lo is None and hi is None:
                hi = rnd.randrange(200)
            ser.remove(lo, hi)
            for t in [t for t in model if (lo is None or t >= lo) and (hi is None or t <= hi)]:
                del model[t]
        elif model:
            t = rnd.choice(sorted(model))
            del ser[t]
            del model[t]
        if model:
            lo_t, hi_t = min(model), max(model)
            assert ser.first() == (lo_t, model[lo_t]), step
            assert ser.last() == (hi_t, model[hi_t]), step
        else:
            assert ser.first() is None and ser.last() is None


# -- every write changes the head -------------------------------------------------------


def test_every_write_changes_the_head_record(pair: tuple[Store, Store]) -> None:
    store = pair[0]
    ser = store.series("s")
    ser.extend(_even(20))

    def head() -> bytes | None:
        return store._rget(ser._ns, ser._head_key)

    before = head()
    ser[4] = "other"  # overwritten in place: the directory is unchanged
    after = head()
    assert after != before
    ser.remove()
    ser.extend(_even(20))  # the same points again: a new random version, not the old head
    assert head() not in (before, after)


def test_a_head_written_before_versions_still_reads(pair: tuple[Store, Store]) -> None:
    store = pair[0]
    ser = store.series("s")
    ser.extend(_even(20))
    ns, key = ser._ns, ser._head_key
    head = store._decode(ns, key, store._rget(ns, key) or b"")
    del head["v"]
    store._put(ns, key, store._encode(ns, key, head), None)
    assert ser.range() == _even(20)
    assert list(ser) == [t for t, _ in _even(20)]
    ser[1] = 1
    assert ser.range(0, 2) == [(0, 0), (1, 1), (2, 2)]
    assert type(store._decode(ns, key, store._rget(ns, key) or b"")["v"]) is int


# -- bounded series reads are snapshots ---------------------------------------------------


def _split_and_restore(writer: Store, lo: int) -> Callable[[], None]:
    """Odd points into the chunk of *lo* (splitting it), then deleted again one by one."""

    def action() -> None:
        w = writer.series("s")
        odd = range(lo + 1, lo + 2 * SMALL, 2)
        w.extend((t, -1) for t in odd)
        for t in odd:
            del w[t]

    return action


def test_range_while_a_write_splits_a_chunk(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(48))
    hook = Hook(monkeypatch, reader, "C:", _split_and_restore(writer, 32))
    assert ser.range() == _even(48)  # before: 4 never-deleted points were missing
    assert hook.fired == 1


def test_range_is_one_version_of_a_two_chunk_write(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(24))  # 0..14 | 16..30 | 32..46
    # Between the reads of chunk 0 and chunk 1, one atomic write changes a value in each;
    # neither the directory nor the chunk ids change.
    hook = Hook(
        monkeypatch,
        reader,
        "C:",
        lambda: writer.series("s").extend([(2, "new"), (20, "new")]),
        nth=2,
    )
    got = dict(ser.range())
    assert hook.fired == 1
    assert (got[2], got[20]) in [(2, 20), ("new", "new")]


def test_range_while_a_remove_deletes_a_chunk(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(40))
    hook = Hook(monkeypatch, reader, "C:", lambda: writer.series("s").remove(48, None), nth=2)
    got = ser.range()  # before: CorruptValueError "chunk ... is missing"
    assert hook.fired == 1
    assert got == [(t, t) for t in range(0, 48, 2)]


def test_point_reads_while_a_write_moves_the_point(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s", freq=2)
    ser.extend(_even(32))  # chunk 2 holds 32..46; the split moves 40..46 to a new chunk id
    for read, expected in [
        (lambda: ser[44], 44),
        (lambda: 44 in ser, True),
        (lambda: ser.missing(40, 46), []),
        (lambda: ser.iscomplete(40, 46), True),
        (lambda: ser.range(44, 44), [(44, 44)]),
        (lambda: ser.range(40, 46, freq=4), [(40, 40), (44, 44)]),
        (lambda: ser.range(40, n=2), [(40, 40), (42, 42)]),
    ]:
        with monkeypatch.context() as m:
            hook = Hook(m, reader, "C:", _split_and_restore(writer, 32))
            assert read() == expected
            assert hook.fired == 1


def test_missing_chunk_with_an_unchanged_head_is_damage(pair: tuple[Store, Store]) -> None:
    reader = pair[0]
    ser = reader.series("s")
    ser.extend(_even(24))
    reader._delete(ser._ns, ser._chunk_key(1))
    for read in (ser.range, lambda: list(ser.items()), lambda: list(ser), lambda: ser[20]):
        with pytest.raises(CorruptValueError, match="chunk 1 is missing"):
            read()


def test_a_read_outlasts_a_steady_stream_of_writes(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(24))
    # A write before every chunk read the reader makes without its lock: it can never
    # finish optimistically, so it must end up reading inside the exclusive section.
    hook = Hook(monkeypatch, reader, "C:", _split_and_restore(writer, 16), times=None)
    assert ser.range() == _even(24)
    # Every try without the lock failed (each fires once per chunk it reads); the last
    # try read every chunk under the lock.
    assert hook.fired >= _series._OPTIMISTIC_TRIES
    assert hook.locked_reads == len(ser._head()[0])


def test_a_lazy_iteration_outlasts_a_steady_stream_of_writes(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(24))
    hook = Hook(monkeypatch, reader, "C:", _split_and_restore(writer, 16), times=None)
    assert list(ser.items()) == _even(24)
    assert hook.locked_reads >= 1


def test_a_read_only_store_retries_without_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    with mappingstore.open(url) as writer:
        writer.series("s").extend(_even(24))
        with mappingstore.open(url, readonly=True) as reader:
            hook = Hook(
                monkeypatch,
                reader,
                "C:",
                _split_and_restore(writer, 16),
                times=_series._OPTIMISTIC_TRIES + 3,
            )
            assert reader.series("s").range() == _even(24)
            assert hook.fired == _series._OPTIMISTIC_TRIES + 3
            assert hook.locked_reads == 0


# -- lazy series iteration ----------------------------------------------------------------


def test_items_while_a_remove_deletes_a_chunk(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(40))
    Hook(monkeypatch, reader, "C:", lambda: writer.series("s").remove(48, None), nth=4)
    got = list(ser.items())  # before: CorruptValueError "chunk ... is missing"
    assert got == [(t, t) for t in range(0, 48, 2)]


def test_iteration_resumes_after_the_last_point_yielded(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    ser = reader.series("s")
    ser.extend(_even(40))

    def write() -> None:
        w = writer.series("s")
        w.extend((t, -1) for t in range(1, 12, 2))  # before the reader's position: unseen
        w.extend((t, -1) for t in range(49, 64, 2))  # ahead of it: splits chunk 3
        w.remove(64, 70)  # ahead of it: gone

    # The third chunk read comes after the points of chunks 0 and 1 were yielded.
    Hook(monkeypatch, reader, "C:", write, nth=3)
    for read in (lambda: [t for t, _ in ser.items()], lambda: list(ser)):
        got = read()
        assert got == sorted(set(got))  # ascending, each point once
        assert not {t for t in got if t < 16} - set(range(0, 16, 2))
        assert set(range(0, 80, 2)) - set(range(64, 71)) <= set(got)  # nothing lost
        ser.remove(1, 79)
        ser.remove(1, 1)
        ser.extend(_even(40))


# -- event logs ----------------------------------------------------------------------------


@pytest.fixture
def logs(pair: tuple[Store, Store]) -> tuple[_events.EventLog, Store]:
    reader, writer = pair
    log = reader.events("l")
    for i in range(1, 200):
        log.apply({"n": i}, i)
    return log, writer


@pytest.mark.parametrize(("prefix", "before"), [("C:", 10), ("D:", 100), ("C:", 149)])
def test_past_while_a_prune_rewrites_the_chunks(
    logs: tuple[_events.EventLog, Store],
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    before: int,
) -> None:
    log, writer = logs
    hook = Hook(monkeypatch, log._store, prefix, lambda: writer.events("l").prune(before))
    assert log.past(150, with_timestamp=True) == (150, {"n": 150})  # before: CorruptValueError
    assert hook.fired == 1
    assert log.past(150) == {"n": 150}


def test_events_and_len_while_a_prune_rewrites_the_chunks(
    logs: tuple[_events.EventLog, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    log, writer = logs
    with monkeypatch.context() as m:
        Hook(m, log._store, "C:", lambda: writer.events("l").prune(100), nth=2)
        got = log.events(140, 160)
    assert [(e.timestamp, e.value) for e in got] == [(t, t) for t in range(140, 161)]
    with monkeypatch.context() as m:
        Hook(m, log._store, "D:", lambda: writer.events("l").prune(120))
        assert len(log) in (100, 80)  # one version or the other, never an error
    with monkeypatch.context() as m:
        Hook(m, log._store, "C:", lambda: writer.events("l").prune(130), nth=1)
        assert [e.timestamp for e in log][:2] in ([120, 121], [130, 131])


def test_event_damage_is_still_reported(logs: tuple[_events.EventLog, Store]) -> None:
    log = logs[0]
    cid = log._head()["c"][2][1]  # type: ignore[index]
    log._store._delete(log._ns, log._chunk_key(cid))
    with pytest.raises(CorruptValueError, match=f"chunk {cid} is missing"):
        log.past(20)
    with pytest.raises(CorruptValueError, match=f"chunk {cid} is missing"):
        log.events()
    assert log.past(199) == {"n": 199}  # the tail: the head alone


def test_read_only_event_reads_finish_under_a_write_before_every_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process applies an event before every chunk and directory read the reader
    # makes (appends that flush new chunks along the way), so the head changes during
    # every try: a read that compared heads could never finish on a read-only store
    # (it cannot take the lock). Appends only add chunks; a head's chunks stay as they
    # were, so each try answers as of the head it read.
    url = f"sqlite:///{tmp_path}/e.db"
    with mappingstore.open(url) as writer:
        log = writer.events("l")
        for i in range(1, 200):
            log.apply({"n": i}, i)
        with mappingstore.open(url, readonly=True) as reader:
            ts = [10_000]

            def append() -> None:
                ts[0] += 1
                log.apply({"n": ts[0]}, ts[0])

            hook = Hook(monkeypatch, reader, "", append, times=None)
            r = reader.events("l")
            assert r.past(50) == {"n": 50}
            assert [e.timestamp for e in r.events(None, 9_999)] == list(range(1, 200))
            assert len(r) >= 199
            assert hook.fired > 3 and hook.locked_reads == 0


def test_an_event_inserted_in_the_past_during_a_read_restarts_it(
    pair: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    reader, writer = pair
    log = reader.events("l")
    for i in range(1, 200):
        log.apply({"n": i}, i * 10)
    before = log._head()["c"]  # type: ignore[index]
    # Before the reader's second chunk read, the first chunk gets a new event: the chunks
    # are rewritten under new ids, so the reader cannot mix versions.
    hook = Hook(monkeypatch, reader, "C:", lambda: writer.events("l").apply({"x": 1}, 5), nth=2)
    got = [(e.timestamp, e.item) for e in log.events(None, 2000)]
    assert hook.fired == 1
    assert got[0] == (5, "x") and len(got) == 200  # the version after the insert, whole
    after = log._head()["c"]  # type: ignore[index]
    assert not {c[1] for c in before} & {c[1] for c in after}
    assert [log._store._rget(log._ns, log._chunk_key(c[1])) for c in before] == [None] * len(before)


def test_a_re_created_log_reuses_no_chunk_id(pair: tuple[Store, Store]) -> None:
    store = pair[0]
    log = store.events("l")
    for i in range(1, 100):
        log.apply({"n": i}, i)
    first = {c[1] for c in log._head()["c"]}  # type: ignore[index]
    log.remove()
    for i in range(1, 100):
        log.apply({"n": i}, i)
    assert not first & {c[1] for c in log._head()["c"]}  # type: ignore[index]


def test_an_event_log_written_before_epochs_still_reads(pair: tuple[Store, Store]) -> None:
    # A directory record of the earlier format (the bare list) and a head without "r":
    # reads check the whole head again, as they did; the next write upgrades both.
    store = pair[0]
    log = store.events("l")
    for i in range(1, 200):
        log.apply({"n": i}, i)
    head = log._head()
    assert head is not None
    ns = log._ns
    stored = {k: v for k, v in head.items() if k not in ("c", "r")}
    store._put(ns, log._head_key, store._encode(ns, log._head_key, stored), None)
    store._put(ns, log._dir_key, store._encode(ns, log._dir_key, head["c"]), None)
    assert log.past(50) == {"n": 50} and len(log) == 199
    log.apply({"n": 0}, 1000)
    assert isinstance(store._decode(ns, log._dir_key, store._rget(ns, log._dir_key)), dict)
    assert log.past(50) == {"n": 50} and len(log) == 200


def test_every_event_write_changes_the_head(pair: tuple[Store, Store]) -> None:
    store = pair[0]
    log = store.events("l")
    for i in range(1, 30):
        log.apply({"x": i}, i * 10)
    before = store._rget(log._ns, log._head_key)
    log.apply({"x": 0}, 5)  # in the past, overwritten later: the state does not change
    assert log.current() == {"x": 29}
    assert store._rget(log._ns, log._head_key) != before


# -- argument checks ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [9.5, True, "x", [1], None.__class__])
def test_event_bounds_must_be_int(bad: Any) -> None:
    log = mappingstore.open("memory://").events("l")
    log.apply({"a": 1}, 10)
    with pytest.raises(KeyTypeError):
        log.events(bad)
    with pytest.raises(KeyTypeError):
        log.events(end=bad)
    assert log.events(10, 10) == [_events.Event(10, "a", "setitem", 1)]


@pytest.mark.parametrize("bad", [5, 2.5, object()])
def test_event_ops_must_be_ops(bad: Any) -> None:
    log = mappingstore.open("memory://").events("l")
    log.apply({"a": 1}, 10)
    with pytest.raises(OptionTypeError) as info:
        log.events(ops=bad)
    assert isinstance(info.value, TypeError)
    assert [e.op for e in log.events(ops=[operator.setitem, "add"])] == ["setitem"]


@pytest.mark.parametrize("bad", [5, None, 2.5])
def test_extend_needs_an_iterable(bad: Any) -> None:
    store = mappingstore.open("memory://")
    ser = store.series("s")
    with pytest.raises(OptionTypeError) as info:
        ser.extend(bad)
    assert isinstance(info.value, TypeError) and isinstance(info.value, MappingStoreError)
    assert store.series_names() == []


# -- real threads ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_series_reads_race_real_writers(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/r.db"
    reader = mappingstore.open(url)
    writer = reader if kind == "memory" else mappingstore.open(url)
    base = _even(200)  # never touched by the writer
    reader.series("r").extend(base)
    done = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            w = writer.series("r")
            rnd = random.Random(3)
            while not done.is_set():
                lo = rnd.randrange(0, 400, 2)
                odd = range(lo + 1, lo + 30, 2)
                w.extend((t, -t) for t in odd)  # splits chunks
                for t in odd:  # only the odd points it wrote
                    del w[t]
                w.extend((t, 0) for t in range(1000, 1040))  # whole chunks...
                w.remove(1000, None)  # ...deleted again
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    ser = reader.series("r")
    try:
        for _ in range(25):
            got = ser.range(None, 999)
            assert [p for p in got if p[0] % 2 == 0] == base
            items = list(ser.items())
            assert [p[0] for p in items] == sorted({p[0] for p in items})
            assert set(base) <= set(items)
            assert ser[200] == 200 and 398 in ser
    finally:
        done.set()
        thread.join()
        if writer is not reader:
            writer.close()
        reader.close()
    assert not failures


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_event_reads_race_real_prunes(kind: str, tmp_path: Path) -> None:
    url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/e.db"
    reader = mappingstore.open(url)
    writer = reader if kind == "memory" else mappingstore.open(url)
    log = reader.events("l")
    for i in range(1, 200):
        log.apply({"n": i}, i)
    failures: list[BaseException] = []
    done = threading.Event()

    def write() -> None:
        try:
            w = writer.events("l")
            for before in range(2, 150, 3):  # each rewrites every chunk under new ids
                w.prune(before)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        while not done.is_set():
            assert log.past(150) == {"n": 150}
            assert [(e.timestamp, e.value) for e in log.events(150, 152)] == [
                (150, 150),
                (151, 151),
                (152, 152),
            ]
            assert 50 <= len(log) <= 199
    finally:
        done.set()
        thread.join()
        if writer is not reader:
            writer.close()
        reader.close()
    assert not failures


def test_a_read_only_range_finishes_under_writes_it_can_never_outrun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write lands during every whole-range try (before every third chunk read), so no
    # try can validate, and a read-only store cannot take the lock: the read used to
    # retry forever. After the optimistic tries it walks chunk by chunk, each step
    # validated alone (a step reads one or two chunks), so it needs only short gaps.
    url = f"sqlite:///{tmp_path}/s.db"
    with mappingstore.open(url) as writer:
        writer.series("s").extend(_even(24))
        with mappingstore.open(url, readonly=True) as reader:
            write = _split_and_restore(writer, 16)
            calls = [0]

            def every_third() -> None:
                calls[0] += 1
                if calls[0] % 3 == 1:
                    write()

            hook = Hook(monkeypatch, reader, "C:", every_third, times=None)
            assert reader.series("s").range() == _even(24)
            assert hook.locked_reads == 0
            assert calls[0] > _series._OPTIMISTIC_TRIES


def test_update_takes_anything_with_keys_as_a_mapping() -> None:
    # As dict.update: an object with keys() is read as other[key] (a pandas Series
    # iterates its values, not its keys).
    class KeysOnly:
        def __init__(self, data: dict[int, Any]) -> None:
            self._data = data

        def keys(self) -> list[int]:
            return list(self._data)

        def __getitem__(self, t: int) -> Any:
            return self._data[t]

        def __iter__(self) -> Iterator[Any]:
            return iter(self._data.values())

    store = mappingstore.open("memory://")
    ser = store.series("s")
    ser.update(KeysOnly({100: (1, "x"), 200: (2, "y")}))
    assert list(ser.items()) == [(100, (1, "x")), (200, (2, "y"))]


def test_an_edge_record_whose_version_disagrees_never_hangs_a_read(tmp_path: Path) -> None:
    # Reads validate against the edge record's version; one that disagrees with its head
    # (damage, or a record restored from elsewhere) must fall back to the head, not be
    # taken for a concurrent write forever.
    url = f"sqlite:///{tmp_path}/s.db"
    with mappingstore.open(url) as store:
        ser = store.series("s")
        ser.extend(_even(24))
        edges = store._decode(ser._ns, ser._edge_key, store._rget(ser._ns, ser._edge_key))
        edges["v"] += 12345
        store._rput(ser._ns, ser._edge_key, store._encode(ser._ns, ser._edge_key, edges), None)
        assert ser.range() == _even(24)
        assert list(ser.items()) == _even(24)
        with mappingstore.open(url, readonly=True) as reader:
            assert reader.series("s").range(0, 10) == _even(24)[:6]
