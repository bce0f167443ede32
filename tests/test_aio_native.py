"""mappingstore.aio's native async I/O for Redis (``redis.asyncio``) and PostgreSQL
(psycopg's async connections): the native path is really taken, it interoperates byte for
byte with the sync store (plain and encrypted), it raises the sync store's errors (also on
a dead server), and it serves many concurrent tasks.

The conformance scenarios of ``tests/test_aio.py`` run through the native path too (its
``Backend.open`` asserts that Redis and PostgreSQL stores are native). Real servers only:
the shared ones for behaviour, a private ``redis-server`` (killed) and a private TCP proxy
in front of PostgreSQL (shut) for outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import decimal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import FOREVER, aio
from mappingstore.aio import AsyncStore
from mappingstore.errors import (
    BackendUnavailableError,
    IntegrityError,
    InvalidKeyError,
    InvalidOptionError,
    KeyTypeError,
    MissingKeyError,
    OptionTypeError,
    PasswordRequiredError,
    ReadOnlyError,
    StoreClosedError,
    StoreNotFoundError,
    UnknownOutcomeError,
)
from tests.faultproxy import FaultProxy
from tests.servers import POSTGRES_URL, REDIS_URL
from tests.test_aio import Backend, _postgres_cleanup, _redis_cleanup, collect, run

#: Raw backend methods the native path must never call for the hot operations.
RAW_METHODS = (
    "_get",
    "_get_record",
    "_put",
    "_delete",
    "_contains",
    "_count",
    "_iter_keys",
    "_iter_items",
    "_get_many",
    "_apply",
    "_update",
)


def _network_backend(kind: str) -> Iterator[Backend]:
    """A Redis or PostgreSQL backend with a private key prefix / tables, removed after."""
    run_id = f"aion{uuid.uuid4().hex[:12]}"
    if kind == "redis":
        cleanup = _redis_cleanup(run_id)
        next(cleanup)
        yield Backend("redis", lambda name: REDIS_URL, lambda name: {"prefix": f"{run_id}-{name}"})
    else:
        tables: list[str] = []

        def pg_options(name: str) -> dict[str, Any]:
            table = f"{run_id}_{name}"
            if table not in tables:
                tables.append(table)
            return {"table": table}

        cleanup = _postgres_cleanup(tables)
        next(cleanup)
        yield Backend("postgres", lambda name: POSTGRES_URL, pg_options)
    with contextlib.suppress(StopIteration):
        next(cleanup)


@pytest.fixture(params=["redis", "postgres"])
def net(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each network backend in turn."""
    yield from _network_backend(request.param)


@pytest.fixture
def pg() -> Iterator[Backend]:
    """The PostgreSQL backend."""
    yield from _network_backend("postgres")


def spy_raw_calls(sync: mappingstore.Store) -> dict[str, int]:
    """Count the calls of the sync store's raw methods (the real methods still run)."""
    calls = dict.fromkeys(RAW_METHODS, 0)
    for name in RAW_METHODS:
        original = getattr(sync, name)

        def counting(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kw)

        setattr(sync, name, counting)
    return calls


# -- the native path is taken ---------------------------------------------------------------


def test_hot_operations_never_use_the_sync_backend(net: Backend) -> None:
    """Every operation documented as native runs without one call of the sync store's raw
    methods (a spy on the instance counts them), on the driver's own async client; a
    thread-path operation (modify) does call them, so the spy would notice."""

    async def main() -> None:
        async with await net.open() as s:
            if net.kind == "redis":
                import redis.asyncio

                assert s.native == "redis"
                assert isinstance(s._native.client, redis.asyncio.Redis)  # type: ignore[union-attr]
            else:
                from psycopg_pool import AsyncConnectionPool

                assert s.native == "postgresql"
                assert isinstance(s._native.pool, AsyncConnectionPool)  # type: ignore[union-attr]
            calls = spy_raw_calls(s.sync)
            await s.set("a", 1)
            await s.set("t", 2, ttl=60)
            assert await s.getitem("a") == 1 and await s.get("t") == 2
            assert await s.get("missing", "d") == "d"
            assert await s.contains("a") and not await s.contains("missing")
            await s.set_many({"m1": 1, "m2": 2})
            await s.update({"u1": 1}, u2=2)
            assert await s.len() == 6
            assert sorted(await collect(s.keys())) == ["a", "m1", "m2", "t", "u1", "u2"]
            assert sorted(await collect(s.names("m"))) == ["m1", "m2"]
            assert dict(await collect(s.items()))["u2"] == 2
            assert sorted(await collect(s.values())) == [1, 1, 1, 2, 2, 2]
            assert (await s.to_dict())["m2"] == 2
            assert await s.get_many(["a", "m1", "nope"]) == {"a": 1, "m1": 1}
            assert await s.delete_many(["m1", "m2", "nope", "m1"]) == 2
            await s.delete("a")
            with pytest.raises(MissingKeyError):
                await s.delete("a")
            assert calls == dict.fromkeys(RAW_METHODS, 0)
            assert await s.modify("n", lambda v: v + 1, default=0) == 1
            assert sum(calls.values()) > 0

    run(main())


def test_dot_names_and_batches_stay_on_the_thread(net: Backend) -> None:
    """A dot-name store has no native driver (tree operations need the sync store), and
    the calls of a task inside ``batch()`` go to the batch's thread (the spy sees them)."""

    async def main() -> None:
        async with await net.open(dot_names=True) as dotted:
            assert dotted.native is None
            await dotted.set("a.b", 1)
            assert (await dotted.getitem("a"))["b"] == 1
        async with await net.open() as s:
            calls = spy_raw_calls(s.sync)
            async with s.batch():
                await s.set("x", 1)
                assert await s.getitem("x") == 1
            assert calls["_apply"] == 1  # the batch committed through the sync store
            assert await s.getitem("x") == 1

    run(main())


# -- interoperability with the sync store ---------------------------------------------------

VALUES: dict[str, Any] = {
    "plain": "text",
    "nul\x00key": b"\x00\xff bytes",
    "ünïcødé/../%*?[]": (1, "tuple", None),
    "set": {1, 2, 3},
    "when": datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.timezone.utc),
    "money": decimal.Decimal("12.3400"),
    "big": 2**100,
    "k" * 3000: {"long": "key"},  # PostgreSQL indexes it by prefix + digest
}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_interop_with_the_sync_store(net: Backend, encrypted: bool) -> None:
    """What the native path writes, the sync store reads (and the other way round):
    same codec, key names, records, TTLs and encryption (AAD bound to the key)."""
    secret: dict[str, Any] = {"password": "pw", "security": "low"} if encrypted else {}

    async def main() -> None:
        sync = net.open_sync(namespace="ns", **secret)
        try:
            async with await net.open(namespace="ns", **secret) as s:
                assert s.native is not None and s.encrypted is encrypted
                await s.set_many({k: v for k, v in VALUES.items() if k != "plain"})
                await s.set("plain", "text", ttl=60)
                assert {k: sync[k] for k in VALUES} == VALUES
                remaining = sync.ttl("plain")
                assert remaining is not None and 50 < remaining <= 60
                assert sorted(sync) == sorted(VALUES) and len(sync) == len(VALUES)

                sync.clear()
                sync.update({f"s:{k}": v for k, v in VALUES.items()})
                sync.set("s:brief", 1, ttl=60)
                assert await s.getitem("s:" + "k" * 3000) == {"long": "key"}
                assert await s.get_many([f"s:{k}" for k in VALUES]) == {
                    f"s:{k}": v for k, v in VALUES.items()
                }
                assert dict(await collect(s.items())) == {
                    **{f"s:{k}": v for k, v in VALUES.items()},
                    "s:brief": 1,
                }
                assert sorted(await collect(s.names("s:k"))) == ["s:" + "k" * 3000]
                # A prefix longer than PostgreSQL's indexed form of a name (1,024 bytes).
                assert await collect(s.names("s:" + "k" * 1500)) == ["s:" + "k" * 3000]
                assert await s.len() == len(VALUES) + 1
                await s.delete("s:plain")
                assert "s:plain" not in sync
                assert await s.delete_many(["s:set", "s:money", "s:gone"]) == 2
                assert sync.get_many(["s:set", "s:money", "s:big"]) == {"s:big": 2**100}

                if encrypted:
                    # Copy the sealed record of one key over another: the AAD names the
                    # key, so reading it back through the native path fails, never
                    # returning the other key's value.
                    ns = sync._ns
                    data = sync._get(ns, "s:big")
                    assert data is not None and data[:2] == b"\x01\x01"
                    sync._put(ns, "s:when", data, None)
                    with pytest.raises(IntegrityError):
                        await s.getitem("s:when")
                    await s.set("sealed", "plaintext-never-stored")
                    raw = sync._get(ns, "sealed")
                    assert raw is not None and b"plaintext" not in raw
                    async with await net.open(namespace="ns", encrypt=False) as locked:
                        assert locked.native is not None
                        with pytest.raises(PasswordRequiredError):
                            await locked.getitem("sealed")
                        # Encrypting needs the password: the thread path chooses the error.
                        with pytest.raises(PasswordRequiredError):
                            await locked.set("x", 1, encrypt=True)
        finally:
            sync.close()

    run(main())


def test_same_errors_and_options_as_the_sync_store(net: Backend) -> None:
    """Bad keys, bad TTLs, read-only, default TTL, FOREVER and namespaces behave as in the
    sync store, exception class for exception class."""

    async def main() -> None:
        async with await net.open(ttl=30) as s, await net.open(namespace="other") as other:
            sync = s.sync
            bad: list[tuple[Callable[[], Any], Callable[[], Any]]] = [
                (lambda: sync.set("", 1), lambda: s.set("", 1)),
                (lambda: sync.get(1), lambda: s.get(1)),  # type: ignore[arg-type]
                (lambda: sync.set("k", 1, ttl=-1), lambda: s.set("k", 1, ttl=-1)),
                (lambda: sync.set("k", 1, ttl="1"), lambda: s.set("k", 1, ttl="1")),  # type: ignore[arg-type]
                (lambda: sync.set("k", object()), lambda: s.set("k", object())),
                (lambda: sync.set_many([("k",)]), lambda: s.set_many([("k",)])),  # type: ignore[list-item]
                (lambda: sync.delete_many([""]), lambda: s.delete_many([""])),
                (lambda: sync["\ud800"], lambda: s.getitem("\ud800")),
            ]
            for sync_call, async_call in bad:
                with pytest.raises(Exception) as expected:
                    sync_call()
                with pytest.raises(type(expected.value)):
                    await async_call()
            assert {InvalidKeyError, KeyTypeError, InvalidOptionError, OptionTypeError} <= {
                type(e) for e in _errors_of([c for c, _ in bad])
            }
            await s.set("default", 1)
            await s.set("forever", 1, ttl=FOREVER)
            remaining = sync.ttl("default")
            assert remaining is not None and 20 < remaining <= 30
            assert sync.ttl("forever") is None
            await other.set("default", "other")
            assert await s.getitem("default") == 1 and await other.len() == 1
        async with await net.open(readonly=True) as ro:
            assert ro.native is not None and await ro.getitem("default") == 1
            for call in (
                lambda: ro.set("k", 1),
                lambda: ro.delete("default"),
                lambda: ro.set_many({"k": 1}),
                lambda: ro.update({"k": 1}),
                lambda: ro.delete_many(["default"]),
            ):
                with pytest.raises(ReadOnlyError):
                    await call()
        with pytest.raises(StoreClosedError):
            await ro.get("default")

    run(main())


def _errors_of(calls: list[Callable[[], Any]]) -> list[BaseException]:
    found: list[BaseException] = []
    for call in calls:
        try:
            call()
        except Exception as exc:
            found.append(exc)
    return found


def test_ttl_expiry_on_the_native_path(net: Backend) -> None:
    """An expired item is invisible to every native read at once (PostgreSQL: the store's
    injected clock; Redis: the server's clock)."""

    class Clock:
        now = 1_800_000_000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()

    async def main() -> None:
        options: dict[str, Any] = {"clock": clock} if net.kind == "postgres" else {}
        async with await net.open(**options) as s:
            # 1 s TTLs: a stalled CI machine must not expire them before the len() check.
            await s.set("brief", 1, ttl=1)
            await s.set("stays", 2)
            await s.set_many({"b2": 3}, ttl=1)
            assert await s.len() == 3
            if net.kind == "postgres":
                clock.now += 2
            else:
                await asyncio.sleep(1.2)
            assert not await s.contains("brief") and await s.get("b2") is None
            assert await s.len() == 1 and await collect(s.keys()) == ["stays"]
            assert await s.get_many(["brief", "b2", "stays"]) == {"stays": 2}
            with pytest.raises(MissingKeyError):
                await s.delete("brief")
            assert await s.delete_many(["brief", "b2", "stays"]) == 1

    run(main())


# -- concurrency ----------------------------------------------------------------------------


def test_native_writes_never_wait_for_the_store_lock(net: Backend) -> None:
    """The sync store's lock may be held by the worker thread for whole network round
    trips (Redis holds it during an exclusive section); native calls, writes included,
    never take it, so the event loop is never blocked behind the thread."""

    async def main() -> None:
        async with await net.open() as s:
            released = threading.Event()
            held = threading.Event()
            timed_out: list[bool] = []

            def hold_the_lock() -> None:
                with s.sync._lock:
                    held.set()
                    timed_out.append(not released.wait(timeout=10))

            holder = threading.Thread(target=hold_the_lock)
            holder.start()
            held.wait()
            await s.set("k", 1)
            await s.set_many({"a": 1, "b": 2}, ttl=60)
            await s.update({"c": 3})
            assert await s.get_many(["k", "a", "c"]) == {"k": 1, "a": 1, "c": 3}
            released.set()
            await asyncio.to_thread(holder.join)
            assert timed_out == [False]

    run(main())


def test_two_hundred_concurrent_tasks(net: Backend) -> None:
    """200 gathered sets, then 200 gathered gets, contains and a mix of both, on one
    AsyncStore: every result is the right one."""

    async def main() -> None:
        async with await net.open() as s:
            await asyncio.gather(*(s.set(f"k{i}", {"i": i}) for i in range(200)))
            got = await asyncio.gather(*(s.getitem(f"k{i}") for i in range(200)))
            assert got == [{"i": i} for i in range(200)]
            mixed = await asyncio.gather(
                *(s.set(f"k{i}", -i) if i % 2 else s.get(f"k{i}") for i in range(200)),
                *(s.contains(f"k{i}") for i in range(200)),
            )
            assert mixed[:200:2] == [{"i": i} for i in range(0, 200, 2)]
            assert all(mixed[200:])
            assert await s.len() == 200
            assert await s.get_many([f"k{i}" for i in range(1, 200, 2)]) == {
                f"k{i}": -i for i in range(1, 200, 2)
            }

    run(main())


def test_close_waits_for_native_calls_in_progress(net: Backend) -> None:
    """close() lets native calls already started finish, then refuses new ones, also the
    next step of an iteration."""

    async def main() -> None:
        s = await net.open()
        pending = [asyncio.ensure_future(s.set(f"p{i}", i)) for i in range(20)]
        await asyncio.sleep(0)  # every task is now awaiting its server
        await s.close()
        await asyncio.gather(*pending)
        with pytest.raises(StoreClosedError):
            await s.set("late", 1)
        with pytest.raises(StoreClosedError):
            await collect(s.keys())
        async with await net.open() as again:
            assert await again.len() == 20
            walking = await net.open()
            keys = walking.keys()
            assert (await keys.__anext__()).startswith("p")
            await walking.close()  # mid-iteration: no further fetch starts
            with pytest.raises(StoreClosedError):
                await keys.__anext__()

    run(main())


# -- outages --------------------------------------------------------------------------------


def test_redis_outage_raises_mappingstore_errors(tmp_path: Path) -> None:
    """On a private redis-server: a killed server makes native reads and writes raise
    BackendUnavailableError; a write whose reply is lost raises UnknownOutcomeError; after
    a restart (empty script cache) the native path reconnects and reloads its scripts,
    including the MULTI of delete_many."""
    pytest.importorskip("redis")
    from tests.redis_cluster import PrivateRedis, require_binaries

    require_binaries()
    import redis

    async def main(server: PrivateRedis) -> None:
        url = f"{server.url}?retries=1&socket_timeout=0.5"
        async with await aio.open(url) as s:
            assert s.native == "redis"
            await s.set("k", 1)
            admin = redis.Redis(port=server.port)
            try:
                # The server sleeps with the write in its socket: the reply never comes
                # in time, so its outcome is unknown and it is not resent.
                sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", 1))
                sleeper.start()
                await asyncio.sleep(0.1)
                with pytest.raises(UnknownOutcomeError):
                    await s.set("slow", 1)
                await asyncio.to_thread(sleeper.join)
                admin.script_flush()
            finally:
                admin.close()
            await s.set_many({"a": 1, "b": 2})  # NOSCRIPT, then EVAL: loaded again
            admin = redis.Redis(port=server.port)
            admin.script_flush()
            admin.close()
            assert await s.delete_many(["a", "b", "c"]) == 2  # MULTI after a flush

            server.kill()
            with pytest.raises(BackendUnavailableError):
                await s.get("k")
            with pytest.raises(BackendUnavailableError):
                await s.set("k", 2)  # refused connection: proven not sent
            with pytest.raises(BackendUnavailableError):
                await collect(s.keys())
            server.start()
            assert await s.getitem("k") == 1  # AOF always: the write survived
            await s.set("k", 3)
            assert await s.getitem("k") == 3

    with PrivateRedis(tmp_path) as server:
        run(main(server))


def test_postgres_outage_raises_mappingstore_errors() -> None:
    """An unreachable server fails aio.open with BackendUnavailableError. Through a
    proxy: an upsert whose reply is lost is retried and applied once; a DELETE whose
    reply is lost raises UnknownOutcomeError (and was applied); a server lost after
    opening makes native reads and writes raise BackendUnavailableError; a table
    dropped behind the store's back raises StoreNotFoundError."""
    psycopg = pytest.importorskip("psycopg")
    table = f"aion{uuid.uuid4().hex[:12]}"
    host, port = "127.0.0.1", int(POSTGRES_URL.rsplit(":", 1)[1].split("/", 1)[0])
    tail = POSTGRES_URL.split("://", 1)[1]
    user, dbname = tail.split("@", 1)[0], tail.rsplit("/", 1)[1]
    proxy = FaultProxy(host, port)
    options = f"?table={table}&pool_timeout=0.5&connect_timeout=1"

    async def main() -> None:
        with pytest.raises(BackendUnavailableError):
            await aio.open(f"postgresql://{user}@127.0.0.1:1/{dbname}?connect_timeout=1")
        async with await aio.open(
            f"postgresql://{user}@127.0.0.1:{proxy.port}/{dbname}{options}"
        ) as s:
            assert s.native == "postgresql"
            await s.set("k", 1)
            assert await s.getitem("k") == 1
            # An upsert cut after it was sent is retried on a fresh connection (applying
            # it twice is harmless); a DELETE cut so is reported, never resent.
            proxy.cut_after(b"cut-upsert")
            await s.set("cut-upsert", 1)
            assert proxy.cuts == 1 and await s.getitem("cut-upsert") == 1
            proxy.cut_after(b"cut-upsert")
            with pytest.raises(UnknownOutcomeError):
                await s.delete("cut-upsert")
            assert proxy.cuts == 2 and not await s.contains("cut-upsert")
            proxy.close()
            with pytest.raises(BackendUnavailableError):
                await s.get("k")
            with pytest.raises(BackendUnavailableError):
                await s.set("k", 2)
            with pytest.raises(BackendUnavailableError):
                await s.delete("k")
        async with await aio.open(POSTGRES_URL + f"?table={table}") as s:
            assert await s.getitem("k") == 1
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(f'DROP TABLE "{table}"')
            with pytest.raises(StoreNotFoundError):
                await s.get("k")

    try:
        run(main())
    finally:
        proxy.close()
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')


def test_postgres_terminated_connections_are_replaced(pg: Backend) -> None:
    """pg_terminate_backend of this store's own async connections: the next native read
    retries on a fresh connection and succeeds (as the sync store does)."""
    psycopg = pytest.importorskip("psycopg")
    app = f"aion-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with await pg.open(application_name=app) as s:
            await s.set("k", 1)
            await asyncio.gather(*(s.get("k") for _ in range(5)))
            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                killed = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE application_name = %s",
                    (app,),
                ).fetchone()
            assert killed is not None and killed[0] >= 1
            time.sleep(0.1)
            assert await s.getitem("k") == 1
            await s.set("k", 2)
            assert await s.getitem("k") == 2

    run(main())


def test_wrapping_a_sync_store_keeps_the_thread(net: Backend) -> None:
    """``AsyncStore(store)`` drives any store from its worker thread (no native driver),
    and reads what the native path wrote."""

    async def main() -> None:
        async with await net.open() as native:
            await native.set("k", (1, 2))
            async with AsyncStore(net.open_sync()) as threaded:
                assert threaded.native is None
                assert await threaded.getitem("k") == (1, 2)

    run(main())


def test_redis_tls_settings_carry_over(tmp_path: Path) -> None:
    """The native Redis client is built from the sync client's settings: over TLS it
    verifies the server with the same CA file, and its writes read back through TLS."""
    from tests.redis_cluster import PrivateRedis, require_binaries

    require_binaries()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip

    async def main(url: str) -> None:
        async with await aio.open(url, namespace="tls", socket_timeout=3) as s:
            assert s.native == "redis"
            settings = s._native.client.connection_pool.connection_kwargs  # type: ignore[union-attr]
            assert settings["ssl_ca_certs"] == str(cert) and settings["ssl_cert_reqs"] == "required"
            assert settings["socket_timeout"] == 3
            await s.set("k", {"secure": True})
            assert await s.getitem("k") == {"secure": True}
            with mappingstore.open(url, namespace="tls") as sync:
                assert sync["k"] == {"secure": True}

    with PrivateRedis(tmp_path / "srv", tls=(cert, key)) as server:
        run(main(f"{server.url}?ssl_ca_certs={cert}"))
