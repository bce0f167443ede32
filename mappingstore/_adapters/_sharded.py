"""``Sharded([s1, s2, ...])``: keys spread over several stores by rendezvous hashing."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from .._codec import ENCRYPTED_HEADER
from .._keys import INTERNAL_PREFIX, check_key, internal_ns
from .._store import KEEP, Op, Record, Store
from ..errors import IntegrityError, InvalidOptionError, OptionTypeError
from ._base import META_NS, Adapter

__all__ = ["Sharded"]


def _text_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _chunk_contexts(key: str) -> list[bytes]:
    """The two possible sealing contexts of the blob chunk record *key*
    (``C:<len>:<name>:<version>:<index hex>``; whether it is the last chunk is not in its
    key), or ``[]`` if *key* is not one."""
    from .._blobs import _context

    try:
        size, _, rest = key[2:].partition(":")
        version, _, index = rest[int(size) + 1 :].partition(":")
        number = int(index, 16)
    except ValueError:
        return []
    return [_context(version, number, False), _context(version, number, True)]


class Sharded(Adapter):
    """Keys spread over *shards*; ``len``, iteration and ``clear`` cover every shard.

    **Placement.** A key lives on the shard with the highest score
    ``blake2b(shard name, key)`` (rendezvous / highest-random-weight hashing). It is
    stable across processes, machines and Python versions (never the salted builtin
    ``hash()``), and adding a shard moves only the keys the new shard wins, about
    ``1/n`` of them; removing one moves only its own keys. Shard names default to
    ``"0"``, ``"1"``...: add new shards at the end, or pass stable ``names=`` when shards
    may be removed or reordered. After changing the shard list of existing data, call
    :meth:`rebalance` before anything else (until then a moved key reads as missing).

    ``placement(key) -> int`` replaces the hash for user keys (it must be deterministic
    across processes). The store's own records (time series, event logs) are placed per
    namespace: every series and event log of one namespace lives on one shard, so their
    multi-record writes are atomic. Metadata (key slot) stays on each shard.

    **Atomicity.** Single-key writes, ``modify``, ``pop`` and ``setdefault`` are atomic
    on the owning shard (across processes where that backend is). A batch or
    ``update()`` touching several shards takes every involved shard's exclusive section
    (in shard order) and writes each shard atomically, but the shards commit one after
    the other: a crash in between can apply a batch on some shards only, and a reader
    meanwhile can see it applied on some shards only. The same holds for dot-name
    branch writes whose leaves sit on different shards. ``clear`` empties the shards one
    by one.

    **Readers** take no lock, so their consistency is per shard: ``get_many`` reads each
    shard with one ``_get_many`` (a batch's keys on one shard are seen all or none, as
    that shard's own ``get_many`` sees them), but keys on different shards are read at
    different moments, and can show a multi-shard batch half applied. Iteration,
    ``items()``, ``values()`` and ``len`` walk the shards one after the other, with the
    same per-shard guarantee. (A cross-shard snapshot would need every reader to hold
    the shards' exclusive sections, stopping every writer.) Keep keys that must be read
    together on one shard (``placement=``) when that matters.

    **Encryption.** Options are those of the first shard, used on every shard (so two
    shards must be two locations). With encryption, open all shards with one password:
    each record is sealed with the key of the shard that holds it, so a shard stays
    readable when others are reordered or removed. Thread-safe as the shards are.
    """

    scheme: ClassVar[str] = "sharded"

    def __init__(
        self,
        shards: Sequence[Store],
        placement: Callable[[str], int] | None = None,
        *,
        names: Sequence[str] | None = None,
        close_inner: bool = False,
    ) -> None:
        if not isinstance(shards, Sequence):  # a Store is a Mapping, not a Sequence
            raise OptionTypeError("Sharded takes a list of stores")
        stores = tuple(shards)
        if not stores:
            raise InvalidOptionError("Sharded needs at least one store")
        if placement is not None and not callable(placement):
            raise OptionTypeError("placement must be a callable key -> shard index")
        if names is None:
            labels = [str(i) for i in range(len(stores))]
        else:
            if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
                raise OptionTypeError("names must be a list of str, one per shard")
            labels = list(names)
            if not all(isinstance(n, str) for n in labels):
                raise OptionTypeError("shard names must be str")
            if len(labels) != len(stores) or len(set(labels)) != len(labels):
                raise InvalidOptionError("give one distinct name per shard")
        super().__init__(stores, stores[0], close_inner=close_inner)
        # Every shard is used in the first shard's namespace: two shards at one location
        # (one database or directory, whatever their namespace= option) would hold the
        # same records, each listed twice. An anonymous memory store has no location.
        urls = [s.url for s in stores if s.url != "memory://"]
        if len(set(urls)) != len(urls):
            raise InvalidOptionError(
                "Sharded got two shards at one location (every shard is used in the "
                "first shard's namespace): give each shard its own database or directory"
            )
        self._shards = stores
        self._names = tuple(labels)
        self._placement = placement
        # Hash the shard name once; each lookup copies the state and feeds the key.
        self._seeds = [
            hashlib.blake2b(b"mappingstore-shard\x00" + _text_bytes(n) + b"\x00", digest_size=8)
            for n in labels
        ]

    @property
    def shard_names(self) -> tuple[str, ...]:
        """The shard names used for hashing."""
        return self._names

    @property
    def url(self) -> str:
        """The URLs of the shards, for display: not one URL (reopen with ``open_sharded``)."""
        return "sharded:[" + ", ".join(s.url for s in self._shards) + "]"

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Sharded{state} [{self._inner_reprs()}]>"

    @property
    def durability(self) -> str:  # type: ignore[override]
        """Each shard's own (named per shard when they differ)."""
        kinds = [s.durability for s in self._shards]
        if len(set(kinds)) == 1:
            text = "each shard's: " + kinds[0]
        else:
            text = "per shard: " + " | ".join(
                f"{name!r}: {kind}" for name, kind in zip(self._names, kinds, strict=True)
            )
        return text + " (a write spanning several shards commits shard by shard)"

    @property
    def shared_across_processes(self) -> bool:  # type: ignore[override]
        """True when every shard is (placement is the same in every process)."""
        return all(s.shared_across_processes for s in self._shards)

    # -- placement ----------------------------------------------------------------------

    def _rendezvous(self, data: bytes) -> int:
        best, best_score = 0, -1
        for i, seed in enumerate(self._seeds):
            h = seed.copy()
            h.update(data)
            score = int.from_bytes(h.digest(), "big")
            if score > best_score:
                best, best_score = i, score
        return best

    def _owner(self, ns: str, key: str) -> int:
        if ns == META_NS:
            return 0
        if ns.startswith(INTERNAL_PREFIX):
            # A series/event log writes several records at once: keep a namespace's
            # records together so that each such write is atomic on one shard.
            return self._rendezvous(b"\x00ns\x00" + _text_bytes(ns))
        if self._placement is None:
            return self._rendezvous(_text_bytes(key))
        index = self._placement(key)
        if isinstance(index, bool) or not isinstance(index, int):
            raise OptionTypeError(f"placement({key!r}) returned {index!r}, not an int")
        if not 0 <= index < len(self._shards):
            last = len(self._shards) - 1
            raise InvalidOptionError(
                f"placement({key!r}) returned {index}, not a shard index in 0..{last}"
            )
        return index

    def shard_of(self, key: str) -> int:
        """The index of the shard that holds (or would hold) *key*."""
        return self._owner(self._ns, check_key(key))

    def _own_namespaces(self) -> list[str]:
        """The raw namespaces this adapter reads and writes: its namespace and that
        namespace's series, event logs and blobs (never another namespace of a shard)."""
        return [self._ns] + [internal_ns(kind, self._ns) for kind in ("ts", "ev", "blob")]

    def rebalance(self) -> int:
        """Move every record of this adapter that is not on its owning shard; return how
        many moved.

        Run it after adding, removing or reordering shards, before other use. Only this
        adapter's namespace is touched (its keys, and its series, event logs and blobs),
        never another namespace of the shards. A key already present on the owning shard
        (written since) is kept, and the misplaced copy dropped. The series, event logs
        and blobs of the namespace move as a whole, and only to an owning shard that holds
        none of its own (else they stay where they are: records of one series are never
        merged with another's). Encrypted records are sealed again for the shard they
        move to. Safe to rerun after an interruption.
        """
        self._check_writable()
        moved = 0
        for ns in self._own_namespaces():
            internal = ns != self._ns
            for i, shard in enumerate(self._shards):
                keys = list(shard._iter_keys(ns, ""))
                if not keys:
                    continue
                if internal:
                    j = self._owner(ns, "")
                    if j == i:
                        continue
                    # A partly copied namespace (an interrupted rebalance) is a subset of
                    # this one; anything else there is another shard's own data.
                    there = list(self._shards[j]._iter_keys(ns, ""))
                    if not all(self._same(i, j, ns, key) for key in there):
                        continue
                for key in keys:
                    j = self._owner(ns, key)
                    if j == i:
                        continue
                    rec = shard._get_record(ns, key)
                    if rec is None:
                        continue
                    data = self._reseal(i, j, ns, key, rec[0])

                    def place(current: Record | None, rec: Record = (data, rec[1])) -> Any:
                        return KEEP if current is not None else rec

                    # Copy first, then delete: an interruption leaves a duplicate that
                    # a rerun removes, never a lost record.
                    self._shards[j]._update(ns, key, place)
                    shard._delete(ns, key)
                    moved += 1
        return moved

    def _same(self, i: int, j: int, ns: str, key: str) -> bool:
        """Whether shards *i* and *j* hold the same value under *key* (a copy)."""
        mine, theirs = self._shards[i]._get(ns, key), self._shards[j]._get(ns, key)
        if mine is None or theirs is None:
            return False
        if mine == theirs:
            return True
        try:
            copied = self._shards[j]._decode(ns, key, self._reseal(i, j, ns, key, mine))
            return bool(copied == self._shards[j]._decode(ns, key, theirs))
        except Exception:  # not comparable (damaged, another context): not a copy
            return False

    def _reseal(self, i: int, j: int, ns: str, key: str, data: bytes) -> bytes:
        """*data* (a record of shard *i*) as shard *j* stores it: sealed again with shard
        *j*'s key when encrypted (each shard opens only what it holds)."""
        if data[:2] != ENCRYPTED_HEADER:
            return data
        contexts = [b""]
        if ns.startswith(internal_ns("blob")) and key.startswith("C:"):
            contexts = _chunk_contexts(key) or contexts
        error: Exception | None = None
        for context in contexts:
            try:
                value = self._open_sealed(i, ns, key, data, context)
            except IntegrityError as exc:
                error = error or exc
                continue
            return self._shards[j]._encode(ns, key, value, True, context)
        assert error is not None
        raise error

    # -- reads (docstrings inherited) ---------------------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        return self._shards[self._owner(ns, key)]._get_record(ns, key)

    def _get(self, ns: str, key: str) -> bytes | None:
        return self._shards[self._owner(ns, key)]._get(ns, key)

    def _contains(self, ns: str, key: str) -> bool:
        return self._shards[self._owner(ns, key)]._contains(ns, key)

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        # One _get_many per shard: consistent per shard, not across shards (see the class
        # docstring, "Readers").
        groups: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[self._owner(ns, key)].append(i)
        out: list[bytes | None] = [None] * len(keys)
        for shard, indexes in groups.items():
            found = self._shards[shard]._get_many(ns, [keys[i] for i in indexes])
            for i, data in zip(indexes, found, strict=True):
                out[i] = data
        return out

    def _listed(self, ns: str) -> tuple[Store, ...]:
        if ns.startswith(INTERNAL_PREFIX):
            # Metadata stays on each shard (the first one's is the adapter's); a series,
            # event log or blob namespace is on its owning shard only: what other shards
            # hold there is their own, which the adapter neither reads nor lists.
            return (self._shards[self._owner(ns, "")],)
        return self._shards

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        for shard in self._listed(ns):
            yield from shard._iter_keys(ns, prefix)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        for shard in self._listed(ns):
            yield from shard._iter_items(ns, prefix)

    def _count(self, ns: str) -> int:
        return sum(shard._count(ns) for shard in self._listed(ns))

    def _has_prefix(self, ns: str, prefix: str) -> bool:
        return any(shard._has_prefix(ns, prefix) for shard in self._listed(ns))

    def _namespaces(self) -> Iterable[str]:
        found: dict[str, None] = {}
        for shard in self._shards:
            found.update(dict.fromkeys(shard._namespaces()))
        return list(found)

    # -- codec: each record is sealed by the shard that holds it -------------------------

    def _encode(
        self, ns: str, key: str, value: Any, encrypt: bool | None = None, context: bytes = b""
    ) -> bytes:
        if not (self._encrypt_default if encrypt is None else encrypt):
            return self._primary._encode(ns, key, value, False, context)
        return self._shards[self._owner(ns, key)]._encode(ns, key, value, True, context)

    def _decode(self, ns: str, key: str, record: bytes, context: bytes = b"") -> Any:
        if record[:2] != ENCRYPTED_HEADER:
            return self._primary._decode(ns, key, record, context)
        return self._open_sealed(self._owner(ns, key), ns, key, record, context)

    def _open_sealed(self, i: int, ns: str, key: str, record: bytes, context: bytes) -> Any:
        """Open *record*, held by shard *i*, with that shard's key; a record sealed before
        1.x (with the first shard's key) opens with the shard that sealed it."""
        try:
            return self._shards[i]._decode(ns, key, record, context)
        except IntegrityError:
            # The error path only: try the other shards' keys, then fail as shard i did.
            for other in self._shards:
                if other is self._shards[i] or other._cipher is None:
                    continue
                try:
                    return other._decode(ns, key, record, context)
                except IntegrityError:
                    continue
            raise

    # -- writes -------------------------------------------------------------------------

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        self._shards[self._owner(ns, key)]._put(ns, key, data, expires)

    def _delete(self, ns: str, key: str) -> bool:
        return self._shards[self._owner(ns, key)]._delete(ns, key)

    def _apply(self, ops: Sequence[Op]) -> None:
        groups: dict[int, list[Op]] = defaultdict(list)
        for op in ops:
            groups[self._owner(op.ns, op.key)].append(op)
        if len(groups) <= 1:
            for shard, shard_ops in groups.items():
                self._shards[shard]._apply(shard_ops)
            return
        order = sorted(groups)
        with self._all_exclusive([self._shards[i] for i in order]):
            for shard in order:
                self._shards[shard]._apply(groups[shard])

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        self._shards[self._owner(ns, key)]._update(ns, key, fn)

    def _clear(self, ns: str) -> None:
        for shard in self._listed(ns):
            shard._clear(ns)

    def _purge_expired(self, ns: str) -> int:
        return sum(shard._purge_expired(ns) for shard in self._listed(ns))

    def _exclusive(self) -> Any:
        return self._all_exclusive(self._shards)
