"""Record-level access for the jobs that need more than the mapping API.

``ls --long`` shows a record's stored size and encryption flag, ``check`` authenticates
records without keeping the values, and ``copy``/``export``/``import`` carry each item's
expiry and work across namespaces. Those go through the backend contract of
:class:`~mappingstore.Store` (``_rrecord``, ``_rkeys``, ``_decode``, ``_apply``...); this
module is the only place in the CLI that does, so the dependency stays visible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from .._store import Op, Record, Store

__all__ = [
    "RecordReader",
    "count",
    "datas",
    "decode",
    "default_expires",
    "encode",
    "keys",
    "now",
    "purge",
    "record",
    "write",
]


def record(store: Store, ns: str, key: str) -> Record | None:
    """The live record ``(data, expires)`` of *key* in raw namespace *ns*, or ``None``."""
    store._check_open()
    rec = store._rrecord(ns, key)
    if rec is not None and rec[1] == math.inf:
        # Only an import that took "expires": 1e400 (older versions did) wrote this; it
        # never expires, and neither JSON nor Redis has a word for it.
        return (rec[0], None)
    return rec


def keys(store: Store, ns: str, prefix: str = "") -> Iterator[str]:
    """Live raw key names of *ns* starting with *prefix* (backend order)."""
    store._check_open()
    return store._rkeys(ns, prefix)


def count(store: Store, ns: str) -> int:
    """Number of live records in *ns*."""
    store._check_open()
    return store._rcount(ns)


def datas(store: Store, ns: str, names: Sequence[str]) -> list[bytes | None]:
    """The record data of each of *names* (``None`` if missing), in one round trip."""
    store._check_open()
    return store._get_many(ns, list(names))


def default_expires(store: Store) -> float | None:
    """The expiry a new item gets from the store's default TTL (``None``: never)."""
    return store._expires(None)


def decode(store: Store, ns: str, key: str, data: bytes) -> Any:
    """Check (CRC or AEAD tag) and decode one record of *ns*."""
    return store._decode(ns, key, data)


def encode(store: Store, ns: str, key: str, value: Any, encrypt: bool | None = None) -> bytes:
    """Encode *value* as a record of *key* in *ns* (sealed when the store encrypts)."""
    return store._encode(ns, key, value, encrypt)


def write(store: Store, ops: Sequence[tuple[str, str, bytes, float | None]]) -> None:
    """Write ``(ns, key, data, expires)`` records atomically (one transaction/pipeline)."""
    store._check_writable()
    if ops:
        store._apply([Op(ns, key, data, expires) for ns, key, data, expires in ops])


def purge(store: Store, ns: str) -> int:
    """Physically remove the expired records of *ns*; return how many."""
    store._check_writable()
    return store._purge_expired(ns)


def now(store: Store) -> float:
    """The store's clock (what ``expires`` is measured against)."""
    return store._clock()


class RecordReader:
    """Reads many records of a store, concurrently when each read is a network round trip.

    The backend contract reads a record (value *and* expiry) one key at a time; bulk
    ``_get_many`` returns values only. On a local backend that is fast enough, but on a
    server each read waits for a round trip (Redis: 100,000 reads take about a minute),
    so once the first reads show that cost, the rest go through a small thread pool
    (stores are thread-safe). The results are the same either way; only speed differs.
    """

    #: A read slower than this is a round trip to a server, not a local lookup.
    ROUND_TRIP = 100e-6
    WORKERS = 8
    _PROBE = 32

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pool: ThreadPoolExecutor | None = None
        self._decided = False

    def read(self, ns: str, names: Sequence[str]) -> list[Record | None]:
        """The live record of each of *names* in *ns* (``None``: missing or expired)."""
        store = self._store
        done: list[Record | None] = []
        if not self._decided:
            probe = names[: self._PROBE]
            start = time.perf_counter()
            done = [record(store, ns, name) for name in probe]
            if len(probe) == self._PROBE:
                self._decided = True
                if (time.perf_counter() - start) / len(probe) > self.ROUND_TRIP:
                    self._pool = ThreadPoolExecutor(
                        self.WORKERS, thread_name_prefix="mappingstore-read"
                    )
        rest = names[len(done) :]
        if self._pool is not None:
            done.extend(self._pool.map(lambda name: record(store, ns, name), rest))
        else:
            done.extend(record(store, ns, name) for name in rest)
        return done

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
