"""``Prefixed(store, prefix)``: one key range of a store, seen as a whole store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO, Any, ClassVar

from .._blobs import BlobReader, Blobs
from .._keys import check_key, internal_ns, tagged_names
from .._store import KEEP, Op, Record, Store
from ..errors import InvalidOptionError, MissingKeyError, NameConflictError, OptionTypeError
from ._base import META_NS, Adapter, add_query, query_option

__all__ = ["Prefixed"]

_BLOB_NS = internal_ns("blob")  # + a user namespace: the raw namespace of its blobs


class _PrefixedBlobs(Blobs):
    """The blobs of a :class:`Prefixed` adapter: the wrapped store's blobs named
    ``prefix + name``, kept in the wrapped store's own form (a directory store's files).

    ``store`` (the adapter, or a ``ReadOnly``/``Cached`` over it) makes the checks; the
    wrapped store's :class:`Blobs` (*inner*) repeats its own and encodes: a blob is bound
    to its full name, exactly as if it had been written through the wrapped store.
    """

    def __init__(self, facade: Store, inner: Blobs, prefix: str) -> None:
        super().__init__(facade)
        self._inner = inner
        self._prefix = prefix

    def _put(self, name: str, src: IO[bytes], encrypt: bool | None, chunk_size: int) -> int:
        return self._inner.put_file(
            self._prefix + name, src, encrypt=encrypt, chunk_size=chunk_size
        )

    def _open(self, name: str) -> BlobReader:
        try:
            reader = self._inner.open(self._prefix + name)
        except MissingKeyError:
            raise MissingKeyError(name) from None
        return reader._present(self.store, name)

    def _delete(self, name: str) -> None:
        try:
            self._inner.delete(self._prefix + name)
        except MissingKeyError:
            raise MissingKeyError(name) from None

    def _names(self) -> list[str]:
        # Sorted names sharing a prefix stay sorted without it.
        prefix, cut = self._prefix, len(self._prefix)
        return [n[cut:] for n in self._inner.names() if n.startswith(prefix) and len(n) > cut]

    def _cleanup(self, older_than: float) -> int:
        # Leftovers of crashed uploads carry no usable name: all of the namespace's go.
        return self._inner.cleanup(older_than)


class Prefixed(Adapter):
    """The keys of *store* that start with *prefix*, with the prefix removed.

    ``Prefixed(store, "app1:")["k"]`` is stored as ``"app1:k"``. Listing, ``len`` and
    ``clear`` see only keys inside the prefix (a key ``"app1"`` or ``"app1;x"`` is
    invisible); the prefix applies in every namespace, to time series and event logs
    too. The prefix is plain text, not a path: choose one that ends with a separator no
    other prefix starts with (``"app1:"`` and ``"app10:"`` are independent, ``"app1"`` and
    ``"app10"`` are not).

    Encrypted values are bound to the *full* stored key, so a value read through the
    adapter is also readable through the wrapped store as ``prefix + key`` and a
    ciphertext moved between prefixes fails its check.

    Blobs too: the blob ``"k"`` is the wrapped store's blob ``prefix + "k"``, in that
    store's own form (a directory store's file), and ``blob_names`` lists only those
    inside the prefix. ``purge_blobs`` cleans the whole wrapped namespace.

    **Dot names.** Over a dot-names store, a write through the adapter is refused with
    :class:`~mappingstore.errors.NameConflictError` when a name the prefix passes
    through is a leaf of the wrapped store (``Prefixed(db, "app.")["x"] = 1`` while
    ``db["app"]`` holds a value), exactly as ``db["app.x"] = 1`` is: a name is never both
    a leaf and a branch. That costs one read of the wrapped store per dot in the prefix
    per write (none without dot names or without a dot in the prefix). Inside a batch
    the check runs when the batch commits, and a refused batch writes nothing.

    Costs: ``len`` counts by scanning the prefix range (one streaming query); ``clear``
    deletes the range in one atomic write. ``purge_expired`` purges the whole wrapped
    namespace (expired records are invisible anyway). Thread-safe and shared between
    processes as the wrapped store is.
    """

    scheme: ClassVar[str] = "prefixed"

    def __init__(self, store: Store, prefix: str, *, close_inner: bool = False) -> None:
        if not isinstance(prefix, str):
            raise OptionTypeError(f"prefix must be str, not {type(prefix).__qualname__}")
        self._prefix = check_key(prefix)
        super().__init__([store], store, close_inner=close_inner)
        if self._dot and "" in prefix.split(".")[:-1]:
            # "a..", ".p.": every key written through it would have an empty dot-name
            # segment, which the wrapped store's own writes refuse.
            raise InvalidOptionError(f"prefix {prefix!r} has an empty dot-name segment")
        # Under dot names, the wrapped store's names the prefix passes through ("app" for
        # "app.", "a" and "a.b" for "a.b.c"): outside our key range, so the dot-name
        # checks made through this adapter cannot see them; each must not be a leaf.
        self._parents = (
            tuple(prefix[:i] for i, ch in enumerate(prefix) if ch == "." and i) if self._dot else ()
        )

    @property
    def prefix(self) -> str:
        """The prefix added to every key."""
        return self._prefix

    @property
    def url(self) -> str:
        """The wrapped store's URL with ``key_prefix=``.

        Over another ``Prefixed`` (directly or through ``Cached``/``ReadOnly``) the
        prefixes are joined into one, which stores the same keys:
        ``Prefixed(Prefixed(s, "a:"), "b:")`` and ``Prefixed(s, "a:b:")`` both store
        ``"a:b:k"``.
        """
        inner = self._inner.url
        outer = query_option(inner, "key_prefix") or ""
        return add_query(inner, key_prefix=outer + self._prefix)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Prefixed {self._prefix!r}{state} of {self._inner!r}>"

    def _full(self, ns: str, key: str) -> str:
        # The metadata (key slot, store id) belongs to the whole wrapped store.
        return key if ns == META_NS else self._prefix + key

    def _strip(self, keys: Iterable[str]) -> Iterator[str]:
        cut = len(self._prefix)
        for key in keys:
            if len(key) > cut:  # the prefix itself would be the empty key: not ours
                yield key[cut:]

    # -- blobs: the wrapped store's, under the full name ----------------------------------

    def _blob_backend_for(self, facade: Store) -> Blobs:
        # Not chunk records through our raw methods: those would be keyed
        # prefix + "M:<len>:<name>", a blob the wrapped store never lists.
        return _PrefixedBlobs(facade, self._inner._blob_backend(), self._prefix)

    # -- codec: bind encrypted values to the full stored key -----------------------------

    def _encode(
        self, ns: str, key: str, value: Any, encrypt: bool | None = None, context: bytes = b""
    ) -> bytes:
        return self._inner._encode(ns, self._full(ns, key), value, encrypt, context)

    def _decode(self, ns: str, key: str, record: bytes, context: bytes = b"") -> Any:
        return self._inner._decode(ns, self._full(ns, key), record, context)

    # -- backend contract (docstrings inherited) -----------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        return self._inner._get_record(ns, self._full(ns, key))

    def _get(self, ns: str, key: str) -> bytes | None:
        return self._inner._get(ns, self._full(ns, key))

    def _contains(self, ns: str, key: str) -> bool:
        return self._inner._contains(ns, self._full(ns, key))

    def _conflict(self, ns: str, keys: Iterable[str]) -> NameConflictError | None:
        """The error for writing leaves *keys* of *ns* when a name the prefix passes
        through is a leaf of the wrapped store (dot names only), else ``None``."""
        if ns != self._ns:  # dot names are about the store's own keys, not its series
            return None
        for parent in self._parents:
            if self._inner._contains(ns, parent):
                key = next(iter(keys))
                return NameConflictError(
                    f"cannot set {key!r} (stored as {self._prefix + key!r}): "
                    f"{parent!r} is a leaf of the wrapped store, not a branch"
                )
        return None

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        if self._parents and ns == self._ns:
            # The check and the write in one exclusive section of the wrapped store: its
            # reads then go to the store (a Cached one serves no stale entry there), and
            # no writer can make a parent a leaf in between.
            with self._inner._exclusive():
                error = self._conflict(ns, [key])
                if error is not None:
                    raise error
                self._inner._put(ns, self._full(ns, key), data, expires)
            return
        self._inner._put(ns, self._full(ns, key), data, expires)

    def _delete(self, ns: str, key: str) -> bool:
        return self._inner._delete(ns, self._full(ns, key))

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        if ns == META_NS:
            return self._inner._iter_keys(ns, prefix)
        return self._strip(self._inner._iter_keys(ns, self._prefix + prefix))

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        if ns == META_NS:
            yield from self._inner._iter_items(ns, prefix)
            return
        cut = len(self._prefix)
        for key, data in self._inner._iter_items(ns, self._prefix + prefix):
            if len(key) > cut:
                yield key[cut:], data

    def _count(self, ns: str) -> int:
        if ns == META_NS:
            return self._inner._count(ns)
        # No backend counts a key range natively; scanning the range is one query.
        return sum(1 for _ in self._strip(self._inner._iter_keys(ns, self._prefix)))

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        return self._inner._get_many(ns, [self._full(ns, k) for k in keys])

    def _apply(self, ops: Sequence[Op]) -> None:
        full = [op._replace(key=self._full(op.ns, op.key)) for op in ops]
        if self._parents:
            written = [op.key for op in ops if op.data is not None and op.ns == self._ns]
            if written:
                # As in _put: a batch commits here outside any exclusive section of ours.
                with self._inner._exclusive():
                    error = self._conflict(self._ns, written)
                    if error is not None:
                        raise error
                    self._inner._apply(full)
                return
        self._inner._apply(full)

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        if not (self._parents and ns == self._ns):
            self._inner._update(ns, self._full(ns, key), fn)
            return
        with self._inner._exclusive():  # as in _put
            error = self._conflict(ns, [key])
            if error is not None:
                # Read before the update (a backend may run fn inside its own
                # transaction), refused only if fn writes: pop() and deletes stay possible.
                inner_fn = fn

                def fn(rec: Record | None) -> Any:
                    new = inner_fn(rec)
                    if new is not KEEP and new is not None:
                        raise error
                    return new

            self._inner._update(ns, self._full(ns, key), fn)

    def _clear(self, ns: str) -> None:
        with self._inner._exclusive():
            keys = list(self._iter_keys(ns, ""))
            self._inner._apply([Op(ns, self._full(ns, k), None, None) for k in keys])

    def _purge_expired(self, ns: str) -> int:
        return self._inner._purge_expired(ns)

    def _exclusive(self) -> Any:
        return self._inner._exclusive()

    def _has_keys(self, ns: str) -> bool:
        if ns.startswith(_BLOB_NS):
            return self._has_blobs(ns)
        keys = self._strip(self._inner._iter_keys(ns, self._prefix))
        try:
            return next(keys, None) is not None
        finally:
            close = getattr(keys, "close", None)
            if close is not None:  # release a streaming cursor at once
                close()

    def _namespaces(self) -> Iterable[str]:
        found = []
        for ns in self._inner._namespaces():
            if ns == META_NS or self._has_keys(ns):
                found.append(ns)
        return found

    def _has_blobs(self, raw: str) -> bool:
        """Whether the raw blob namespace *raw* holds a blob inside the prefix. Blobs are
        the wrapped store's, named ``prefix + name`` in its own form (chunk records keyed
        by a tagged name, or a directory store's files), so no key starts with the
        prefix: list the blob names."""
        user = raw[len(_BLOB_NS) :]
        if user == self._ns:
            names = self._inner._blob_backend().names()  # in every form the store keeps
        else:
            # Another namespace: the manifests of its chunked blobs name them.
            names = tagged_names(self._inner._iter_keys(raw, "M:"), "M")
        prefix, cut = self._prefix, len(self._prefix)
        return any(n.startswith(prefix) and len(n) > cut for n in names)
