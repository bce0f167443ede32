"""``Tiered([fast, ..., slow])``: reads try the fast tiers first; writes go to all."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from .._keys import internal_ns
from .._store import KEEP, Op, Record, Store
from ..errors import InvalidOptionError, OptionTypeError
from ._base import META_NS, Adapter

__all__ = ["Tiered"]

_STRIPES = 64
_LOCKS = 16
_BLOB_NS = internal_ns("blob")  # + namespace: chunked blobs (_blobs.ChunkedBlobs)


def _slow_only(ns: str) -> bool:
    """Records read from and copied to the slowest tier alone: the metadata (it belongs
    to that store) and blob records. A blob's chunks (up to 64 MiB each) copied into a
    faster tier, often memory, would hold whole blobs there, which is what streaming
    avoids (``Cached`` skips them too; a reader caches its one chunk itself)."""
    return ns == META_NS or ns.startswith(_BLOB_NS)


class Tiered(Adapter):
    """A stack of stores, fastest first; the last (slowest) tier is the authoritative one.

    * **Reads** try each tier in order. A hit in a slower tier is copied, as the raw
      record with its expiry, into every faster tier (promotion); a miss everywhere
      raises a plain ``KeyError`` (:class:`~mappingstore.errors.MissingKeyError`).
      Promotion is best-effort: if a faster tier cannot take the copy (it is full, its
      server is gone...), the read still returns the record, the failure is logged as
      a warning, and that tier's copy of the key is deleted, so it holds either the
      current record or none. An error *reading* a tier is raised.
    * **Writes** (set, delete, ``modify``, batches) go to every tier in an order that a
      crash cannot turn into a wrong read: the key is first removed from the faster
      tiers, then written to the slowest tier, then to the faster tiers from slow to
      fast. Deletes go from the fastest tier to the slowest. A crash in between leaves
      at worst a faster tier *without* the key, and the next read promotes it again.
      An error before the slowest tier is written is raised, and no value changed (a
      faster tier may have lost its copy, which changes no read). Once the slowest
      tier holds the new value, the write has happened: a faster tier that then fails
      to take it is logged as a warning and has its copy of the key deleted (a fast tier
      never keeps the old value), and the write returns normally.
    * ``modify``, ``pop`` and ``setdefault`` run atomically on the slowest tier (across
      processes if that backend is shared), then update the faster tiers.
    * ``get_many`` of several keys reads them all from the fastest tier when it holds
      every one, and otherwise all from the slowest tier (one ``_get_many`` each, then the
      records the fastest tier lacked are promoted): never some keys from one tier and
      some from another, which could show half of a batch. It is as consistent as the
      tier it read (through one ``Tiered`` object; see "Processes" below).
    * **Listing**, ``len``, ``items()`` and ``namespaces()`` come from the slowest tier;
      ``clear`` empties every tier.
    * **Blobs** (``put_file``) are manifest and chunk records through this adapter, kept
      on the slowest tier only: they are read from it, never copied into a faster tier
      (whole blobs would fill a memory tier), and a write or delete of one still removes
      a faster tier's copy of the record first.

    Options and encryption are those of the slowest tier; every tier holds records in
    its format (with encryption, open the tiers with the same password and always read
    them through this adapter). The store's metadata stays in each tier.

    Thread-safe: writes and promotions of one key through this object are serialised
    (striped locks), and a promotion never copies a record over a newer write or delete.
    Processes: a faster tier only learns about writes made through a ``Tiered`` over
    it. If another process writes the slowest tier directly, or through its own
    private fast tier, this process's private fast tier keeps serving its old copy
    (use :class:`~mappingstore.Cached` with ``ttl=`` for that case); writes of one key
    by several processes through a *shared* fast tier are not serialised with each
    other. Atomicity: each tier's write is atomic; the tiers are not written in one
    transaction.
    """

    scheme: ClassVar[str] = "tiered"

    def __init__(self, stores: Sequence[Store], *, close_inner: bool = False) -> None:
        if not isinstance(stores, Sequence):  # a Store is a Mapping, not a Sequence
            raise OptionTypeError("Tiered takes a list of stores, fastest first")
        tiers = tuple(stores)
        if not tiers:
            raise InvalidOptionError("Tiered needs at least one store")
        super().__init__(tiers, tiers[-1], close_inner=close_inner)
        self._tiers = tiers
        self._slow = tiers[-1]
        self._fast = tiers[:-1]
        self._gen_lock = threading.Lock()
        self._gens = [0] * _STRIPES
        # Two writes of one key through this adapter must not interleave across tiers
        # (A to slow, B to slow, B to fast, A to fast would leave A in the fast tier).
        # Striped locks, always taken before any tier's own lock: never a deadlock.
        self._key_locks = [threading.RLock() for _ in range(_LOCKS)]

    @property
    def url(self) -> str:
        """The URLs of the tiers, for display: not one URL (reopen with ``open_tiered``)."""
        return "tiered:[" + ", ".join(t.url for t in self._tiers) + "]"

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Tiered{state} [{self._inner_reprs()}]>"

    @property
    def durability(self) -> str:  # type: ignore[override]
        """The slowest tier's: every write reaches it before any faster tier, and the
        faster tiers only hold copies of what it holds."""
        return "the slowest tier's (written before the faster tiers): " + self._slow.durability

    @property
    def shared_across_processes(self) -> bool:  # type: ignore[override]
        """False with faster tiers: another process's writes never reach this process's
        private fast tier, and writes through a shared one are not serialised (see the
        class docstring). A single tier: that store's answer."""
        return not self._fast and self._slow.shared_across_processes

    # -- write serialisation and promotion guard ---------------------------------------

    @contextlib.contextmanager
    def _locked(self, keys: Iterable[tuple[str, str]]) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for i in sorted({hash(ck) % _LOCKS for ck in keys}):
                stack.enter_context(self._key_locks[i])
            yield

    # A read never copies an old record over a newer write:

    def _bump(self, keys: Iterable[tuple[str, str]]) -> None:
        with self._gen_lock:
            for ck in keys:
                self._gens[hash(ck) % _STRIPES] += 1

    def _promote(self, ns: str, key: str, rec: Record, upto: int, gen: int) -> None:
        stripe = hash((ns, key)) % _STRIPES

        def fill(current: Record | None) -> Any:
            # Runs inside the tier's own atomic section: a write through this adapter
            # that began after our read bumped the generation, and then wins.
            if current is not None or self._gens[stripe] != gen:
                return KEEP
            return rec

        # Under the key's write lock: with the generation alone, a read that saw the old
        # record could fill it in between a write's slowest-tier and fast-tier steps, and
        # if that fast step then failed the old copy would stay. Never waited for: a
        # read may run inside a write's atomic section (a modify function reading another
        # key), where waiting could deadlock; and a copy is only an optimisation.
        lock = self._key_locks[hash((ns, key)) % _LOCKS]
        if not lock.acquire(blocking=False):
            return  # a write of this lock stripe is under way: skip the copy
        try:
            if self._gens[stripe] != gen:  # a write came in meanwhile: its copy is newer
                return
            for tier in reversed(self._fast[:upto]):
                try:
                    tier._update(ns, key, fill)
                except Exception as exc:  # best-effort: the read has its record already
                    self._fast_failed(tier, [(ns, key)], "copy a record into", exc)
        finally:
            lock.release()

    def _fast_failed(
        self, tier: Store, keys: Iterable[tuple[str, str]], what: str, exc: Exception
    ) -> None:
        """A faster *tier* could not take a record (the slowest tier has it): log it and
        delete that tier's copy of *keys*, whatever state the failure left it in.

        Called under the keys' write locks, so no write of these keys through this
        adapter is under way: deleting can only turn a copy into a miss, never lose data.
        """
        self._log.warning(
            "%r: could not %s the faster tier %r (%s: %s); its copy is dropped",
            self,
            what,
            tier,
            type(exc).__name__,
            exc,
        )
        try:
            tier._apply([Op(ns, key, None, None) for ns, key in dict.fromkeys(keys)])
        except Exception as drop_exc:
            # Nothing more to do: under the write locks, the tier can only hold the
            # current record or none (the write dropped the old one first).
            self._log.error(
                "%r: could not drop the copy in the faster tier %r either (%s: %s)",
                self,
                tier,
                type(drop_exc).__name__,
                drop_exc,
            )

    # -- reads (docstrings inherited) ---------------------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        if _slow_only(ns):
            return self._slow._get_record(ns, key)
        gen = self._gens[hash((ns, key)) % _STRIPES]
        for i, tier in enumerate(self._tiers):
            rec = tier._get_record(ns, key)
            if rec is not None:
                if i:
                    self._promote(ns, key, rec, i, gen)
                return rec
        return None

    def _get(self, ns: str, key: str) -> bytes | None:
        rec = self._get_record(ns, key)
        return None if rec is None else rec[0]

    def _contains(self, ns: str, key: str) -> bool:
        return self._get_record(ns, key) is not None

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        if _slow_only(ns) or not self._fast:
            return self._slow._get_many(ns, keys)
        if len(keys) == 1:
            return [self._get(ns, keys[0])]
        # All from the fastest tier, or all from the slowest, in one _get_many each: never
        # a mix of tiers (or of single reads), which could show half of a batch that
        # committed between two reads. A record in a faster tier is always the slowest
        # tier's current one (a write first drops the faster tiers' copies), so a read
        # that finds every key in the fastest tier is as consistent as that tier's own.
        first = self._fast[0]._get_many(ns, keys)
        if None not in first:
            return first
        stripes = [hash((ns, key)) % _STRIPES for key in keys]
        gens = [self._gens[stripe] for stripe in stripes]
        out = self._slow._get_many(ns, keys)
        upto = len(self._fast)
        for i, key in enumerate(keys):
            data = out[i]
            if data is None or first[i] is not None or self._gens[stripes[i]] != gens[i]:
                continue
            # Promote what the fastest tier lacked. _get_many gives no expiry, so the
            # record is read again; copied only if it is still what this read returned
            # (and, in _promote, if no write of the key came in since the read).
            rec = self._slow._get_record(ns, key)
            if rec is not None and rec[0] == data:
                self._promote(ns, key, rec, upto, gens[i])
        return out

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        return self._slow._iter_keys(ns, prefix)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        return self._slow._iter_items(ns, prefix)

    def _count(self, ns: str) -> int:
        return self._slow._count(ns)

    def _has_prefix(self, ns: str, prefix: str) -> bool:
        return self._slow._has_prefix(ns, prefix)

    def _namespaces(self) -> Iterable[str]:
        return self._slow._namespaces()

    # -- writes -------------------------------------------------------------------------

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        if ns == META_NS:
            self._slow._put(ns, key, data, expires)
            return
        self._apply([Op(ns, key, data, expires)])

    def _delete(self, ns: str, key: str) -> bool:
        if ns == META_NS:
            return self._slow._delete(ns, key)
        with self._locked([(ns, key)]):
            self._bump([(ns, key)])
            existed = False
            try:
                for tier in self._tiers:  # fastest first: a crash leaves it in the slow tier
                    existed = tier._delete(ns, key) or existed
            finally:
                self._bump([(ns, key)])
        return existed

    def _apply(self, ops: Sequence[Op]) -> None:
        if not ops:
            return
        meta = [op for op in ops if op.ns == META_NS]
        ops = [op for op in ops if op.ns != META_NS]
        if meta:
            self._slow._apply(meta)
        keys = [(op.ns, op.key) for op in ops]
        with self._locked(keys):
            self._bump(keys)
            try:
                drop = [Op(ns, key, None, None) for ns, key in dict.fromkeys(keys)]
                for tier in self._fast:  # no fast tier may keep an old value if we crash
                    tier._apply(drop)
                self._slow._apply(ops)
                # From here on the write has happened: a fast tier's failure is not ours.
                # Blob records were only dropped from the fast tiers (old copies), not
                # copied there.
                copies = [op for op in ops if not _slow_only(op.ns)]
                for tier in reversed(self._fast) if copies else ():
                    try:
                        tier._apply(copies)
                    except Exception as exc:
                        self._fast_failed(tier, keys, "write", exc)
            finally:
                self._bump(keys)

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        if ns == META_NS:
            self._slow._update(ns, key, fn)
            return
        seen: list[Any] = []

        def step(rec: Record | None) -> Any:
            seen.clear()
            new = fn(rec)
            seen.extend((rec, new))
            return new

        with self._locked([(ns, key)]):
            self._bump([(ns, key)])
            try:
                for tier in self._fast:
                    tier._delete(ns, key)
                self._slow._update(ns, key, step)
                if seen:
                    current, new = seen
                    result = current if new is KEEP else new
                    if result is not None and not _slow_only(ns):
                        for tier in reversed(self._fast):
                            try:
                                tier._put(ns, key, result[0], result[1])
                            except Exception as exc:  # the slowest tier has it: done
                                self._fast_failed(tier, [(ns, key)], "write", exc)
            finally:
                self._bump([(ns, key)])

    def _clear(self, ns: str) -> None:
        with self._locked_all():
            with self._gen_lock:
                self._gens = [g + 1 for g in self._gens]
            for tier in self._tiers:  # fastest first, as deletes
                tier._clear(ns)

    def _purge_expired(self, ns: str) -> int:
        counts = [tier._purge_expired(ns) for tier in self._tiers]
        return counts[-1]

    @contextlib.contextmanager
    def _locked_all(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for lock in self._key_locks:
                stack.enter_context(lock)
            yield

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # Our key locks first (as every write), then the tiers slowest first: the tier
        # other writers contend on; a fixed order avoids deadlocks.
        with self._locked_all(), self._all_exclusive(tuple(reversed(self._tiers))):
            yield
