"""Native async I/O for :class:`~mappingstore.PostgresStore` (psycopg 3 ``AsyncConnection``
in a ``psycopg_pool.AsyncConnectionPool``).

The sync store opened by :func:`mappingstore.aio.open` keeps owning everything but the
network exchange: URL and conninfo parsing, the pool and connection options, creating and
checking the table, the metadata and encryption set-up, the codec and key checks, the
indexed form of names (``_ident``/``_long``), the SQL text and parameters
(``PostgresStore._q_*``, ``_scan_sql``, ``_get_many_sql``, ``_row``, ``_batch``), the
retry decision and the conversion of driver errors (``PostgresStore._failed``,
``_unknown_write``, ``_convert``), and the pool's wait slices (``_pool_slice``,
``_pool_failure``). This module runs the same statements on async connections opened with
the same conninfo and options, so both paths read and write the same rows, byte for byte.

Failure handling follows the sync store: a read, or an idempotent write (an upsert), is
retried once on a fresh connection when the link drops; a ``DELETE`` cut after it was
sent, or an upsert cut after it was sent whose retry fails too, raises
:class:`~mappingstore.errors.UnknownOutcomeError`; a pool that cannot connect within
``pool_timeout`` raises :class:`~mappingstore.errors.BackendUnavailableError`.

Only a store that owns its pool (opened from a URL or conninfo) takes this path; one built
on a ready ``ConnectionPool`` keeps the worker thread for every call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import pq
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .._postgres import (
    _CHUNK,
    _RECONNECT_WINDOW,
    _SHORT,
    PostgresStore,
    _batch,
    _dead_while_idle,
    _ident,
    _live,
    _pool_failure,
    _pool_slice,
    _row,
)
from .._store import Op
from ..errors import BackendError, BackendUnavailableError

__all__ = ["NativePostgres"]

T = TypeVar("T")
AConn = psycopg.AsyncConnection[Any]
_IDLE = pq.TransactionStatus.IDLE


def _cursor(conn: AConn) -> psycopg.AsyncCursor[Any]:
    """The binary cursor kept with *conn* for one-row statements: reusing it saves about
    a tenth of a statement's client time (a connection serves one task at a time)."""
    cur: psycopg.AsyncCursor[Any] | None = conn.__dict__.get("_mappingstore_aio_cursor")
    if cur is None:
        cur = conn.__dict__["_mappingstore_aio_cursor"] = conn.cursor(binary=True)
    return cur


def supports(store: PostgresStore) -> bool:
    """True when *store* can take the native path (it owns its pool)."""
    return bool(store._owns_pool)


class NativePostgres:
    """The raw operations of a :class:`~mappingstore.PostgresStore` over async psycopg.

    Records, SQL and errors are the sync store's; see the module docstring. Safe for any
    number of tasks of one event loop (each statement borrows a pooled connection); bound
    to the loop that opened it.
    """

    kind = "postgresql"

    def __init__(self, store: PostgresStore, pool: AsyncConnectionPool[Any]) -> None:
        self._store = store
        self._pool = pool
        self._closed = False
        # Connections kept between statements, as the sync store parks its own: skipping
        # the pool's bookkeeping on every call. Only while no task waits on the pool
        # (every getconn of this private pool is ours, so the count is exact).
        self._idle: list[AConn] = []
        self._waiting = 0
        # Connections on their way back to the pool (see _give_back).
        self._returning: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(cls, store: PostgresStore) -> NativePostgres:
        """An async pool with the sync store's conninfo, sizes and connection options."""
        # psycopg's automatic preparing stays off on the sync store's connections (its
        # fast path prepares statements itself); these connections only ever run
        # statements through psycopg, so they may prepare (explicitly, below).
        kwargs = {**store._connect_kwargs, "prepare_threshold": 5}
        # How long the pool keeps reconnecting after an outage: as long as the sync
        # store's own pool (which may not exist: see PostgresStore._bootstrap).
        reconnect = _RECONNECT_WINDOW
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            store._conninfo,
            kwargs=kwargs,
            min_size=store._min_size,
            max_size=store._max_size,
            timeout=store._pool_timeout,
            name=f"mappingstore-aio:{store.table}",
            reconnect_timeout=reconnect,
            open=False,
        )
        try:
            # Wait for the first connections: a pool whose background connect task is
            # still running when the event loop ends makes asyncio.run() hang at its
            # shutdown (cancelling that task never returns), when a caller lets the loop
            # end with the store open, which is allowed.
            await pool.open(wait=True, timeout=store._pool_timeout)
        except PoolTimeout:
            await pool.close()
            raise BackendUnavailableError(
                f"PostgreSQL at {store.url} gave no connection within "
                f"{store._pool_timeout} s (pool_timeout)"
            ) from None
        except BaseException:
            await pool.close()
            raise
        return cls(store, pool)

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        """The async connection pool (for tests and diagnostics)."""
        return self._pool

    # -- connections and statements: PostgresStore._getconn/_read/_write, awaited ---------

    async def _getconn(self, *, live: bool = False) -> AConn:
        while True:
            if self._idle:
                conn = self._idle.pop()
            else:
                self._waiting += 1
                try:
                    conn = await self._pool_getconn()
                finally:
                    self._waiting -= 1
            if not live or not _dead_while_idle(conn):
                return conn
            # Closed by the server while idle: nothing was sent on it, take another.
            await self._give_back([conn], close=True)

    async def _pool_getconn(self) -> AConn:
        """A connection from the pool within ``pool_timeout``, asked for in slices: each
        new request lets a pool whose reconnection attempts gave up (after the sync
        pool's ``reconnect_timeout``, copied at open) start a fresh one at once."""
        store = self._store
        deadline = time.monotonic() + store._pool_timeout
        while True:
            try:
                conn: AConn = await self._pool.getconn(timeout=_pool_slice(deadline))
                return conn
            except psycopg.Error as exc:
                failure = _pool_failure(exc, deadline)
                if failure == "again":
                    continue
                if failure == "unreachable":
                    # The sync store's check connects with libpq directly: on a thread.
                    raise await asyncio.to_thread(store._unreachable, exc) from exc
                raise store._convert(exc, None) from exc

    async def _putconn(self, conn: AConn) -> None:
        if (
            not self._closed
            and not self._waiting
            and conn.pgconn.transaction_status == _IDLE  # also false once it is broken
            and len(self._idle) < self._store._max_size
        ):
            self._idle.append(conn)
            return
        await self._give_back([conn])  # the pool replaces a broken connection

    def _give_back(self, conns: list[AConn], *, close: bool = False) -> asyncio.Future[None]:
        """Return *conns* to the pool (closing them first if *close*) in a task of its
        own, and wait for it shielded: ``AsyncConnectionPool.putconn`` awaits the pool's
        lock and hands the connection to a waiting client, and a task cancelled in there
        (``asyncio.wait_for`` on a call) would lose the connection for good; after
        ``pool_max_size`` such losses every call would time out."""
        task = asyncio.ensure_future(self._return(conns, close))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)
        return asyncio.shield(task)

    async def _return(self, conns: list[AConn], close: bool) -> None:
        for conn in conns:
            try:
                if close:
                    await conn.close()
                await self._pool.putconn(conn)
            except psycopg.Error as exc:  # pragma: no cover - putconn closes what it cannot keep
                self._store._log.debug("returning a connection to the async pool failed: %s", exc)

    async def _sweep(self) -> None:
        """After a lost connection: let the pool replace its dead idle connections."""
        parked, self._idle = self._idle, []
        if parked:
            await self._give_back(parked)
        try:
            await self._pool.check()
        except (psycopg.Error, PoolTimeout):
            pass

    async def _read(self, work: Callable[[AConn], Awaitable[T]]) -> T:
        """Run idempotent *work*; retry it once on a fresh connection if the link drops."""
        return await self._run(work, write=False, idempotent=True)

    async def _run(
        self, work: Callable[[AConn], Awaitable[T]], *, write: bool, idempotent: bool
    ) -> T:
        """Run one autocommit statement (``PostgresStore._read``/``_write``, awaited):
        ``PostgresStore._failed`` decides on a retry, ``UnknownOutcomeError`` or the
        converted error; a write that was sent and then lost raises
        ``UnknownOutcomeError`` also when no connection is left for its retry."""
        store = self._store
        sent: psycopg.Error | None = None  # a try lost after it was sent: maybe applied
        for attempt in (0, 1):
            try:
                conn = await self._getconn(live=not idempotent)
            except BackendError as exc:
                if sent is None:
                    raise
                raise store._unknown_write(sent) from exc
            try:
                return await work(conn)
            except psycopg.Error as exc:
                sent = store._failed(exc, conn, attempt, sent, write=write, idempotent=idempotent)
            finally:
                await self._putconn(conn)
            await self._sweep()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetchone(self, query: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        async def work(conn: AConn) -> tuple[Any, ...] | None:
            cur = await _cursor(conn).execute(query, params, prepare=True)
            row: tuple[Any, ...] | None = await cur.fetchone()
            return row

        return await self._read(work)

    # -- the raw contract ---------------------------------------------------------------

    def _key_params(self, ns: str, key: str) -> tuple[bytes, bytes, float]:
        return _ident(ns.encode()), _ident(key.encode()), self._store._clock()

    async def get(self, ns: str, key: str) -> bytes | None:
        row = await self._fetchone(self._store._q_get, self._key_params(ns, key))
        return None if row is None else bytes(row[0])

    async def contains(self, ns: str, key: str) -> bool:
        return await self._fetchone(self._store._q_contains, self._key_params(ns, key)) is not None

    async def count(self, ns: str) -> int:
        params = (_ident(ns.encode()), self._store._clock())
        row = await self._fetchone(self._store._q_count, params)
        return 0 if row is None else int(row[0])

    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        query, params, encoded = self._store._get_many_sql(ns, keys)

        async def work(conn: AConn) -> dict[bytes, bytes]:
            cur = await conn.execute(query, params, binary=True)
            return {bytes(k): bytes(v) for k, v in await cur.fetchall()}

        found = await self._read(work)
        return [found.get(k) for k in encoded]

    async def put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        params = _row(ns, key, data, expires)
        query = self._store._q_put

        async def work(conn: AConn) -> None:
            await _cursor(conn).execute(query, params, prepare=True)

        # An upsert applied twice leaves the same state: safe to retry when in doubt.
        await self._run(work, write=True, idempotent=True)

    async def apply(self, ops: Sequence[Op]) -> None:
        """Upsert every op (no deletes: only ``set_many`` uses this) in one statement."""
        rows, deletes = _batch(ops)  # the sync batch's rows, in its global row order
        if deletes:
            raise ValueError("NativePostgres.apply() takes writes only")
        if not rows:
            return
        columns = [list(col) for col in zip(*rows, strict=True)]
        query = self._store._q_upsert_many

        async def work(conn: AConn) -> None:
            # One statement, so one transaction in autocommit mode: all rows or none.
            await conn.execute(query, columns)

        await self._run(work, write=True, idempotent=True)

    async def delete(self, ns: str, key: str) -> bool:
        params = (_ident(ns.encode()), _ident(key.encode()))
        now = self._store._clock()
        query = self._store._q_delete

        async def work(conn: AConn) -> bool:
            cur = await _cursor(conn).execute(query, params, prepare=True)
            row = await cur.fetchone()
            return row is not None and _live(row[0], now)

        # Not idempotent: a retry could report "missing" for a key the lost try deleted.
        return await self._run(work, write=True, idempotent=False)

    async def delete_many(self, ns: str, keys: Sequence[str]) -> int:
        """Delete *keys* in one statement (atomic); return how many were live."""
        if not keys:
            return 0
        params = (_ident(ns.encode()), list({_ident(k.encode()) for k in keys}))
        now = self._store._clock()
        query = self._store._q_delete_many_returning

        async def work(conn: AConn) -> int:
            cur = await conn.execute(query, params, binary=True)
            return sum(1 for (expires,) in await cur.fetchall() if _live(expires, now))

        return await self._run(work, write=True, idempotent=False)

    async def _scan(self, ns: str, low: bytes, *, items: bool) -> AsyncIterator[tuple[Any, ...]]:
        """Rows ``(key, long_key[, value])`` of *ns* whose key starts with *low*, in the
        order of the indexed key: keyset pages of ``_CHUNK`` rows (the sync store's page
        queries), each on a connection borrowed for that page only."""
        if len(low) > _SHORT:
            # Only long keys can match; their indexed form keeps _SHORT bytes of the name.
            async for row in self._scan(ns, low[:_SHORT], items=items):
                if row[1] is not None and bytes(row[1]).startswith(low):
                    yield row
            return
        scan = self._store._scan_sql(ns, low, items)
        query, after = scan.first, low
        while True:
            params = scan.params(after)

            async def work(conn: AConn, q: str = query, p: tuple[Any, ...] = params) -> list[Any]:
                cur = await conn.execute(q, p, binary=True)
                return await cur.fetchall()

            rows = await self._read(work)
            for row in rows:
                yield row
            if len(rows) < _CHUNK:
                return
            query, after = scan.page, bytes(rows[-1][0])

    # A name that is not UTF-8 is no key of the store: skipped, as the sync store does
    # (PostgresStore._iter_keys).

    async def iter_keys(self, ns: str, prefix: str = "") -> AsyncIterator[str]:
        async for row in self._scan(ns, prefix.encode(), items=False):
            try:
                key = bytes(row[0] if row[1] is None else row[1]).decode()
            except UnicodeDecodeError:
                continue
            yield key

    async def iter_items(self, ns: str, prefix: str = "") -> AsyncIterator[tuple[str, bytes]]:
        async for row in self._scan(ns, prefix.encode(), items=True):
            try:
                key = bytes(row[0] if row[1] is None else row[1]).decode()
            except UnicodeDecodeError:
                continue
            yield key, bytes(row[2])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        parked, self._idle = self._idle, []
        try:
            if parked:
                await self._give_back(parked)
            # Connections still on their way back (from cancelled calls) are in first.
            returning = [t for t in self._returning if not t.done()]
            if returning:
                await asyncio.gather(*returning, return_exceptions=True)
            await self._pool.close()
        except (psycopg.Error, BackendError) as exc:
            self._store._log.debug("closing the async PostgreSQL pool failed: %s", exc)
