"""mappingstore.aio: the defects of the sixth review (``/tmp/review6/aio/REPORT.md``).

Nested batches of concurrent tasks, close() against batch commits and cancellation, the
PostgreSQL pool under cancellation, native to_dict() and close(), no I/O in the event
loop (decoding, reading the caller's mappings), update()/set_many() reading a dict
subclass as the sync store does, a native store used from another event loop, and the
MutableMapping methods of AsyncSeries. Each test failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import aio
from mappingstore.errors import (
    InvalidOptionError,
    KeyTypeError,
    MissingKeyError,
    PasswordRequiredError,
    ReadOnlyError,
    StoreClosedError,
)
from tests.test_aio import Backend, backend, collect, run  # noqa: F401  (a fixture)
from tests.test_aio_native import net, pg  # noqa: F401  (fixtures)

# -- 1. nested batches of the tasks of one batch ---------------------------------------------


def test_nested_batches_of_concurrent_tasks_keep_every_write(backend: Backend) -> None:  # noqa: F811
    """Two tasks created inside a batch each open a nested block; the blocks end in the
    order they did not begin in. Every acknowledged write is committed."""

    async def main() -> None:
        async with await backend.open() as s:
            a_in, b_in, a_out = asyncio.Event(), asyncio.Event(), asyncio.Event()

            async def child_a() -> None:
                async with s.batch():
                    await s.set("A1", 1)
                    a_in.set()
                    await b_in.wait()  # B enters after A
                    await s.set("A2", 2)
                a_out.set()  # A leaves first

            async def child_b() -> None:
                await a_in.wait()
                async with s.batch():
                    b_in.set()
                    await s.set("B1", 1)
                    await a_out.wait()
                    await s.set("B2", 2)
                await s.set("B3", 3)  # after its block: in the outer batch

            async with s.batch():
                await s.set("outer_before", 0)
                await asyncio.gather(child_a(), child_b())
                await s.set("outer_after", 0)
                assert await s.get_many(["A1", "B2", "B3"]) == {"A1": 1, "B2": 2, "B3": 3}
            assert sorted(await s.to_dict()) == [
                "A1",
                "A2",
                "B1",
                "B2",
                "B3",
                "outer_after",
                "outer_before",
            ]

    run(main())


def test_a_child_rollback_takes_back_only_its_own_writes(backend: Backend) -> None:  # noqa: F811
    async def main() -> None:
        async with await backend.open() as s:
            child_in, parent_wrote = asyncio.Event(), asyncio.Event()

            async def child() -> None:
                with contextlib.suppress(RuntimeError):
                    async with s.batch():
                        await s.set("child", 1)
                        child_in.set()
                        await parent_wrote.wait()
                        assert await s.get("parent") == 1  # the outer batch, seen through
                        raise RuntimeError("child gives up")

            async with s.batch():
                task = asyncio.create_task(child())
                await child_in.wait()
                await s.set("parent", 1)  # acknowledged, in the outer batch
                assert await s.get("child") is None  # the child's block is its own
                parent_wrote.set()
                await task
            assert await s.to_dict() == {"parent": 1}

    run(main())


def test_a_nested_block_that_outlives_the_batch_raises() -> None:
    """A task that leaves its nested block after the batch it joined has ended cannot
    commit with it: its exit says so instead of dropping the writes silently."""

    async def main() -> None:
        async with await aio.open("memory://") as s:
            inside, outer_done = asyncio.Event(), asyncio.Event()
            errors: list[BaseException] = []

            async def straggler(write: bool) -> None:
                try:
                    async with s.batch():
                        if write:
                            await s.set("late", 1)
                        inside.set()
                        await outer_done.wait()
                except StoreClosedError as exc:
                    errors.append(exc)

            async with s.batch():
                writer = asyncio.create_task(straggler(True))
                await inside.wait()
                inside.clear()
                idle = asyncio.create_task(straggler(False))
                await inside.wait()
            outer_done.set()
            await asyncio.gather(writer, idle)
            assert len(errors) == 1 and "not committed" in str(errors[0])
            assert not await s.contains("late")
            assert s.sync._nbatch == 0
            # A task of the batch that goes on after it is out of it: writes at once.
            async with s.batch():
                go_on = asyncio.Event()

                async def later() -> None:
                    await go_on.wait()
                    await s.set("after-batch", 1)

                task = asyncio.create_task(later())
            go_on.set()
            await task
            assert await s.get("after-batch") == 1

    run(main())


# -- 2. close() waits for a batch commit ------------------------------------------------------


def test_close_waits_for_a_batch_commit_in_progress(tmp_path: Path) -> None:
    async def main() -> None:
        s = await aio.open(f"sqlite:///{tmp_path}/commit.db")
        sync = s.sync
        started, release = threading.Event(), threading.Event()
        real_apply = sync._apply

        def slow_apply(ops: Any) -> None:
            started.set()
            release.wait(10)
            real_apply(ops)

        sync._apply = slow_apply  # type: ignore[method-assign]

        async def writer() -> None:
            async with s.batch():
                await s.set_many({f"k{i}": i for i in range(1000)})

        task = asyncio.ensure_future(writer())
        await asyncio.to_thread(started.wait, 10)  # the commit runs on the batch's thread
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.1)
        assert s.closed and not closing.done() and not sync.closed  # close() waits
        release.set()
        await closing
        await task  # committed, no error
        assert sync.closed
        with mappingstore.open(f"sqlite:///{tmp_path}/commit.db") as again:
            assert len(again) == 1000

    run(main())


def test_a_batch_left_after_close_started_writes_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        s = await aio.open(f"sqlite:///{tmp_path}/late.db")

        async def close_inside() -> None:
            async with s.batch():
                await s.set("buffered", 1)
                await s.close()

        with pytest.raises(StoreClosedError):
            await close_inside()
        assert s.sync.closed and s.sync._nbatch == 0
        with mappingstore.open(f"sqlite:///{tmp_path}/late.db") as again:
            assert "buffered" not in again

    run(main())


# -- 3. the PostgreSQL pool under cancellation --------------------------------------------


def test_cancelled_postgres_calls_return_their_connections(pg: Backend) -> None:  # noqa: F811
    """A call cancelled while its connection goes back to the pool (psycopg_pool awaits
    its lock and hands the connection to a waiting task) does not lose the connection."""
    pytest.importorskip("psycopg_pool")

    async def main() -> None:
        s = await pg.open(pool_max_size=2, pool_timeout=5)
        try:
            await s.set_many({f"k{i}": i for i in range(5)})
            native: Any = s._native
            pool = native.pool
            real_putconn = pool.putconn

            async def slow_putconn(conn: Any) -> None:
                await asyncio.sleep(0.2)  # a cancellation lands here
                await real_putconn(conn)

            pool.putconn = slow_putconn
            for _ in range(3):
                # More tasks than connections: the first ones return theirs through the
                # pool (to the waiting ones), and every task is cancelled on the way.
                await asyncio.gather(
                    *(asyncio.wait_for(s.get(f"k{i}"), 0.1) for i in range(4)),
                    return_exceptions=True,
                )
            await asyncio.sleep(0.5)
            pool.putconn = real_putconn
            stats = pool.get_stats()
            lost = stats.get("pool_size", 0) - stats.get("pool_available", 0) - len(native._idle)
            assert lost == 0
            assert await asyncio.wait_for(s.get_many(["k1", "k2"]), 5) == {"k1": 1, "k2": 2}
        finally:
            await s.close()
        assert pool.closed

    run(main())


# -- 4. a cancelled close() still closes ------------------------------------------------------


def test_a_cancelled_close_still_closes_the_store(tmp_path: Path) -> None:
    async def main() -> None:
        s = await aio.open(f"sqlite:///{tmp_path}/cc.db")
        await s.set("a", 1)
        release = threading.Event()
        slow = asyncio.ensure_future(s.modify("a", lambda v: release.wait(10) and v + 1))
        await asyncio.sleep(0.05)  # the modify runs on the worker
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.close(), 0.05)
        assert s.closed and not s.sync.closed  # still waiting for the modify
        release.set()
        assert await slow == 2
        await s.close()  # waits for the same closing
        assert s.sync.closed
        with mappingstore.open(f"sqlite:///{tmp_path}/cc.db") as again:
            assert again["a"] == 2

    run(main())


def test_a_cancelled_close_still_closes_the_native_driver(net: Backend) -> None:  # noqa: F811
    async def main() -> None:
        s = await net.open()
        await s.set("k", 1)
        native: Any = s._native
        gate = asyncio.Event()
        real_get = native.get

        async def gated_get(ns: str, key: str) -> Any:
            await gate.wait()
            return await real_get(ns, key)

        native.get = gated_get
        busy = asyncio.ensure_future(s.get("k"))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.close(), 0.05)
        assert s.closed and not native._closed and not s.sync.closed
        gate.set()
        assert await busy == 1  # close() let the native call finish
        await s.close()
        assert native._closed and s.sync.closed
        if net.kind == "postgres":
            assert native.pool.closed

    run(main())


# -- 5. native to_dict() and close() ----------------------------------------------------------


def test_close_waits_for_a_native_to_dict(net: Backend) -> None:  # noqa: F811
    async def main() -> None:
        s = await net.open()
        await s.set_many({f"k{i}": i for i in range(50)})
        native: Any = s._native
        gate = asyncio.Event()
        real_iter_items = native.iter_items

        async def gated(ns: str, prefix: str = "") -> AsyncIterator[tuple[str, bytes]]:
            async for n, (key, data) in _enumerate(real_iter_items(ns, prefix)):
                if n == 10:
                    await gate.wait()
                yield key, data

        native.iter_items = gated
        task = asyncio.ensure_future(s.to_dict())
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.05)
        assert not closing.done()  # waits for the to_dict in progress
        gate.set()
        assert await task == {f"k{i}": i for i in range(50)}
        await closing
        with pytest.raises(StoreClosedError):
            await s.to_dict()

    run(main())


async def _enumerate(it: AsyncIterator[Any]) -> AsyncIterator[tuple[int, Any]]:
    n = 0
    async for x in it:
        yield n, x
        n += 1


# -- 6. native reads never do sync I/O in the event loop --------------------------------------


def test_native_decoding_never_reads_metadata_in_the_loop(net: Backend) -> None:  # noqa: F811
    async def main() -> None:
        with net.open_sync(password="pw", security="low") as sync:
            sync["secret"] = "x"
        s = await net.open(encrypt=False)  # reads plain values only
        try:
            loop_thread = threading.get_ident()
            on_loop: list[bool] = []
            real_meta_get = s.sync._meta_get

            def spy(name: str) -> bytes | None:
                on_loop.append(threading.get_ident() == loop_thread)
                return real_meta_get(name)

            s.sync._meta_get = spy  # type: ignore[method-assign]
            with pytest.raises(PasswordRequiredError):
                await s.getitem("secret")
            with pytest.raises(PasswordRequiredError):
                await s.get_many(["secret"])
            with pytest.raises(PasswordRequiredError):
                await collect(s.items())
            with pytest.raises(PasswordRequiredError):
                await s.to_dict()
            assert on_loop and not any(on_loop)  # each read, on the worker thread
        finally:
            await s.close()

    run(main())


# -- 7, 8. reading the caller's mappings: where, and how --------------------------------------


class _Recording(Mapping[str, Any]):
    """A mapping that is not a dict, recording the threads that read it (as reading
    another store would: blocking I/O)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self.threads: list[int] = []

    def __getitem__(self, key: str) -> Any:
        self.threads.append(threading.get_ident())
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        self.threads.append(threading.get_ident())
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_other_mappings_and_iterables_are_read_on_the_thread(backend: Backend) -> None:  # noqa: F811
    async def main() -> None:
        loop_thread = threading.get_ident()
        async with await backend.open() as s:
            for call in ("set_many", "update"):
                src = _Recording({f"{call}{i}": i for i in range(10)})
                await getattr(s, call)(src)
                assert src.threads and loop_thread not in src.threads, call
            assert await s.len() == 20

            threads: list[int] = []

            def keys() -> Iterator[str]:
                threads.append(threading.get_ident())
                yield from ("set_many0", "update0")

            def pairs() -> Iterator[tuple[str, int]]:
                threads.append(threading.get_ident())
                yield ("gen", 1)

            await s.set_many(pairs())
            assert await s.get_many(keys()) == {"set_many0": 0, "update0": 0}
            assert await s.delete_many(keys()) == 2
            assert await s.get("gen") == 1
            assert len(threads) == 3 and loop_thread not in threads

    run(main())


class _KeysNarrowed(dict[str, Any]):
    """A dict subclass whose keys() hides some of its entries (update() reads keys())."""

    def keys(self) -> Any:
        return [k for k in dict(self) if not k.startswith("_")]


class _ItemsNarrowed(dict[str, Any]):
    """A dict subclass whose items() hides some of its entries (set_many() reads items())."""

    def items(self) -> Any:
        return [(k, v) for k, v in dict(self).items() if not k.startswith("_")]


def test_dict_subclasses_are_read_as_the_sync_store_reads_them(backend: Backend) -> None:  # noqa: F811
    by_keys, by_items = _KeysNarrowed(a=1, _hidden=2), _ItemsNarrowed(a=1, _hidden=2)
    with mappingstore.open("memory://") as sync:
        sync.update(by_keys)
        expected_update = sorted(sync)
        sync.clear()
        sync.set_many(by_items, ttl=60)
        expected_set_many = sorted(sync)
    assert expected_update == expected_set_many == ["a"]

    async def main() -> None:
        async with await backend.open() as s:
            await s.update(by_keys)
            assert sorted(await s.to_dict()) == expected_update
            await s.clear()
            await s.set_many(by_items, ttl=60)
            assert sorted(await s.to_dict()) == expected_set_many

    run(main())


# -- 9. a native store used from another event loop -------------------------------------------


def test_a_native_store_in_another_loop_raises_a_mappingstore_error(net: Backend) -> None:  # noqa: F811
    # The owner loop is stopped, not closed (a pool left open in a loop that asyncio.run
    # shuts down may hang psycopg_pool's workers): this test can close the driver after.
    owner = asyncio.new_event_loop()
    native: Any = None
    try:
        s = owner.run_until_complete(net.open())
        native = s._native
        owner.run_until_complete(s.set("a", 1))

        async def second() -> None:
            with pytest.raises(InvalidOptionError, match="event loop"):
                await s.get("a")
            with pytest.raises(InvalidOptionError, match="event loop"):
                await collect(s.keys())
            assert await s.pop("a") == 1  # the thread path works in any loop
            with pytest.raises(InvalidOptionError, match="no longer running"):
                await s.close()  # its loop does not run: the sync store still closes
            assert s.closed and s.sync.closed
            assert s.native == {"redis": "redis", "postgres": "postgresql"}[net.kind]
            with pytest.raises(StoreClosedError):
                await s.get("a")

        asyncio.run(second())
        assert s._native is None  # let go of (garbage collected with its connections)
    finally:
        if native is not None:
            owner.run_until_complete(native.aclose())  # what only its own loop can do
        owner.close()


def test_a_native_store_closed_from_another_loop_closes_in_its_own(net: Backend) -> None:  # noqa: F811
    owner = asyncio.new_event_loop()
    thread = threading.Thread(target=owner.run_forever, daemon=True)
    thread.start()
    try:
        s = asyncio.run_coroutine_threadsafe(net.open(), owner).result(30)
        asyncio.run_coroutine_threadsafe(s.set("a", 1), owner).result(30)

        async def elsewhere() -> None:
            await s.close()

        asyncio.run(elsewhere())
        native: Any = s._native
        assert native._closed and s.sync.closed
        if net.kind == "postgres":
            assert native.pool.closed
    finally:
        owner.call_soon_threadsafe(owner.stop)
        thread.join(10)
        owner.close()


# -- AsyncSeries: the MutableMapping methods --------------------------------------------------


def test_async_series_has_the_mutable_mapping_methods(backend: Backend) -> None:  # noqa: F811
    async def main() -> None:
        async with await backend.open() as s:
            series = s.series("prices")
            await series.update({30: 3.0, 10: 1.0})
            await series.update([(20, 2.0)])
            with pytest.raises(KeyTypeError):
                await series.update(x=1)
            assert await collect(series.keys(chunk_size=2)) == [10, 20, 30]
            assert await collect(series) == [10, 20, 30]
            assert await collect(series.values(chunk_size=2)) == [1.0, 2.0, 3.0]
            assert await series.pop(20) == 2.0
            assert await series.pop(20, "gone") == "gone"
            with pytest.raises(MissingKeyError):
                await series.pop(20)
            assert await series.setdefault(10, 9.9) == 1.0
            assert await series.setdefault(40, 4.0) == 4.0
            assert await series.popitem() == (10, 1.0)  # the earliest
            assert await series.range() == [(30, 3.0), (40, 4.0)]
            await series.clear()
            assert await series.len() == 0
            with pytest.raises(KeyError):
                await series.popitem()
            assert await s.series_names() == []

            # A read-only store refuses them even when there is nothing to change.
            async with await backend.open(readonly=True) as ro:
                empty = ro.series("prices")
                for call in (
                    empty.clear(),
                    empty.update({}),
                    empty.pop(1, None),
                    empty.setdefault(1),
                ):
                    with pytest.raises(ReadOnlyError):
                        await call

    run(main())


def test_other_mapping_given_to_series_update_is_read_on_the_thread() -> None:
    class Points(Mapping[int, Any]):
        def __init__(self) -> None:
            self.threads: list[int] = []

        def __getitem__(self, t: int) -> Any:
            self.threads.append(threading.get_ident())
            return t * 10

        def __iter__(self) -> Iterator[int]:
            return iter([1, 2])

        def __len__(self) -> int:
            return 2

    async def main() -> None:
        async with await aio.open("memory://") as s:
            points = Points()
            await s.series("x").update(points)
            assert points.threads and threading.get_ident() not in points.threads
            assert await s.series("x").range() == [(1, 10), (2, 20)]

    run(main())


def test_close_waits_for_a_slow_call_inside_a_batch(tmp_path: Path) -> None:
    """Not only the commit: any call a batch task is running on the batch's thread."""

    async def main() -> None:
        s = await aio.open(f"sqlite:///{tmp_path}/slow.db")
        await s.set("n", 0)
        release = threading.Event()

        def slow(v: int) -> int:
            release.wait(10)
            time.sleep(0.01)
            return v + 1

        inside = asyncio.Event()

        async def writer() -> None:
            async with s.batch():
                inside.set()
                await s.modify("n", slow)

        task = asyncio.ensure_future(writer())
        await inside.wait()
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.05)
        assert not s.sync.closed
        release.set()
        await closing
        with pytest.raises(StoreClosedError):
            await task  # its batch could not commit after close()
        assert s.sync.closed and s.sync._nbatch == 0

    run(main())


def test_a_nested_block_opened_during_another_tasks_modify_tracks_no_reads(
    tmp_path: Path,
) -> None:
    """A nested block begins outside any read-modify-write, even when another task of the
    batch is inside one on the batch's thread at that moment: its plain reads are not
    remembered, so another writer's change to what it read is no conflict at commit."""

    async def main() -> None:
        url = f"sqlite:///{tmp_path}/rmw.db"
        async with await aio.open(url, dot_names=True) as s:
            await s.set("other", 1)
            in_fn, gate = threading.Event(), threading.Event()

            def fn(v: int) -> int:
                in_fn.set()
                gate.wait(10)
                return v + 1

            async with s.batch():
                task = asyncio.create_task(s.modify("counter", fn, default=0))
                await asyncio.to_thread(in_fn.wait, 10)  # fn runs in its exclusive section
                async with s.batch():
                    gate.set()
                    assert await s.get("other") == 1
                with mappingstore.open(url, dot_names=True) as writer:
                    writer["other"] = 2  # another writer, after the plain read
                assert await task == 1
            assert await s.get_many(["counter", "other"]) == {"counter": 1, "other": 2}

    run(main())
