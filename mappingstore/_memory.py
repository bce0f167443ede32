"""In-process memory backend (``memory://`` and ``memory://NAME``)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

from . import _crypto
from ._codec import PLAIN_HEADER, decode_plain, pack, wrap_plain
from ._store import Op, Record, Store
from ._url import parse_url
from .errors import InvalidURLError

__all__ = ["MemoryStore"]


class _Space:
    """The data behind one memory store, shared by every instance opened on the same NAME."""

    __slots__ = ("expiring", "key", "lock", "seq", "spaces")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # Odd while a multi-key _apply is half done: lock-free readers that see an odd or
        # changed value retry under the lock, so a batch is seen all or nothing.
        self.seq = 0
        self.spaces: dict[str, dict[str, Record]] = {}
        self.expiring: dict[str, int] = {}  # records ever written with an expiry, per ns
        self.key = _crypto.random_key()  # for encrypt=True without a password


_NAMED: dict[str, _Space] = {}
_NAMED_LOCK = threading.Lock()
_EMPTY: dict[str, Record] = {}


class MemoryStore(Store):
    """Values kept in this process's memory, encoded (so reads return copies).

    ``MemoryStore()`` is private to the instance. ``MemoryStore("NAME")`` (or
    ``open("memory://NAME")``) shares its data with every store opened on ``NAME`` in the
    process, and keeps it when they are closed: reopening never wipes data. Free a named
    store's memory with :meth:`drop`.

    Thread-safe. Not shared between processes (use ``shm://`` for that). Nothing survives
    the process. ``encrypt=True`` without a password uses a random per-store key that never
    leaves the process.
    """

    scheme: ClassVar[str] = "memory"
    durability: ClassVar[str] = "none: data lives only as long as the process"

    def __init__(self, name: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        if name is not None and not isinstance(name, str):
            raise InvalidURLError("the memory store name must be str")
        self._name = name or None
        if self._name is None:
            self._space = _Space()
        else:
            with _NAMED_LOCK:
                self._space = _NAMED.setdefault(self._name, _Space())
        self._start()
        # The common case (plain values, no dot names, no default TTL, writable) takes an
        # inlined path in __getitem__/__setitem__: a memory store's cost is all Python
        # call overhead, so every layer skipped shows. Batches, closed stores, non-ASCII
        # keys (they need the Unicode check) and everything else take the general path.
        self._fast = not (
            self._dot or self._readonly or self._encrypt_default or self._default_ttl is not None
        )

    def __getitem__(self, key: str) -> Any:
        # docstring inherited
        if self._fast and type(key) is str and key and key.isascii() and not self._nbatch:
            space = self._space
            seq = space.seq
            # A dict lookup is atomic; the sequence check replaces the lock.
            rec = space.spaces.get(self._ns, _EMPTY).get(key)
            if seq & 1 or space.seq != seq:
                with space.lock:
                    rec = space.spaces.get(self._ns, _EMPTY).get(key)
            if rec is not None and not self._closed:
                expires = rec[1]
                if expires is None or expires > self._clock():
                    data = rec[0]
                    if data[:2] == PLAIN_HEADER:
                        return decode_plain(data)
                    return self._decode(self._ns, key, data)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        # docstring inherited
        if (
            self._fast
            and type(key) is str
            and key
            and key.isascii()
            and not self._nbatch
            and not self._closed
        ):
            data = wrap_plain(pack(value))
            space = self._space
            with space.lock:
                bucket = space.spaces.get(self._ns)
                if bucket is None:
                    bucket = space.spaces[self._ns] = {}
                bucket[key] = (data, None)
            return
        self.set(key, value)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStore:
        """``memory://`` (private) or ``memory://NAME`` (shared by name in the process)."""
        parsed = parse_url(url, cls.scheme)
        name = parsed.netloc + parsed.path
        return cls(name or None, **{**parsed.options, **options})

    @classmethod
    def drop(cls, name: str) -> bool:
        """Forget the named store *name* and free its memory; return whether it existed."""
        with _NAMED_LOCK:
            return _NAMED.pop(name, None) is not None

    @property
    def url(self) -> str:
        return f"memory://{self._name}" if self._name else "memory://"

    def _ephemeral_key(self) -> bytes | None:
        return self._space.key

    # -- backend contract ---------------------------------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        space = self._space
        with space.lock:
            rec = space.spaces.get(ns, _EMPTY).get(key)
            if rec is None:
                return None
            expires = rec[1]
            if expires is not None and expires <= self._clock():
                del space.spaces[ns][key]
                return None
            return rec

    def _get(self, ns: str, key: str) -> bytes | None:
        space = self._space
        with space.lock:
            rec = space.spaces.get(ns, _EMPTY).get(key)
            if rec is None:
                return None
            if rec[1] is not None and rec[1] <= self._clock():
                del space.spaces[ns][key]
                return None
            return rec[0]

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        space = self._space
        with space.lock:
            bucket = space.spaces.get(ns)
            if bucket is None:
                bucket = space.spaces[ns] = {}
            bucket[key] = (data, expires)
            if expires is not None:
                space.expiring[ns] = space.expiring.get(ns, 0) + 1

    def _delete(self, ns: str, key: str) -> bool:
        space = self._space
        with space.lock:
            bucket = space.spaces.get(ns)
            if not bucket:
                return False
            rec = bucket.pop(key, None)
            if not bucket:
                del space.spaces[ns]
                space.expiring.pop(ns, None)
            return rec is not None and (rec[1] is None or rec[1] > self._clock())

    def _live(self, ns: str) -> list[tuple[str, Record]]:
        # A snapshot: iteration never fails because another thread changed the dict.
        with self._space.lock:
            items = list(self._space.spaces.get(ns, _EMPTY).items())
            if not self._space.expiring.get(ns):
                return items
        now = self._clock()
        return [(k, r) for k, r in items if r[1] is None or r[1] > now]

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        for key, _ in self._live(ns):
            if key.startswith(prefix):
                yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        for key, rec in self._live(ns):
            if key.startswith(prefix):
                yield key, rec[0]

    def _count(self, ns: str) -> int:
        with self._space.lock:
            bucket = self._space.spaces.get(ns, _EMPTY)
            if not self._space.expiring.get(ns):
                return len(bucket)
        return len(self._live(ns))

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(ns, k) for k in keys]

    def _apply(self, ops: Sequence[Op]) -> None:
        space = self._space
        with space.lock:  # readers take the same lock (or check seq): all or nothing
            space.seq += 1
            try:
                for op in ops:
                    if op.data is None:
                        self._delete(op.ns, op.key)
                    else:
                        self._put(op.ns, op.key, op.data, op.expires)
            finally:
                space.seq += 1

    def _exclusive(self) -> Any:
        return self._space.lock

    def _clear(self, ns: str) -> None:
        with self._space.lock:
            self._space.spaces.pop(ns, None)
            self._space.expiring.pop(ns, None)

    def _purge_expired(self, ns: str) -> int:
        now = self._clock()
        with self._space.lock:
            bucket = self._space.spaces.get(ns, _EMPTY)
            dead = [k for k, r in bucket.items() if r[1] is not None and r[1] <= now]
            for k in dead:
                del bucket[k]
            self._space.expiring[ns] = sum(1 for r in bucket.values() if r[1] is not None)
            return len(dead)

    def _namespaces(self) -> Iterable[str]:
        with self._space.lock:
            return [ns for ns, bucket in self._space.spaces.items() if bucket]

    def _close(self) -> None:
        if self._name is None:
            self._space = _Space()  # a private store's data goes with it
