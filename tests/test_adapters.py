"""Adapters: each joins the conformance suite around memory stores, plus what each adds.

The conformance classes wrap *named* memory stores, so the same ``name`` reopens the
same data (``persistent = True``). One nested combination (a cache over a sharded set
of SQLite files) runs the suite too, across processes.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import (
    Cached,
    MemoryStore,
    Prefixed,
    ReadOnly,
    Sharded,
    SQLiteStore,
    Store,
    Tiered,
)
from mappingstore._codec import pack, wrap_plain
from mappingstore._store import Op, Record
from mappingstore.errors import (
    InvalidKeyError,
    InvalidOptionError,
    InvalidURLError,
    MissingKeyError,
    OptionTypeError,
    ReadOnlyError,
    StoreClosedError,
)
from mappingstore.testing import ENCRYPTION, FakeClock, StoreFactory, StoreTests
from mappingstore.testing._lifecycle import _child_increments
from mappingstore.testing._timeseries import EventTests, SeriesTests

Wrap = Callable[[list[Store]], Store]


def _memory_factory(wrap: Wrap, count: int = 1) -> Iterator[StoreFactory]:
    """A ``factory`` whose store *name* is *count* named memory stores, wrapped."""
    prefix = f"adapt-{uuid.uuid4().hex}"
    used: set[str] = set()

    def open_(name: str = "a", **options: Any) -> Store:
        inner: list[Store] = []
        try:
            for i in range(count):
                used.add(f"{prefix}/{name}/{i}")
                inner.append(MemoryStore(f"{prefix}/{name}/{i}", **options))
            return wrap(inner)
        except BaseException:
            for store in inner:
                store.close()
            raise

    yield open_
    for name in used:
        MemoryStore.drop(name)


def _cached_of(store: Store) -> Cached:
    assert isinstance(store, Cached)
    return store


class _CacheStaleness(StoreTests, SeriesTests, EventTests):
    """Replaces the suite's tests where a *second* store object writes and the first
    reads: a ``Cached`` sees other objects' writes only once its own entry is gone
    (documented). Each replacement checks that staleness, then the suite's expectation
    after :meth:`Cached.invalidate`."""

    def test_second_instance_sees_writes(self, open_store: Any) -> None:
        first = _cached_of(open_store("shared"))
        second = _cached_of(open_store("shared"))
        first["k"] = 1
        assert second["k"] == 1
        first["k"] = 2
        assert second["k"] == 1  # stale, as documented
        second.invalidate("k")
        assert second["k"] == 2
        del second["k"]
        assert first["k"] == 2  # first cached k=2 when it wrote it: stale again
        first.invalidate()
        assert "k" not in first
        with first.batch():
            first["b"] = 1
        assert second["b"] == 1  # never cached by second: read from the store

    def test_batch_invisible_to_others_until_commit(self, open_store: Any) -> None:
        store = _cached_of(open_store("bvis"))
        other = _cached_of(open_store("bvis"))
        with store.batch():
            store["k"] = 1
            assert "k" not in other
        assert "k" not in other  # the miss is cached: stale until invalidated
        other.invalidate("k")
        assert other["k"] == 1

    def test_processes_modify_exact_count(self, open_store: Any, factory: StoreFactory) -> None:
        if not self.multiprocess:
            pytest.skip("not shared between processes")
        store = _cached_of(open_store("procs"))
        store["counter"] = 0
        ctx = multiprocessing.get_context("fork")
        procs = [ctx.Process(target=_child_increments, args=(factory, "procs", 200)) for _ in "ab"]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        assert store["counter"] == 0  # cached before the children wrote
        store.invalidate("counter")
        assert store["counter"] == 400
        assert store.modify("counter", lambda v: v + 1) == 401  # modify is never stale


class TestCached(_CacheStaleness):
    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        # A tiny cache: the suite's stores hold more keys than this, so evictions happen.
        yield from _memory_factory(lambda s: Cached(s[0], maxsize=8, close_inner=True))


class TestTiered(StoreTests, SeriesTests, EventTests):
    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        yield from _memory_factory(lambda s: Tiered(s, close_inner=True), count=3)


class TestSharded(StoreTests, SeriesTests, EventTests):
    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        yield from _memory_factory(lambda s: Sharded(s, close_inner=True), count=3)


class TestPrefixed(StoreTests, SeriesTests, EventTests):
    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    #: Keys of the wrapped store that look like the prefix but are outside it.
    LOOKALIKES = ("pre", "pre:", "pre;x", "prE:x", "pr", "pre\x00", "pre.x", "xpre:x")

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        def wrap(stores: list[Store]) -> Store:
            inner = stores[0]
            for key in self.LOOKALIKES:  # planted raw: never visible through the adapter
                inner._put(inner.namespace, key, wrap_plain(pack("outside")), None)
            return Prefixed(inner, "pre:", close_inner=True)

        yield from _memory_factory(wrap)


class TestReadOnly(StoreTests, SeriesTests, EventTests):
    """``readonly=True`` in the suite opens a ReadOnly over a *writable* store, so the
    suite's read-only tests check the adapter's refusals, and its reads of data written
    by the suite through the plain store."""

    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        prefix = f"ro-{uuid.uuid4().hex}"
        used: set[str] = set()

        def open_(name: str = "a", **options: Any) -> Store:
            readonly = options.pop("readonly", False)
            used.add(f"{prefix}/{name}")
            inner = MemoryStore(f"{prefix}/{name}", **options)
            return ReadOnly(inner, close_inner=True) if readonly else inner

        yield open_
        for name in used:
            MemoryStore.drop(name)


class TestCachedShardedSQLite(_CacheStaleness):
    """Nesting: a cache over three SQLite shards, shared between processes."""

    persistent = True
    multiprocess = True
    fake_clock = True
    supports_encryption_without_password = False

    @pytest.fixture
    def factory(self, tmp_path: Path) -> StoreFactory:
        def open_(name: str = "a", **options: Any) -> Store:
            (tmp_path / name).mkdir(exist_ok=True)
            shards: list[Store] = []
            try:
                for i in range(3):
                    shards.append(SQLiteStore(tmp_path / name / f"shard{i}.db", **options))
                sharded = Sharded(shards, close_inner=True)
            except BaseException:
                for shard in shards:
                    shard.close()
                raise
            return Cached(sharded, maxsize=16, close_inner=True)

        return open_


# -- helpers for the adapter-specific tests ------------------------------------------------


class Spy(MemoryStore):
    """A private memory store that logs its raw writes (and can be told to fail them)."""

    def __init__(self, label: str, log: list[tuple[str, str, str]], **options: Any) -> None:
        super().__init__(**options)
        self.label, self.log, self.fail_writes = label, log, False

    def _check_fail(self) -> None:
        if self.fail_writes:
            raise OSError(f"{self.label}: simulated crash")

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        if not ns.startswith("\x00"):
            self._check_fail()
            self.log.append((self.label, "put", key))
        super()._put(ns, key, data, expires)

    def _delete(self, ns: str, key: str) -> bool:
        if not ns.startswith("\x00"):
            self._check_fail()
            self.log.append((self.label, "delete", key))
        return super()._delete(ns, key)

    def _apply(self, ops: Sequence[Op]) -> None:
        for op in ops:
            if not op.ns.startswith("\x00"):
                self._check_fail()
                self.log.append((self.label, "delete" if op.data is None else "put", op.key))
        with self._exclusive():
            for op in ops:
                if op.data is None:
                    super()._delete(op.ns, op.key)
                else:
                    super()._put(op.ns, op.key, op.data, op.expires)

    def _get_record(self, ns: str, key: str) -> Record | None:
        if not ns.startswith("\x00"):
            self.log.append((self.label, "get", key))
        return super()._get_record(ns, key)


def _raw(value: Any) -> bytes:
    return wrap_plain(pack(value))


# -- Cached ----------------------------------------------------------------------------------


def test_cached_hits_misses_and_write_through() -> None:
    log: list[tuple[str, str, str]] = []
    with Spy("inner", log) as inner, Cached(inner, maxsize=4) as cache:
        inner["k"] = 1
        log.clear()
        assert cache["k"] == 1 and cache["k"] == 1
        assert [e for e in log if e[1] == "get"] == [("inner", "get", "k")]  # one store read
        assert cache.cache_info() == (1, 1, 4, 1)
        inner._put("default", "k", _raw(99), None)  # behind the cache's back
        assert cache["k"] == 1  # served from the cache
        cache["k"] = 2  # write-through: the store first, then the cache
        assert inner["k"] == 2
        log.clear()
        assert cache["k"] == 2
        assert log == []  # the write updated the cache
        assert "nope" not in cache and "nope" not in cache  # a miss is cached too...
        assert [e for e in log if e[1] == "get"] == [("inner", "get", "nope")]
        cache["nope"] = 3  # ...and a write invalidates it
        assert cache["nope"] == 3
        del cache["nope"]
        assert "nope" not in inner and "nope" not in cache
        assert cache.modify("k", lambda v: v + 1) == 3 and inner["k"] == 3 and cache["k"] == 3
        assert cache.pop("k") == 3 and "k" not in cache and "k" not in inner


def test_cached_lru_eviction() -> None:
    with MemoryStore() as inner, Cached(inner, maxsize=2) as cache:
        inner.update(a=1, b=2, c=3)
        assert cache["a"] == 1 and cache["b"] == 2
        assert cache["a"] == 1  # a is now the most recently used
        assert cache["c"] == 3  # evicts b, the least recently used
        assert cache.cache_info().currsize == 2
        for key in "abc":
            inner._put("default", key, _raw(key * 2), None)
        assert cache["a"] == 1 and cache["c"] == 3  # still cached
        assert cache["b"] == "bb"  # was evicted: read again from the store


def test_cached_ttl_bounds_staleness() -> None:
    clock = FakeClock()
    with MemoryStore(clock=clock) as inner, Cached(inner, maxsize=10, ttl=30) as cache:
        other = inner  # stands for another process writing the same data
        other["k"] = "old"
        assert cache["k"] == "old"
        other["k"] = "new"
        clock.advance(29)
        assert cache["k"] == "old"  # trusted for ttl seconds, as documented
        clock.advance(1)
        assert cache["k"] == "new"
        assert "gone" not in cache
        other["gone"] = 1
        assert "gone" not in cache  # misses are trusted for ttl too
        clock.advance(30)
        assert cache["gone"] == 1


def test_cached_never_serves_an_expired_record() -> None:
    clock = FakeClock()
    with MemoryStore(clock=clock) as inner, Cached(inner) as cache:
        cache.set("k", 1, ttl=5)
        assert cache["k"] == 1 and cache.ttl("k") == 5
        clock.advance(5)
        assert "k" not in cache
        with pytest.raises(KeyError):
            cache["k"]
        assert len(cache) == 0


def _constant(value: Any, _old: Any) -> Any:
    return value


class Jittery(MemoryStore):
    """Yields to other threads around every raw call, so that races actually happen."""

    def _jitter(self) -> None:
        time.sleep(random.random() / 20_000)

    def _get_record(self, ns: str, key: str) -> Record | None:
        self._jitter()
        rec = super()._get_record(ns, key)
        self._jitter()
        return rec

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        self._jitter()
        super()._put(ns, key, data, expires)
        self._jitter()

    def _delete(self, ns: str, key: str) -> bool:
        self._jitter()
        existed = super()._delete(ns, key)
        self._jitter()
        return existed


def test_cached_concurrent_writers_leave_no_stale_entry() -> None:
    # Writers and readers race on a few keys; afterwards the cache must agree with the
    # store for every key (a fill or update that raced a write must not stick).
    with Jittery() as inner, Cached(inner, maxsize=64) as cache:
        keys = [f"k{i}" for i in range(6)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(8)

        def work(seed: int) -> None:
            rnd = random.Random(seed)
            try:
                barrier.wait()
                for n in range(600):
                    key = rnd.choice(keys)
                    action = rnd.random()
                    if action < 0.35:
                        cache[key] = (seed, n)
                    elif action < 0.45:
                        cache.pop(key, None)
                    elif action < 0.55:
                        cache.modify(key, lambda v: v, default=(seed, n))
                    elif action < 0.6:
                        cache.set_many({key: (seed, n), rnd.choice(keys): n})
                    else:
                        cache.get(key)
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for key in keys:
            assert cache.get(key, "missing") == inner.get(key, "missing"), key

        # Rounds of simultaneous writes and reads of one key, starting from an empty
        # cache entry: after every round the cache holds the store's record or nothing.
        rounds, mismatches = 200, []
        start, done = threading.Barrier(8), threading.Barrier(8)

        def hot(seed: int) -> None:
            try:
                for n in range(rounds):
                    if seed == 0:
                        cache.invalidate("hot")
                    start.wait()
                    if seed in (1, 2):
                        cache["hot"] = (seed, n)
                    elif seed in (3, 4):
                        cache.modify("hot", functools.partial(_constant, (seed, n)), default=None)
                    elif seed == 5:
                        cache.pop("hot", None)
                    else:
                        cache.get("hot")
                    done.wait()
                    if seed == 0 and cache.get("hot") != inner.get("hot"):
                        mismatches.append(n)
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=hot, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and mismatches == []


def test_cached_options_and_structure() -> None:
    with MemoryStore() as inner:
        with pytest.raises(InvalidOptionError):
            Cached(inner, maxsize=0)
        with pytest.raises(OptionTypeError):
            Cached(inner, maxsize=True)
        with pytest.raises(InvalidOptionError):
            Cached(inner, ttl=0)
        with pytest.raises(OptionTypeError):
            Cached(inner, ttl="10")  # type: ignore[arg-type]
        with pytest.raises(OptionTypeError):
            Cached({"a": 1})  # type: ignore[arg-type]
        cache = Cached(inner, 5, ttl=2.5)
        assert repr(cache) == f"<Cached maxsize=5 ttl=2.5 of {inner!r}>"
        cache.close()
        assert not inner.closed  # close_inner=False: closes nothing it did not open
        with pytest.raises(StoreClosedError):
            cache["k"]


def test_adapter_closed_when_its_store_is() -> None:
    inner = MemoryStore()
    cache = Cached(inner)
    inner.close()
    assert cache.closed
    with pytest.raises(StoreClosedError):
        cache["k"] = 1
    cache.close()


def test_close_inner_closes_every_wrapped_store() -> None:
    stores = [MemoryStore(), MemoryStore()]
    sharded = Sharded(stores, close_inner=True)
    sharded.close()
    assert all(s.closed for s in stores)


# -- Tiered ----------------------------------------------------------------------------------


def test_tiered_promotes_into_faster_tiers_only() -> None:
    clock = FakeClock()
    tiers = [MemoryStore(clock=clock) for _ in range(3)]
    with Tiered(tiers, close_inner=True) as store:
        expires = clock() + 100
        tiers[1]._put("default", "k", _raw("v"), expires)  # only in the middle tier
        assert store["k"] == "v"
        assert tiers[0]._get_record("default", "k") == (_raw("v"), expires)  # with expiry
        assert tiers[2]._get_record("default", "k") is None  # never into slower tiers
        assert store.ttl("k") == 100
        clock.advance(100)
        assert "k" not in store  # the promoted copy expires with the original


def test_tiered_miss_everywhere_is_a_plain_key_error() -> None:
    with Tiered([MemoryStore(), MemoryStore(), MemoryStore()], close_inner=True) as store:
        with pytest.raises(KeyError) as info:
            store["nope"]
        assert type(info.value) is MissingKeyError  # not an aggregate of three errors
        with pytest.raises(KeyError):
            del store["nope"]
        assert store.get("nope", 0) == 0


def test_tiered_write_order() -> None:
    log: list[tuple[str, str, str]] = []
    tiers: list[Store] = [Spy("fast", log), Spy("mid", log), Spy("slow", log)]
    with Tiered(tiers, close_inner=True) as store:
        store["k"] = 1
        # Invalidate the faster tiers, write the slowest, then fill from slow to fast.
        assert log == [
            ("fast", "delete", "k"),
            ("mid", "delete", "k"),
            ("slow", "put", "k"),
            ("mid", "put", "k"),
            ("fast", "put", "k"),
        ]
        log.clear()
        del store["k"]
        assert log == [("fast", "delete", "k"), ("mid", "delete", "k"), ("slow", "delete", "k")]
        log.clear()
        store.modify("n", lambda v: v + 1, default=0)
        assert log[-2:] == [("mid", "put", "n"), ("fast", "put", "n")]
        assert all(t["n"] == 1 for t in tiers)


def test_tiered_failed_slow_write_leaves_no_stale_cache() -> None:
    log: list[tuple[str, str, str]] = []
    fast, slow = Spy("fast", log), Spy("slow", log)
    with Tiered([fast, slow], close_inner=True) as store:
        store["k"] = "old"
        slow.fail_writes = True
        with pytest.raises(OSError):
            store["k"] = "new"
        assert "k" not in fast  # invalidated before the slow write failed
        slow.fail_writes = False
        assert store["k"] == "old"  # the authoritative value, promoted again
        assert fast["k"] == "old"


def test_tiered_listing_comes_from_the_slowest_tier() -> None:
    fast, slow = MemoryStore(), MemoryStore()
    with Tiered([fast, slow], close_inner=True) as store:
        store.update(a=1, b=2)
        fast._put("default", "only-fast", _raw(0), None)
        assert sorted(store) == ["a", "b"] and len(store) == 2
        store.clear()
        assert len(fast) == 0 and len(slow) == 0


def test_tiered_promotion_never_resurrects_an_old_value() -> None:
    # Readers promote "hot" from the slow tier while writers replace it: after every
    # round the fast tier holds the slow tier's record or nothing, never an older one.
    fast, slow = Jittery(), Jittery()
    with Tiered([fast, slow], close_inner=True) as store:
        rounds, errors, mismatches = 200, [], []
        start, done = threading.Barrier(8), threading.Barrier(8)

        def work(seed: int) -> None:
            try:
                for n in range(rounds):
                    if seed == 0:
                        slow["hot"] = ("seed", n)  # only in the slow tier: reads promote
                        fast.pop("hot", None)
                    start.wait()
                    if seed == 1:
                        store["hot"] = (seed, n)
                    elif seed == 2:
                        store.pop("hot", None)  # a promotion racing this must not undo it
                    else:
                        store.get("hot")
                    done.wait()
                    if seed == 0:
                        cached = fast._get_record("default", "hot")
                        if cached is not None and cached != slow._get_record("default", "hot"):
                            mismatches.append(n)
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and mismatches == []


def test_tiered_is_read_only_if_a_tier_is() -> None:
    name = f"ro-tier-{uuid.uuid4().hex}"
    try:
        with MemoryStore(name) as writable, MemoryStore(name, readonly=True) as frozen:
            writable["k"] = 1
            with Tiered([MemoryStore(), frozen], close_inner=False) as store:
                assert store.readonly and store["k"] == 1
                with pytest.raises(ReadOnlyError):
                    store["k"] = 2
    finally:
        MemoryStore.drop(name)


# -- Sharded ---------------------------------------------------------------------------------

KEYS = [f"user:{i}" for i in range(10_000)]


def _expected_owner(key: str, names: Sequence[str]) -> int:
    """Rendezvous hashing as documented, written independently of the adapter."""
    import hashlib

    def score(name: str) -> bytes:
        data = b"mappingstore-shard\x00" + name.encode() + b"\x00" + key.encode()
        return hashlib.blake2b(data, digest_size=8).digest()

    return max(range(len(names)), key=lambda i: score(names[i]))


def test_sharded_distribution_and_documented_hash() -> None:
    with Sharded([MemoryStore() for _ in range(4)], close_inner=True) as store:
        owners = [store.shard_of(k) for k in KEYS]
        for i in range(4):
            assert 0.22 < owners.count(i) / len(KEYS) < 0.28
        names = store.shard_names
        assert names == ("0", "1", "2", "3")
        assert all(owners[i] == _expected_owner(KEYS[i], names) for i in range(0, 10_000, 97))


def test_sharded_adding_a_shard_moves_about_one_in_n() -> None:
    four = Sharded([MemoryStore() for _ in range(4)], close_inner=True)
    five = Sharded([*four.stores, MemoryStore()], close_inner=True)
    moved = [k for k in KEYS if four.shard_of(k) != five.shard_of(k)]
    assert 0.17 < len(moved) / len(KEYS) < 0.23  # 1/5 expected (binomial sd 0.4%)
    assert all(five.shard_of(k) == 4 for k in moved)  # only to the new shard
    five.close()


def test_sharded_rebalance_after_adding_a_shard() -> None:
    old = [MemoryStore() for _ in range(4)]
    with Sharded(old) as four:
        four.update({k: i for i, k in enumerate(KEYS[:2000])})
        four.series("temps").extend([(1, 1.5), (2, 2.5)])
    with Sharded([*old, MemoryStore()], close_inner=True) as five:
        expected = sum(1 for k in KEYS[:2000] if five.shard_of(k) == 4)
        assert expected > 0
        assert sum(1 for k in five if k in five) == 2000 - expected  # moved: unreadable
        series_ns = "\x00ts\x00default"
        series_records = sum(s._count(series_ns) for s in old)
        series_moves = 0 if old[five._owner(series_ns, "")]._count(series_ns) else series_records
        assert five.rebalance() == expected + series_moves
        assert five.rebalance() == 0
        assert len(five) == 2000
        assert all(five[k] == i for i, k in enumerate(KEYS[:2000]))
        for i, shard in enumerate(five.stores):
            assert all(five.shard_of(k) == i for k in shard)
        assert five.series("temps").range() == [(1, 1.5), (2, 2.5)]


def test_sharded_placement_stable_across_processes() -> None:
    code = (
        "import mappingstore as m\n"
        "s = m.Sharded([m.MemoryStore() for _ in range(7)])\n"
        "print(','.join(str(s.shard_of(f'key-{i}')) for i in range(300)))\n"
    )
    runs = []
    for seed in ("1", "2"):  # a different str hash salt in each process
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        runs.append(out.stdout.strip())
    with Sharded([MemoryStore() for _ in range(7)]) as here:
        mine = ",".join(str(here.shard_of(f"key-{i}")) for i in range(300))
    assert runs == [mine, mine]


def test_sharded_custom_placement() -> None:
    shards = [MemoryStore() for _ in range(5)]
    with Sharded(shards, lambda key: int(key) * 5 // 100, close_inner=True) as store:
        store.update({str(i): i for i in range(100)})
        for i in range(100):
            assert str(i) in shards[i * 5 // 100]
        assert [len(s) for s in shards] == [20] * 5
        assert sum(len(s) for s in shards) == len(store) == 100
        shards[0]._put("default", "99", _raw("misplaced"), None)  # 99 belongs to shard 4
        assert store["99"] == 99  # a record on the wrong shard is never read
        with pytest.raises(InvalidOptionError):
            store["500"] = 1  # placement returned 25
    bad = Sharded([MemoryStore()], lambda key: "0", close_inner=True)  # type: ignore[arg-type,return-value]
    with pytest.raises(OptionTypeError):
        bad["k"] = 1
    bad.close()


def test_sharded_names_make_placement_independent_of_order() -> None:
    a, b, c = MemoryStore(), MemoryStore(), MemoryStore()
    one = Sharded([a, b, c], names=["east", "west", "north"])
    two = Sharded([c, a, b], names=["north", "east", "west"])
    for key in KEYS[:500]:
        assert one.stores[one.shard_of(key)] is two.stores[two.shard_of(key)]
    with pytest.raises(InvalidOptionError):
        Sharded([a, b], names=["x", "x"])
    with pytest.raises(InvalidOptionError):
        Sharded([a, a])


def test_sharded_batch_and_series_across_shards() -> None:
    shards = [MemoryStore() for _ in range(3)]
    with Sharded(shards, close_inner=True) as store:
        with store.batch():
            for k in KEYS[:30]:
                store[k] = k
        assert {len(s) > 0 for s in shards} == {True}  # the batch spanned every shard

        def aborted() -> None:
            with store.batch():
                store["x"] = 1
                raise RuntimeError("abort")

        with pytest.raises(RuntimeError):
            aborted()
        assert "x" not in store
        series = store.series("s")
        series.extend([(t, t * 2) for t in range(50)])
        holders = [i for i, s in enumerate(shards) if s._count("\x00ts\x00default")]
        assert len(holders) == 1  # a namespace's series records live on one shard
        assert series.range(10, 12) == [(10, 20), (11, 22), (12, 24)]


def test_sharded_encrypted_with_one_password(tmp_path: Path) -> None:
    def shards() -> list[Store]:
        return [SQLiteStore(tmp_path / f"s{i}.db", **ENCRYPTION) for i in range(3)]

    with Sharded(shards(), close_inner=True) as store:
        store.update({k: "secret" for k in KEYS[:20]})
        assert store.encrypted
    with Sharded(shards(), close_inner=True) as again:
        assert again == {k: "secret" for k in KEYS[:20]}
        again.change_password("another one", security="low")
    with Sharded(
        [
            SQLiteStore(tmp_path / f"s{i}.db", password="another one", security="low")
            for i in range(3)
        ],
        close_inner=True,
    ) as third:
        assert len(third) == 20 and third[KEYS[0]] == "secret"


# -- Prefixed and ReadOnly -----------------------------------------------------------------


def test_prefixed_look_alike_keys_stay_outside() -> None:
    with MemoryStore() as inner:
        for key in ("prefix", "prefixX", "prefi", "prefiX", "Prefix:x", "x"):
            inner[key] = "outside"
        view = Prefixed(inner, "prefix")
        assert list(view) == ["X"]  # "prefixX" is inside a prefix without separator
        view = Prefixed(inner, "prefix:")
        assert list(view) == [] and len(view) == 0 and not view
        view["a"] = 1
        assert inner["prefix:a"] == 1
        assert list(view) == ["a"] and view.to_dict() == {"a": 1}
        view.clear()
        assert sorted(inner) == sorted(["prefix", "prefixX", "prefi", "prefiX", "Prefix:x", "x"])
        assert view.namespaces() == []
        with pytest.raises(InvalidKeyError):
            Prefixed(inner, "")
        with pytest.raises(OptionTypeError):
            Prefixed(inner, b"p")  # type: ignore[arg-type]


def test_prefixed_encryption_binds_the_full_key() -> None:
    with MemoryStore(**ENCRYPTION) as inner:
        one, two = Prefixed(inner, "one:"), Prefixed(inner, "two:")
        one["k"] = "secret"
        assert inner["one:k"] == "secret"  # readable through the wrapped store
        two._put("default", "k", one._get_record("default", "k")[0], None)  # type: ignore[index]
        with pytest.raises(ValueError):  # IntegrityError: moved to another prefix
            two["k"]
        nested = Prefixed(Prefixed(inner, "a:"), "b:")
        nested["k"] = 1
        assert inner["a:b:k"] == 1 and Prefixed(inner, "a:b:")["k"] == 1


def test_readonly_over_a_writable_store() -> None:
    with MemoryStore() as inner:
        inner["k"] = 1
        view = ReadOnly(inner)
        assert view["k"] == 1
        calls: list[Callable[[], Any]] = [
            lambda: view.__setitem__("k", 2),
            lambda: view.__delitem__("k"),
            lambda: view.clear(),
            lambda: view.series("s").__setitem__(1, 1),
            lambda: view._put("default", "k", _raw(3), None),  # below the public API too
        ]
        for call in calls:
            with pytest.raises(ReadOnlyError):
                call()
        inner["k"] = 2
        assert view["k"] == 2  # sees the writes of the store it wraps
        assert view.readonly and not inner.readonly
        assert "readonly=true" in view.url


# -- URL composition -------------------------------------------------------------------------


def test_open_with_cache_and_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = mappingstore.open("sqlite:///a.db?cache=100&namespace=x&key_prefix=app:")
    assert isinstance(store, Cached) and store.maxsize == 100
    prefixed = store.stores[0]
    assert isinstance(prefixed, Prefixed) and prefixed.prefix == "app:"
    assert isinstance(prefixed.stores[0], SQLiteStore) and store.namespace == "x"
    store["k"] = 1
    store.close()
    assert prefixed.closed and prefixed.stores[0].closed  # it opened them: it closes them
    with mappingstore.open("sqlite:///a.db", namespace="x") as plain:
        assert isinstance(plain, SQLiteStore) and plain["app:k"] == 1
    with mappingstore.open("sqlite:///a.db?cache=5", cache=7, cache_ttl=2, namespace="x") as kw:
        assert isinstance(kw, Cached) and kw.maxsize == 7 and kw.ttl_seconds == 2
    with mappingstore.open("memory://?cache=0") as uncached:
        assert isinstance(uncached, MemoryStore)
    with mappingstore.open("memory://", key_prefix="p:") as only_prefix:
        assert isinstance(only_prefix, Prefixed)


def test_open_url_round_trip_and_errors() -> None:
    name = f"url-{uuid.uuid4().hex}"
    try:
        with mappingstore.open(f"memory://{name}?key_prefix=a%26b&cache=3&cache_ttl=1.5") as one:
            one["k"] = 1
            with mappingstore.open(one.url) as two:
                assert repr(two) == repr(one).replace(" closed", "")
                assert two["k"] == 1
        for bad in ("memory://?cache=x", "memory://?cache_ttl=5", "memory://?cache=-1"):
            with pytest.raises(InvalidOptionError):
                mappingstore.open(bad)
        with pytest.raises(InvalidURLError):
            mappingstore.open("memory://?cache=1&cache=2")
        with pytest.raises(InvalidURLError):
            mappingstore.open("memory://?caches=1")  # unknown options are still rejected
        with pytest.raises(InvalidURLError, match="prefix"):
            # "prefix" is left to the backend (Redis has a native one; memory has none)
            mappingstore.open("memory://?prefix=p:")
    finally:
        MemoryStore.drop(name)


def test_open_tiered_and_sharded(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path}/s{i}.db" for i in range(3)]
    with mappingstore.open_sharded(urls, namespace="n") as sharded:
        assert isinstance(sharded, Sharded) and sharded.namespace == "n"
        sharded.update({k: 1 for k in KEYS[:30]})
        assert all(len(s) > 0 for s in sharded.stores)
    assert all(s.closed for s in sharded.stores)
    with mappingstore.open_tiered(["memory://", f"sqlite:///{tmp_path}/slow.db"]) as tiered:
        assert isinstance(tiered, Tiered)
        tiered["k"] = 1
    with mappingstore.open(f"sqlite:///{tmp_path}/slow.db") as slow:
        assert slow["k"] == 1
    with pytest.raises(OptionTypeError):
        mappingstore.open_tiered("memory://")
    with pytest.raises(InvalidURLError):
        mappingstore.open_sharded(["memory://", "nope"])


def test_redis_native_prefix_cache_and_tiers() -> None:
    from tests.servers import REDIS_URL, unavailable

    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.ping()
    except Exception as exc:  # skipped on a laptop without Redis, a failure in CI
        unavailable(f"Redis at {REDIS_URL}", exc)
    name = f"adapt{uuid.uuid4().hex[:12]}"
    url = f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={name}"
    try:
        # "prefix" stays Redis's own option; key_prefix and cache wrap the store.
        with mappingstore.open(f"{url}&cache=10&key_prefix=app:") as store:
            assert isinstance(store, Cached)
            assert isinstance(store.stores[0], Prefixed)
            assert f"prefix={name}" in store.stores[0].stores[0].url
            store["k"] = {"v": 1}
        with mappingstore.open_tiered(["memory://", url]) as tiers:
            assert tiers["app:k"] == {"v": 1}
            assert "app:k" in tiers.stores[0]  # promoted from Redis into memory
            tiers.set("t", 1, ttl=60)
            assert 0 < (tiers.stores[0].ttl("t") or 0) <= 60
        with mappingstore.open(url) as plain:
            assert sorted(plain) == ["app:k", "t"]
    finally:
        names = list(client.scan_iter(match=f"{name}*".encode()))
        if names:
            client.delete(*names)
        client.close()
