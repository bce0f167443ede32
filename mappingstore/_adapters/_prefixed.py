"""``Prefixed(store, prefix)``: one key range of a store, seen as a whole store."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

from .._keys import check_key
from .._store import Op, Record, Store
from ..errors import OptionTypeError
from ._base import META_NS, Adapter, add_query

__all__ = ["Prefixed"]


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

    @property
    def prefix(self) -> str:
        """The prefix added to every key."""
        return self._prefix

    @property
    def url(self) -> str:
        return add_query(self._inner.url, key_prefix=self._prefix)

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

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
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
        self._inner._apply([op._replace(key=self._full(op.ns, op.key)) for op in ops])

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
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
