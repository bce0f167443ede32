"""Adapters under concurrency: other writers, and readers of a batch being committed.

* ``Cached``: a read inside the store's exclusive section (a series or event-log head, a
  dot-name leaf check, ``delete_many``'s count, a dot-name ``pop``) goes to the store,
  never to a cache that another writer (another ``Cached`` object, another process) has
  made stale; time series and event logs are not cached at all.
* ``get_many`` through ``Cached`` and ``Tiered`` reads every key from one place in one
  ``_get_many`` (all from the cache / fastest tier, or all from the store / slowest tier),
  never a mix that shows half of a batch; ``Sharded`` reads each shard with one
  ``_get_many`` (consistent per shard, documented as not across shards).

The deterministic tests run the other writer at a chosen point through a hook in a
wrapped store; two stress tests (about a second each) cover the same ground with threads.
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import Cached, MemoryStore, Sharded, Store, Tiered
from mappingstore._store import Op
from mappingstore.errors import NameConflictError


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shared.db"


@pytest.fixture
def opened() -> Iterator[list[Store]]:
    stores: list[Store] = []
    yield stores
    for store in reversed(stores):
        store.close()


def _two_caches(url: str, opened: list[Store], **options: Any) -> tuple[Cached, Cached, Store]:
    """Two ``Cached(ttl=5)`` objects over one SQLite file (two processes, as the adapters
    guide recommends for a shared store), and the file opened plainly."""
    a = Cached(mappingstore.open(url, **options), maxsize=100, ttl=5, close_inner=True)
    b = Cached(mappingstore.open(url, **options), maxsize=100, ttl=5, close_inner=True)
    raw = mappingstore.open(url, **options)
    opened.extend([a, b, raw])
    return a, b, raw


# -- Cached: writes never built on a stale entry ----------------------------------------------


def test_cached_series_from_two_objects_loses_no_point(url: str, opened: list[Store]) -> None:
    a, b, raw = _two_caches(url, opened)
    a.series("t").extend([(1, 1.0)])
    b.series("t").extend([(2, 2.0)])
    a.series("t").extend([(3, 3.0)])  # A's cache must not hide point 2
    b.series("t").extend([(4, 4.0)])
    assert [t for t, _ in raw.series("t").range()] == [1, 2, 3, 4]
    assert [t for t, _ in a.series("t").range()] == [1, 2, 3, 4]


def test_cached_event_log_from_two_objects_loses_no_event(url: str, opened: list[Store]) -> None:
    a, b, raw = _two_caches(url, opened)
    a.events("log").apply({"n": 0}, timestamp=0)
    a.events("log").apply({"n": (operator.add, 1)}, timestamp=1)
    b.events("log").apply({"n": (operator.add, 1)}, timestamp=2)
    a.events("log").apply({"n": (operator.add, 1)}, timestamp=3)
    assert raw.events("log").current() == {"n": 3}
    assert [e[0] for e in raw.events("log").events()] == [0, 1, 2, 3]


def test_cached_series_read_never_mixes_cached_and_fresh_records(
    url: str, opened: list[Store]
) -> None:
    # A cached head with a chunk read from the store would pass the series' version check
    # (the head came from the same cache) and report a chunk another writer removed as
    # damage, or give points that never existed together.
    a, b, _ = _two_caches(url, opened)
    b.series("t").extend((t, t) for t in range(2000))  # two chunks
    assert len(a.series("t")) == 2000  # reads the head through A
    assert b.series("t").remove(1024) == 976  # drops the second chunk
    assert [t for t, _ in a.series("t").range(1000, 1100)] == list(range(1000, 1024))
    assert len(a.series("t").range()) == 1024


def test_cached_dot_names_leaf_check_reads_the_store(url: str, opened: list[Store]) -> None:
    a, b, raw = _two_caches(url, opened, dot_names=True)
    assert "a" not in a  # A caches "a" as missing
    b["a"] = 1  # a leaf, written by another object
    with pytest.raises(NameConflictError):
        a["a.b"] = 2  # would make "a" both a leaf and a branch
    assert list(raw.names()) == ["a"] and raw["a"] == 1
    with pytest.raises(NameConflictError):
        a.update({"a.c": 3})
    assert "a" not in a or a["a"] == 1  # whatever A's cache says, the store is whole
    assert raw.to_dict() == {"a": 1}


def test_cached_dot_names_pop_reads_the_store(url: str, opened: list[Store]) -> None:
    a, b, raw = _two_caches(url, opened, dot_names=True)
    a["k"] = "old"
    b["k"] = "new"
    assert a.pop("k") == "new"  # the value removed is the one returned
    assert "k" not in raw
    b["m"] = 1
    assert a.setdefault("m", 2) == 1  # A had never read "m": one winner


def test_cached_delete_many_counts_what_the_store_holds(url: str, opened: list[Store]) -> None:
    a, b, raw = _two_caches(url, opened)
    assert "k" not in a  # cached as missing
    b["k"] = 1
    assert a.delete_many(["k"]) == 1
    assert "k" not in raw


def test_cached_modify_in_a_batch_reads_the_store(url: str, opened: list[Store]) -> None:
    # The batch's commit checks the records its read-modify-writes read (BatchConflictError
    # if another writer changed one): those reads must not come from a stale entry, or
    # the batch would build on an old value (or fail with no other writer about).
    a, b, raw = _two_caches(url, opened)
    a["n"] = 0  # cached by A
    b["n"] = 5
    with a.batch():
        assert a.modify("n", lambda n: n + 1) == 6
        assert a.setdefault("n", 0) == 6
    assert raw["n"] == 6


def test_cached_read_inside_exclusive_refreshes_the_entry(opened: list[Store]) -> None:
    inner = MemoryStore(dot_names=True)
    cache = Cached(inner, maxsize=10)
    opened.extend([cache, inner])
    assert "x" not in cache
    inner["x"] = 1  # behind the cache's back
    with pytest.raises(NameConflictError):
        cache["x.y"] = 2  # the leaf check reads the store...
    assert cache["x"] == 1  # ...and the entry it read replaced the stale one


def test_cached_exclusive_flag_is_per_thread(opened: list[Store]) -> None:
    inner = MemoryStore()
    cache = Cached(inner, maxsize=10)
    opened.extend([cache, inner])
    cache["k"] = 1
    inner["k"] = 2  # behind the cache's back
    seen: list[Any] = []
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cache._exclusive():
            seen.append(cache["k"])  # this thread reads the store
            entered.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(5)
        assert cache.cache_info().currsize == 1
    finally:
        release.set()
        t.join(5)
    assert seen == [2]
    assert cache["k"] == 2  # the read in the exclusive section refreshed the entry
    assert cache._in_exclusive == 0


# -- get_many: never half of a batch -------------------------------------------------------------


class _Hooked(MemoryStore):
    """A memory store that runs *hook* once, the next time *method* is called."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks: dict[str, Callable[[], None]] = {}

    def _fire(self, method: str) -> None:
        hook = self.hooks.pop(method, None)
        if hook is not None:
            hook()

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        self._fire("get_many:before")
        out = super()._get_many(ns, keys)
        self._fire("get_many:after")
        return out

    def _apply(self, ops: Sequence[Op]) -> None:
        super()._apply(ops)
        self._fire("apply:after")


def _in_thread(fn: Callable[[], None]) -> Callable[[], None]:
    """A hook that runs *fn* in another thread (another writer) and waits for it."""

    def run() -> None:
        errors: list[BaseException] = []

        def target() -> None:
            try:
                fn()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        t = threading.Thread(target=target)
        t.start()
        t.join(10)
        assert not t.is_alive() and not errors, errors

    return run


def _whole(found: dict[str, Any], keys: Sequence[str]) -> bool:
    return set(found) == set(keys) and len(set(found.values())) == 1


def test_cached_get_many_never_mixes_a_hit_with_a_fresh_read(opened: list[Store]) -> None:
    inner = _Hooked()
    cache = Cached(inner, maxsize=10)
    opened.extend([cache, inner])
    cache.update(a=0, b=0)
    cache.invalidate("b")
    assert cache["a"] == 0  # "a" cached, "b" not
    # The batch commits through the same Cached object just before the store is read.
    inner.hooks["get_many:before"] = _in_thread(lambda: cache.update(a=1, b=1))
    found = cache.get_many(["a", "b"])
    assert _whole(found, ["a", "b"]), found
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": 1}


def test_cached_get_many_during_a_write_in_flight(opened: list[Store]) -> None:
    inner = _Hooked()
    cache = Cached(inner, maxsize=10)
    opened.extend([cache, inner])
    cache.update(a=0, b=0)
    assert cache.get_many(["a", "b"]) == {"a": 0, "b": 0}
    cache.invalidate("b")
    assert cache["a"] == 0
    committed, release = threading.Event(), threading.Event()

    def pause() -> None:
        committed.set()
        release.wait(10)

    # The store has the batch; the cache is not updated yet (the write is in flight).
    inner.hooks["apply:after"] = pause
    writer = threading.Thread(target=lambda: cache.update(a=1, b=1))
    writer.start()
    try:
        assert committed.wait(10)
        assert cache["b"] == 1  # this read fills "b" with the new record; "a" is old
        found = cache.get_many(["a", "b"])
        assert _whole(found, ["a", "b"]), found
    finally:
        release.set()
        writer.join(10)
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": 1}


def test_cached_get_many_with_ttl_reads_the_store(opened: list[Store]) -> None:
    inner = MemoryStore()
    cache = Cached(inner, maxsize=10, ttl=60)
    opened.extend([cache, inner])
    inner.update(a=0, b=0)
    assert cache["a"] == 0 and cache["b"] == 0  # both cached
    inner.update(a=1, b=1)  # another writer's batch
    assert cache["a"] == 0  # a single read may be stale (within ttl), as documented
    assert cache.get_many(["a", "b"]) == {"a": 1, "b": 1}  # several: one read of the store
    assert cache["a"] == 1  # the entries it proved stale are gone
    assert cache.get_many(["b"]) == {"b": 1}


def test_cached_get_many_all_hits_served_from_the_cache(opened: list[Store]) -> None:
    inner = _Hooked()
    cache = Cached(inner, maxsize=10)
    opened.extend([cache, inner])
    cache.update(a=0, b=0, c=0)
    calls: list[int] = []
    inner.hooks["get_many:before"] = lambda: calls.append(1)
    hits = cache.cache_info().hits
    assert cache.get_many(["a", "b", "c"]) == {"a": 0, "b": 0, "c": 0}
    assert calls == [] and cache.cache_info().hits == hits + 3
    cache.invalidate("c")
    assert cache.get_many(["a", "b", "c", "zz"]) == {"a": 0, "b": 0, "c": 0}
    assert calls == [1]  # one read of the store, for every key


def test_tiered_get_many_never_mixes_tiers(opened: list[Store]) -> None:
    fast, slow = _Hooked(), MemoryStore()
    tiers = Tiered([fast, slow])
    opened.extend([tiers, fast, slow])
    tiers.update(a=0, b=0)
    fast._delete("default", "b")  # "a" in the fast tier, "b" only in the slow one
    # The batch commits (every tier) between the fast tier's read and the slow tier's.
    fast.hooks["get_many:after"] = _in_thread(lambda: tiers.update(a=1, b=1))
    found = tiers.get_many(["a", "b"])
    assert _whole(found, ["a", "b"]), found
    assert tiers.get_many(["a", "b"]) == {"a": 1, "b": 1}


def test_tiered_get_many_promotes_what_the_fast_tier_lacks(opened: list[Store]) -> None:
    fast, slow = MemoryStore(), MemoryStore()
    tiers = Tiered([fast, slow])
    opened.extend([tiers, fast, slow])
    slow.update(a=1, b=2)
    tiers["c"] = 3
    slow.expire("b", 1000)
    assert tiers.get_many(["a", "b", "c", "zz"]) == {"a": 1, "b": 2, "c": 3}
    assert dict(fast.items()) == {"a": 1, "b": 2, "c": 3}
    assert fast.ttl("b") == pytest.approx(1000, abs=5)  # promoted with its expiry


def test_sharded_get_many_reads_each_shard_once(opened: list[Store]) -> None:
    shards = [_Hooked(), _Hooked()]
    sharded = Sharded(shards, placement=lambda key: int(key[0] == "y"))
    opened.append(sharded)
    opened.extend(shards)
    sharded.update({"x1": 0, "x2": 0, "y1": 0, "y2": 0})
    calls: list[int] = []
    for i, shard in enumerate(shards):
        shard.hooks["get_many:before"] = lambda i=i: calls.append(i)  # type: ignore[misc]
    assert sharded.get_many(["x1", "y1", "x2", "y2"]) == {"x1": 0, "y1": 0, "x2": 0, "y2": 0}
    assert sorted(calls) == [0, 1]
    # Keys on one shard are one _get_many of that shard: a batch that commits around it
    # is seen whole (the shard's own guarantee).
    shards[0].hooks["get_many:before"] = _in_thread(lambda: sharded.update(x1=1, x2=1))
    assert sharded.get_many(["x1", "x2"]) == {"x1": 1, "x2": 1}


def _stress_get_many(store: Store, seconds: float = 1.0) -> tuple[int, int]:
    """A writer thread commits batches of 8 keys, a second thread reads single keys
    (fills and promotions); the caller's thread counts torn ``get_many`` results."""
    keys = [f"k{i}" for i in range(8)]
    store.update(dict.fromkeys(keys, 0))
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            g = 0
            while time.monotonic() < stop:
                g += 1
                with store.batch():
                    for k in keys:
                        store[k] = g
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def single_reader() -> None:
        try:
            i = 0
            while time.monotonic() < stop:
                i += 1
                store.get(keys[i % len(keys)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=single_reader)]
    for t in threads:
        t.start()
    torn = reads = 0
    try:
        while time.monotonic() < stop:
            found = store.get_many(keys)
            reads += 1
            torn += not _whole(found, keys)
    finally:
        for t in threads:
            t.join(10)
    assert not errors, errors
    return torn, reads


def test_stress_cached_get_many_whole(tmp_path: Path, opened: list[Store]) -> None:
    # maxsize below the key count: get_many keeps meeting evicted keys (mixed hits).
    cache = Cached(mappingstore.open(f"sqlite:///{tmp_path}/c.db"), maxsize=6, close_inner=True)
    opened.append(cache)
    torn, reads = _stress_get_many(cache)
    assert reads and torn == 0


def test_stress_tiered_get_many_whole(tmp_path: Path, opened: list[Store]) -> None:
    tiers = Tiered(
        [mappingstore.open(f"sqlite:///{tmp_path}/{name}.db") for name in ("fast", "slow")],
        close_inner=True,
    )
    opened.append(tiers)
    torn, reads = _stress_get_many(tiers)
    assert reads and torn == 0


def test_stress_cached_series_from_two_objects(url: str, opened: list[Store]) -> None:
    a, b, raw = _two_caches(url, opened)
    errors: list[BaseException] = []
    per_thread = 150

    def extend(cache: Cached, base: int) -> None:
        try:
            for i in range(per_thread):
                cache.series("s").extend([(base + i, i)])
                cache.events("e").apply({"n": (operator.add, 1)})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    raw.events("e").apply({"n": 0})
    threads = [
        threading.Thread(target=extend, args=(a, 0)),
        threading.Thread(target=extend, args=(b, 10_000)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len(raw.series("s")) == 2 * per_thread
    assert raw.events("e").current() == {"n": 2 * per_thread}
