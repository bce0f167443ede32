"""Native async I/O for :class:`~mappingstore.RedisStore` (``redis.asyncio``).

The sync store opened by :func:`mappingstore.aio.open` keeps owning everything but the
network exchange: URL parsing and options, the metadata and encryption set-up, the codec,
key checks, the key layout (``_redis_layout``), the Lua scripts (``_redis_lua``), the
expiry conversion (``RedisStore._px``) and the classification of driver errors
(``_redis_client.classify``). This module only sends the same commands and scripts (by
SHA, ``EVAL`` again after ``NOSCRIPT``) through a ``redis.asyncio`` client built from the
sync client's connection settings (``_redis_client.client_settings``), and builds its
script calls with the sync store's (``RedisStore._put_call``, ``_delete_call``,
``_apply_groups``/``_apply_call``, and ``iter_args``/``iter_next``/``iter_rows`` for
walks), so both paths read and write the same keys, byte for byte.

Standalone servers only: a Redis Cluster store (and a store built on a client you passed
in) keeps the worker-thread path for every call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .. import _redis_lua as lua
from .._redis import Call, RedisStore, iter_args, iter_next, iter_rows
from .._redis_client import backoff_delay, classify, client_settings, wrong_type
from .._redis_layout import count_of
from .._store import Op
from ..errors import MappingStoreError

__all__ = ["NativeRedis"]

T = TypeVar("T")


def supports(store: RedisStore) -> bool:
    """True when *store* can take the native path (a standalone server, its own client)."""
    return bool(store._owns) and not store._cluster


def _make_client(store: RedisStore) -> aredis.Redis:
    """A ``redis.asyncio`` client with the sync client's settings, resending nothing by
    itself (as ``make_client``): the store decides what may be retried."""
    settings = client_settings(store._client)
    return aredis.Redis(**settings, retry=Retry(NoBackoff(), 0), decode_responses=False)


class NativeRedis:
    """The raw operations of a :class:`~mappingstore.RedisStore` over ``redis.asyncio``.

    Records, key names, scripts and errors are the sync store's; see the module
    docstring. Safe for any number of tasks of one event loop (the client pools
    connections); bound to the loop that first uses it.
    """

    kind = "redis"

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        # Typed Any: redis-py's stubs type replies as bytes | str, we never decode them.
        self._client: Any = _make_client(store)
        self._closed = False

    @property
    def client(self) -> aredis.Redis:
        """The ``redis.asyncio`` client (for tests and diagnostics)."""
        client: aredis.Redis = self._client
        return client

    # -- running commands: RedisStore._run and _evalsha, awaited ------------------------

    async def _run(self, what: str, write: bool, fn: Callable[[], Awaitable[T]]) -> T:
        """One exchange, retrying only what ``classify`` allows; every error converted."""
        attempt = 0
        while True:
            try:
                return await fn()
            except MappingStoreError:
                raise
            except (rex.RedisError, OSError) as exc:
                verdict = classify(exc, write=write, what=what)
                if verdict.retry and attempt < self._store._retries and not self._closed:
                    if verdict.reconnect:
                        await self._client.connection_pool.disconnect()
                    await asyncio.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                raise verdict.error from exc

    async def _evalsha(self, script: lua.Script, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            # An empty script cache (restarted or new server): NOSCRIPT means nothing ran.
            return await self._client.eval(script.source, len(keys), *keys, *args)

    async def _eval(self, call: Call, *, write: bool) -> Any:
        script, keys, args = call
        return await self._run(script.name, write, lambda: self._evalsha(script, keys, args))

    # -- the raw contract ---------------------------------------------------------------

    async def get(self, ns: str, key: str) -> bytes | None:
        dkey = self._store._data_key(ns, key)

        async def get() -> bytes | None:
            try:
                return await self._client.get(dkey)  # type: ignore[no-any-return]
            except rex.ResponseError as exc:
                return wrong_type(exc)

        return await self._run("GET", False, get)

    async def contains(self, ns: str, key: str) -> bool:
        dkey = self._store._data_key(ns, key)
        return bool(await self._run("EXISTS", False, lambda: self._client.exists(dkey)))

    async def count(self, ns: str) -> int:
        lay = self._store._layout(ns)
        if not self._store._cluster:
            # As the sync store: one MGET of the bucket counters the write scripts keep;
            # the COUNT script only when some key of the namespace has an expiry.
            counters = lay.counters
            n = count_of(await self._run("MGET", False, lambda: self._client.mget(counters)))
            if n is not None:
                return n
        return int(await self._eval((lua.COUNT, lay.flat, []), write=False))

    async def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        dkeys = [self._store._data_key(ns, k) for k in keys]
        return await self._run("MGET", False, lambda: self._client.mget(dkeys))

    async def put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        await self._eval(self._store._put_call(ns, key, data, expires), write=True)

    async def apply(self, ops: Sequence[Op]) -> None:
        groups = self._store._apply_groups(ops)
        if groups:
            await self._eval(self._store._apply_call(groups), write=True)

    async def delete(self, ns: str, key: str) -> bool:
        return bool(await self._eval(self._store._delete_call(ns, key), write=True))

    async def delete_many(self, ns: str, keys: Sequence[str]) -> int:
        """Delete *keys* atomically (one ``MULTI``/``EXEC`` of the DELETE script per key);
        return how many were live."""
        if not keys:
            return 0
        names = [self._store._names(ns, k) for k in keys]
        script = lua.DELETE

        async def go() -> int:
            for _ in (0, 1):
                pipe = self._client.pipeline(transaction=True)
                for member, ikey, xkey, dkey in names:
                    pipe.evalsha(script.sha, 3, ikey, xkey, dkey, member)
                replies = await pipe.execute(raise_on_error=False)
                if any(isinstance(r, rex.NoScriptError) for r in replies):
                    # Every call of the transaction runs the same script, so either all
                    # ran or none did (empty script cache): load it and run them again.
                    await self._client.script_load(script.source)
                    continue
                for reply in replies:
                    if isinstance(reply, BaseException):
                        raise reply
                return sum(int(r) for r in replies)
            raise rex.NoScriptError("the DELETE script vanished twice from the script cache")

        return await self._run("DELETE", True, go)

    async def _walk(self, ns: str, prefix: str, values: bool) -> AsyncIterator[tuple[bytes, bytes]]:
        # RedisStore._walk on a standalone server: one group of buckets.
        keys = self._store._layout(ns).flat
        args = iter_args(prefix, values)
        while True:
            res = await self._eval((lua.ITER, keys, args), write=False)
            for row in iter_rows(res, values):
                yield row
            next_args = iter_next(args, res)
            if next_args is None:
                return
            args = next_args

    async def iter_keys(self, ns: str, prefix: str = "") -> AsyncIterator[str]:
        async for member, _ in self._walk(ns, prefix, False):
            try:
                key = member.decode("utf-8")
            except UnicodeDecodeError:
                continue  # no key of the store (see RedisStore._iter_keys)
            yield key

    async def iter_items(self, ns: str, prefix: str = "") -> AsyncIterator[tuple[str, bytes]]:
        async for member, data in self._walk(ns, prefix, True):
            try:
                key = member.decode("utf-8")
            except UnicodeDecodeError:
                continue  # no key of the store (see RedisStore._iter_keys)
            yield key, data

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self._client.aclose()
        except (rex.RedisError, OSError) as exc:
            self._store._log.debug("closing the async Redis client failed: %s", exc)
