"""What every adapter shares: wrapping stores at the raw-record level (layer 4).

An adapter is itself a :class:`~mappingstore.Store`. It does not run the base class's
crypto set-up (``_start``): the wrapped *primary* store has already unlocked its data key,
and the adapter encodes and decodes through that store (``_encode``/``_decode`` are
delegated), so a record written through an adapter is readable through the wrapped store
and vice versa, and key-mapping adapters (:class:`~mappingstore.Prefixed`) compose.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from .._keys import internal_ns
from .._store import Store
from ..errors import InvalidOptionError, OptionTypeError, PasswordRequiredError

__all__ = ["META_NS", "Adapter", "add_query", "query_option"]

#: The raw namespace of a store's own metadata (salt, wrapped data key, store id). An
#: adapter never caches, replicates, shards or prefixes it: it belongs to one store.
META_NS = internal_ns("meta")


_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _query_parts(url: str) -> tuple[str, list[str], str]:
    """``(head, query items, "#fragment")`` of *url*, split as ``open()`` splits it."""
    head, qmark, rest = url.partition("?")
    if qmark:
        query, hsh, frag = rest.partition("#")
    else:
        head, hsh, frag = url.partition("#")
        query = ""
    return head, [part for part in query.split("&") if part], hsh + frag


def _option_name(part: str) -> str:
    from urllib.parse import unquote_plus

    return unquote_plus(part.partition("=")[0])


def query_option(url: str, name: str) -> str | None:
    """The value of the query option *name* of *url* (the last one), or ``None``."""
    from urllib.parse import unquote_plus

    found = None
    for part in _query_parts(url)[1]:
        if _option_name(part) == name:
            found = unquote_plus(part.partition("=")[2])
    return found


def add_query(url: str, **params: str | None) -> str:
    """*url* with the query options *params* set (for an adapter's ``url``).

    An option *url* already has is replaced, not repeated (``open()`` refuses an option
    given twice, so a nested adapter's URL must carry each option once); ``None`` removes
    it.
    """
    from urllib.parse import quote

    if _URL_START.match(url) is None:
        # Not a URL open() takes (Tiered/Sharded show "tiered:[url, url]"): only append.
        extra = "&".join(f"{n}={quote(v, safe='')}" for n, v in params.items() if v is not None)
        return f"{url}{'&' if '?' in url else '?'}{extra}"
    head, parts, tail = _query_parts(url)
    kept = [part for part in parts if _option_name(part) not in params]
    kept += [
        f"{name}={quote(value, safe='')}" for name, value in params.items() if value is not None
    ]
    return head + ("?" + "&".join(kept) if kept else "") + tail


class Adapter(Store):
    """Base of the adapters: a store made of other stores.

    Subclasses implement the backend contract by delegating to the wrapped stores' raw
    methods. Options (namespace, dot names, default TTL, clock, logger, encryption) are
    those of the *primary* store; the adapter is read-only if any wrapped store is.

    Closing an adapter closes the wrapped stores only if it was built with
    ``close_inner=True`` (what :func:`mappingstore.open` does for the adapters it
    creates); it is unusable (``StoreClosedError``) as soon as a wrapped store is closed.
    """

    scheme: ClassVar[str] = "adapter"

    def __init__(
        self,
        stores: Sequence[Store],
        primary: Store,
        *,
        close_inner: bool = False,
        readonly: bool = False,
    ) -> None:
        inners = tuple(stores)
        if not inners:
            raise InvalidOptionError(f"{type(self).__name__} needs at least one store")
        for store in inners:
            if not isinstance(store, Store):
                raise OptionTypeError(
                    f"{type(self).__name__} wraps Store objects, not {type(store).__qualname__}"
                )
            store._check_open()
        if len({id(s) for s in inners}) != len(inners):
            raise InvalidOptionError(f"{type(self).__name__} got the same store twice")
        if not isinstance(close_inner, bool):
            raise OptionTypeError("close_inner must be True or False")
        super().__init__(
            namespace=primary._ns,
            dot_names=primary._dot,
            readonly=readonly or any(s._readonly for s in inners),
            logger=primary._log,
            clock=primary._clock,
        )
        self._default_ttl = primary._default_ttl
        self._inners = inners
        self._primary = primary
        self._inner = primary  # the one wrapped store of a single-store adapter
        self._close_inner = close_inner
        # The codec state the base class reads directly (``encrypted``, ``info()``); the
        # cipher itself stays with the primary store, which does the encoding.
        self._cipher = primary._cipher
        self._store_id = primary._store_id
        self._encrypt_default = primary._encrypt_default
        self._security = primary._security
        self._log.debug("opened %s", repr(self))

    # -- state: an adapter is closed when it or any store it wraps is closed -----------

    @property
    def _closed(self) -> bool:
        if self.__dict__.get("_own_closed", True):
            return True
        return any(s._closed for s in self.__dict__.get("_inners", ()))

    @_closed.setter
    def _closed(self, value: bool) -> None:
        self.__dict__["_own_closed"] = value

    def close(self) -> None:
        """Close the adapter (and the wrapped stores if ``close_inner=True``). Idempotent."""
        if self.__dict__.get("_own_closed", True):
            return
        self._closed = True
        self._cipher = None
        self._close()

    def _close(self) -> None:
        self._release()
        if not self._close_inner:
            return
        errors: list[BaseException] = []
        for store in self._inners:
            try:
                store.close()
            except Exception as exc:  # close every store even if one fails
                errors.append(exc)
        if errors:
            raise errors[0]

    def _uncached(self) -> contextlib.AbstractContextManager[None]:
        # Structure checks through an adapter read what the wrapped stores read uncached.
        return _all_uncached(self._inners)

    def _release(self) -> None:
        """Free the adapter's own resources (a cache...); wrapped stores are not touched."""

    @property
    def stores(self) -> tuple[Store, ...]:
        """The wrapped stores, in the order given."""
        return self._inners

    # -- what info() reports: the wrapped store's, not the Store class defaults ----------

    @property
    def durability(self) -> str:  # type: ignore[override]
        """The wrapped store's durability (``Tiered`` and ``Sharded`` combine theirs).

        An instance property, not a class attribute: it depends on what is wrapped.
        """
        return self._primary.durability

    @property
    def shared_across_processes(self) -> bool:  # type: ignore[override]
        """Whether the wrapped store is shared between processes (see ``durability``)."""
        return self._primary.shared_across_processes

    # -- time series: every mutator of a read-only adapter's series refuses ------------

    # -- codec: the primary store encodes (it holds the data key) -----------------------

    def _encode(
        self, ns: str, key: str, value: Any, encrypt: bool | None = None, context: bytes = b""
    ) -> bytes:
        return self._primary._encode(ns, key, value, encrypt, context)

    def _decode(self, ns: str, key: str, record: bytes, context: bytes = b"") -> Any:
        return self._primary._decode(ns, key, record, context)

    def _ephemeral_key(self) -> bytes | None:
        return self._primary._ephemeral_key()

    def change_password(
        self,
        new: str | bytes | None = None,
        *,
        key: bytes | None = None,
        security: str | None = None,
    ) -> None:
        """Re-wrap the data key of every wrapped store opened with a password or key.

        Each wrapped store keeps its own key slot; they must all open with the new
        secret afterwards, so each one is re-wrapped (O(1) each, no value rewritten).
        """
        self._check_writable()
        locked = [s for s in self._inners if s._cipher is not None and s._store_id != b"ephemeral"]
        if not any(s is self._primary for s in locked):  # `in` would compare contents
            raise PasswordRequiredError(
                "change_password() needs a store opened with its password or key"
            )
        for store in locked:
            store.change_password(new, key=key, security=security)
        self._security = self._primary._security

    # -- helpers ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _all_exclusive(self, stores: Sequence[Store]) -> Iterator[None]:
        """Enter the exclusive sections of *stores* in the given (fixed) order."""
        with contextlib.ExitStack() as stack:
            for store in stores:
                stack.enter_context(store._exclusive())
            yield

    def _inner_reprs(self) -> str:
        return ", ".join(repr(s) for s in self._inners)


@contextlib.contextmanager
def _all_uncached(stores: Sequence[Store]) -> Iterator[None]:
    """Every store's :meth:`Store._uncached` section at once."""
    with contextlib.ExitStack() as stack:
        for store in stores:
            stack.enter_context(store._uncached())
        yield
