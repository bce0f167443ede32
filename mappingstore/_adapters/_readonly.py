"""``ReadOnly(store)``: a read-only window on a store that stays writable elsewhere."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

from .._store import Op, Record, Store
from ..errors import ReadOnlyError
from ._base import Adapter, add_query

if TYPE_CHECKING:
    from .._blobs import Blobs

__all__ = ["ReadOnly"]


class ReadOnly(Adapter):
    """Reads go to *store*; every mutator raises :class:`~mappingstore.errors.ReadOnlyError`.

    Unlike ``readonly=True`` at open, the wrapped store may stay writable (hand a
    ``ReadOnly`` to code that must not write, keep the store for yourself). The raw write
    methods refuse too, so even code reaching below the public API cannot write through
    it. Reads see every write made through the wrapped store at once (nothing is cached).

    Blobs are the wrapped store's own (a directory store's blob files included):
    ``open``, ``get_file`` and ``blob_names`` read them; ``put_file``, ``delete_file`` and
    ``purge_blobs`` raise ``ReadOnlyError``.

    Thread-safe as the wrapped store is; shared between processes as it is.
    """

    scheme: ClassVar[str] = "readonly"

    def __init__(self, store: Store, *, close_inner: bool = False) -> None:
        super().__init__([store], store, close_inner=close_inner, readonly=True)

    @property
    def url(self) -> str:
        # add_query replaces a readonly= the wrapped URL has (a ReadOnly of a ReadOnly).
        return add_query(self._inner.url, readonly="true")

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<ReadOnly{state} of {self._inner!r}>"

    # -- reads: delegated (docstrings inherited) ----------------------------------------

    def _blob_backend_for(self, facade: Store) -> Blobs:
        # The wrapped store keeps the bytes in its own form; *facade* (read-only) checks.
        return self._inner._blob_backend_for(facade)

    def _get_record(self, ns: str, key: str) -> Record | None:
        return self._inner._get_record(ns, key)

    def _get(self, ns: str, key: str) -> bytes | None:
        return self._inner._get(ns, key)

    def _contains(self, ns: str, key: str) -> bool:
        return self._inner._contains(ns, key)

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        return self._inner._iter_keys(ns, prefix)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        return self._inner._iter_items(ns, prefix)

    def _count(self, ns: str) -> int:
        return self._inner._count(ns)

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        return self._inner._get_many(ns, keys)

    def _namespaces(self) -> Iterable[str]:
        return self._inner._namespaces()

    # -- writes: refused, also below the public API --------------------------------------

    def _refuse(self) -> NoReturn:
        raise ReadOnlyError("this store is a ReadOnly view")

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        self._refuse()

    def _delete(self, ns: str, key: str) -> bool:
        self._refuse()

    def _apply(self, ops: Sequence[Op]) -> None:
        self._refuse()

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        self._refuse()

    def _clear(self, ns: str) -> None:
        self._refuse()

    def _purge_expired(self, ns: str) -> int:
        self._refuse()
