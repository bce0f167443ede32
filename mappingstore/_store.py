"""The :class:`Store` base class: a ``MutableMapping[str, Any]`` over a small backend contract.

Layers (imports point downward only; see ``docs/architecture.md``):

1. **Backend contract**: a backend subclasses :class:`Store` and implements six raw
   methods over *records*, where a record is ``(data: bytes, expires: float | None)`` and
   ``expires`` is an absolute wall-clock time (seconds since the epoch):

   ``_get_record(ns, key)``  the live record, or ``None`` when missing or expired
   ``_put(ns, key, data, expires)``  create or replace
   ``_delete(ns, key) -> bool``  remove; ``True`` if a live record was removed
   ``_iter_keys(ns, prefix)``  live keys of *ns* starting with *prefix*
   ``_namespaces()``  raw namespaces holding at least one record
   ``_close()``  release resources

   Everything else has a correct default that a backend may override for speed or for
   atomicity across processes: ``_get``, ``_contains``, ``_count``, ``_iter_items``,
   ``_get_many``, ``_apply`` (atomic multi-key write), ``_update`` (atomic
   read-modify-write of one key), ``_clear``, ``_purge_expired`` and ``_exclusive()``.
   The defaults of ``_apply`` and ``_update`` run under ``_exclusive()``, which is a
   process-local lock; **a backend shared between processes overrides ``_exclusive()``**
   (a transaction or an OS lock) or both ``_apply`` and ``_update``.

2. **Codec and crypto** (``_codec``, ``_crypto``): values become records here.

3. **Views** (``_tree``): dot-name paths and :class:`~mappingstore.View`.

Raw namespaces are plain strings; user namespaces never start with NUL, which is kept for
mappingstore's own records (``_keys.internal_ns``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import (
    Callable,
    ItemsView,
    Iterable,
    Iterator,
    KeysView,
    Mapping,
    MutableMapping,
    Sequence,
    ValuesView,
)
from itertools import repeat
from operator import add
from typing import IO, TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar, cast

from . import _crypto
from ._codec import (
    ENCRYPTED_HEADER,
    PLAIN_HEADER,
    decode_plain,
    decode_plain_many,
    is_encrypted,
    pack,
    unpack,
    unpack_many,
    wrap_plain,
)
from ._keys import INTERNAL_PREFIX, MISSING, check_key, check_namespace, internal_ns
from .errors import (
    BatchConflictError,
    CorruptValueError,
    IntegrityError,
    InvalidOptionError,
    MappingStoreError,
    MissingKeyError,
    PasswordRequiredError,
    ReadOnlyError,
    SerializationError,
    StoreClosedError,
)

if TYPE_CHECKING:
    from ._blobs import BlobReader, Blobs
    from ._events import EventLog
    from ._series import Series

__all__ = ["FOREVER", "KEEP", "Op", "Record", "Store"]

Record = tuple[bytes, "float | None"]
T = TypeVar("T")

#: Pass as ``ttl=`` to store an item without expiry even when the store has a default TTL.
FOREVER: float = math.inf


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


#: Returned by an ``_update`` callback to leave the record untouched (no write).
KEEP: Any = _Keep()

_META_NS = internal_ns("meta")
_LOG = logging.getLogger("mappingstore")


class Op(NamedTuple):
    """One write of an atomic :meth:`Store._apply`: ``data=None`` deletes."""

    ns: str
    key: str
    data: bytes | None
    expires: float | None


class CheckedCommit:
    """The commit of a batch whose read-modify-writes read stored records, while it runs
    on this thread (:func:`checked_commit`): ``Store.batch`` compares those records, in
    the store's exclusive section, with what the batch saw, then writes.

    A backend whose single-key writes do not take that exclusive section (Redis,
    PostgreSQL) uses it to make the comparison hold until the write: its ``_get_record``
    learns it is the commit's check (and locks, or notes a guard for the write), its
    ``_apply`` that it is the commit's write. It is set by the batch's own store, which
    may be an adapter around the backend (``store``: a backend can tell whether the batch
    is its own, and so whether its keys are the backend's keys); ``state`` is for the
    backends, each under its own ``id()``."""

    __slots__ = ("batch", "state", "store")

    def __init__(self, store: Store, batch: _Batch) -> None:
        self.store = store
        self.batch = batch
        self.state: dict[int, Any] = {}  # id(backend) -> what that backend keeps


_COMMIT = threading.local()


def checked_commit() -> CheckedCommit | None:
    """The checked batch commit running on this thread, if any (see CheckedCommit)."""
    return getattr(_COMMIT, "current", None)


def batch_conflict(key: str) -> BatchConflictError:
    """The error of a batch commit that found *key* changed since the batch read it."""
    return BatchConflictError(
        f"batch not committed: {key!r} was changed by another writer after a "
        "read-modify-write in the batch read it; nothing was written"
    )


class _Batch:
    """The pending writes of a batch; a nested batch (a savepoint) is its own _Batch over
    the enclosing one (``outer``): its writes go to its own ``ops``, reads look through
    the chain, and it is merged into the enclosing batch when it ends without an error,
    or dropped when it raises. Entering one costs nothing, however many writes are
    pending (copying them made a loop of small nested batches quadratic)."""

    __slots__ = ("ops", "outer", "reads", "rmw")

    def __init__(self, outer: _Batch | None = None) -> None:
        self.ops: dict[tuple[str, str], tuple[bytes | None, float | None]] = {}
        self.outer = outer
        # The stored records (their data, or None) that read-modify-writes inside the
        # batch read from the store, not from the batch: the commit checks, in the
        # store's exclusive section, that none changed meanwhile (else another writer's
        # acknowledged update would be overwritten). Shared with the enclosing batches.
        self.reads: dict[tuple[str, str], bytes | None] = {} if outer is None else outer.reads
        # How deep this thread is in read-modify-write sections (_atomic) of the batch.
        self.rmw: int = 0 if outer is None else outer.rmw

    def lookup(self, k: tuple[str, str]) -> tuple[bytes | None, float | None] | None:
        """The pending write of *k* in this batch or an enclosing one (innermost wins)."""
        batch: _Batch | None = self
        while batch is not None:
            hit = batch.ops.get(k)
            if hit is not None:
                return hit
            batch = batch.outer
        return None

    def pending(self) -> dict[tuple[str, str], tuple[bytes | None, float | None]]:
        """Every pending write, of this batch and the enclosing ones (innermost wins)."""
        if self.outer is None:
            return self.ops
        merged = dict(self.outer.pending())
        merged.update(self.ops)
        return merged


def _check_ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        from .errors import OptionTypeError

        raise OptionTypeError(f"ttl must be a number of seconds, not {type(ttl).__qualname__}")
    try:
        seconds = float(ttl)
    except OverflowError:  # an int beyond any float: longer than FOREVER needs
        seconds = math.inf if ttl > 0 else -math.inf
    if math.isnan(seconds) or seconds <= 0:
        raise InvalidOptionError(f"ttl must be > 0 seconds (or FOREVER), got {ttl!r}")
    return seconds


def _check_flag(value: Any, name: str) -> bool:
    """A yes/no option: a bool (or 0/1), never a truthy string such as ``"false"``."""
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return bool(value)
    from .errors import OptionTypeError

    raise OptionTypeError(f"{name} must be True or False, got {value!r}")


def _iterable(items: Any, what: str) -> Iterator[Any]:
    """``iter(items)``, or OptionTypeError naming *what* (an error raised while the
    iteration runs, by the caller's own generator, passes through unchanged)."""
    try:
        return iter(items)
    except TypeError:
        from .errors import OptionTypeError

        raise OptionTypeError(f"{what} needs an iterable, not {type(items).__qualname__}") from None


def _check_hooks(logger: object, clock: object) -> None:
    """The ``logger`` and ``clock`` options have usable types (typed ``object``: callers
    outside a type checker pass anything)."""
    from .errors import OptionTypeError

    if logger is not None and not isinstance(logger, (logging.Logger, logging.LoggerAdapter)):
        raise OptionTypeError(f"logger must be a logging.Logger, got {logger!r}")
    if clock is not None and not callable(clock):
        raise OptionTypeError(f"clock must be a callable returning seconds, got {clock!r}")


def _update_pairs(other: Any, what: str = "update()") -> Iterable[Any]:
    """The items of ``dict.update(other)``: anything with ``keys()`` is a mapping, read as
    ``other[key]`` (not ``iter(other)``: a pandas Series iterates its values), else an
    iterable of ``(key, value)`` pairs (:class:`OptionTypeError` if it is not iterable).
    Store, View and Series ``update()`` all follow this rule."""
    if isinstance(other, Mapping) or hasattr(other, "keys"):
        keys = other.keys()
        return ((k, other[k]) for k in keys)
    return _iterable(other, what)


def _pair(pair: Any) -> tuple[Any, Any]:
    """``(key, value)`` of one item of ``update(pairs)``, with dict.update's error types."""
    try:
        k, v = pair
    except TypeError as exc:  # as dict.update: not a sequence -> TypeError
        from .errors import OptionTypeError

        raise OptionTypeError(f"update() needs (key, value) pairs, got {pair!r}") from exc
    except ValueError as exc:  # as dict.update: wrong length -> ValueError
        raise InvalidOptionError(f"update() needs (key, value) pairs, got {pair!r}") from exc
    return k, v


def _encodable(text: str) -> bool:
    """Whether *text* is valid UTF-8 text (no lone surrogate), as every key is."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _require_str(value: object, what: str) -> None:
    if not isinstance(value, str):
        from .errors import KeyTypeError

        raise KeyTypeError(f"{what} must be str, not {type(value).__qualname__}")


class Store(MutableMapping[str, Any]):
    """A persistent ``MutableMapping[str, Any]``; the abstract base of every backend.

    ``store[key]`` returns a fresh copy of the value: mutating it does not change the
    store. Use :meth:`view` (with ``dot_names=True``) or :meth:`modify` to edit in place.

    Thread safety: every store may be shared between threads. A :meth:`batch` belongs to
    the thread that opened it. Whether processes can share the data depends on the
    backend (see its class docstring and ``docs/choose-a-backend.md``).

    Options common to every backend (all keyword-only):

    namespace
        Name of an isolated key space inside the backend (default ``"default"``).
    password, key, salt, security, encrypt
        Encryption (see ``docs/security.md``). ``password`` derives a key with argon2id
        at ``security`` ``"low"``, ``"medium"`` or ``"high"`` (the default); ``key`` is a
        raw 32-byte key instead. ``encrypt`` defaults to on when either is given.
    dot_names
        Treat ``"a.b.c"`` as a path; ``store["a"]`` is then a live :class:`View`.
    readonly
        Every mutator raises :class:`~mappingstore.errors.ReadOnlyError`.
    ttl
        Default time-to-live in seconds for new items (``None``: no expiry).
    logger
        A :class:`logging.Logger` (default: the ``mappingstore`` logger).
    clock
        A zero-argument callable returning the time in seconds since the epoch, used for
        TTL (default :func:`time.time`); inject a fake clock in tests.
    """

    #: URL scheme(s) of the backend, for ``repr`` and the registry.
    scheme: ClassVar[str] = ""
    #: What the backend promises after a crash; shown by ``info()`` and the docs.
    durability: ClassVar[str] = "none"
    #: True when several processes can use the same data at once.
    shared_across_processes: ClassVar[bool] = False
    #: True when ``_namespaces()`` already leaves out namespaces whose records have all
    #: expired; otherwise :meth:`namespaces` probes each one for a live key.
    _namespaces_live: ClassVar[bool] = False

    _closed: bool = True  # until __init__ has run, behave as closed

    # -- construction -------------------------------------------------------------------

    def __init__(
        self,
        *,
        namespace: str = "default",
        password: str | bytes | None = None,
        key: bytes | None = None,
        salt: bytes | None = None,
        security: str = "high",
        encrypt: bool | None = None,
        dot_names: bool = False,
        readonly: bool = False,
        ttl: float | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._ns = check_namespace(namespace)
        if not isinstance(security, str) or security not in _crypto.SECURITY_LEVELS:
            raise InvalidOptionError(
                f"security must be one of {sorted(_crypto.SECURITY_LEVELS)}, got {security!r}"
            )
        if encrypt is not None and not isinstance(encrypt, bool):
            raise InvalidOptionError("encrypt must be True, False or None")
        if password is not None and key is not None:
            raise InvalidOptionError("give password= or key=, not both")
        _check_hooks(logger, clock)
        self._password = password
        self._raw_key = key
        self._salt = salt
        self._security = security
        self._encrypt_option = encrypt
        self._dot = _check_flag(dot_names, "dot_names")
        self._readonly = _check_flag(readonly, "readonly")
        default_ttl = _check_ttl(ttl)
        self._default_ttl = None if default_ttl == FOREVER else default_ttl
        self._log = logger if logger is not None else _LOG
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._lock = threading.RLock()
        self._tls = threading.local()
        self._nbatch = 0
        self._cipher: _crypto.Cipher | None = None
        self._store_id = b""
        self._encrypt_default = False
        self._closed = False

    def _start(self) -> None:
        """Finish opening once the backend is connected (backends call this last)."""
        try:
            self._init_crypto()
        except BaseException:
            self.close()
            raise
        # Never log secrets: the description contains no password or key. Pass the text,
        # not the store: logging treats a lone Mapping argument as a dict of named args
        # (it would call bool() on the store, a read, and format with it).
        self._log.debug("opened %s", repr(self))

    def _ephemeral_key(self) -> bytes | None:
        """A random in-process key for ``encrypt=True`` without a password (memory only)."""
        return None

    def _init_crypto(self) -> None:
        has_secret = self._password is not None or self._raw_key is not None
        encrypt = self._encrypt_option
        slot_bytes = self._meta_get("crypto")
        if not has_secret:
            if slot_bytes is not None and encrypt is not False:
                raise PasswordRequiredError(
                    "this store is encrypted: pass password= or key= "
                    "(or encrypt=False to read only its unencrypted items)"
                )
            if encrypt:
                ephemeral = self._ephemeral_key()
                if ephemeral is None:
                    raise PasswordRequiredError("encrypt=True needs a password= or key=")
                self._store_id = b"ephemeral"
                self._cipher = _crypto.Cipher(ephemeral)
                self._encrypt_default = True
            return
        self._encrypt_default = encrypt is not False
        if slot_bytes is None:
            if self._readonly:
                # Nothing encrypted can exist yet and nothing may be written: no key needed.
                return
            store_id = self._meta_setdefault("id", _crypto.random_key()[:16])
            slot = _crypto.new_slot(
                _crypto.random_key(),
                store_id,
                password=self._password,
                raw_key=self._raw_key,
                salt=self._salt,
                security=self._security,
            )
            # Two processes may create the store at once: whoever wins, both use its slot.
            slot_bytes = self._meta_setdefault("crypto", pack(slot.to_dict()))
        store_id = self._meta_get("id") or b""
        slot = _crypto.KeySlot.from_dict(unpack(slot_bytes))
        if self._salt is not None and bytes(self._salt) != slot.salt:
            raise InvalidOptionError("salt= does not match the salt this store was created with")
        data_key = _crypto.unwrap(slot, store_id, password=self._password, raw_key=self._raw_key)
        self._store_id = store_id
        self._cipher = _crypto.Cipher(data_key)

    def _meta_get(self, name: str) -> bytes | None:
        return self._get(_META_NS, name)

    def _meta_setdefault(self, name: str, value: bytes) -> bytes:
        result: list[bytes] = []

        def step(rec: Record | None) -> Any:
            if rec is not None:
                result.append(rec[0])
                return KEEP
            result.append(value)
            return (value, None)

        self._update(_META_NS, name, step)
        return result[0]

    def _meta_set(self, name: str, value: bytes) -> None:
        self._put(_META_NS, name, value, None)

    # -- backend contract: required -----------------------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        """Return the live record ``(data, expires)`` of *key*, or ``None``."""
        raise NotImplementedError

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        """Create or replace a record (``expires=None``: no expiry)."""
        raise NotImplementedError

    def _delete(self, ns: str, key: str) -> bool:
        """Delete a record; return whether a live one existed."""
        raise NotImplementedError

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        """Yield the live keys of *ns* that start with *prefix* (order: backend's own)."""
        raise NotImplementedError

    def _namespaces(self) -> Iterable[str]:
        """Raw namespaces holding at least one record (may include expired ones)."""
        raise NotImplementedError

    def _close(self) -> None:
        """Release every resource; called once."""
        raise NotImplementedError

    # -- backend contract: optional, with defaults --------------------------------------

    def _get(self, ns: str, key: str) -> bytes | None:
        rec = self._get_record(ns, key)
        return None if rec is None else rec[0]

    def _contains(self, ns: str, key: str) -> bool:
        return self._get_record(ns, key) is not None

    def _count(self, ns: str) -> int:
        return sum(1 for _ in self._iter_keys(ns, ""))

    def _has_prefix(self, ns: str, prefix: str) -> bool:
        """Whether *ns* has a live key starting with *prefix* (dot names ask it of every
        leaf written: is the name a branch?). A backend without an ordered index of its
        keys overrides it to avoid a scan."""
        return next(iter(self._iter_keys(ns, prefix)), None) is not None

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        for key in self._iter_keys(ns, prefix):
            data = self._get(ns, key)
            if data is not None:  # deleted or expired since it was listed
                yield key, data

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(ns, key) for key in keys]

    def _uncached(self) -> contextlib.AbstractContextManager[None]:
        """A section whose raw reads come from the storage itself, for dot-name structure
        checks; an adapter that caches records (``Cached``) overrides it. No-op here."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Make the raw calls inside atomic against other writers (re-entrant)."""
        with self._lock:
            yield

    def _apply(self, ops: Sequence[Op]) -> None:
        """Apply every op or none (and readers see all or none)."""
        with self._exclusive():
            for op in ops:
                if op.data is None:
                    self._delete(op.ns, op.key)
                else:
                    self._put(op.ns, op.key, op.data, op.expires)

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        """Atomically replace the record of *key* with ``fn(current)``.

        ``fn`` returns a new record, ``None`` to delete, or :data:`KEEP`. It may raise to
        abort; nothing is then written. Backends with optimistic concurrency may call it
        more than once.
        """
        with self._exclusive():
            rec = self._get_record(ns, key)
            new = fn(rec)
            if new is KEEP:
                return
            if new is None:
                if rec is not None:
                    self._delete(ns, key)
            else:
                self._put(ns, key, new[0], new[1])

    def _clear(self, ns: str) -> None:
        with self._exclusive():
            self._apply([Op(ns, k, None, None) for k in list(self._iter_keys(ns, ""))])

    def _purge_expired(self, ns: str) -> int:
        """Physically remove expired records of *ns*; return how many."""
        return 0

    # -- batch-aware raw access (used by every public method) ---------------------------

    def _batch(self) -> _Batch | None:
        if not self._nbatch:
            return None
        batch: _Batch | None = getattr(self._tls, "batch", None)
        return batch

    def _rrecord(self, ns: str, key: str) -> Record | None:
        batch = self._batch()
        if batch is not None:
            hit = batch.ops.get((ns, key))
            if hit is None and batch.outer is not None:
                hit = batch.lookup((ns, key))
            if hit is not None:
                data, expires = hit
                if data is None or (expires is not None and expires <= self._clock()):
                    return None
                return data, expires
            if batch.rmw:
                return self._read_for_batch(batch, ns, key)
        return self._get_record(ns, key)

    def _read_for_batch(self, batch: _Batch, ns: str, key: str) -> Record | None:
        """A stored record read by a read-modify-write inside *batch*: remembered, so that
        the commit can check that it did not change (see _Batch.reads)."""
        rec = self._get_record(ns, key)
        batch.reads.setdefault((ns, key), None if rec is None else rec[0])
        return rec

    def _rget(self, ns: str, key: str) -> bytes | None:
        if self._nbatch:
            rec = self._rrecord(ns, key)
            return None if rec is None else rec[0]
        return self._get(ns, key)

    def _rget_polled(self, ns: str, key: str) -> bytes | None:
        """:meth:`_rget` for a read callers repeat, polling one small record (a time
        series' ``first()``/``last()``): a backend may answer from a cache it can prove
        current (SQLite: see ``_walwatch``). Same result as ``_rget``, always."""
        return self._rget(ns, key)

    def _rput(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        batch = self._batch()
        if batch is not None:
            batch.ops[(ns, key)] = (data, expires)
        else:
            self._put(ns, key, data, expires)

    def _rdelete(self, ns: str, key: str) -> bool:
        batch = self._batch()
        if batch is not None:
            existed = self._rrecord(ns, key) is not None
            batch.ops[(ns, key)] = (None, None)
            return existed
        return self._delete(ns, key)

    def _rapply(self, ops: Sequence[Op]) -> None:
        batch = self._batch()
        if batch is not None:
            for op in ops:
                batch.ops[(op.ns, op.key)] = (op.data, op.expires)
        elif ops:
            self._apply(ops)

    def _rupdate(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        batch = self._batch()
        if batch is None:
            self._update(ns, key, fn)
            return
        batch.rmw += 1
        try:
            rec = self._rrecord(ns, key)
        finally:
            batch.rmw -= 1
        new = fn(rec)
        if new is KEEP:
            return
        batch.ops[(ns, key)] = (None, None) if new is None else (new[0], new[1])

    def _rkeys(self, ns: str, prefix: str = "") -> Iterator[str]:
        batch = self._batch()
        if batch is None:
            yield from self._iter_keys(ns, prefix)
            return
        pending = {
            k: v for (n, k), v in batch.pending().items() if n == ns and k.startswith(prefix)
        }
        now = self._clock()
        for key in self._iter_keys(ns, prefix):
            if key not in pending:
                yield key
        for key, (data, expires) in pending.items():
            if data is not None and (expires is None or expires > now):
                yield key

    def _rhas_prefix(self, ns: str, prefix: str) -> bool:
        """:meth:`_has_prefix` as this thread's open batch would see it."""
        if self._batch() is None:
            return self._has_prefix(ns, prefix)
        return next(self._rkeys(ns, prefix), None) is not None

    def _ritems(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        if self._batch() is None:
            yield from self._iter_items(ns, prefix)
            return
        for key in list(self._rkeys(ns, prefix)):
            data = self._rget(ns, key)
            if data is not None:
                yield key, data

    def _rcount(self, ns: str) -> int:
        if self._batch() is None:
            return self._count(ns)
        return sum(1 for _ in self._rkeys(ns, ""))

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """Exclusive section for multi-step writes. Inside a batch it takes no lock (the
        batch commits as a whole): the stored records read inside it are remembered, and
        the commit checks that none changed (``BatchConflictError`` if one did)."""
        batch = self._batch()
        if batch is None:
            with self._exclusive():
                yield
            return
        batch.rmw += 1
        try:
            yield
        finally:
            batch.rmw -= 1

    # -- codec --------------------------------------------------------------------------

    def _encode(
        self, ns: str, key: str, value: Any, encrypt: bool | None = None, context: bytes = b""
    ) -> bytes:
        payload = pack(value)
        if not (self._encrypt_default if encrypt is None else encrypt):
            return wrap_plain(payload)
        cipher = self._cipher or self._sealing_cipher()
        return cipher.seal_record(ENCRYPTED_HEADER, self._store_id, ns, key, payload, context)

    def _sealing_cipher(self) -> _crypto.Cipher:
        """The cipher new encrypted values are sealed with (set up on first use)."""
        cipher = self._cipher
        if cipher is None:
            self._check_open()  # closed by another thread: the key is gone with it
            # A store locked by a password (opened with encrypt=False) must never get values
            # sealed with the in-process key: nobody holding the password could read them.
            no_secret = self._password is None and self._raw_key is None
            locked = no_secret and self._meta_get("crypto") is not None
            ephemeral = self._ephemeral_key() if no_secret and not locked else None
            if ephemeral is None:
                raise PasswordRequiredError(
                    "encrypt=True needs a store opened with password= or key="
                )
            self._store_id, self._cipher = b"ephemeral", _crypto.Cipher(ephemeral)
            cipher = self._cipher
        return cipher

    def _decode(self, ns: str, key: str, record: bytes, context: bytes = b"") -> Any:
        head = record[:2]
        if head == PLAIN_HEADER:
            return decode_plain(record)
        if head == ENCRYPTED_HEADER:
            cipher = self._cipher
            if cipher is None:
                self._check_open()  # closed by another thread: the key is gone with it
                if self._meta_get("crypto") is None:
                    if self._sealed_in_process(ns, key, record, context):
                        raise PasswordRequiredError(
                            f"the value of {key!r} is encrypted with this process's key "
                            "for the named memory store: open it with encrypt=True"
                        )
                    # No key slot: nothing was ever encrypted here, so this header is damage
                    # (one flipped bit turns a plain header into it) or a foreign record.
                    raise CorruptValueError(
                        f"stored value of {key!r} claims to be encrypted, but this store "
                        "has no encryption key"
                    )
                raise PasswordRequiredError(
                    f"the value of {key!r} is encrypted: open the store with password= or key="
                )
            return unpack(
                cipher.open_record(ENCRYPTED_HEADER, self._store_id, ns, key, record, context)
            )
        raise CorruptValueError(f"stored value of {key!r} is not a mappingstore record")

    def _sealed_in_process(self, ns: str, key: str, record: bytes, context: bytes) -> bool:
        """Whether *record* opens with the in-process key (memory stores opened with
        ``encrypt=True`` and no password): a sound record another instance of the same
        named store sealed, not damage. Only asked on the error path."""
        ephemeral = self._ephemeral_key()
        if ephemeral is None:
            return False
        try:
            _crypto.Cipher(ephemeral).open_record(
                ENCRYPTED_HEADER, b"ephemeral", ns, key, record, context
            )
        except MappingStoreError:
            return False
        return True

    def _expires(self, ttl: float | None) -> float | None:
        ttl = self._default_ttl if ttl is None else _check_ttl(ttl)
        if ttl is None or ttl == FOREVER:
            return None
        return self._clock() + ttl

    # -- state checks -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{type(self).__name__} is closed")

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{type(self).__name__} is closed")
        if self._readonly:
            raise ReadOnlyError(f"{type(self).__name__} was opened read-only")

    # -- the mapping --------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if self._closed:
            self._check_open()
        if self._dot:
            from . import _tree

            return _tree.get_item(self, "", key)
        # Every read passes here: the common key (ASCII text) skips the full check, and a
        # plain record skips the decode dispatch. Both fall back to the general path.
        k = key if type(key) is str and key and key.isascii() else check_key(key)
        data = self._rget(self._ns, k) if self._nbatch else self._get(self._ns, k)
        if data is None:
            raise MissingKeyError(key)
        if data[:2] == PLAIN_HEADER:
            return decode_plain(data)
        return self._decode(self._ns, k, data)

    def get(self, key: str, default: Any = None) -> Any:
        """``store[key]`` if present, else *default* (never raises ``KeyError``)."""
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def set(
        self, key: str, value: Any, *, ttl: float | None = None, encrypt: bool | None = None
    ) -> None:
        """Store *value* at *key*.

        ``ttl`` (seconds) overrides the store's default TTL; :data:`FOREVER` stores
        without expiry. Overwriting an item without a TTL clears its old expiry.
        ``encrypt`` overrides the store's default for this item.
        """
        if self._closed or self._readonly:
            self._check_writable()
        if self._dot:
            from . import _tree

            _tree.set_item(self, "", key, value, ttl=ttl, encrypt=encrypt)
            return
        k = check_key(key)
        data = self._encode(self._ns, k, value, encrypt)
        expires = self._expires(ttl) if (ttl is not None or self._default_ttl is not None) else None
        if self._nbatch:  # _rput() inlined: a batch of many sets runs this per item
            batch: _Batch | None = getattr(self._tls, "batch", None)
            if batch is not None:
                batch.ops[(self._ns, k)] = (data, expires)
                return
        self._put(self._ns, k, data, expires)

    def __delitem__(self, key: str) -> None:
        self._check_writable()
        if self._dot:
            from . import _tree

            _tree.del_item(self, "", key)
            return
        k = check_key(key)
        if not self._rdelete(self._ns, k):
            raise MissingKeyError(key)

    def __contains__(self, key: object) -> bool:
        self._check_open()
        if self._dot:
            from . import _tree

            return _tree.contains(self, "", key)
        k = check_key(key)
        if self._nbatch:
            return self._rrecord(self._ns, k) is not None
        return self._contains(self._ns, k)

    def __iter__(self) -> Iterator[str]:
        self._check_open()
        if self._dot:
            from . import _tree

            return _tree.iter_children(self, "")
        return self._rkeys(self._ns, "")

    def __len__(self) -> int:
        self._check_open()
        if self._dot:
            from . import _tree

            return _tree.count_children(self, "")
        return self._rcount(self._ns)

    def __bool__(self) -> bool:
        self._check_open()
        for _ in self._rkeys(self._ns, ""):
            return True
        return False

    def keys(self) -> KeysView[str]:
        """A live view of the keys (top-level names under dot names)."""
        return KeysView(self)

    def items(self) -> ItemsView[str, Any]:
        """A live view of ``(key, value)`` pairs, read with one streaming scan."""
        return _ItemsView(self)

    def values(self) -> ValuesView[Any]:
        """A live view of the values, read with one streaming scan."""
        return _ValuesView(self)

    def _iter_pairs(self) -> Iterator[tuple[str, Any]]:
        self._check_open()
        if self._dot:
            from . import _tree

            yield from _tree.iter_child_items(self, "")
            return
        ns = self._ns
        for key, data in self._ritems(ns, ""):
            yield key, self._decode(ns, key, data)

    def pop(self, key: str, default: Any = MISSING) -> Any:
        """Remove *key* and return its value atomically; *default* or ``KeyError`` if missing."""
        self._check_writable()
        if self._dot:
            from . import _tree

            return _tree.pop_item(self, "", key, default)
        k = check_key(key)
        found: list[Any] = []

        def step(rec: Record | None) -> Any:
            found.clear()
            if rec is None:
                return KEEP
            # Decode before deleting: a corrupt or undecryptable value raises and stays.
            found.append(self._decode(self._ns, k, rec[0]))
            return None

        self._rupdate(self._ns, k, step)
        if not found:
            if default is MISSING:
                raise MissingKeyError(key)
            return default
        return found[0]

    def popitem(self) -> tuple[str, Any]:
        """Remove and return some ``(key, value)`` pair; ``KeyError`` when empty."""
        self._check_writable()
        if self._dot:
            from . import _tree

            return _tree.pop_any(self, "")
        while True:
            key = next(iter(self), MISSING)
            if key is MISSING:
                raise MissingKeyError("popitem(): store is empty")
            value = self.pop(key, MISSING)
            if value is not MISSING:  # another writer may have taken it first
                return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        """Atomically insert *default* if *key* is missing; return the stored value."""
        self._check_writable()
        if self._dot:
            from . import _tree

            return _tree.setdefault_item(self, "", key, default)
        k = check_key(key)
        try:
            encoded = self._encode(self._ns, k, default)
        except SerializationError:
            # As dict.setdefault: an existing key returns its value whatever the default.
            data = self._rget(self._ns, k)
            if data is None:
                raise
            return self._decode(self._ns, k, data)
        expires = self._expires(None)
        found: list[bytes] = []

        def step(rec: Record | None) -> Any:
            found.clear()
            if rec is not None:
                found.append(rec[0])
                return KEEP
            return (encoded, expires)

        self._rupdate(self._ns, k, step)
        return self._decode(self._ns, k, found[0]) if found else self._decode(self._ns, k, encoded)

    def clear(self) -> None:
        """Remove every item of this namespace."""
        self._check_writable()
        batch = self._batch()
        if batch is not None:
            for key in list(self._rkeys(self._ns, "")):
                batch.ops[(self._ns, key)] = (None, None)
        else:
            self._clear(self._ns)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like ``dict.update``; every write commits together (one transaction/pipeline)."""
        self._check_writable()
        self.set_many(_update_pairs(other), _extra=kwargs or None)

    def set_many(
        self,
        items: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        ttl: float | None = None,
        encrypt: bool | None = None,
        _extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Store many items at once, atomically (encoded first: a bad value stores nothing)."""
        self._check_writable()
        pairs = list(
            items.items() if isinstance(items, Mapping) else _iterable(items, "set_many()")
        )
        if _extra:
            pairs.extend(_extra.items())
        if self._dot:
            from . import _tree

            _tree.assign_many(self, "", pairs, ttl=ttl, encrypt=encrypt)
            return
        self._rapply(self._encode_many(pairs, ttl, encrypt))

    def _encode_many(
        self, pairs: Iterable[Any], ttl: float | None, encrypt: bool | None
    ) -> list[Op]:
        """The records ``set_many(pairs)`` writes (not under dot names): keys checked, values
        encoded (and encrypted), expiry computed, the last of repeated keys kept. Does no
        I/O (unless encryption must read the metadata to choose its error), so the async
        API's native drivers call it in the event loop."""
        expires = self._expires(ttl)
        ns = self._ns
        # Encrypted values are packed here and sealed together below (Cipher.seal_records:
        # about 1 µs a value instead of 2.3 µs one by one), each with its own nonce;
        # not when a subclass encodes its own way (adapters bind values to other names).
        bulk = type(self)._encode is Store._encode and (
            self._encrypt_default if encrypt is None else encrypt
        )
        cipher: _crypto.Cipher | None = None
        latest: dict[str, bytes] = {}
        for pair in pairs:
            k, v = _pair(pair)
            k = check_key(k)
            if not bulk:
                latest[k] = self._encode(ns, k, v, encrypt)
                continue
            payload = pack(v)
            if cipher is None:  # as _encode: no usable key -> the error at the first value
                cipher = self._cipher or self._sealing_cipher()
            latest[k] = payload
        if cipher is not None:
            sealed = cipher.seal_records(
                ENCRYPTED_HEADER, self._store_id, ns, latest.keys(), latest.values()
            )
            return [Op(ns, k, rec, expires) for k, rec in zip(latest, sealed, strict=True)]
        return [Op(ns, k, data, expires) for k, data in latest.items()]

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Values of the *keys* that exist (missing keys are left out), in one round trip."""
        self._check_open()
        wanted = list(_iterable(keys, "get_many()"))
        if self._dot:
            from . import _tree

            found: dict[str, Any] = {}
            for k in wanted:
                # One read per name (a leaf, else a branch as a View): never a check and
                # then a read, which a name deleted or expired in between would fail.
                try:
                    found[k] = _tree.get_item(self, "", k)
                except MissingKeyError:
                    pass
            return found
        checked = [check_key(k) for k in wanted]
        if self._batch() is not None:
            datas = [self._rget(self._ns, k) for k in checked]
        else:
            datas = self._get_many(self._ns, checked)
        return self._decode_many(self._ns, checked, datas)

    def _decode_many(
        self, ns: str, keys: Sequence[str], datas: Sequence[bytes | None]
    ) -> dict[str, Any]:
        """``{key: self._decode(ns, key, data)}`` for the records found (not None), with the
        same errors; plain or encrypted ones are checked and decoded all at once (no I/O:
        the async API calls it too)."""
        first = datas[0] if datas else None
        if first is not None and first[:2] == PLAIN_HEADER and None not in datas:
            values = self._decode_page(ns, keys, cast("list[bytes]", datas))
            if values is not None:
                return dict(zip(keys, values, strict=True))
        # Cipher.open_records and one unpack_many: about 1.5 µs a value against 2.8 one
        # by one; None marks missing keys and records of other kinds.
        plain = self._open_many(ns, keys, datas)
        if plain is not None:
            if None not in plain:  # every key found, every record encrypted
                values = unpack_many(cast("list[bytes]", plain), whole=True)
                if values is not None:
                    return dict(zip(keys, values, strict=True))
            return {
                k: self._decode(ns, k, d) if p is None else unpack(p)
                for k, d, p in zip(keys, datas, plain, strict=True)
                if d is not None
            }
        # The loop raises the batch's first error, as it always did.
        return {
            k: self._decode(ns, k, d) for k, d in zip(keys, datas, strict=True) if d is not None
        }

    def _open_many(
        self, ns: str, keys: Sequence[str], datas: Sequence[bytes | None]
    ) -> list[bytes | None] | None:
        """The plaintexts of the encrypted records among *datas*, opened at once (None for
        the others), or ``None`` when this store has no key, decodes its own way, or any
        record fails authentication (then the caller decodes one by one, for the right
        error at the right record)."""
        cipher = self._cipher
        if cipher is None or type(self)._decode is not Store._decode:
            return None
        try:
            return cipher.open_records(ENCRYPTED_HEADER, self._store_id, ns, keys, datas)
        except IntegrityError:
            return None

    def _decode_page(
        self, ns: str, keys: Sequence[str], datas: Sequence[bytes]
    ) -> list[Any] | None:
        """``[self._decode(ns, k, d) ...]`` for records all plain or all encrypted, checked
        and decoded at once (``decode_plain_many``; ``Cipher.open_records`` and
        ``unpack_many``), or ``None`` when any record fails or the kinds are mixed: the
        caller then decodes one by one, for the right error at the right record."""
        if not datas or type(self)._decode is not Store._decode:
            return None
        if datas[0][:2] == PLAIN_HEADER:
            return decode_plain_many(datas)
        plain = self._open_many(ns, keys, datas)
        if plain is None or None in plain:  # no key, a failure, or records of other kinds
            return None
        return unpack_many(cast("list[bytes]", plain), whole=True)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete the *keys* that exist, atomically; return how many existed."""
        self._check_writable()
        keys = _iterable(keys, "delete_many()")
        if self._dot:
            from . import _tree

            return _tree.delete_many(self, "", keys)
        checked = list(dict.fromkeys(check_key(k) for k in keys))
        with self._atomic():
            present = [k for k in checked if self._rrecord(self._ns, k) is not None]
            self._rapply([Op(self._ns, k, None, None) for k in present])
        return len(present)

    # -- TTL ----------------------------------------------------------------------------

    def _leaf_record(self, key: str) -> tuple[str, Record]:
        if self._dot:
            from . import _tree

            k = _tree.leaf_name(self, "", key)
        else:
            k = check_key(key)
        rec = self._rrecord(self._ns, k)
        if rec is None:
            raise MissingKeyError(key)
        return k, rec

    def ttl(self, key: str) -> float | None:
        """Seconds until *key* expires, or ``None`` if it never does; ``KeyError`` if missing."""
        self._check_open()
        _, (_, expires) = self._leaf_record(key)
        if expires is None:
            return None
        return max(0.0, expires - self._clock())

    def expire(self, key: str, ttl: float | None) -> None:
        """Set *key* to expire in *ttl* seconds (``None`` or ``FOREVER``: never)."""
        self._check_writable()
        checked = _check_ttl(ttl)
        expires = None if checked is None or checked == FOREVER else self._clock() + checked
        k, _ = self._leaf_record(key)

        def step(rec: Record | None) -> Any:
            if rec is None:
                raise MissingKeyError(key)
            return (rec[0], expires)

        self._rupdate(self._ns, k, step)

    def purge_expired(self) -> int:
        """Physically remove the expired items of this namespace; return how many.

        Expired items are already invisible to every read; this reclaims their space.
        """
        self._check_writable()
        return self._purge_expired(self._ns)

    # -- read-modify-write and batches --------------------------------------------------

    def modify(self, key: str, fn: Callable[[Any], Any], default: Any = MISSING) -> Any:
        """Atomically replace the value of *key* with ``fn(value)`` and return the new value.

        If *key* is missing, ``fn(default)`` is stored (``KeyError`` without a default).
        The item keeps its expiry and its encryption (an item stored with
        ``set(..., encrypt=...)`` stays as it was); a new item gets the store's defaults.
        Atomic across threads, and across processes on backends shared between processes.
        ``fn`` may run more than once on backends with optimistic concurrency (Redis): keep
        it free of side effects. If ``fn`` raises, nothing is written.
        """
        self._check_writable()
        if self._dot:
            from . import _tree

            k = _tree.leaf_name(self, "", key, for_write=True)
        else:
            k = check_key(key)
        ns = self._ns
        result: list[Any] = []

        def step(rec: Record | None) -> Any:
            result.clear()
            encrypt: bool | None = None
            if rec is None:
                if default is MISSING:
                    raise MissingKeyError(key)
                old, expires = default, self._expires(None)
            else:
                old, expires = self._decode(ns, k, rec[0]), rec[1]
                encrypt = is_encrypted(rec[0])  # the item keeps its own setting
            new = fn(old)
            if self._dot and isinstance(new, Mapping):
                from .errors import NameConflictError

                raise NameConflictError("modify() cannot turn a leaf into a branch under dot names")
            result.append(new)
            return (self._encode(ns, k, new, encrypt), expires)

        if not self._dot:
            # _update is atomic by contract: an _exclusive() section around it would only
            # add cost (a transaction and a lock on backends shared between processes).
            self._rupdate(ns, k, step)
            return result[0]
        with self._atomic():
            from . import _tree

            _tree.check_leaf_write(self, k)
            self._rupdate(ns, k, step)
        return result[0]

    @contextlib.contextmanager
    def batch(self) -> Iterator[Store]:
        """Group writes: inside the block they are buffered (and visible to reads in this
        thread); at the end they commit together, or not at all if the block raises.

        Nested batches join the outer one; a nested block that raises takes back its own
        writes (a savepoint), so a caller that catches the error keeps the outer batch's
        earlier writes and nothing of the failed block. Reads are not isolated from other
        writers.
        """
        self._check_writable()
        outer = self._batch()
        if outer is not None:
            inner = _Batch(outer)
            self._tls.batch = inner
            try:
                yield self
            finally:
                self._tls.batch = outer
            outer.ops.update(inner.ops)  # only when the block did not raise
            return
        batch = _Batch()
        self._tls.batch = batch
        with self._lock:
            self._nbatch += 1
        try:
            yield self
        except BaseException:
            self._end_batch()
            raise
        self._end_batch()
        if batch.ops:
            self._check_open()
            # Each Op is (ns, key) + (data, expires), built in C: Op(...) runs the Python
            # __new__ of a NamedTuple, about 100 ns more per op (a batch may hold many).
            ops = batch.ops
            todo = list(map(tuple.__new__, repeat(Op), map(add, ops.keys(), ops.values())))
            if not batch.reads:
                self._apply(todo)
                return
            with self._exclusive():  # the check and the writes, with no writer between
                enclosing = checked_commit()
                _COMMIT.current = CheckedCommit(self, batch)
                try:
                    for (ns, key), seen in batch.reads.items():
                        rec = self._get_record(ns, key)
                        if (None if rec is None else rec[0]) != seen:
                            raise batch_conflict(key)
                    self._apply(todo)
                finally:
                    _COMMIT.current = enclosing

    def _end_batch(self) -> None:
        self._tls.batch = None
        with self._lock:
            self._nbatch -= 1

    # -- names, views, export -----------------------------------------------------------

    def names(self, prefix: str = "") -> Iterator[str]:
        """Every full key name starting with *prefix*.

        Under dot names *prefix* is a path: ``names("2")`` yields ``"2"`` and ``"2.x"`` but
        not ``"20"``; a prefix ending in ``"."`` means exactly that branch.
        """
        self._check_open()
        _require_str(prefix, "prefix")
        if not _encodable(prefix):
            return  # a lone surrogate: no key (always valid UTF-8) starts with it
        if self._dot and prefix and not prefix.endswith("."):
            # The probe of the leaf is a structure check: from the storage, never a
            # cache's old entry (a stale leaf beside a new branch would be listed twice).
            with self._uncached():
                leaf = self._rrecord(self._ns, prefix) is not None
            if leaf:
                yield prefix
            yield from self._rkeys(self._ns, prefix + ".")
            return
        yield from self._rkeys(self._ns, prefix)

    def view(self, name: str) -> View:
        """A live :class:`View` of branch *name* (which need not exist yet); needs dot names."""
        self._check_open()
        from . import _tree

        return _tree.make_view(self, name)

    def to_dict(self) -> dict[str, Any]:
        """A plain ``dict`` copy (nested dicts under dot names)."""
        self._check_open()
        if self._dot:
            from . import _tree

            return _tree.to_dict(self, "")
        return dict(self._iter_pairs())

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` snapshot, as ``os.environ.copy()`` gives: :meth:`to_dict`."""
        return self.to_dict()

    # The dict operators, as os.environ (another MutableMapping) has them: ``store | other``
    # and ``other | store`` make a new plain dict, ``store |= other`` is update().
    def __or__(self, other: object) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**self.to_dict(), **other}

    def __ror__(self, other: object) -> dict[str, Any]:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {**other, **self.to_dict()}

    # Incompatible with __or__ on purpose (typeshed's os._Environ does the same).
    def __ior__(self, other: Any) -> Store:  # type: ignore[misc]
        self.update(other)
        return self

    def export_json(self, fp: IO[str] | None = None, *, typed: bool = True) -> str | None:
        """Export as one JSON object ``{name: value}``; return it as text when *fp* is None.

        ``typed=True`` tags values JSON cannot hold (bytes, tuples, sets, datetimes,
        Decimal...) so :meth:`import_json` restores them exactly; ``typed=False`` gives
        plain JSON any tool can read (lossy for those types).
        """
        self._check_open()
        from ._jsonio import dump

        # One scan of records: never a listing and then a read per name, which turned a
        # key deleted or expired in between into "name": null.
        ns = self._ns
        return dump(((k, self._decode(ns, k, d)) for k, d in self._ritems(ns, "")), fp, typed=typed)

    def import_json(self, src: str | bytes | IO[str] | IO[bytes]) -> int:
        """Import JSON written by :meth:`export_json` (text, bytes or a file); atomically.

        Returns the number of items written.
        """
        self._check_writable()
        from ._jsonio import load

        items = load(src)
        self.set_many(items.items())
        return len(items)

    def namespaces(self) -> list[str]:
        """The namespaces of this backend that hold data (sorted)."""
        self._check_open()
        found = set()
        for raw in self._namespaces():
            ns = raw
            if ns.startswith(INTERNAL_PREFIX):
                # Series, event logs and blobs of namespace N live in "\0ts\0N",
                # "\0ev\0N" and "\0blob\0N".
                kind, _, user = ns[1:].partition(INTERNAL_PREFIX)
                if kind not in ("ts", "ev", "blob") or not user:
                    continue
                ns = user
            # Only plain items expire: series, event logs and blobs (which a backend may
            # keep outside its records) are live while listed.
            if ns in found or not (self._namespaces_live or raw != ns or self._holds_live(raw)):
                continue
            found.add(ns)
        return sorted(found)

    def _holds_live(self, ns: str) -> bool:
        """Raw namespace *ns* holds at least one live record (a backend may still list a
        namespace whose records have all expired, until they are purged)."""
        keys = iter(self._rkeys(ns, ""))
        try:
            return next(keys, None) is not None
        finally:
            close = getattr(keys, "close", None)
            if close is not None:
                close()

    # -- time series and event sequences ------------------------------------------------

    def series(self, name: str, *, freq: int | None = None) -> Series:
        """The time series *name* (created on first write). ``freq`` is its default
        frequency for :meth:`Series.missing`. Independent of a plain key of the same name."""
        self._check_open()
        from ._series import Series

        return Series(self, name, freq)

    def series_names(self) -> list[str]:
        """Names of the non-empty time series of this namespace, sorted."""
        self._check_open()
        from ._series import series_names

        return series_names(self)

    def events(self, name: str) -> EventLog:
        """The event sequence *name* (an unknown one reads as an empty state)."""
        self._check_open()
        from ._events import EventLog

        return EventLog(self, name)

    def event_names(self) -> list[str]:
        """Names of the event sequences of this namespace, sorted."""
        self._check_open()
        from ._events import event_names

        return event_names(self)

    # -- large values as streams --------------------------------------------------------

    def _blob_backend(self) -> Blobs:
        """The object that keeps this store's blobs (see ``_blobs.Blobs``); the public blob
        methods only dispatch to it. Called once per blob operation.

        Not a hook: override :meth:`_blob_backend_for`, so that adapters can reach it.
        """
        return self._blob_backend_for(self)

    def _blob_backend_for(self, facade: Store) -> Blobs:
        """Backend hook: the blobs *facade* presents, kept by this store.

        *facade* is this store, or an adapter that shows this store's key space 1:1
        (:class:`~mappingstore.ReadOnly` and :class:`~mappingstore.Cached` delegate here;
        :class:`~mappingstore.Prefixed` maps the names onto the wrapped store's blobs):
        it supplies the namespace, the closed, read-only and batch checks and the codec,
        while this store keeps the bytes, so a blob is the same one through the store and
        through the adapter. The default stores each blob as chunk records through
        *facade*'s raw methods, which is right for every backend and for the adapters over
        several stores (``Tiered``, ``Sharded``); a backend with a better native form (the
        directory store's plain files) overrides this.
        """
        from ._blobs import ChunkedBlobs

        return ChunkedBlobs(facade)

    def put_file(
        self,
        key: str,
        source: str | os.PathLike[str] | IO[bytes],
        *,
        encrypt: bool | None = None,
        chunk_size: int | None = None,
    ) -> int:
        """Stream *source* (a path or a binary file object) into the blob *key*, in chunks,
        without loading it into memory; return the number of bytes stored.

        Blobs live apart from plain keys (``store[key]`` and the blob *key* are
        independent). Replacing a blob is atomic: readers see the old or the new content,
        never a part. The source file is never moved or deleted. ``chunk_size`` (bytes,
        default 1 MiB) is fixed per blob. Not allowed inside :meth:`batch`.
        """
        from ._blobs import CHUNK_SIZE

        size = CHUNK_SIZE if chunk_size is None else chunk_size
        return self._blob_backend().put_file(key, source, encrypt=encrypt, chunk_size=size)

    def get_file(self, key: str, target: str | os.PathLike[str] | IO[bytes]) -> int:
        """Write the blob *key* to *target*: a path (replaced atomically) or a writable
        binary file object; return the number of bytes written. ``KeyError`` if missing."""
        return self._blob_backend().get_file(key, target)

    def open(self, key: str) -> BlobReader:
        """A readable, seekable binary file object over the blob *key* (``KeyError`` if
        missing); it reads only what it needs. Use it as a context manager."""
        return self._blob_backend().open(key)

    def delete_file(self, key: str) -> None:
        """Delete the blob *key* (``KeyError`` if missing)."""
        self._blob_backend().delete(key)

    def blob_names(self) -> list[str]:
        """Names of the blobs of this namespace, sorted."""
        return self._blob_backend().names()

    def purge_blobs(self, older_than: float = 24 * 3600.0) -> int:
        """Delete what uploads that never completed (a crash mid-``put_file``) left
        behind, if started more than *older_than* seconds ago; return how many records
        or files were removed. The directory store tells abandoned uploads from running
        ones by a lock, so it removes every abandoned one whatever its age."""
        return self._blob_backend().cleanup(older_than)

    # -- encryption management ----------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        """True if new values are encrypted by default."""
        return self._encrypt_default

    def change_password(
        self,
        new: str | bytes | None = None,
        *,
        key: bytes | None = None,
        security: str | None = None,
    ) -> None:
        """Re-wrap the store's data key under a new password (or raw ``key=``).

        O(1): no value is rewritten. Every namespace of the store is affected. Other open
        instances keep working (the data key does not change). The key derivation keeps
        the store's recorded ``security`` level unless ``security=`` names another one.
        """
        self._check_writable()
        if self._cipher is None or self._store_id == b"ephemeral":
            raise PasswordRequiredError(
                "change_password() needs a store opened with its password or key"
            )
        if (new is None) == (key is None):
            raise InvalidOptionError("give exactly one of a new password or key=")
        slot_bytes = self._meta_get("crypto")
        if slot_bytes is None:
            raise PasswordRequiredError("this store has no password yet")
        old = _crypto.KeySlot.from_dict(unpack(slot_bytes))
        # Without security=, the level recorded with the store stays (never the one this
        # open passed, which opening ignores): a new password never weakens the KDF.
        level = security or old.security or self._security
        data_key = _crypto.unwrap(
            old, self._store_id, password=self._password, raw_key=self._raw_key
        )
        slot = _crypto.new_slot(
            data_key, self._store_id, password=new, raw_key=key, salt=None, security=level
        )
        self._meta_set("crypto", pack(slot.to_dict()))
        self._password, self._raw_key, self._salt, self._security = new, key, None, level

    # -- lifecycle ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """A description without secrets: backend, location, namespace, options, crypto."""
        self._check_open()
        crypto: dict[str, Any] | None = None
        slot_bytes = self._meta_get("crypto")
        if slot_bytes is not None:
            slot = _crypto.KeySlot.from_dict(unpack(slot_bytes))
            crypto = {
                "kdf": slot.kdf,
                "security": slot.security,
                "opslimit": slot.opslimit,
                "memlimit": slot.memlimit,
                "cipher": "XChaCha20-Poly1305",
            }
        return {
            "backend": type(self).__name__,
            "url": self.url,
            "namespace": self._ns,
            "durability": self.durability,
            "shared_across_processes": self.shared_across_processes,
            "dot_names": self._dot,
            "readonly": self._readonly,
            "default_ttl": self._default_ttl,
            "encrypt_by_default": self._encrypt_default,
            "encryption": crypto,
        }

    @property
    def url(self) -> str:
        """A URL that reopens this store (passwords are never included)."""
        return f"{self.scheme}://"

    @property
    def namespace(self) -> str:
        """The namespace this store reads and writes."""
        return self._ns

    @property
    def readonly(self) -> bool:
        """True if the store was opened read-only."""
        return self._readonly

    @property
    def dot_names(self) -> bool:
        """True if dot names are on."""
        return self._dot

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed

    def close(self) -> None:
        """Release resources. Idempotent; any later use raises ``StoreClosedError``."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()  # may wait for calls of other threads, which may still decode
        finally:
            self._cipher = None

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Cheap: reads nothing, counts nothing, never shows a password.
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.url!r} namespace={self._ns!r}{state}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled; reopen it from its URL: {self.url!r}"
        )

    # Mapping.__eq__ compares dict(self.items()) with the other mapping; keep it, and make
    # the class unhashable like dict.
    __hash__ = None  # type: ignore[assignment]


class _ItemsView(ItemsView[str, Any]):
    _mapping: Store

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._mapping._iter_pairs()

    def __contains__(self, item: object) -> bool:
        # As dict_items: only a (key, value) tuple can be an item (ItemsView unpacks any
        # iterable, so ["a", 1] counted and 5 raised a raw TypeError).
        return isinstance(item, tuple) and len(item) == 2 and super().__contains__(item)


class _ValuesView(ValuesView[Any]):
    _mapping: Store

    def __iter__(self) -> Iterator[Any]:
        for _, value in self._mapping._iter_pairs():
            yield value


from ._tree import View  # noqa: E402  (the view module imports Store lazily)
