"""``Cached(store, maxsize=1024, ttl=None)``: an LRU read cache in front of a store."""

from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from .._keys import INTERNAL_PREFIX, check_key
from .._store import KEEP, Op, Record, Store
from ..errors import InvalidOptionError, OptionTypeError
from ._base import Adapter, add_query

if TYPE_CHECKING:
    from .._blobs import Blobs

__all__ = ["CacheInfo", "Cached"]

_STRIPES = 64  # generation counters: a write bumps one stripe, not the whole cache


def _uncached(ns: str) -> bool:
    """Records that go straight to the store: every internal namespace. That is the
    metadata (it belongs to the store); blob chunks (up to 64 MiB each: caching them would
    hold whole blobs in memory, which is what streaming avoids; a reader caches its one
    chunk itself); and time series and event logs. A series or a log is several records
    read together and checked against the write version in its head record: cached
    records of different ages (an old head from the cache, a newer chunk from the store)
    would pass that check and give points that never existed together, or report a chunk
    another writer removed as damage."""
    return ns.startswith(INTERNAL_PREFIX)


class CacheInfo(NamedTuple):
    """Counters of a :class:`Cached` store, like :func:`functools.lru_cache`'s."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


class _Write:
    """One key's write in flight (see :meth:`Cached._begin`)."""

    __slots__ = ("epoch", "key", "solo", "starts")

    def __init__(self, key: tuple[str, str], solo: bool, starts: int, epoch: int) -> None:
        self.key, self.solo, self.starts, self.epoch = key, solo, starts, epoch


class Cached(Adapter):
    """An LRU cache of raw records in front of *store*.

    Reads fill the cache (misses too: a key known to be missing is not asked again);
    writes, deletes, ``modify`` and batches go to the store first and then update the
    cache. Records whose own expiry has passed are never served. ``len``, iteration,
    ``items()`` and ``names()`` always come from the store (they are not cached).

    **Staleness.** The cache only sees writes made through *this* ``Cached`` object.
    Writes by another process, or through another store object, show up only once the
    cached entry is gone: evicted by LRU, dropped by :meth:`invalidate`, or older than
    ``ttl`` seconds (``ttl=None``: trusted until evicted). Use ``ttl=`` when the store is
    shared. Writes are never built on a stale entry: inside the store's exclusive section
    (``modify``, ``pop``, ``setdefault``, ``delete_many``, the leaf/branch checks of dot
    names, time-series and event-log writes), and in the read-modify-writes of a batch,
    every read goes to the store, and refreshes the entry it read.

    **get_many** of several keys is served from the cache only when ``ttl=None`` (every
    writer goes through this object), every key is cached, and no write of any of them is
    under way; otherwise all the keys are read from the store in one ``_get_many``, so it
    is as consistent as the store's own (a batch seen whole or not at all), never a mix of
    cached and fresh records. (Under dot names ``get_many`` reads key by key, on every
    store.)

    ``maxsize`` counts entries, not bytes. Thread-safe: no lock is held while the store
    is called, and a read that raced a write never puts an old record back in the cache.

    **Blobs** are the wrapped store's own, kept in its own form (a directory store's blob
    files): a blob written through the store reads through the cache and the other way
    round. Blobs are never cached: chunk records bypass the cache, as the metadata does.
    Nor are time series and event logs (their records are read from the store).
    """

    scheme: ClassVar[str] = "cached"

    def __init__(
        self,
        store: Store,
        maxsize: int = 1024,
        ttl: float | None = None,
        *,
        close_inner: bool = False,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int):
            raise OptionTypeError(f"maxsize must be an int, not {type(maxsize).__qualname__}")
        if maxsize < 1:
            raise InvalidOptionError(f"maxsize must be >= 1, got {maxsize}")
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
                raise OptionTypeError(f"ttl must be a number of seconds, not {ttl!r}")
            if math.isnan(ttl) or ttl <= 0:
                raise InvalidOptionError(f"ttl must be > 0 seconds, got {ttl!r}")
        self._maxsize = maxsize
        self._trust = None if ttl is None else float(ttl)
        super().__init__([store], store, close_inner=close_inner)
        self._cache_lock = threading.Lock()
        # (ns, key) -> (record or None for "missing", time it was filled)
        self._entries: OrderedDict[tuple[str, str], tuple[Record | None, float]] = OrderedDict()
        self._gens = [0] * _STRIPES
        self._writing: dict[tuple[str, str], list[int]] = {}  # key -> [in flight, starts]
        self._epoch = 0  # bumped by clear() and invalidate(): no older read may fill
        self._hits = 0
        self._misses = 0
        # Threads inside _exclusive() (see there): their reads bypass the cache. The
        # count lets every other read skip the thread-local lookup.
        self._in_exclusive = 0
        self._excl_tls = threading.local()
        self._clearing: dict[str, int] = {}  # namespaces being cleared -> how many times

    @property
    def maxsize(self) -> int:
        """The most entries the cache holds."""
        return self._maxsize

    @property
    def ttl_seconds(self) -> float | None:
        """How long a cached entry is trusted (``None``: until evicted)."""
        return self._trust

    @property
    def url(self) -> str:
        """The wrapped store's URL with ``cache=`` (and ``cache_ttl=``).

        A URL holds one cache: for a ``Cached`` over another ``Cached`` (directly or
        through other adapters) it is this, the outer cache's options, which replace the
        inner one's. The URL opens one cache instead of two, over the same data.
        """
        ttl = None if self._trust is None else repr(self._trust)
        return add_query(self._inner.url, cache=str(self._maxsize), cache_ttl=ttl)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Cached maxsize={self._maxsize} ttl={self._trust!r}{state} of {self._inner!r}>"

    # -- public cache control -----------------------------------------------------------

    def cache_info(self) -> CacheInfo:
        """Hits, misses, maxsize and current size of the cache."""
        with self._cache_lock:
            return CacheInfo(self._hits, self._misses, self._maxsize, len(self._entries))

    def invalidate(self, key: str | None = None) -> None:
        """Forget the cached entry of *key* (in this store's namespace), or everything.

        Use it after another process wrote, when ``ttl`` is too long to wait for.
        A *key* that is not a valid key raises as ``store[key]`` does
        (:class:`~mappingstore.errors.KeyTypeError`, ``InvalidKeyError``).
        """
        if key is not None:
            key = check_key(key)
        with self._cache_lock:
            if key is None:
                self._epoch += 1
                self._entries.clear()
            else:
                self._gens[hash((self._ns, key)) % _STRIPES] += 1
                self._entries.pop((self._ns, key), None)

    def _release(self) -> None:
        with self._cache_lock:
            self._epoch += 1
            self._entries.clear()

    # -- cache internals ----------------------------------------------------------------

    def _lookup(self, ck: tuple[str, str]) -> tuple[bool, Record | None, tuple[int, int]]:
        """``(hit, record, token)``; *token* lets a miss fill the cache only if no write
        (or clear) happened to the key meanwhile."""
        stripe = hash(ck) % _STRIPES
        with self._cache_lock:
            entry = self._entries.get(ck)
            if entry is not None:
                rec, filled = entry
                now = self._clock()
                fresh = self._trust is None or now - filled < self._trust
                alive = rec is None or rec[1] is None or rec[1] > now
                if fresh and alive:
                    self._entries.move_to_end(ck)
                    self._hits += 1
                    return True, rec, (0, 0)
                del self._entries[ck]
            self._misses += 1
            return False, None, (self._gens[stripe], self._epoch)

    def _store_entry(self, ck: tuple[str, str], rec: Record | None) -> None:
        # Caller holds _cache_lock.
        self._entries[ck] = (rec, self._clock())
        self._entries.move_to_end(ck)
        while len(self._entries) > self._maxsize:
            self._entries.popitem(last=False)

    def _fill(self, ck: tuple[str, str], rec: Record | None, token: tuple[int, int]) -> None:
        with self._cache_lock:
            if token == (self._gens[hash(ck) % _STRIPES], self._epoch):
                self._store_entry(ck, rec)

    def _begin(self, keys: Iterable[tuple[str, str]]) -> list[_Write]:
        """Register writes in flight. A write may update the cache at its end only if no
        other write to the same key overlapped it: then its result is the store's state.
        Overlapping writes evict instead (their order in the store is unknown)."""
        writes = []
        with self._cache_lock:
            for ck in dict.fromkeys(keys):
                self._gens[hash(ck) % _STRIPES] += 1
                state = self._writing.get(ck)
                if state is None:
                    state = self._writing[ck] = [0, 0]
                solo = state[0] == 0
                state[0] += 1
                state[1] += 1
                writes.append(_Write(ck, solo, state[1], self._epoch))
        return writes

    def _finish(self, writes: list[_Write], results: dict[tuple[str, str], Any]) -> None:
        """End writes: cache each key's new record (``None``: now missing), or evict it
        when the write overlapped another, failed, or its result is unknown."""
        with self._cache_lock:
            for w in writes:
                ck = w.key
                self._gens[hash(ck) % _STRIPES] += 1
                state = self._writing[ck]
                state[0] -= 1
                alone = w.solo and state[1] == w.starts and w.epoch == self._epoch
                if state[0] == 0:
                    del self._writing[ck]
                rec = results.get(ck, KEEP)
                if alone and rec is not KEEP:
                    self._store_entry(ck, rec)
                else:
                    self._entries.pop(ck, None)

    # -- reads (docstrings inherited) ---------------------------------------------------

    def _blob_backend_for(self, facade: Store) -> Blobs:
        # The wrapped store keeps the bytes in its own form; *facade* checks and encodes.
        return self._inner._blob_backend_for(facade)

    def _for_write(self) -> bool:
        """Whether this thread's reads are for a write, so must bypass the cache: inside
        :meth:`_exclusive`, or a read-modify-write inside a batch (the batch's commit
        checks that the records it read are still the stored ones: a stale entry would
        make it fail with ``BatchConflictError`` though no other writer came in)."""
        if self._in_exclusive and getattr(self._excl_tls, "depth", 0):
            return True
        if self._nbatch:
            batch = self._batch()
            return batch is not None and batch.rmw > 0
        return False

    def _read_through(self, ns: str, key: str) -> Record | None:
        """The store's record of *key*, bypassing the cache, which it then refreshes
        (unless a write or clear came in meanwhile)."""
        ck = (ns, key)
        with self._cache_lock:
            token = (self._gens[hash(ck) % _STRIPES], self._epoch)
        rec = self._inner._get_record(ns, key)
        self._fill(ck, rec, token)
        return rec

    def _get_record(self, ns: str, key: str) -> Record | None:
        if _uncached(ns):
            return self._inner._get_record(ns, key)
        if (self._in_exclusive or self._nbatch) and self._for_write():
            return self._read_through(ns, key)
        ck = (ns, key)
        hit, rec, token = self._lookup(ck)
        if hit:
            return rec
        rec = self._inner._get_record(ns, key)
        self._fill(ck, rec, token)
        return rec

    def _get(self, ns: str, key: str) -> bytes | None:
        rec = self._get_record(ns, key)
        return None if rec is None else rec[0]

    def _contains(self, ns: str, key: str) -> bool:
        return self._get_record(ns, key) is not None

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        if len(keys) == 1:
            return [self._get(ns, keys[0])]
        if (
            _uncached(ns)
            or self._trust is not None
            or ((self._in_exclusive or self._nbatch) and self._for_write())
        ):
            # Another writer may have changed any entry (ttl=) or the caller needs current
            # records: one read of the store, as consistent as its own get_many.
            return self._store_many(ns, keys)
        out: list[bytes | None] = []
        with self._cache_lock:
            # One pass under the lock: every key cached and none being written, or none
            # from the cache. Entries are then each the store's current record (every
            # write goes through this object, and a finished write updated or dropped its
            # entries at once), so together they are one state of the store. Mixing hits
            # with records read from the store could show half of a batch: one that
            # committed between the entry's fill and the read, or is committing now.
            now = self._clock()
            for key in keys:
                ck = (ns, key)
                entry = self._entries.get(ck)
                if entry is None or ck in self._writing or ns in self._clearing:
                    break
                rec = entry[0]
                if rec is not None and rec[1] is not None and rec[1] <= now:
                    break  # expired: _get_record drops the entry
                out.append(None if rec is None else rec[0])
            else:
                for key in keys:
                    self._entries.move_to_end((ns, key))
                self._hits += len(keys)
                return out
            self._misses += len(keys)
        return self._store_many(ns, keys)

    def _store_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        """``_get_many`` of the store; cached entries it proves stale are dropped."""
        found = self._inner._get_many(ns, keys)
        if _uncached(ns):
            return found
        # _get_many gives no expiry, so these records cannot be cached; an entry that
        # disagrees with them is stale (another writer) and goes, so that a later get()
        # does not show an older value than this get_many did.
        with self._cache_lock:
            for key, data in zip(keys, found, strict=True):
                ck = (ns, key)
                entry = self._entries.get(ck)
                if entry is not None and (None if entry[0] is None else entry[0][0]) != data:
                    del self._entries[ck]
                    # A read that began before ours must not fill its older record back.
                    self._gens[hash(ck) % _STRIPES] += 1
        return found

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        return self._inner._iter_keys(ns, prefix)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        return self._inner._iter_items(ns, prefix)

    def _count(self, ns: str) -> int:
        return self._inner._count(ns)

    def _namespaces(self) -> Iterable[str]:
        return self._inner._namespaces()

    # -- writes: the store first, then the cache ----------------------------------------

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        if _uncached(ns):
            self._inner._put(ns, key, data, expires)
            return
        ck = (ns, key)
        writes = self._begin([ck])
        results: dict[tuple[str, str], Any] = {}
        try:
            self._inner._put(ns, key, data, expires)
            results[ck] = (data, expires)
        finally:
            self._finish(writes, results)

    def _delete(self, ns: str, key: str) -> bool:
        if _uncached(ns):
            return self._inner._delete(ns, key)
        ck = (ns, key)
        writes = self._begin([ck])
        results: dict[tuple[str, str], Any] = {}
        try:
            existed = self._inner._delete(ns, key)
            results[ck] = None
        finally:
            self._finish(writes, results)
        return existed

    def _apply(self, ops: Sequence[Op]) -> None:
        writes = self._begin((op.ns, op.key) for op in ops if not _uncached(op.ns))
        results: dict[tuple[str, str], Any] = {}
        try:
            self._inner._apply(ops)
            for op in ops:
                if not _uncached(op.ns):
                    results[(op.ns, op.key)] = None if op.data is None else (op.data, op.expires)
        finally:
            self._finish(writes, results)

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        if _uncached(ns):
            self._inner._update(ns, key, fn)
            return
        ck = (ns, key)
        seen: list[Any] = []

        def step(rec: Record | None) -> Any:
            seen.clear()
            new = fn(rec)
            seen.extend((rec, new))
            return new

        writes = self._begin([ck])
        results: dict[tuple[str, str], Any] = {}
        try:
            self._inner._update(ns, key, step)
            if seen:
                current, new = seen
                # KEEP: nothing written, the record read inside the update is current.
                results[ck] = current if new is KEEP else new
        finally:
            self._finish(writes, results)

    def _clear(self, ns: str) -> None:
        with self._cache_lock:
            self._clearing[ns] = self._clearing.get(ns, 0) + 1
        try:
            self._drop_namespace(ns)
            try:
                self._inner._clear(ns)
            finally:
                self._drop_namespace(ns)
        finally:
            with self._cache_lock:
                if self._clearing[ns] == 1:
                    del self._clearing[ns]
                else:
                    self._clearing[ns] -= 1

    def _drop_namespace(self, ns: str) -> None:
        with self._cache_lock:
            self._epoch += 1
            for ck in [ck for ck in self._entries if ck[0] == ns]:
                del self._entries[ck]

    def _purge_expired(self, ns: str) -> int:
        return self._inner._purge_expired(ns)

    def _has_prefix(self, ns: str, prefix: str) -> bool:
        return self._inner._has_prefix(ns, prefix)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # The store's exclusive section, and while this thread holds it every read of
        # this thread goes to the store: a read-modify-write (a series or event-log head,
        # a dot-name leaf check, delete_many's count) must not build on a cached record
        # that another writer (another Cached object, another process) has replaced.
        with self._inner._exclusive(), self._fresh():
            yield

    @contextlib.contextmanager
    def _fresh(self) -> Iterator[None]:
        """While inside, every read of this thread goes to the store (and refreshes the
        entry it read); no lock of the store is taken."""
        tls = self._excl_tls
        depth = getattr(tls, "depth", 0)
        tls.depth = depth + 1
        if not depth:
            with self._cache_lock:
                self._in_exclusive += 1
        try:
            yield
        finally:
            tls.depth = depth
            if not depth:
                with self._cache_lock:
                    self._in_exclusive -= 1

    # -- listings and dot-name structure: from the store, never the cache ---------------

    def _uncached(self) -> contextlib.AbstractContextManager[None]:
        # Dot-name structure checks (view(), the views of views, names()'s leaf probe, a
        # torn listing's recheck) read the store: a stale cached leaf beside a branch
        # another writer made would be reported as a name both a leaf and a branch.
        return self._fresh()
