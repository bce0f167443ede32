"""In-process memory backend (``memory://`` and ``memory://NAME``)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar, TypeAlias

import msgpack

from . import _crypto
from ._codec import _DECODE_ERRORS, _ext_hook, pack, unpack, unwrap_plain, wrap_plain
from ._keys import check_key
from ._store import Op, Record, Store, _iterable
from ._url import parse_url
from .errors import InvalidURLError

__all__ = ["MemoryStore"]


# What a memory store holds per key. A plain value is kept bare: its msgpack payload
# without the record frame (header and CRC32), because the frame guards against damage on
# a medium, and an immutable bytes object in this process has none. The common entry, a
# bare payload without expiry, is that bytes object itself (one indirection less on every
# read); any other is a tuple (body, expires, bare). The frame is added whenever a record
# leaves the store (_get, _get_record, _iter_items: export, adapters, the generic paths),
# so everything outside sees the ordinary checked record. A record that comes in through
# _put is checked on entry: a plain record whose CRC holds is kept bare; anything else (an
# encrypted record, or a damaged one, which then reads as damaged, as on every backend) is
# kept framed.
_Entry: TypeAlias = "bytes | tuple[bytes, float | None, bool]"


def _entry(data: bytes, expires: float | None) -> _Entry:
    payload = unwrap_plain(data)
    if payload is None:
        return (data, expires, False)
    return payload if expires is None else (payload, expires, True)


def _expires(entry: _Entry) -> float | None:
    return entry[1] if isinstance(entry, tuple) else None


def _framed(entry: _Entry) -> bytes:
    if isinstance(entry, tuple):
        return wrap_plain(entry[0]) if entry[2] else entry[0]
    return wrap_plain(entry)


def _record(entry: _Entry) -> Record:
    return (_framed(entry), _expires(entry))


class _KeyIndex:
    """The keys of one namespace in sorted order, for :meth:`MemoryStore._has_prefix`
    (dot names ask it for every leaf written: is the name a branch?), which would
    otherwise scan every key.

    Made by the first question, then kept up to date by every write of a new key, under
    the space's lock. Deletions are not tracked (there are many ways to delete): a key
    found here is checked against the namespace's dict, and one that is gone is dropped
    then. The list is rebuilt when it holds many more keys than the namespace.
    """

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys: list[str] | None = None

    def add(self, key: str) -> None:
        """Record a key new to the namespace (call under the lock; a no-op before the
        first question)."""
        keys = self.keys
        if keys is not None:
            i = bisect_left(keys, key)
            if i == len(keys) or keys[i] != key:  # it may still be here from before
                keys.insert(i, key)


class _Space:
    """The data behind one memory store, shared by every instance opened on the same NAME."""

    __slots__ = ("expiring", "indexes", "key", "lock", "seq", "spaces")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        # Odd while a multi-key _apply is half done: lock-free readers that see an odd or
        # changed value retry under the lock, so a batch is seen all or nothing.
        self.seq = 0
        # One dict per namespace, never replaced or removed once made (an empty one is an
        # empty namespace), so an instance can keep a reference to its own.
        self.spaces: dict[str, dict[str, _Entry]] = {}
        self.expiring: dict[str, int] = {}  # records ever written with an expiry, per ns
        self.indexes: dict[str, _KeyIndex] = {}  # per ns, like spaces
        self.key = _crypto.random_key()  # for encrypt=True without a password

    def bucket(self, ns: str) -> dict[str, _Entry]:
        with self.lock:
            return self.spaces.setdefault(ns, {})

    def index(self, ns: str) -> _KeyIndex:
        with self.lock:
            return self.indexes.setdefault(ns, _KeyIndex())


_NAMED: dict[str, _Space] = {}
_NAMED_LOCK = threading.Lock()
_EMPTY: dict[str, _Entry] = {}


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
        self._bucket = self._space.bucket(self._ns)
        self._index = self._space.index(self._ns)
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
        # No key check: only valid keys are ever stored, so a str found is a valid key, and
        # one not found (or invalid) takes the general path, which checks it.
        if self._fast and type(key) is str and not self._nbatch:
            space = self._space
            seq = space.seq
            # A dict lookup is atomic; the sequence check replaces the lock.
            entry = self._bucket.get(key)
            if seq & 1 or space.seq != seq:
                with space.lock:
                    entry = self._bucket.get(key)
            if entry is not None and not self._closed:
                if type(entry) is bytes:
                    body = entry
                elif isinstance(entry, tuple):
                    expires = entry[1]
                    if expires is not None and expires <= self._clock():
                        return super().__getitem__(key)  # expired: removed there
                    if not entry[2]:
                        return self._decode(self._ns, key, entry[0])
                    body = entry[0]
                try:  # codec.unpack() inlined: this is every read's path
                    return msgpack.unpackb(body, ext_hook=_ext_hook, strict_map_key=False)
                except _DECODE_ERRORS:
                    return unpack(body)  # a value one level too deep, or the error to raise
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
            entry = pack(value)
            lock = self._space.lock  # excludes modify, batches and the other locked paths
            lock.acquire()
            try:
                bucket = self._bucket
                if self._index.keys is not None and key not in bucket:
                    self._index.add(key)
                bucket[key] = entry
            finally:
                lock.release()
            return
        self.set(key, value)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        # docstring inherited
        if self._dot or self._closed or self._batch() is not None:
            return super().get_many(keys)
        checked = [check_key(k) for k in _iterable(keys, "get_many()")]
        ns = self._ns
        with self._space.lock:
            entries = [self._entry_live(ns, k) for k in checked]
        return {
            k: self._value(ns, k, e) for k, e in zip(checked, entries, strict=True) if e is not None
        }

    def _iter_pairs(self) -> Iterator[tuple[str, Any]]:
        # items() and values(): entries decoded as they are, never framed first
        if self._dot or self._closed or self._batch() is not None:
            yield from super()._iter_pairs()
            return
        ns = self._ns
        for key, entry in self._live(ns):
            yield key, self._value(ns, key, entry)

    def _value(self, ns: str, key: str, entry: _Entry) -> Any:
        if isinstance(entry, tuple):
            return unpack(entry[0]) if entry[2] else self._decode(ns, key, entry[0])
        return unpack(entry)

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

    def _entry_live(self, ns: str, key: str) -> _Entry | None:
        """The live entry of *key* (an expired one is removed); call under the lock."""
        bucket = self._space.spaces.get(ns, _EMPTY)
        entry = bucket.get(key)
        if entry is None:
            return None
        expires = _expires(entry)
        if expires is not None and expires <= self._clock():
            del bucket[key]
            return None
        return entry

    def _get_record(self, ns: str, key: str) -> Record | None:
        with self._space.lock:
            entry = self._entry_live(ns, key)
        return None if entry is None else _record(entry)

    def _contains(self, ns: str, key: str) -> bool:
        with self._space.lock:
            return self._entry_live(ns, key) is not None

    def _get(self, ns: str, key: str) -> bytes | None:
        with self._space.lock:
            entry = self._entry_live(ns, key)
        return None if entry is None else _framed(entry)

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        entry = _entry(data, expires)
        space = self._space
        with space.lock:
            bucket = space.spaces.get(ns)
            if bucket is None:
                bucket = space.spaces[ns] = {}
            if key not in bucket and (index := space.indexes.get(ns)) is not None:
                index.add(key)
            bucket[key] = entry
            if expires is not None:
                space.expiring[ns] = space.expiring.get(ns, 0) + 1

    def _delete(self, ns: str, key: str) -> bool:
        space = self._space
        with space.lock:
            bucket = space.spaces.get(ns)
            if not bucket:
                return False
            entry = bucket.pop(key, None)
            if not bucket:
                space.expiring.pop(ns, None)
            if entry is None:
                return False
            expires = _expires(entry)
            return expires is None or expires > self._clock()

    def _live(self, ns: str) -> list[tuple[str, _Entry]]:
        # A snapshot: iteration never fails because another thread changed the dict.
        with self._space.lock:
            items = list(self._space.spaces.get(ns, _EMPTY).items())
            if not self._space.expiring.get(ns):
                return items
        now = self._clock()
        return [(k, e) for k, e in items if type(e) is bytes or e[1] is None or e[1] > now]

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        for key, _ in self._live(ns):
            if key.startswith(prefix):
                yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        for key, entry in self._live(ns):
            if key.startswith(prefix):
                yield key, _framed(entry)

    def _has_prefix(self, ns: str, prefix: str) -> bool:
        # docstring inherited; see _KeyIndex
        space = self._space
        with space.lock:
            bucket = space.spaces.get(ns)
            if not bucket:
                return False
            index = space.indexes.get(ns)
            if index is None:
                index = space.indexes[ns] = _KeyIndex()
            keys = index.keys
            if keys is None or len(keys) > 2 * len(bucket) + 64:
                keys = index.keys = sorted(bucket)
            i = bisect_left(keys, prefix)
            while i < len(keys) and keys[i].startswith(prefix):
                if self._entry_live(ns, keys[i]) is not None:
                    return True
                del keys[i]  # deleted (or expired, and removed just now)
            return False

    def _count(self, ns: str) -> int:
        with self._space.lock:
            bucket = self._space.spaces.get(ns, _EMPTY)
            if not self._space.expiring.get(ns):
                return len(bucket)
        return len(self._live(ns))

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        # One lock for all: a batch committed meanwhile is seen whole or not at all.
        with self._space.lock:
            entries = [self._entry_live(ns, k) for k in keys]
        return [None if e is None else _framed(e) for e in entries]

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
            bucket = self._space.spaces.get(ns)
            if bucket is not None:
                bucket.clear()
            self._space.expiring.pop(ns, None)
            index = self._space.indexes.get(ns)
            if index is not None:
                index.keys = None

    def _purge_expired(self, ns: str) -> int:
        now = self._clock()
        with self._space.lock:
            bucket = self._space.spaces.get(ns, _EMPTY)
            dead = [k for k, e in bucket.items() if (x := _expires(e)) is not None and x <= now]
            for k in dead:
                del bucket[k]
            self._space.expiring[ns] = sum(1 for e in bucket.values() if _expires(e) is not None)
            return len(dead)

    def _namespaces(self) -> Iterable[str]:
        with self._space.lock:
            return [ns for ns, bucket in self._space.spaces.items() if bucket]

    def _close(self) -> None:
        if self._name is None:
            self._space = _Space()  # a private store's data goes with it
            self._bucket = self._space.bucket(self._ns)
