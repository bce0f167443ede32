"""mappingstore.aio: the async API, run through the same scenarios on every backend.

Plain ``asyncio.run`` inside sync test functions (no pytest-asyncio). Redis and
PostgreSQL use the real test servers (``tests/servers.py``); each test gets its own Redis
key prefix / PostgreSQL table, removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import operator
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import MemoryStore, aio
from mappingstore.aio import AsyncStore
from mappingstore.errors import (
    MissingKeyError,
    OptionTypeError,
    ReadOnlyError,
    StoreClosedError,
    UnknownSchemeError,
    WrongPasswordError,
)
from tests.servers import POSTGRES_URL, REDIS_URL, drop_redis_keys, redis_client, unavailable

BACKENDS = ["memory", "sqlite", "dir", "ini", "redis", "postgres"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """Opens async stores of one backend: the same *name* reopens the same storage."""

    def __init__(self, kind: str, url: Callable[[str], str], options: Callable[[str], Any]):
        self.kind = kind
        self._url = url
        self._options = options
        #: Expiry follows an injected clock= (False: the server's own clock, Redis).
        self.fake_clock = kind != "redis"

    def url(self, name: str = "a") -> str:
        return self._url(name)

    def options(self, name: str = "a") -> dict[str, Any]:
        return dict(self._options(name))

    async def open(self, name: str = "a", **options: Any) -> AsyncStore:
        store = await aio.open(self.url(name), **{**self.options(name), **options})
        # Redis and PostgreSQL run the hot operations natively (tests/test_aio_native.py
        # proves the sync backend is then not called); dot names stay on the thread.
        expected = {"redis": "redis", "postgres": "postgresql"}.get(self.kind)
        assert store.native == (None if options.get("dot_names") else expected)
        return store

    def open_sync(self, name: str = "a", **options: Any) -> mappingstore.Store:
        return mappingstore.open(self.url(name), **{**self.options(name), **options})


def _redis_cleanup(run: str) -> Iterator[None]:
    client = redis_client()
    try:
        yield
    finally:
        drop_redis_keys(client, run)
        client.close()


def _postgres_cleanup(tables: list[str]) -> Iterator[None]:
    psycopg = pytest.importorskip("psycopg")
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable("PostgreSQL", exc)
    with conn:
        try:
            yield
        finally:
            for table in tables:
                conn.execute(
                    psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table))
                )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind: str = request.param
    run = f"aio{uuid.uuid4().hex[:12]}"
    if kind == "memory":
        used: set[str] = set()

        def memory_url(name: str) -> str:
            used.add(f"{run}-{name}")
            return f"memory://{run}-{name}"

        yield Backend(kind, memory_url, lambda name: {})
        for name in used:
            MemoryStore.drop(name)
    elif kind == "sqlite":
        yield Backend(kind, lambda name: f"sqlite:///{tmp_path}/{name}.db", lambda name: {})
    elif kind == "dir":
        yield Backend(kind, lambda name: f"dir:///{tmp_path}/{name}?durable=false", lambda n: {})
    elif kind == "ini":
        yield Backend(
            kind, lambda name: f"ini:///{tmp_path}/{name}.ini?durable=false", lambda n: {}
        )
    elif kind == "redis":
        cleanup = _redis_cleanup(run)
        next(cleanup)
        yield Backend(kind, lambda name: REDIS_URL, lambda name: {"prefix": f"{run}-{name}"})
        with contextlib.suppress(StopIteration):
            next(cleanup)
    else:
        tables: list[str] = []

        def pg_options(name: str) -> dict[str, Any]:
            table = f"{run}_{name}"
            if table not in tables:
                tables.append(table)
            return {"table": table}

        cleanup = _postgres_cleanup(tables)
        next(cleanup)
        yield Backend(kind, lambda name: POSTGRES_URL, pg_options)
        with contextlib.suppress(StopIteration):
            next(cleanup)


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


async def collect(it: Any) -> list[Any]:
    return [x async for x in it]


# -- the mapping ----------------------------------------------------------------------------


def test_mapping_operations(backend: Backend) -> None:
    async def main() -> None:
        async with await backend.open() as s:
            assert await s.len() == 0
            assert await s.get("k") is None and await s.get("k", 7) == 7
            with pytest.raises(MissingKeyError):
                await s.getitem("k")
            with pytest.raises(KeyError):
                await s.delete("k")
            await s.set("k", {"a": [1, 2]})
            assert await s.getitem("k") == {"a": [1, 2]}
            assert await s.contains("k") and not await s.contains("other")
            await s.set("k", b"\x00bytes")
            assert await s.get("k") == b"\x00bytes"
            await s.delete("k")
            assert not await s.contains("k")

            await s.set_many({f"key{i:02d}": i for i in range(30)})
            assert await s.len() == 30
            # A chunk size that does not divide the count: the last chunk is short.
            assert sorted(await collect(s.keys(chunk_size=7))) == [f"key{i:02d}" for i in range(30)]
            assert sorted(await collect(s)) == sorted(await collect(s.keys()))
            assert sorted(await collect(s.items(chunk_size=4))) == [
                (f"key{i:02d}", i) for i in range(30)
            ]
            assert sorted(await collect(s.values(chunk_size=30))) == list(range(30))
            assert sorted(await collect(s.names("key0"))) == [f"key0{i}" for i in range(10)]
            assert await s.get_many(["key01", "nope", "key02"]) == {"key01": 1, "key02": 2}
            assert await s.delete_many(["key01", "key02", "nope"]) == 2
            assert await s.pop("key03") == 3
            assert await s.pop("key03", "gone") == "gone"
            with pytest.raises(KeyError):
                await s.pop("key03")
            assert await s.setdefault("key04", "new") == 4
            assert await s.setdefault("fresh", "new") == "new"
            await s.update({"u1": 1}, u2=2)
            assert await s.get_many(["u1", "u2"]) == {"u1": 1, "u2": 2}
            assert (await s.to_dict())["u2"] == 2
            assert await s.namespaces() == ["default"]
            info = await s.info()
            assert info["namespace"] == "default" and "password" not in str(info)

            count = await s.len()
            assert count == 30 - 2 - 1 + 3
            exported = await s.export_json()
            assert isinstance(exported, str)
            buffer = io.StringIO()
            assert await s.export_json(buffer) is None
            assert buffer.getvalue() == exported
            await s.clear()
            assert await s.len() == 0
            assert await s.import_json(exported) == count
            assert await s.getitem("fresh") == "new"
            key, value = await s.popitem()
            assert not await s.contains(key) and value is not None
            with pytest.raises(OptionTypeError):
                await collect(s.keys(chunk_size=0))

    run(main())


def test_data_is_shared_with_the_sync_api(backend: Backend) -> None:
    async def main() -> None:
        async with await backend.open(namespace="ns1") as s:
            await s.set("a", (1, 2))
            other = backend.open_sync(namespace="ns1")
            try:
                assert other["a"] == (1, 2)  # the same codec: a tuple stays a tuple
                other["b"] = 2
            finally:
                other.close()
            assert await s.getitem("b") == 2
            assert s.namespace == "ns1"
            assert "ns1" in await s.namespaces()

    run(main())


def test_modify_runs_fn_in_the_worker_thread(backend: Backend) -> None:
    threads: list[threading.Thread] = []

    def add_one(v: int) -> int:
        threads.append(threading.current_thread())
        return v + 1

    async def main() -> None:
        async with await backend.open() as s:
            with pytest.raises(MissingKeyError):
                await s.modify("n", add_one)
            assert await s.modify("n", add_one, default=0) == 1
            assert await s.modify("n", add_one) == 2
            assert await s.getitem("n") == 2

            def boom(v: int) -> int:
                raise ValueError("no")

            with pytest.raises(ValueError, match="no"):
                await s.modify("n", boom)
            assert await s.getitem("n") == 2  # fn raised: nothing written

    run(main())
    assert threads and all(t is not threading.main_thread() for t in threads)


# -- batches --------------------------------------------------------------------------------


def test_batch_commits_together_or_not_at_all(backend: Backend) -> None:
    async def main() -> None:
        async with await backend.open() as s, await backend.open() as observer:
            async with s.batch() as same:
                assert same is s
                await s.set("x", 1)
                await s.set_many({"y": 2, "z": 3})
                assert await s.getitem("x") == 1  # this task sees its buffered writes
                assert not await observer.contains("x")  # others do not, until commit
                async with s.batch():  # nested: joins the outer batch
                    await s.delete("z")
                assert not await s.contains("z")
            assert await observer.get_many(["x", "y", "z"]) == {"x": 1, "y": 2}

            async def failing_batch() -> None:
                async with s.batch():
                    await s.set("x", 100)
                    await s.delete("y")
                    raise RuntimeError("rollback")

            with pytest.raises(RuntimeError, match="rollback"):
                await failing_batch()
            assert await s.get_many(["x", "y"]) == {"x": 1, "y": 2}

            # A batch of a read-only store cannot start.
            async with await backend.open(readonly=True) as ro:
                with pytest.raises(ReadOnlyError):
                    async with ro.batch():
                        pass

    run(main())


def test_batch_does_not_capture_other_writers(backend: Backend) -> None:
    async def main() -> None:
        async with await backend.open() as s, await backend.open() as other:
            inside = asyncio.Event()
            done = asyncio.Event()

            async def batch_then_fail() -> None:
                with contextlib.suppress(RuntimeError):
                    async with s.batch():
                        await s.set("mine", 1)
                        inside.set()
                        await done.wait()
                        raise RuntimeError("discard")

            async def writers() -> None:
                await inside.wait()
                # Another task of the SAME AsyncStore: not part of the batch, and it does
                # not wait for the batch to end either.
                await s.set("same-store", 1)
                assert not await s.contains("mine")
                await other.set("other-store", 1)
                sync = s.sync
                await asyncio.to_thread(sync.set, "sync-store", 1)
                done.set()

            await asyncio.gather(batch_then_fail(), writers())
            assert await s.get_many(["mine", "same-store", "other-store", "sync-store"]) == {
                "same-store": 1,
                "other-store": 1,
                "sync-store": 1,
            }

    run(main())


def test_the_event_loop_runs_while_the_worker_blocks(tmp_path: Path) -> None:
    # The worker thread waits for an event that only a coroutine of the loop sets: if any
    # call blocked the loop, the wait would time out and the test fail (no timing limits).
    async def main() -> None:
        async with await aio.open(f"sqlite:///{tmp_path}/loop.db") as s:
            released = threading.Event()
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while not released.is_set():
                    ticks += 1
                    if ticks == 3:
                        released.set()
                    await asyncio.sleep(0.001)

            def slow_increment(v: int) -> int:
                if not released.wait(timeout=30):
                    raise AssertionError("the event loop was blocked")
                return v + 1

            async with s.batch():
                await s.set_many({f"k{i}": i for i in range(500)})
                result, _ = await asyncio.gather(s.modify("n", slow_increment, default=0), ticker())
            assert result == 1 and ticks >= 3
            assert await s.len() == 501

    run(main())


# -- TTL ------------------------------------------------------------------------------------


def test_ttl_and_expiry(backend: Backend) -> None:
    async def main() -> None:
        clock = FakeClock()
        options: dict[str, Any] = {"clock": clock} if backend.fake_clock else {}
        async with await backend.open(**options) as s:
            await s.set("forever", 1)
            assert await s.ttl("forever") is None
            with pytest.raises(KeyError):
                await s.ttl("missing")
            # 1 s TTLs: a stalled CI machine must not expire them before they are checked.
            await s.set("brief", 1, ttl=1)
            remaining = await s.ttl("brief")
            assert remaining is not None and 0 < remaining <= 1 + 1e-6
            await s.expire("forever", 1)
            assert await s.ttl("forever") is not None
            await s.expire("forever", None)
            assert await s.ttl("forever") is None
            if backend.fake_clock:
                clock.now += 2
            else:
                await asyncio.sleep(1.2)
            assert not await s.contains("brief")
            assert await s.get("brief") is None
            assert await s.getitem("forever") == 1
            assert await s.purge_expired() >= 0
            assert await collect(s.keys()) == ["forever"]

    run(main())


# -- errors, encryption, lifecycle ----------------------------------------------------------


def test_errors_propagate_unchanged(backend: Backend) -> None:
    async def main() -> None:
        async with await backend.open(password="pw", security="low") as s:
            await s.set("secret", "v")
            assert s.encrypted
            assert (await s.info())["encryption"]["security"] == "low"
        with pytest.raises(WrongPasswordError):
            await backend.open(password="wrong", security="low")
        async with await backend.open(password="pw", security="low") as s:
            assert await s.getitem("secret") == "v"
            await s.change_password("pw2", security="low")
        async with await backend.open(password="pw2", security="low") as s:
            assert await s.getitem("secret") == "v"
        async with await backend.open(readonly=True, password="pw2", security="low") as ro:
            assert ro.readonly and await ro.getitem("secret") == "v"
            with pytest.raises(ReadOnlyError):
                await ro.set("k", 1)
            with pytest.raises(ReadOnlyError):
                await ro.delete("secret")
            with pytest.raises(ReadOnlyError):
                await ro.modify("secret", str.upper)

    run(main())


def test_close_is_idempotent_and_final(backend: Backend) -> None:
    async def main() -> None:
        s = await backend.open()
        await s.set("k", 1)
        pending = [asyncio.ensure_future(s.set(f"p{i}", i)) for i in range(5)]
        await asyncio.sleep(0)  # the tasks start: each call is now queued in the worker
        await s.close()
        await asyncio.gather(*pending)  # calls queued before close() completed first
        assert s.closed and s.sync.closed
        await s.close()
        with pytest.raises(StoreClosedError):
            await s.get("k")
        with pytest.raises(StoreClosedError):
            await collect(s.keys())
        with pytest.raises(StoreClosedError):
            s.series("x")
        with pytest.raises(StoreClosedError):
            async with s.batch():
                pass
        async with await backend.open() as again:
            assert await again.get_many(["k", "p4"]) == {"k": 1, "p4": 4}
        assert again.closed

    run(main())


def test_open_errors_and_wrapping() -> None:
    async def main() -> None:
        with pytest.raises(UnknownSchemeError):
            await aio.open("nosuchscheme://x")
        with pytest.raises(OptionTypeError):
            AsyncStore({})  # type: ignore[arg-type]
        sync = mappingstore.open("memory://")
        wrapped = AsyncStore(sync)
        await wrapped.set("k", 1)
        assert sync["k"] == 1 and "AsyncStore" in repr(wrapped)
        await wrapped.close()
        assert sync.closed

    run(main())


def test_one_worker_thread_per_store_in_call_order() -> None:
    async def main() -> None:
        async with await aio.open("memory://") as s:
            seen: list[tuple[int, str]] = []

            def record(i: int) -> Callable[[Any], Any]:
                def fn(v: Any) -> Any:
                    seen.append((i, threading.current_thread().name))
                    return i

                return fn

            await asyncio.gather(*(s.modify("k", record(i), default=0) for i in range(20)))
            assert [i for i, _ in seen] == list(range(20))
            assert len({name for _, name in seen}) == 1
            assert await s.getitem("k") == 19

    run(main())


def test_keys_are_fetched_in_chunks() -> None:
    pulled = 0

    class Counting(MemoryStore):
        def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
            nonlocal pulled
            for key in super()._iter_keys(ns, prefix):
                pulled += 1
                yield key

    async def main() -> None:
        store = Counting()
        store.update({f"k{i}": i for i in range(1000)})
        async with AsyncStore(store) as s:
            it = s.keys(chunk_size=10)
            first = await it.__anext__()
            assert first.startswith("k") and pulled == 10
            rest = [k async for k in it]
            assert len(rest) == 999 and pulled == 1000

    run(main())


# -- series and event logs ------------------------------------------------------------------


def test_series_and_event_logs(backend: Backend) -> None:
    async def main() -> None:
        async with await backend.open() as s:
            prices = s.series("prices", freq=10)
            assert prices.name == "prices" and prices.freq == 10
            await prices.extend([(130, 1.3), (100, 1.0), (120, 1.2)])
            await prices.setitem(110, 1.1)
            assert await prices.len() == 4
            assert await prices.getitem(110) == 1.1
            assert await prices.get(999) is None and not await prices.contains(999)
            with pytest.raises(KeyError):
                await prices.getitem(999)
            assert await prices.first() == (100, 1.0)
            assert await prices.last() == (130, 1.3)
            assert await prices.range(105, 125) == [(110, 1.1), (120, 1.2)]
            assert await prices.missing(100, 150) == [140, 150]
            assert not await prices.iscomplete(100, 150)
            assert await collect(prices.items(chunk_size=3)) == [
                (100, 1.0),
                (110, 1.1),
                (120, 1.2),
                (130, 1.3),
            ]
            await prices.delete(110)
            with pytest.raises(KeyError):
                await prices.delete(110)
            assert await s.series_names() == ["prices"]
            assert await prices.remove(125) == 1
            assert await prices.remove() == 2
            assert await s.series_names() == []

            log = s.events("door")
            assert await log.current() == {}
            await log.apply({"open": True, "count": 1}, timestamp=10)
            state = await log.apply({"count": (operator.add, 2)}, timestamp=20)
            assert state == {"open": True, "count": 3}
            assert await log.current(with_timestamp=True) == (20, {"open": True, "count": 3})
            assert await log.past(15) == {"open": True, "count": 1}
            events = await log.events()
            assert [(e.timestamp, e.item, e.op) for e in events] == [
                (10, "open", "setitem"),
                (10, "count", "setitem"),
                (20, "count", "add"),
            ]
            assert await log.events(15, ops="add") == events[2:]
            assert await log.len() == 3
            assert await s.event_names() == ["door"]
            assert await log.prune(10) >= 0
            assert await log.current() == {"open": True, "count": 3}
            await log.remove()
            assert await s.event_names() == []

    run(main())


def test_a_cancelled_batch_is_discarded(tmp_path: Path) -> None:
    async def main() -> None:
        async with await aio.open(f"sqlite:///{tmp_path}/cancel.db") as s:
            inside = asyncio.Event()

            async def writer() -> None:
                async with s.batch():
                    await s.set("buffered", 1)
                    inside.set()
                    await asyncio.Event().wait()  # until cancelled

            task = asyncio.ensure_future(writer())
            await inside.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not await s.contains("buffered")
            assert s.sync._nbatch == 0  # the sync batch was left, not abandoned
            async with s.batch():
                await s.set("after", 1)
            assert await s.get("after") == 1

    run(main())
