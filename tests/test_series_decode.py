"""The bulk read path of time series: window decoding and the garbage-collector pause.

``Series.range`` decodes each chunk's slice with one msgpack call (``_codec.unpack_slice``) and
pauses CPython's cyclic collector while it does (``_GCPause``). These tests pin down that
the decode returns exactly what item-by-item decoding returns, that damage is still
reported, and that the pause always gives the collector back in the state it found it:
after errors, when the application disabled it, when pauses nest and when two threads
overlap. The behaviour of series as such is in the conformance suite
(``mappingstore/testing/_timeseries.py``).
"""

from __future__ import annotations

import datetime
import gc
import os
import random
import threading
import uuid
import warnings
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mappingstore
from mappingstore._codec import pack, unpack_slice
from mappingstore._series import CHUNK_SIZE, _GCPause
from mappingstore.errors import CorruptValueError


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    """Every test leaves the collector as it found it, and no pause open."""
    enabled = gc.isenabled()
    try:
        yield
        assert _GCPause._depth == 0
        assert gc.isenabled() == enabled
    finally:
        if enabled:
            gc.enable()
        else:  # pragma: no cover - the suite runs with the collector on
            gc.disable()


VALUES: list[Any] = [
    {"v": 1, "q": 0.5},
    (1, 2, (3,)),
    {1, 2},
    frozenset({"a"}),
    datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
    Decimal("1.5"),
    uuid.UUID(int=7),
    2**80,
    None,
    "x" * 300,
    b"y" * 70_000,  # bin 32: a long item to skip over
    [1, [2, [3]]],
    1.5,
    -7,
    True,
    {"nested": {"deep": [1, 2, {"x": (1,)}]}},
]


# -- unpack_slice ------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.sampled_from(VALUES), max_size=60),
    start=st.integers(0, 70),
    stop=st.integers(0, 70),
)
def test_window_equals_slice(items: list[Any], start: int, stop: int) -> None:
    packed = pack(items)
    start = min(start, len(items))  # callers never start past the end
    assert unpack_slice(packed, start, stop) == items[start:stop]


def test_window_whole_and_edges() -> None:
    items = [VALUES[i % len(VALUES)] for i in range(CHUNK_SIZE)]
    packed = pack(items)
    assert unpack_slice(packed, 0, CHUNK_SIZE) == items
    assert unpack_slice(packed, 0, CHUNK_SIZE + 5) == items
    assert unpack_slice(packed, CHUNK_SIZE - 1, CHUNK_SIZE) == items[-1:]
    assert unpack_slice(packed, 0, 1) == items[:1]
    assert unpack_slice(packed, 5, 5) == []
    assert unpack_slice(packed, CHUNK_SIZE, CHUNK_SIZE) == []
    assert unpack_slice(pack([]), 0, 3) == []


def test_window_damage_is_reported() -> None:
    items = [VALUES[i % len(VALUES)] for i in range(50)]
    packed = pack(items)
    rng = random.Random(5)
    for cut in range(0, len(packed), 37):
        truncated = packed[:cut]
        for start, stop in ((0, 50), (10, 20), (0, 5), (45, 50)):
            try:
                got: Any = unpack_slice(truncated, start, stop)
            except CorruptValueError:
                continue
            # Never a wrong value: damaged, or exactly the window (all before the cut).
            assert got == items[start:stop], (cut, start, stop)
    for bad in (b"", b"\xc1", pack({"a": 1}), pack(5), b"\xdd\xff\xff\xff\xff", b"\x93\xc1"):
        for start, stop in ((0, 1), (0, 3), (1, 2)):
            with pytest.raises(CorruptValueError):
                unpack_slice(bad, start, stop)
    flipped = bytearray(packed)
    for _ in range(200):
        flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        try:
            unpack_slice(bytes(flipped), 3, 40)
        except CorruptValueError:
            pass  # garbage in, CorruptValueError out (the CRC catches the rest)


# -- windows across chunks ---------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[mappingstore.Store]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/s.db"
    with mappingstore.open(url) as s:
        yield s


def test_windows_across_chunks(store: mappingstore.Store) -> None:
    series = store.series("w")
    points = [(t * 10, {"v": t, "q": t * 0.5}) for t in range(-1500, 3 * CHUNK_SIZE)]
    series.extend(points)
    rng = random.Random(7)
    ts = [t for t, _ in points]
    for _ in range(150):
        lo = rng.choice([None, *rng.sample(range(ts[0] - 50, ts[-1] + 50), 3)])
        hi = rng.choice([None, *rng.sample(range(ts[0] - 50, ts[-1] + 50), 3)])
        n = rng.choice([None, None, 0, 1, 5, 700, CHUNK_SIZE, 5000])
        want = [(t, v) for t, v in points if (lo is None or t >= lo) and (hi is None or t <= hi)]
        if lo is not None and hi is not None and lo > hi:
            want = []
        if n is not None:
            want = want[:n]
        assert series.range(lo, hi, n=n) == want, (lo, hi, n)
    assert list(series.items()) == points
    assert series.range(-15000, -14990) == points[:2]
    assert series[0] == {"v": 0, "q": 0.0}
    assert 10 * (3 * CHUNK_SIZE - 1) in series
    assert 5 not in series


def test_range_with_collector_disabled_by_the_application(store: mappingstore.Store) -> None:
    series = store.series("g")
    series.extend((t, [t]) for t in range(3000))
    gc.disable()
    try:
        assert series.range(100, 2200)[-1] == (2200, [2200])
        assert not gc.isenabled()  # never re-enabled behind the application's back
    finally:
        gc.enable()
    assert series.range(0, 3) == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]
    assert gc.isenabled()


def test_damaged_chunk_restores_collector(store: mappingstore.Store) -> None:
    series = store.series("d")
    series.extend((t, {"v": t}) for t in range(2 * CHUNK_SIZE))
    chunk_key = series._chunk_key(0)
    raw = store._rget(series._ns, chunk_key)
    assert raw is not None
    chunk = store._decode(series._ns, chunk_key, raw)
    chunk["v"] = chunk["v"][: len(chunk["v"]) // 2]  # values cut short, record still valid
    store._rput(series._ns, chunk_key, store._encode(series._ns, chunk_key, chunk), None)
    assert gc.isenabled()
    with pytest.raises(CorruptValueError):
        series.range(0, 2000)
    with pytest.raises(CorruptValueError):
        list(series.items())
    assert gc.isenabled()
    assert _GCPause._depth == 0


# -- _GCPause ----------------------------------------------------------------------------


def test_pause_restores_and_nests() -> None:
    outer, inner = _GCPause(), _GCPause()
    outer.start()
    assert not gc.isenabled()
    inner.start()
    inner.stop()
    assert not gc.isenabled()  # the outer pause is still open
    outer.stop()
    assert gc.isenabled()
    outer.stop()  # a second stop is a no-op
    assert gc.isenabled() and _GCPause._depth == 0


def test_pause_never_enables_a_disabled_collector() -> None:
    gc.disable()
    try:
        pause = _GCPause()
        pause.start()
        pause.stop()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_stop_without_start_is_a_no_op() -> None:
    # What the finally clause sees when start() was interrupted before it counted.
    _GCPause().stop()
    assert gc.isenabled() and _GCPause._depth == 0


def test_application_enable_during_pause_is_kept() -> None:
    gc.disable()
    try:
        pause = _GCPause()
        pause.start()
        gc.enable()  # the application changes its mind meanwhile
        pause.stop()
        assert gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("first_to_stop", ["a", "b"])
def test_two_threads_overlapping(first_to_stop: str) -> None:
    """A starts, B starts, one stops (still paused for the other), the other stops
    (collector back on): it ends enabled and the count at zero, whichever stops first."""
    started = {name: threading.Event() for name in "ab"}
    go_stop = {name: threading.Event() for name in "ab"}
    stopped = {name: threading.Event() for name in "ab"}
    states: dict[str, bool] = {}

    def worker(name: str) -> None:
        pause = _GCPause()
        try:
            pause.start()
            started[name].set()
            go_stop[name].wait(10)
        finally:
            pause.stop()
            states[name] = gc.isenabled()
            stopped[name].set()

    threads = {name: threading.Thread(target=worker, args=(name,)) for name in "ab"}
    threads["a"].start()
    assert started["a"].wait(10)
    threads["b"].start()
    assert started["b"].wait(10)
    assert not gc.isenabled()
    last = "b" if first_to_stop == "a" else "a"
    go_stop[first_to_stop].set()
    assert stopped[first_to_stop].wait(10)
    assert states[first_to_stop] is False  # the other pause is still open
    go_stop[last].set()
    for thread in threads.values():
        thread.join(10)
    assert states[last] is True
    assert gc.isenabled() and _GCPause._depth == 0


def test_many_threads_reading() -> None:
    with mappingstore.open("memory://") as store:
        series = store.series("t")
        series.extend((t, {"v": t}) for t in range(4 * CHUNK_SIZE))
        errors: list[BaseException] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(60):
                    lo = rng.randrange(4 * CHUNK_SIZE)
                    got = series.range(lo, lo + 1500)
                    assert got == [(t, {"v": t}) for t in range(lo, min(lo + 1501, 4 * CHUNK_SIZE))]
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors
        assert gc.isenabled() and _GCPause._depth == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_during_another_threads_pause() -> None:
    """The child of a fork taken while another thread decodes has the collector back."""
    started, release = threading.Event(), threading.Event()

    def decoding() -> None:
        pause = _GCPause()
        try:
            pause.start()
            started.set()
            release.wait(10)
        finally:
            pause.stop()

    thread = threading.Thread(target=decoding)
    thread.start()
    try:
        assert started.wait(10)
        assert not gc.isenabled()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads running
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit code
            ok = gc.isenabled() and _GCPause._depth == 0
            pause = _GCPause()
            pause.start()
            ok = ok and not gc.isenabled()
            pause.stop()
            os._exit(0 if ok and gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        thread.join(10)
    assert gc.isenabled()


@pytest.mark.parametrize(
    "edges",
    [
        {"f": [1, "a"]},  # no last point
        {"f": [1, "a"], "z": [2]},  # a point without its value
        {"f": ["1", "a"], "z": [2, "b"]},  # a timestamp that is not an int
        {"f": [1, "a"], "z": [2.0, "b"]},
        {"f": [1, "a", 3], "z": [2, "b"]},
        {"f": 1, "z": 2},  # not points at all
        [1, 2],  # not a map
    ],
)
def test_a_damaged_edge_record_is_reported(edges: Any) -> None:
    # first() and last() read only the series' edge record: a record of the wrong shape
    # (sound checksum, so only its content is wrong) raises, never a wrong point.
    store = mappingstore.open("memory://")
    series = store.series("s")
    series.extend([(1, "a"), (2, "b")])
    assert (series.first(), series.last()) == ((1, "a"), (2, "b"))
    key = series._edge_key
    store._put(series._ns, key, store._encode(series._ns, key, edges), None)
    with pytest.raises(CorruptValueError, match="edge record"):
        series.first()
    with pytest.raises(CorruptValueError, match="edge record"):
        series.last()
