"""Dot names: ``"a.b.c"`` as a path, and :class:`View`, a live sub-mapping of a branch.

Layer 3 of the architecture: uses only the batch-aware raw accessors of
:class:`~mappingstore.Store` (``_rget``, ``_rkeys``, ``_rapply``...), never a backend
directly. A name is either a *leaf* (a stored key) or a *branch* (a prefix ``name.`` of at
least one stored key); never both. Branch listings always scan ``name + "."`` so branch
``2`` is never confused with key ``20``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ._keys import MISSING, check_dotted
from .errors import InvalidOptionError, MissingKeyError, NameConflictError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["View"]


def _full(base: str, name: Any) -> str:
    name = check_dotted(name)
    return f"{base}.{name}" if base else name


def _is_leaf(store: Store, full: str) -> bool:
    return store._rrecord(store._ns, full) is not None


def _is_branch(store: Store, full: str) -> bool:
    return next(store._rkeys(store._ns, full + "."), None) is not None


def _check_ancestors(store: Store, full: str) -> None:
    start = 0
    while True:
        dot = full.find(".", start)
        if dot < 0:
            return
        if _is_leaf(store, full[:dot]):
            raise NameConflictError(f"cannot set {full!r}: {full[:dot]!r} is a leaf, not a branch")
        start = dot + 1


def check_leaf_write(store: Store, full: str) -> None:
    """Raise :class:`NameConflictError` unless a leaf may be written at *full*."""
    _check_ancestors(store, full)
    if _is_branch(store, full):
        raise NameConflictError(f"cannot store a value at {full!r}: it is a branch")


def leaf_name(store: Store, base: str, name: Any, *, for_write: bool = False) -> str:
    """The full name of a leaf; a branch raises :class:`NameConflictError`."""
    full = _full(base, name)
    if not for_write and not _is_leaf(store, full) and _is_branch(store, full):
        raise NameConflictError(f"{full!r} is a branch, not a leaf")
    return full


def _flatten(prefix: str, value: Mapping[Any, Any], out: list[tuple[str, Any]]) -> None:
    for k, v in value.items():
        full = _full(prefix, k)
        if isinstance(v, Mapping):
            _flatten(full, v, out)
        else:
            out.append((full, v))


def _check_new_leaves(leaves: list[tuple[str, Any]]) -> None:
    """Reject a mapping that would make one name both a leaf and a branch
    (``{"a": 1, "a.b": 2}``): the store holds either, never both."""
    names = {name for name, _ in leaves}
    for name in names:
        dot = name.find(".")
        while dot >= 0:
            if name[:dot] in names:
                raise NameConflictError(f"{name[:dot]!r} would be both a leaf and a branch")
            dot = name.find(".", dot + 1)


def get_item(store: Store, base: str, name: Any) -> Any:
    full = _full(base, name)
    ns = store._ns
    data = store._rget(ns, full)
    if data is not None:
        return store._decode(ns, full, data)
    if _is_branch(store, full):
        return View(store, full)
    raise MissingKeyError(name)


def set_item(
    store: Store, base: str, name: Any, value: Any, *, ttl: float | None, encrypt: bool | None
) -> None:
    from ._store import Op

    store._check_writable()
    full = _full(base, name)
    ns = store._ns
    expires = store._expires(ttl)
    if not isinstance(value, Mapping):
        data = store._encode(ns, full, value, encrypt)
        with store._atomic():
            check_leaf_write(store, full)
            store._rput(ns, full, data, expires)
        return
    # A branch assignment replaces the whole branch. Read the new content first: it may be
    # a live view of the very branch we are about to delete (``s["a"] = s["a"]``).
    leaves: list[tuple[str, Any]] = []
    _flatten(full, dict(value.items()) if isinstance(value, View) else value, leaves)
    _check_new_leaves(leaves)
    puts = [Op(ns, k, store._encode(ns, k, v, encrypt), expires) for k, v in leaves]
    with store._atomic():
        _check_ancestors(store, full)
        ops = [Op(ns, k, None, None) for k in list(store._rkeys(ns, full + "."))]
        if _is_leaf(store, full):
            ops.append(Op(ns, full, None, None))
        store._rapply(ops + puts)


def del_item(store: Store, base: str, name: Any) -> None:
    from ._store import Op

    store._check_writable()
    full = _full(base, name)
    ns = store._ns
    with store._atomic():
        if store._rdelete(ns, full):
            return
        ops = [Op(ns, k, None, None) for k in list(store._rkeys(ns, full + "."))]
        if not ops:
            raise MissingKeyError(name)
        store._rapply(ops)


def contains(store: Store, base: str, name: Any) -> bool:
    full = _full(base, name)
    return _is_leaf(store, full) or _is_branch(store, full)


def _prefix(base: str) -> str:
    return base + "." if base else ""


def iter_children(store: Store, base: str) -> Iterator[str]:
    prefix = _prefix(base)
    seen: set[str] = set()
    cut = len(prefix)
    for key in store._rkeys(store._ns, prefix):
        child = key[cut:].split(".", 1)[0]
        if child not in seen:
            seen.add(child)
            yield child


def count_children(store: Store, base: str) -> int:
    return sum(1 for _ in iter_children(store, base))


def iter_child_items(store: Store, base: str) -> Iterator[tuple[str, Any]]:
    prefix = _prefix(base)
    cut = len(prefix)
    ns = store._ns
    seen: set[str] = set()
    for key, data in store._ritems(ns, prefix):
        rest = key[cut:]
        child, dot, _ = rest.partition(".")
        if child in seen:
            continue
        seen.add(child)
        if dot:
            yield child, View(store, prefix + child)
        else:
            yield child, store._decode(ns, key, data)


def to_dict(store: Store, base: str) -> dict[str, Any]:
    prefix = _prefix(base)
    cut = len(prefix)
    ns = store._ns
    out: dict[str, Any] = {}
    for key, data in store._ritems(ns, prefix):
        parts = key[cut:].split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = store._decode(ns, key, data)
    return out


def pop_item(store: Store, base: str, name: Any, default: Any) -> Any:
    full = _full(base, name)
    with store._atomic():
        if _is_leaf(store, full):
            value = store._decode(store._ns, full, store._rget(store._ns, full) or b"")
            store._rdelete(store._ns, full)
            return value
        if _is_branch(store, full):
            value = to_dict(store, full)
            del_item(store, base, name)
            return value
    if default is MISSING:
        raise MissingKeyError(name)
    return default


def setdefault_item(store: Store, base: str, name: Any, default: Any) -> Any:
    with store._atomic():
        try:
            return get_item(store, base, name)
        except KeyError:
            pass
        set_item(store, base, name, default, ttl=None, encrypt=None)
        return get_item(store, base, name) if isinstance(default, Mapping) and default else default


def make_view(store: Store, name: Any) -> View:
    if not store._dot:
        raise InvalidOptionError("views need a store opened with dot_names=True")
    full = check_dotted(name)
    if _is_leaf(store, full):
        raise NameConflictError(f"{full!r} is a leaf, not a branch")
    return View(store, full)


class View(MutableMapping[str, Any]):
    """A live sub-mapping of the branch at :attr:`path` of a dot-names store.

    Reads and writes go straight to the store: ``view["x"] = 1`` sets ``"<path>.x"``.
    Names may themselves be dotted (``view["b.c"]``). A view of a branch that has no
    leaves is empty, and stays usable: writing to it creates the branch again. Thread
    safety and atomicity are the store's.
    """

    __slots__ = ("_path", "_store")

    def __init__(self, store: Store, path: str) -> None:
        self._store = store
        self._path = path

    @property
    def path(self) -> str:
        """The full dot name of the branch."""
        return self._path

    @property
    def store(self) -> Store:
        """The store this view reads and writes."""
        return self._store

    def __getitem__(self, name: str) -> Any:
        self._store._check_open()
        return get_item(self._store, self._path, name)

    def __setitem__(self, name: str, value: Any) -> None:
        set_item(self._store, self._path, name, value, ttl=None, encrypt=None)

    def set(
        self, name: str, value: Any, *, ttl: float | None = None, encrypt: bool | None = None
    ) -> None:
        """Like :meth:`Store.set`, relative to this branch."""
        set_item(self._store, self._path, name, value, ttl=ttl, encrypt=encrypt)

    def __delitem__(self, name: str) -> None:
        del_item(self._store, self._path, name)

    def __contains__(self, name: object) -> bool:
        self._store._check_open()
        return contains(self._store, self._path, name)

    def __iter__(self) -> Iterator[str]:
        self._store._check_open()
        return iter_children(self._store, self._path)

    def __len__(self) -> int:
        self._store._check_open()
        return count_children(self._store, self._path)

    def pop(self, name: str, default: Any = MISSING) -> Any:
        """Remove *name* (leaf or whole branch) and return its value (a dict for a branch)."""
        self._store._check_writable()
        return pop_item(self._store, self._path, name, default)

    def setdefault(self, name: str, default: Any = None) -> Any:
        """Insert *default* at *name* unless it exists; return what is stored."""
        self._store._check_writable()
        return setdefault_item(self._store, self._path, name, default)

    def clear(self) -> None:
        """Delete the whole branch."""
        from ._store import Op

        self._store._check_writable()
        ns = self._store._ns
        with self._store._atomic():
            self._store._rapply(
                [Op(ns, k, None, None) for k in list(self._store._rkeys(ns, self._path + "."))]
            )

    def view(self, name: str) -> View:
        """A view of the sub-branch *name*."""
        self._store._check_open()
        return make_view(self._store, _full(self._path, name))

    def names(self) -> Iterator[str]:
        """Full names of every leaf under this branch."""
        self._store._check_open()
        return self._store._rkeys(self._store._ns, self._path + ".")

    def to_dict(self) -> dict[str, Any]:
        """A nested plain ``dict`` copy of the branch."""
        self._store._check_open()
        return to_dict(self._store, self._path)

    def items(self) -> Any:
        """``(name, value)`` pairs, from one scan of the branch."""
        return _ViewItems(self)

    def __repr__(self) -> str:
        return f"<View {self._path!r} of {self._store!r}>"

    __hash__ = None  # type: ignore[assignment]


from collections.abc import ItemsView  # noqa: E402


class _ViewItems(ItemsView[str, Any]):
    _mapping: View

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        view = self._mapping
        view._store._check_open()
        return iter_child_items(view._store, view._path)
