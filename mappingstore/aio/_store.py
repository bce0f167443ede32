"""The async wrappers: native async I/O for Redis and PostgreSQL's hot operations, and
the sync store's method on a worker thread for everything else.

The sync store holds every rule (codec, encryption, key checks, TTL, batches, atomic
read-modify-write). Driving it from a worker thread reuses all of it unchanged, so the
async API cannot drift from the sync one. For Redis and PostgreSQL the single-key and
bulk operations (``get``/``getitem``, ``set``, ``delete``, ``contains``, ``len``,
iteration, ``get_many``, ``set_many``/``update``, ``delete_many``) skip the thread: they
validate, encode and decode with the sync store's own code (``check_key``,
``Store._decode``, and ``Store._encode_many``, the half of ``set_many`` that turns
items into records), and only the network exchange is
native (``aio/_redis.py``, ``aio/_postgres.py``). Dot names, an open batch, series, event
logs and the rest stay on the thread.

Why ONE worker thread per store: some backends keep per-thread state (SQLite has one
connection per thread), and a sync :meth:`~mappingstore.Store.batch` is thread-local. A
``ThreadPoolExecutor(max_workers=1)`` runs the calls of one :class:`AsyncStore` on one
thread, in the order they were made. A batch gets a thread of its own for its lifetime
(see :class:`_AsyncBatch`), so the writes of other tasks are never captured by it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import itertools
import sys
import types
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar

from .._codec import ENCRYPTED_HEADER
from .._keys import MISSING, check_key
from .._store import Op, Store, _Batch, _encodable, _iterable, _require_str, _update_pairs
from ..errors import InvalidOptionError, MissingKeyError, OptionTypeError, StoreClosedError

if TYPE_CHECKING:
    from .._events import Event, EventLog
    from .._series import Series

__all__ = ["AsyncEventLog", "AsyncSeries", "AsyncStore", "open"]

R = TypeVar("R")
T = TypeVar("T")

#: How many keys (or items) one trip to the worker thread fetches while iterating.
CHUNK_SIZE = 256

#: Containers read in the event loop (in memory, no I/O, no user code of note); anything
#: else given to ``set_many``/``update``/``get_many``/``delete_many`` (a generator, another
#: store, a mapping class of its own) is read on the worker thread, as the sync store
#: reads it.
_PLAIN = (dict, list, tuple)


class _Lane:
    """The dedicated thread of one open :meth:`AsyncStore.batch` (the outermost block)."""

    __slots__ = ("executor", "open", "owner")

    def __init__(self, owner: AsyncStore, executor: ThreadPoolExecutor) -> None:
        self.owner = owner
        self.executor = executor
        self.open = True  # False once the outermost block is left: nothing joins it after


class _Level:
    """One ``async with store.batch():`` block: the outermost one of a lane (``parent``
    None, ``batch`` the sync store's own batch) or a nested one (``batch`` a savepoint over
    the enclosing block's). Kept per task (in :data:`_LANES`), never in the lane thread's
    thread-local: the tasks of one batch share its thread, and their nested blocks need
    not end in the order they began. Every call of a task is run with the sync store's
    thread-local batch set to that task's innermost open block."""

    __slots__ = ("batch", "lane", "open", "parent")

    def __init__(self, lane: _Lane, batch: _Batch, parent: _Level | None) -> None:
        self.lane = lane
        self.batch = batch
        self.parent = parent
        self.open = True


#: The innermost batch block of the current context, by ``id(AsyncStore)``. A context
#: variable: the task that entered ``async with store.batch()`` (and the tasks it creates
#: inside, which copy its context) route their calls to the batch's thread; every other
#: task keeps using the store's main worker thread and is not part of the batch.
_LANES: contextvars.ContextVar[Mapping[int, _Level]] = contextvars.ContextVar(
    "mappingstore_aio_lanes", default=types.MappingProxyType({})
)


def _in_batch(store: Store, batch: _Batch, call: Callable[[], R]) -> R:
    """Run *call* on a lane thread as part of *batch* (the calling task's block)."""
    store._tls.batch = batch
    return call()


def _enter_batch(store: Store, cm: Any) -> _Batch:
    """Enter the sync batch *cm* on this (lane) thread; return its buffer."""
    cm.__enter__()
    batch: _Batch = store._tls.batch
    return batch


def _merge(outer: _Batch, inner: _Batch) -> None:
    """End a nested block without an error: its writes join the enclosing block's."""
    outer.ops.update(inner.ops)


def _close_when_idle(store: Store, lane_work: set[Future[Any]]) -> None:
    """Close *store* once no batch lane runs anything (a commit, a call of a batch task):
    closing a store under a running statement is never safe (SQLite closes the other
    threads' connections). Runs on the store's worker thread, after the calls queued
    there."""
    while True:
        running = [f for f in list(lane_work) if not f.done()]
        if not running:
            break
        concurrent.futures.wait(running)
    store.close()


def _snapshot(items: Any) -> Any:
    """A copy of a plain container (the caller may change it while the call waits), or
    *items* itself, for the sync store to read on the thread (reading it may do I/O)."""
    if type(items) is dict:
        return dict(items)
    if type(items) is list or type(items) is tuple:
        return list(items)
    return items


def _list_of(items: Any, what: str) -> list[Any]:
    return list(_iterable(items, what))


async def _collect(items: AsyncIterator[tuple[str, Any]]) -> dict[str, Any]:
    return {k: v async for k, v in items}


def _take(it: Iterator[T], n: int) -> list[T]:
    return list(itertools.islice(it, n))


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise OptionTypeError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _new_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="mappingstore-aio")


class _Native(Protocol):
    """The raw operations a native async driver provides (``aio/_redis.py``,
    ``aio/_postgres.py``): the backend contract's records, awaited."""

    kind: str

    async def get(self, ns: str, key: str) -> bytes | None: ...
    async def contains(self, ns: str, key: str) -> bool: ...
    async def count(self, ns: str) -> int: ...
    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]: ...
    async def put(self, ns: str, key: str, data: bytes, expires: float | None) -> None: ...
    async def apply(self, ops: Sequence[Op]) -> None: ...
    async def delete(self, ns: str, key: str) -> bool: ...
    async def delete_many(self, ns: str, keys: Sequence[str]) -> int: ...
    def iter_keys(self, ns: str, prefix: str = "") -> AsyncIterator[str]: ...
    def iter_items(self, ns: str, prefix: str = "") -> AsyncIterator[tuple[str, bytes]]: ...
    async def aclose(self) -> None: ...


async def _native_for(store: Store) -> _Native | None:
    """A native driver for *store*, or ``None`` when every call stays on the thread.

    Only Redis (standalone, own client) and PostgreSQL (own pool) stores without dot
    names qualify. The driver modules are imported only when such a store is open, so
    their drivers (``redis.asyncio``, psycopg's async classes) load only when used.
    """
    if store._dot:
        return None  # dot-name reads and writes are tree operations: the thread runs them
    redis_mod = sys.modules.get("mappingstore._redis")
    if redis_mod is not None and isinstance(store, redis_mod.RedisStore):
        from . import _redis

        return _redis.NativeRedis(store) if _redis.supports(store) else None
    pg_mod = sys.modules.get("mappingstore._postgres")
    if pg_mod is not None and isinstance(store, pg_mod.PostgresStore):
        from . import _postgres

        # psycopg's async connections cannot run on Windows' default ProactorEventLoop.
        proactor = getattr(asyncio, "ProactorEventLoop", None)
        if proactor is not None and isinstance(asyncio.get_running_loop(), proactor):
            return None
        if _postgres.supports(store):
            return await _postgres.NativePostgres.connect(store)
    return None


async def open(url: str = "memory://", **options: Any) -> AsyncStore:
    """Open the store named by *url* (exactly as :func:`mappingstore.open`) in a worker
    thread and return it as an :class:`AsyncStore` (with native async I/O for Redis and
    PostgreSQL)."""
    from .._registry import open as open_sync

    executor = _new_executor()
    opening: Future[Store] = executor.submit(functools.partial(open_sync, url, **options))
    try:
        store = await asyncio.wrap_future(opening)
    except asyncio.CancelledError:
        # The open may be running already and cannot be stopped: close what it returns.
        executor.submit(_close_opened, opening)
        executor.shutdown(wait=False)
        raise
    except BaseException:
        executor.shutdown(wait=False)
        raise
    try:
        native = await _native_for(store)
    except BaseException:
        executor.submit(store.close)
        executor.shutdown(wait=False)
        raise
    loop = asyncio.get_running_loop() if native is not None else None
    return AsyncStore(store, _executor=executor, _native=native, _loop=loop)


def _close_opened(opening: Future[Store]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class AsyncStore:
    """An ``asyncio`` front end to a sync :class:`~mappingstore.Store`.

    Get one with ``await mappingstore.aio.open(url, **options)`` or wrap an open store with
    ``AsyncStore(store)`` (closing the :class:`AsyncStore` then closes *store*). Every
    method is a coroutine with exactly the semantics and errors of the sync method of the
    same name; ``store[k]`` becomes ``await store.getitem(k)``, ``k in store`` becomes
    ``await store.contains(k)``, ``len(store)`` becomes ``await store.len()``.

    How calls run: a Redis (standalone) or PostgreSQL store opened with
    :func:`mappingstore.aio.open` without dot names runs ``get``, ``getitem``, ``set``,
    ``delete``, ``contains``, ``len``, ``keys``/``items``/``values``/``names``,
    ``to_dict``, ``get_many``, ``set_many``, ``update`` and ``delete_many`` with its
    driver's native async I/O (:attr:`native` names the driver); those calls run
    concurrently, like any coroutines. Every other call (and every call of a task inside
    :meth:`batch`, and every call of other backends) runs on one worker thread of this
    store, one at a time, in the order the calls were made. The event loop never blocks
    on I/O either way.

    Task safety: any number of tasks of the event loop that opened it may share one
    :class:`AsyncStore`. A cancelled call that already started on the thread still
    completes there (a thread cannot be interrupted); one that had not started is
    dropped; a cancelled native call stops where it is (a write may or may not have been
    applied, as when a connection drops). Multi-process behaviour is the backend's.

    Limits: callables passed in (``modify``'s *fn*) run in the worker thread, not in the
    event loop. A native store is bound to the event loop that opened it: a native call
    from another event loop raises :class:`~mappingstore.errors.InvalidOptionError`, and
    :meth:`close` from another loop closes the driver in its own loop (if that loop is no
    longer running, it closes the sync store and raises ``InvalidOptionError``).
    """

    __slots__ = (
        "_busy",
        "_closed",
        "_closing",
        "_drained",
        "_executor",
        "_lane_work",
        "_loop",
        "_native",
        "_native_kind",
        "_store",
    )

    def __init__(
        self,
        store: Store,
        *,
        _executor: ThreadPoolExecutor | None = None,
        _native: _Native | None = None,
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise OptionTypeError(f"AsyncStore wraps a Store, not {type(store).__qualname__}")
        self._store = store
        self._executor = _executor if _executor is not None else _new_executor()
        self._native = _native
        self._native_kind = None if _native is None else _native.kind
        self._loop = _loop  # the event loop a native driver belongs to
        self._busy = 0  # native calls in progress (close() waits for them)
        self._drained: asyncio.Event | None = None
        # Work submitted to batch lanes and not finished (close() waits for it).
        self._lane_work: set[Future[Any]] = set()
        self._closing: asyncio.Future[None] | None = None
        self._closed = False

    # -- running calls ------------------------------------------------------------------

    def _level(self) -> _Level | None:
        """The innermost open batch block of the calling task, or ``None`` (not in a
        batch, or every block it was part of has ended)."""
        level = _LANES.get().get(id(self))
        while level is not None and not level.open:
            level = level.parent
        if level is None or not level.lane.open or level.lane.owner is not self:
            return None
        return level

    def _lane_submit(self, lane: _Lane, fn: Callable[..., R], /, *args: Any) -> Future[R]:
        """Run ``fn(*args)`` on *lane*'s thread, counted so that :meth:`close` waits."""
        future = lane.executor.submit(fn, *args)
        work = self._lane_work
        work.add(future)
        future.add_done_callback(work.discard)
        return future

    def _closed_error(self) -> StoreClosedError:
        return StoreClosedError(f"{type(self._store).__name__} is closed")

    def _native_call(self) -> _Native | None:
        """The native driver for a call of the current task, or ``None`` for the thread
        (no driver, or this task is inside a batch, whose lane thread must see it)."""
        native = self._native
        if native is None:
            return None
        if self._closed or self._store._closed:
            raise self._closed_error()
        # A call inside a batch runs on the batch's lane thread (from any loop, as every
        # thread-path call): the loop check is only for the loop-bound native driver.
        if _LANES.get() and self._level() is not None:
            return None
        if asyncio.get_running_loop() is not self._loop:
            raise self._other_loop_error()
        return native

    def _other_loop_error(self) -> InvalidOptionError:
        return InvalidOptionError(
            f"this AsyncStore ({self._native_kind} native I/O) belongs to the event loop that "
            "opened it: open another one in this event loop"
        )

    def _native_done(self) -> None:
        self._busy -= 1
        if not self._busy and self._drained is not None:
            self._drained.set()

    async def _native_run(self, call: Callable[[], Awaitable[R]]) -> R:
        """Await one native call, counted so that :meth:`close` waits for it."""
        self._busy += 1
        try:
            return await call()
        finally:
            self._native_done()

    def _can_capture(self, encrypt: bool | None) -> bool:
        """True when ``Store._encode_many`` may run here, in the event loop; False when
        encoding would need I/O (encryption asked of a store without a cipher: the sync
        store then reads its metadata to choose the error)."""
        store = self._store
        wanted = store._encrypt_default if encrypt is None else encrypt
        return not wanted or store._cipher is not None

    def _decodes_here(self, data: bytes) -> bool:
        """True when ``Store._decode(data)`` may run in the event loop; False when it
        would read the store's metadata (an encrypted record and no cipher: the sync store
        then looks for a key slot to choose between its two errors), which is I/O."""
        return self._store._cipher is not None or data[:2] != ENCRYPTED_HEADER

    async def _decode(self, ns: str, key: str, data: bytes) -> Any:
        store = self._store
        if self._decodes_here(data):
            return store._decode(ns, key, data)
        return await self._run(store._decode, ns, key, data)

    async def _decode_many(
        self, ns: str, keys: Sequence[str], datas: Sequence[bytes | None]
    ) -> dict[str, Any]:
        store = self._store
        if store._cipher is None and any(
            d is not None and d[:2] == ENCRYPTED_HEADER for d in datas
        ):
            return await self._run(store._decode_many, ns, keys, datas)
        return store._decode_many(ns, keys, datas)

    async def _listed(self, keys: Iterable[str], what: str) -> list[str]:
        """``list(keys)``: here for plain containers, on the thread for anything else (a
        generator, another store: reading it may do I/O)."""
        if type(keys) in _PLAIN or isinstance(keys, (set, frozenset)):
            return list(keys)
        return await self._run(_list_of, keys, what)

    async def _write_ops(self, native: _Native, ops: list[Op]) -> None:
        data = ops[0].data if len(ops) == 1 else None
        if data is not None:
            ns, key, _, expires = ops[0]
            await self._native_run(lambda: native.put(ns, key, data, expires))
        elif ops:
            await self._native_run(lambda: native.apply(ops))

    async def _run(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
        if self._closed:
            raise self._closed_error()
        call = functools.partial(fn, *args, **kwargs) if (args or kwargs) else fn
        level = self._level() if _LANES.get() else None
        if level is None:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        # A batch task: on the batch's thread, inside this task's own block. Cancelling
        # the wait drops the call if it has not started (as run_in_executor does).
        return await asyncio.wrap_future(
            self._lane_submit(level.lane, _in_batch, self._store, level.batch, call)
        )

    async def _chunks(self, make: Callable[[], Iterator[T]], chunk_size: int) -> AsyncIterator[T]:
        """Yield what ``make()`` yields, fetching *chunk_size* at a time in the worker."""
        n = _check_chunk_size(chunk_size)
        it = await self._run(make)
        try:
            while True:
                chunk = await self._run(_take, it, n)
                for x in chunk:
                    yield x
                if len(chunk) < n:
                    return
        finally:
            close = getattr(it, "close", None)
            if close is not None and not self._closed:
                # Releases what the sync iterator holds (e.g. a pooled SQLite reader).
                await self._run(close)

    async def _iterate(
        self,
        make: Callable[[], Iterator[T]],
        chunk_size: int,
        native_make: Callable[[_Native], AsyncIterator[T]],
    ) -> AsyncIterator[T]:
        """``native_make(driver)`` on the native path, else :meth:`_chunks` of *make*."""
        n = _check_chunk_size(chunk_size)
        native = self._native_call()
        if native is None:
            async for x in self._chunks(make, n):
                yield x
            return
        it = native_make(native)
        try:
            # The driver fetches in chunks of its own (Redis: 128 growing to 4,096 keys;
            # PostgreSQL: pages of 2,000 rows); *chunk_size* only applies on the thread.
            # Each step counts as a native call: close() waits for a fetch in progress,
            # and once closed no further step starts.
            while True:
                if self._closed:
                    raise StoreClosedError(f"{type(self._store).__name__} is closed")
                self._busy += 1
                try:
                    x = await it.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self._native_done()
                yield x
        finally:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _native_items(
        self, native: _Native, prefix: str = ""
    ) -> AsyncIterator[tuple[str, Any]]:
        store = self._store
        ns = store._ns
        async for key, data in native.iter_items(ns, prefix):
            yield (
                key,
                (
                    store._decode(ns, key, data)
                    if self._decodes_here(data)
                    else await self._run(store._decode, ns, key, data)
                ),
            )

    async def _native_names(self, native: _Native, prefix: str) -> AsyncIterator[str]:
        _require_str(prefix, "prefix")
        if not _encodable(prefix):
            return  # a lone surrogate: no key starts with it (as Store.names)
        async for key in native.iter_keys(self._store._ns, prefix):
            yield key

    async def _native_values(self, native: _Native) -> AsyncIterator[Any]:
        async for _, value in self._native_items(native):
            yield value

    # -- the mapping --------------------------------------------------------------------

    async def getitem(self, key: str) -> Any:
        """``store[key]``: the value, or :class:`~mappingstore.errors.MissingKeyError`
        (a ``KeyError``)."""
        native = self._native_call()
        if native is None:
            return await self._run(self._store.__getitem__, key)
        store = self._store
        ns, k = store._ns, check_key(key)
        data = await self._native_run(lambda: native.get(ns, k))
        if data is None:
            raise MissingKeyError(key)
        return await self._decode(ns, k, data)

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of *key*, or *default* when it is missing."""
        if self._native_call() is None:
            return await self._run(self._store.get, key, default)
        try:
            return await self.getitem(key)
        except KeyError:
            return default

    async def set(
        self, key: str, value: Any, *, ttl: float | None = None, encrypt: bool | None = None
    ) -> None:
        """Store *value* at *key* (see :meth:`mappingstore.Store.set`)."""
        native = self._native_call()
        if native is None or not self._can_capture(encrypt):
            await self._run(self._store.set, key, value, ttl=ttl, encrypt=encrypt)
            return
        store = self._store
        store._check_writable()
        await self._write_ops(native, store._encode_many([(key, value)], ttl, encrypt))

    async def delete(self, key: str) -> None:
        """``del store[key]``; ``KeyError`` if it is missing."""
        native = self._native_call()
        if native is None:
            await self._run(self._store.__delitem__, key)
            return
        store = self._store
        store._check_writable()
        ns, k = store._ns, check_key(key)
        if not await self._native_run(lambda: native.delete(ns, k)):
            raise MissingKeyError(key)

    async def contains(self, key: str) -> bool:
        """``key in store``."""
        native = self._native_call()
        if native is None:
            return await self._run(self._store.__contains__, key)
        ns, k = self._store._ns, check_key(key)
        return await self._native_run(lambda: native.contains(ns, k))

    async def len(self) -> int:
        """``len(store)``."""
        native = self._native_call()
        if native is None:
            return await self._run(self._store.__len__)
        ns = self._store._ns
        return await self._native_run(lambda: native.count(ns))

    def keys(self, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[str]:
        """``async for key in store.keys()``: the keys, fetched *chunk_size* at a time.

        On the thread, the worker advances the sync iterator; natively, the driver reads
        in chunks of its own. A big store is never read at once. Leaving the loop early
        keeps the iterator until it is garbage collected; wrap it in
        :func:`contextlib.aclosing` to release it at once.
        """
        ns = self._store._ns
        return self._iterate(self._store.__iter__, chunk_size, lambda n: n.iter_keys(ns, ""))

    def __aiter__(self) -> AsyncIterator[str]:
        return self.keys()

    def items(self, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[tuple[str, Any]]:
        """``async for key, value in store.items()``, fetched *chunk_size* pairs at a time."""
        return self._iterate(lambda: iter(self._store.items()), chunk_size, self._native_items)

    def values(self, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[Any]:
        """``async for value in store.values()``, fetched *chunk_size* at a time."""
        return self._iterate(lambda: iter(self._store.values()), chunk_size, self._native_values)

    def names(self, prefix: str = "", *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[str]:
        """Every full key name starting with *prefix* (see :meth:`mappingstore.Store.names`)."""
        return self._iterate(
            lambda: self._store.names(prefix), chunk_size, lambda n: self._native_names(n, prefix)
        )

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Values of the *keys* that exist, in one round trip."""
        native = self._native_call()
        if native is None:
            return await self._run(self._store.get_many, _snapshot(keys))
        listed = await self._listed(keys, "get_many()")
        store = self._store
        ns = store._ns
        checked = [check_key(k) for k in listed]
        datas = await self._native_run(lambda: native.get_many(ns, checked))
        return await self._decode_many(ns, checked, datas)

    async def set_many(
        self,
        items: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        ttl: float | None = None,
        encrypt: bool | None = None,
    ) -> None:
        """Store many items atomically."""
        native = self._native_call()
        # Only plain containers are read here, in the event loop (a copy, as the caller
        # may change them while the call waits); anything else (a generator, another
        # store...) is read by the sync store, on the thread: it may do I/O.
        pairs = _snapshot(items)
        if native is None or type(items) not in _PLAIN or not self._can_capture(encrypt):
            await self._run(self._store.set_many, pairs, ttl=ttl, encrypt=encrypt)
            return
        store = self._store
        store._check_writable()
        # As the sync set_many: a mapping is read with items().
        listed = pairs.items() if isinstance(pairs, dict) else pairs
        await self._write_ops(native, store._encode_many(listed, ttl, encrypt))

    async def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like ``dict.update``; every write commits together."""
        native = self._native_call()
        # Natively only for plain containers (not their subclasses, which may redefine
        # how they are read): reading another mapping (a sync store...) may do I/O,
        # which belongs on the thread.
        if native is None or type(other) not in _PLAIN or not self._can_capture(None):
            await self._run(self._store.update, other, **kwargs)
            return
        store = self._store
        store._check_writable()
        # The sync store's rule (keys() then other[k] for a mapping): the same pairs.
        pairs = list(_update_pairs(other))
        pairs.extend(kwargs.items())
        await self._write_ops(native, store._encode_many(pairs, None, None))

    async def delete_many(self, keys: Iterable[str]) -> int:
        """Delete the *keys* that exist, atomically; return how many existed."""
        native = self._native_call()
        if native is None:
            return await self._run(self._store.delete_many, _snapshot(keys))
        store = self._store
        store._check_writable()  # before reading the caller's keys, as the sync store
        listed = await self._listed(keys, "delete_many()")
        ns = store._ns
        checked = list(dict.fromkeys(check_key(k) for k in listed))
        return await self._native_run(lambda: native.delete_many(ns, checked))

    async def pop(self, key: str, default: Any = MISSING) -> Any:
        """Remove *key* and return its value; *default* or ``KeyError`` if missing."""
        return await self._run(self._store.pop, key, default)

    async def popitem(self) -> tuple[str, Any]:
        """Remove and return some ``(key, value)``; ``KeyError`` when empty."""
        return await self._run(self._store.popitem)

    async def setdefault(self, key: str, default: Any = None) -> Any:
        """Atomically insert *default* if *key* is missing; return the stored value."""
        return await self._run(self._store.setdefault, key, default)

    async def clear(self) -> None:
        """Remove every item of this namespace."""
        await self._run(self._store.clear)

    async def modify(self, key: str, fn: Callable[[Any], Any], default: Any = MISSING) -> Any:
        """Atomically replace the value of *key* with ``fn(value)``; return the new value.

        *fn* is a plain (not async) callable and runs in the worker thread; it may run
        more than once on backends with optimistic concurrency (Redis).
        """
        return await self._run(self._store.modify, key, fn, default)

    async def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy."""
        native = self._native_call()
        if native is None:
            return await self._run(self._store.to_dict)
        # One native call for close() to wait for, start to end (not step by step).
        return await self._native_run(lambda: _collect(self._native_items(native)))

    # -- TTL ----------------------------------------------------------------------------

    async def ttl(self, key: str) -> float | None:
        """Seconds until *key* expires, ``None`` if never; ``KeyError`` if missing."""
        return await self._run(self._store.ttl, key)

    async def expire(self, key: str, ttl: float | None) -> None:
        """Set *key* to expire in *ttl* seconds (``None`` or ``FOREVER``: never)."""
        await self._run(self._store.expire, key, ttl)

    async def purge_expired(self) -> int:
        """Physically remove expired items of this namespace; return how many."""
        return await self._run(self._store.purge_expired)

    # -- batches ------------------------------------------------------------------------

    def batch(self) -> _AsyncBatch:
        """``async with store.batch():`` group writes; they commit together at the end of
        the block, or not at all if it raises (or is cancelled).

        Inside the block, this task's reads see its buffered writes. Other tasks are not
        part of the batch: their calls neither join it nor wait for it. Tasks created
        inside the block copy its context and do join it. Nested batches join the outer.
        """
        return _AsyncBatch(self)

    # -- names, export, encryption, info ------------------------------------------------

    async def namespaces(self) -> list[str]:
        """The namespaces of this backend that hold data (sorted)."""
        return await self._run(self._store.namespaces)

    async def export_json(self, fp: IO[str] | None = None, *, typed: bool = True) -> str | None:
        """Export as one JSON object; the text when *fp* is None (*fp* is written in the
        worker thread)."""
        return await self._run(self._store.export_json, fp, typed=typed)

    async def import_json(self, src: str | bytes | IO[str] | IO[bytes]) -> int:
        """Import JSON written by :meth:`export_json`, atomically; return the item count."""
        return await self._run(self._store.import_json, src)

    async def change_password(
        self,
        new: str | bytes | None = None,
        *,
        key: bytes | None = None,
        security: str | None = None,
    ) -> None:
        """Re-wrap the store's data key under a new password (or raw ``key=``)."""
        await self._run(self._store.change_password, new, key=key, security=security)

    async def info(self) -> dict[str, Any]:
        """A description without secrets (see :meth:`mappingstore.Store.info`)."""
        return await self._run(self._store.info)

    # -- time series and event logs -----------------------------------------------------

    def series(self, name: str, *, freq: int | None = None) -> AsyncSeries:
        """The time series *name* as an :class:`AsyncSeries` (no I/O until used)."""
        self._check_open()
        return AsyncSeries(self, self._store.series(name, freq=freq))

    def events(self, name: str) -> AsyncEventLog:
        """The event log *name* as an :class:`AsyncEventLog` (no I/O until used)."""
        self._check_open()
        return AsyncEventLog(self, self._store.events(name))

    async def series_names(self) -> list[str]:
        """Names of the non-empty time series of this namespace, sorted."""
        return await self._run(self._store.series_names)

    async def event_names(self) -> list[str]:
        """Names of the event logs of this namespace, sorted."""
        return await self._run(self._store.event_names)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def sync(self) -> Store:
        """The wrapped sync store. Calling it from the event loop blocks the loop."""
        return self._store

    @property
    def url(self) -> str:
        """A URL that reopens this store (never with a password)."""
        return self._store.url

    @property
    def native(self) -> str | None:
        """The native async driver of the hot operations: ``"redis"`` (``redis.asyncio``),
        ``"postgresql"`` (psycopg's async connections), or ``None`` when every call runs
        on the worker thread."""
        return self._native_kind

    @property
    def namespace(self) -> str:
        """The namespace this store reads and writes."""
        return self._store.namespace

    @property
    def readonly(self) -> bool:
        """True if the store was opened read-only."""
        return self._store.readonly

    @property
    def dot_names(self) -> bool:
        """True if dot names are on."""
        return self._store.dot_names

    @property
    def encrypted(self) -> bool:
        """True if new values are encrypted by default."""
        return self._store.encrypted

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called (or the sync store was closed)."""
        return self._closed or self._store.closed

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    async def close(self) -> None:
        """Close the store (after the calls already made: native ones, those queued on the
        worker thread, and whatever a batch's thread is running, a commit included), its
        native client or pool, and stop its worker thread.

        Idempotent; any later call raises :class:`~mappingstore.errors.StoreClosedError`.
        Cancelling it does not stop the closing: a later ``close()`` waits for the same
        one (and raises its error, if it failed).
        """
        closing = self._closing
        if closing is None:
            self._closed = True
            closing = self._closing = asyncio.ensure_future(self._teardown())
        elif closing.get_loop() is not asyncio.get_running_loop() and not closing.done():
            return  # closing in the event loop that started it (this one cannot wait on it)
        await asyncio.shield(closing)

    async def _teardown(self) -> None:
        """The closing, in a task of its own: cancelling the caller does not interrupt it."""
        foreign: InvalidOptionError | None = None
        try:
            native = self._native
            if native is not None:
                loop = self._loop
                if loop is None or loop is asyncio.get_running_loop():
                    await self._close_native(native)
                elif loop.is_running() and not loop.is_closed():
                    # Closed from another event loop: the driver closes in its own.
                    await asyncio.wrap_future(
                        asyncio.run_coroutine_threadsafe(self._close_native(native), loop)
                    )
                else:
                    # Its event loop is gone: its connections cannot be closed from here;
                    # let go of them (they close when garbage collected). The sync store
                    # still closes.
                    self._native = None
                    foreign = InvalidOptionError(
                        f"this AsyncStore ({native.kind} native I/O) belongs to an event "
                        "loop that is no longer running: the store is closed, but its "
                        "native connections could not be closed from this event loop "
                        "(they go when garbage collected); close it in its own loop"
                    )
        finally:
            # Submitted, not run_in_executor: a cancellation must not drop it. It runs
            # after the calls queued on the worker, and waits for every batch lane.
            closed = self._executor.submit(_close_when_idle, self._store, self._lane_work)
            self._executor.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closed))
        if foreign is not None:
            raise foreign

    async def _close_native(self, native: _Native) -> None:
        while self._busy:  # native calls already started finish first
            self._drained = asyncio.Event()
            await self._drained.wait()
        await native.aclose()

    async def __aenter__(self) -> AsyncStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncStore of {self._store!r}>"

    def __reduce__(self) -> Any:
        raise TypeError(f"AsyncStore cannot be pickled; reopen it from its URL: {self.url!r}")


class _AsyncBatch:
    """``async with store.batch():`` the sync batch, entered and left on a thread of its own.

    A sync batch is thread-local, and the store's main worker thread is shared by every
    task, so the batch cannot live there (other tasks' writes would join it). A fresh
    single-thread executor (a "lane") runs the batch's enter, every call the tasks of the
    block make, and the exit (commit, or discard on an exception).

    A nested block (in this task, or in a task created inside the block) is a savepoint
    of the block it is nested in, kept per task (:class:`_Level`): blocks of concurrent
    tasks may end in any order, each takes back only its own writes when it raises, and
    one that ends without an error adds its writes to the enclosing block's. A nested
    block that ends after the block it joined (a task that outlived it) cannot join it
    any more: it raises :class:`~mappingstore.errors.StoreClosedError` if it holds writes.
    """

    __slots__ = ("_cm", "_level", "_store", "_token")

    def __init__(self, store: AsyncStore) -> None:
        self._store = store
        self._cm: Any = None
        self._level: _Level | None = None
        self._token: contextvars.Token[Mapping[int, _Level]] | None = None

    async def __aenter__(self) -> AsyncStore:
        store = self._store
        store._check_open()
        sync = store._store
        parent = store._level()
        if parent is not None:
            # Nested: a savepoint over this task's block (no I/O, nothing to undo).
            sync._check_writable()
            batch = _Batch(parent.batch)  # shares the batch's remembered reads
            # It starts outside any read-modify-write section: the one it would copy may
            # be another task's call running on the lane right now.
            batch.rmw = 0
            self._enter(_Level(parent.lane, batch, parent))
            return store
        lane = _Lane(store, _new_executor())
        cm = sync.batch()
        entering = store._lane_submit(lane, _enter_batch, sync, cm)
        try:
            # Shielded: a cancelled task must not leave a sync batch entered but never
            # left (the store would count it open forever).
            batch = await asyncio.shield(asyncio.wrap_future(entering))
        except BaseException as exc:
            lane.open = False
            if isinstance(exc, asyncio.CancelledError):
                store._lane_submit(lane, _leave_if_entered, cm, entering, exc)
            lane.executor.shutdown(wait=False)
            raise
        self._cm = cm
        self._enter(_Level(lane, batch, None))
        return store

    def _enter(self, level: _Level) -> None:
        self._level = level
        key = id(self._store)
        self._token = _LANES.set(types.MappingProxyType({**_LANES.get(), key: level}))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool:
        level, token = self._level, self._token
        assert level is not None
        assert token is not None
        self._level = self._token = None
        # Closed first (in the event loop): a call made from now on, by a task of the
        # block that is still running, goes to the enclosing block (or out of the batch).
        level.open = False
        with contextlib.suppress(ValueError):  # left in another context: nothing to reset
            _LANES.reset(token)
        store = self._store
        lane = level.lane
        parent = level.parent
        if parent is not None:
            return await self._leave_nested(level, parent, exc_type)
        lane.open = False
        cm, self._cm = self._cm, None
        try:
            if store._closed:
                # close() has started: it may be closing the sync store right now, so the
                # batch must not commit. It is left (discarded) on its thread.
                closed = store._closed_error()
                leaving = store._lane_submit(
                    lane,
                    _in_batch,
                    store._store,
                    level.batch,
                    functools.partial(cm.__exit__, type(closed), closed, None),
                )
                await asyncio.shield(asyncio.wrap_future(leaving))
                if exc_type is None and level.batch.ops:
                    raise closed
                return False
            leaving = store._lane_submit(
                lane,
                _in_batch,
                store._store,
                level.batch,
                functools.partial(cm.__exit__, exc_type, exc, tb),
            )
            # Shielded: once the block is over the batch is always left (committed or
            # discarded), even if this task is cancelled while waiting for it; close()
            # waits for it too.
            return bool(await asyncio.shield(asyncio.wrap_future(leaving)))
        finally:
            lane.executor.shutdown(wait=False)

    async def _leave_nested(
        self, level: _Level, parent: _Level, exc_type: type[BaseException] | None
    ) -> bool:
        if exc_type is not None:
            return False  # a savepoint rolled back: its writes are simply dropped
        if not (parent.open and parent.lane.open):
            if level.batch.ops:
                raise StoreClosedError(
                    "the batch block this nested block joined ended before it: its "
                    f"{len(level.batch.ops)} writes were not committed"
                )
            return False
        # On the lane: another task of the batch may be writing to the parent's buffer.
        merging = self._store._lane_submit(parent.lane, _merge, parent.batch, level.batch)
        await asyncio.shield(asyncio.wrap_future(merging))
        return False


def _leave_if_entered(cm: Any, entering: Future[Any], exc: BaseException) -> None:
    """Leave (and so discard) a sync batch whose entry was cancelled, if it was entered."""
    if not entering.cancelled() and entering.exception() is None:
        cm.__exit__(type(exc), exc, exc.__traceback__)


class AsyncSeries:
    """A time series of an :class:`AsyncStore` (see :class:`mappingstore.Series`).

    Every method is a coroutine running the sync method in the store's worker thread:
    ``series[t]`` becomes ``await series.getitem(t)``, ``series[t] = v`` becomes
    ``await series.setitem(t, v)``, ``del series[t]`` becomes ``await series.delete(t)``.
    Task safety as :class:`AsyncStore`.
    """

    __slots__ = ("_series", "_store")

    def __init__(self, store: AsyncStore, series: Series) -> None:
        self._store = store
        self._series = series

    @property
    def name(self) -> str:
        """The series name."""
        return self._series.name

    @property
    def freq(self) -> int | None:
        """The default frequency of :meth:`missing` and :meth:`iscomplete`."""
        return self._series.freq

    async def extend(self, points: Iterable[tuple[int, Any]]) -> None:
        """Add ``(timestamp, value)`` pairs in any order; a repeated timestamp keeps the last."""
        await self._store._run(self._series.extend, list(_iterable(points, "extend()")))

    async def getitem(self, t: int) -> Any:
        """The value at *t*; ``KeyError`` if there is none."""
        return await self._store._run(self._series.__getitem__, t)

    async def get(self, t: int, default: Any = None) -> Any:
        """The value at *t*, or *default*."""
        return await self._store._run(self._series.get, t, default)

    async def setitem(self, t: int, value: Any) -> None:
        """``series[t] = value``."""
        await self._store._run(self._series.__setitem__, t, value)

    async def delete(self, t: int) -> None:
        """``del series[t]``; ``KeyError`` if there is no point at *t*."""
        await self._store._run(self._series.__delitem__, t)

    async def contains(self, t: int) -> bool:
        """``t in series``."""
        return await self._store._run(self._series.__contains__, t)

    async def len(self) -> int:
        """The number of points."""
        return await self._store._run(self._series.__len__)

    async def remove(self, start: int | None = None, end: int | None = None) -> int:
        """Delete the points with ``start <= t <= end``; return how many."""
        return await self._store._run(self._series.remove, start, end)

    async def first(self) -> tuple[int, Any] | None:
        """The earliest ``(timestamp, value)``, or ``None``."""
        return await self._store._run(self._series.first)

    async def last(self) -> tuple[int, Any] | None:
        """The latest ``(timestamp, value)``, or ``None``."""
        return await self._store._run(self._series.last)

    async def range(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        n: int | None = None,
        freq: int | None = None,
    ) -> list[tuple[int, Any]]:
        """Points with ``start <= t <= end`` (inclusive), ascending."""
        return await self._store._run(self._series.range, start, end, n=n, freq=freq)

    async def missing(
        self, start: int, end: int | None = None, *, freq: int | None = None
    ) -> list[int]:
        """Grid timestamps from *start* to *end* that have no value."""
        return await self._store._run(self._series.missing, start, end, freq=freq)

    async def iscomplete(
        self, start: int, end: int | None = None, *, freq: int | None = None
    ) -> bool:
        """``not await missing(start, end, freq=freq)``."""
        return await self._store._run(self._series.iscomplete, start, end, freq=freq)

    async def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like ``dict.update``: one atomic :meth:`extend` of every point (*other* is read
        in the worker thread, as :meth:`AsyncStore.update` reads it)."""
        await self._store._run(self._series.update, _snapshot(other), **kwargs)

    async def pop(self, t: int, *default: Any) -> Any:
        """Remove the point at *t* and return its value; *default* (if given) or
        ``KeyError`` when there is none."""
        return await self._store._run(self._series.pop, t, *default)

    async def popitem(self) -> tuple[int, Any]:
        """Remove and return the earliest ``(timestamp, value)``; ``KeyError`` when empty."""
        return await self._store._run(self._series.popitem)

    async def setdefault(self, t: int, default: Any = None) -> Any:
        """The value at *t*; if there is none, store *default* there and return it."""
        return await self._store._run(self._series.setdefault, t, default)

    async def clear(self) -> None:
        """Delete every point (one atomic write)."""
        await self._store._run(self._series.clear)

    def keys(self, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[int]:
        """``async for t in series.keys()``: the timestamps, ascending, *chunk_size* at a
        time (the values are not decoded)."""
        return self._store._chunks(lambda: iter(self._series), chunk_size)

    def __aiter__(self) -> AsyncIterator[int]:
        return self.keys()

    def items(self, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[tuple[int, Any]]:
        """``async for t, value in series.items()``, ascending, *chunk_size* at a time."""
        return self._store._chunks(lambda: iter(self._series.items()), chunk_size)

    def values(self, *, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[Any]:
        """``async for value in series.values()``, in timestamp order, *chunk_size* at a
        time (one pass over the chunks, as :meth:`items`)."""
        return self._store._chunks(lambda: (value for _, value in self._series.items()), chunk_size)

    def __repr__(self) -> str:
        return f"<AsyncSeries {self.name!r} of {self._store!r}>"


class AsyncEventLog:
    """An event log of an :class:`AsyncStore` (see :class:`mappingstore.EventLog`).

    Every method is a coroutine running the sync method in the store's worker thread.
    Task safety as :class:`AsyncStore`.
    """

    __slots__ = ("_log", "_store")

    def __init__(self, store: AsyncStore, log: EventLog) -> None:
        self._store = store
        self._log = log

    @property
    def name(self) -> str:
        """The log name."""
        return self._log.name

    async def apply(
        self, changes: Mapping[str, Any], timestamp: int | None = None
    ) -> dict[str, Any]:
        """Record one change set; return the new current state."""
        return await self._store._run(self._log.apply, changes, timestamp)

    async def current(self, *, with_timestamp: bool = False) -> Any:
        """The current state (``{}`` for an unknown log)."""
        return await self._store._run(self._log.current, with_timestamp=with_timestamp)

    async def past(self, t: int, *, with_timestamp: bool = False) -> Any:
        """The state after every event at or before *t*."""
        return await self._store._run(self._log.past, t, with_timestamp=with_timestamp)

    async def events(
        self,
        start: int | None = None,
        end: int | None = None,
        *,
        ops: str | Callable[..., Any] | Collection[str | Callable[..., Any]] | None = None,
    ) -> list[Event]:
        """Events with ``start <= timestamp <= end``, in replay order."""
        return await self._store._run(self._log.events, start, end, ops=ops)

    async def prune(self, before: int) -> int:
        """Compact every event at or before *before* into one snapshot; return how many
        events were removed."""
        return await self._store._run(self._log.prune, before)

    async def remove(self) -> None:
        """Delete the whole log."""
        await self._store._run(self._log.remove)

    async def len(self) -> int:
        """The number of events."""
        return await self._store._run(self._log.__len__)

    def __repr__(self) -> str:
        return f"<AsyncEventLog {self.name!r} of {self._store!r}>"
