"""Dot names: ``"a.b.c"`` as a path, and :class:`View`, a live sub-mapping of a branch.

Layer 3 of the architecture: uses only the batch-aware raw accessors of
:class:`~mappingstore.Store` (``_rget``, ``_rkeys``, ``_rapply``...), never a backend
directly. A name is either a *leaf* (a stored key) or a *branch* (a prefix ``name.`` of at
least one stored key); never both. Branch listings always scan ``name + "."`` so branch
``2`` is never confused with key ``20``.

Keys stored without dot names may break that rule (``"a"`` and ``"a.b"``) or have empty
segments (``"a..b"``, ``".a"``). Dot names never write such keys, and never read them as a
tree by guesswork: a lookup, ``del`` or ``pop`` by full name acts on the leaf stored at that
exact key (no branch scan on those paths), and whatever must pick one side itself
(``to_dict``, iteration, ``items()``, ``popitem``, ``pop`` of a branch) raises
:class:`NameConflictError` for the branch that holds them, whatever the backend's scan
order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from itertools import chain
from typing import TYPE_CHECKING, Any

from ._keys import MISSING, check_dotted
from .errors import (
    InvalidOptionError,
    MissingKeyError,
    NameConflictError,
    SerializationError,
)

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["View"]

# msgpack's nesting limit (its packers' DEFAULT_RECURSE_LIMIT; its unpacker reads no deeper):
# a value nested deeper cannot be stored without dot names, so a mapping flattened into dot
# names is refused at the same depth, with the codec's error, before Python's recursion
# limit could be reached.
MAX_DEPTH = 1024


def _full(base: str, name: Any) -> str:
    name = check_dotted(name)
    return f"{base}.{name}" if base else name


def _ancestors(full: str) -> Iterator[str]:
    """``"a"``, ``"a.b"`` for ``"a.b.c"``."""
    dot = full.find(".")
    while dot >= 0:
        yield full[:dot]
        dot = full.find(".", dot + 1)


def _both(name: str) -> NameConflictError:
    return NameConflictError(
        f"{name!r} is both a leaf and a branch (keys stored without dot names): "
        "delete one side by its full name, or rename it without dot_names"
    )


def _empty_segment(key: str) -> NameConflictError:
    return NameConflictError(
        f"key {key!r} has an empty dot-name segment (stored without dot names): "
        "delete its branch, or rename it without dot_names"
    )


def _torn(store: Store, full: str) -> bool:
    """True if a listing that saw *full* as both a leaf and a branch was only torn: on
    backends whose listings are not one snapshot (Redis, ``Sharded``), a branch replaced
    while it is listed can show an old leaf and a new branch of the same name. The store is
    then sound, and the listing keeps the side it met first instead of blaming keys
    "stored without dot names". Checked only when a listing meets a conflict, a few times
    over: the two lookups are not one snapshot either, and a real conflict is stable. The
    lookups read the store itself (``Store._uncached``: never a cache's old entry)."""
    with store._uncached():
        return any(not (_is_leaf(store, full) and _is_branch(store, full)) for _ in range(5))


def _is_leaf(store: Store, full: str) -> bool:
    return store._rrecord(store._ns, full) is not None


def _is_branch(store: Store, full: str) -> bool:
    return store._rhas_prefix(store._ns, full + ".")


def _check_ancestors(store: Store, full: str) -> None:
    for name in _ancestors(full):
        if _is_leaf(store, name):
            raise NameConflictError(f"cannot set {full!r}: {name!r} is a leaf, not a branch")


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
    """Append ``(full name, value)`` for every leaf of *value*, depth first in the
    mapping's order. A loop, not a recursion: a mapping that contains itself, or one nested
    deeper than :data:`MAX_DEPTH`, raises :class:`SerializationError` as the codec does for
    the same value without dot names, never ``RecursionError``."""
    stack: list[tuple[str, Iterator[tuple[Any, Any]]]] = [(prefix, iter(value.items()))]
    # The mappings being walked, kept alive so that their ids stay theirs: one met again
    # below itself is a cycle.
    path: list[Any] = [value]
    on_path = {id(value)}
    while stack:
        base, items = stack[-1]
        for k, v in items:
            full = _full(base, k)
            if not isinstance(v, Mapping):
                out.append((full, v))
                continue
            if id(v) in on_path:
                raise SerializationError(
                    f"cannot serialize value: the mapping at {full!r} contains itself"
                )
            if len(stack) >= MAX_DEPTH:
                raise SerializationError(
                    f"cannot serialize value: mappings nest more than {MAX_DEPTH} deep"
                )
            stack.append((full, iter(v.items())))
            path.append(v)
            on_path.add(id(v))
            break
        else:
            stack.pop()
            on_path.discard(id(path.pop()))


def _check_new_leaves(leaves: list[tuple[str, Any]]) -> None:
    """Reject a mapping that would make one name both a leaf and a branch
    (``{"a": 1, "a.b": 2}``): the store holds either, never both."""
    names = {name for name, _ in leaves}
    for name in names:
        for above in _ancestors(name):
            if above in names:
                raise NameConflictError(f"{above!r} would be both a leaf and a branch")


def get_item(store: Store, base: str, name: Any) -> Any:
    full = _full(base, name)
    ns = store._ns
    data = store._rget(ns, full)
    if data is not None:
        return store._decode(ns, full, data)
    if _is_branch(store, full):
        return View(store, full)
    raise MissingKeyError(name)


def _mapping_leaves(
    store: Store, full: str, value: Mapping[Any, Any], encrypt: bool | None
) -> list[tuple[str, bytes]]:
    """The records a mapping assigned at *full* becomes (checked and encoded; no write)."""
    ns = store._ns
    leaves: list[tuple[str, Any]] = []
    # Read a view's content now: it may be a live view of the very branch about to be
    # replaced (``s["a"] = s["a"]``).
    _flatten(full, dict(value.items()) if isinstance(value, View) else value, leaves)
    _check_new_leaves(leaves)
    return [(k, store._encode(ns, k, v, encrypt)) for k, v in leaves]


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
    # A branch assignment replaces the whole branch (and a leaf of the same name).
    puts = [Op(ns, k, d, expires) for k, d in _mapping_leaves(store, full, value, encrypt)]
    with store._atomic():
        _check_ancestors(store, full)
        ops = [Op(ns, k, None, None) for k in list(store._rkeys(ns, full + "."))]
        if _is_leaf(store, full):
            ops.append(Op(ns, full, None, None))
        store._rapply(ops + puts)


def assign_many(
    store: Store, base: str, pairs: Iterable[Any], *, ttl: float | None, encrypt: bool | None
) -> None:
    """``for name, value in pairs: view[name] = value``, all or nothing.

    Every pair, name and value is checked and encoded first (the errors of single writes:
    ``KeyTypeError``, ``InvalidKeyError``, ``SerializationError``, and ``OptionTypeError`` or
    ``InvalidOptionError`` for a malformed pair). The assignments are then played in order
    against the store's content plus the ones before them, so a leaf/branch conflict anywhere
    raises :class:`NameConflictError` as the loop would, and the records are written with one
    ``_rapply`` at the end: a failure writes nothing, inside an open batch too (nothing
    reaches its buffer before every check passed). Reads per item are those of a single
    write (its ancestors, a scan of ``name.``), ancestors looked up once per call.
    """
    from ._store import Op, _pair

    store._check_writable()
    ns = store._ns
    expires = store._expires(ttl)
    # (full name, record of a leaf, or None and the records of a mapping)
    steps: list[tuple[str, bytes | None, list[tuple[str, bytes]]]] = []
    for pair in pairs:
        name, value = _pair(pair)
        full = _full(base, name)
        if isinstance(value, Mapping):
            steps.append((full, None, _mapping_leaves(store, full, value, encrypt)))
        else:
            steps.append((full, store._encode(ns, full, value, encrypt), []))

    pending: dict[str, bytes | None] = {}  # name -> its new record (None: deleted)
    under: dict[str, set[str]] = {}  # branch -> the pending records below it
    stored_leaf: dict[str, bool] = {}  # lookups of the store's own leaves, made once
    dropped: list[str] = []  # names deleted by the assignments so far

    def is_leaf(key: str) -> bool:
        if key in pending:
            return pending[key] is not None
        hit = stored_leaf.get(key)
        if hit is None:
            hit = stored_leaf[key] = _is_leaf(store, key)
        return hit

    def is_branch(key: str) -> bool:
        if under.get(key):
            return True
        if not dropped:  # nothing deleted yet: any stored key below makes it a branch
            return store._rhas_prefix(ns, key + ".")
        return any(pending.get(k, b"") is not None for k in store._rkeys(ns, key + "."))

    def put(key: str, data: bytes) -> None:
        if pending.get(key) is None:
            for above in _ancestors(key):
                under.setdefault(above, set()).add(key)
        pending[key] = data

    def drop(key: str) -> None:
        if pending.get(key) is not None:
            for above in _ancestors(key):
                under[above].discard(key)
        pending[key] = None
        dropped.append(key)

    with store._atomic():
        for full, data, puts in steps:
            for above in _ancestors(full):
                if is_leaf(above):
                    raise NameConflictError(
                        f"cannot set {full!r}: {above!r} is a leaf, not a branch"
                    )
            if data is not None:
                if is_branch(full):
                    raise NameConflictError(f"cannot store a value at {full!r}: it is a branch")
                put(full, data)
                continue
            # A mapping replaces the branch (and a leaf of the same name), as set_item does.
            for key in list(store._rkeys(ns, full + ".")):
                drop(key)
            for key in list(under.get(full, ())):
                drop(key)
            if is_leaf(full):
                drop(full)
            for key, record in puts:
                put(key, record)
        store._rapply([Op(ns, k, d, None if d is None else expires) for k, d in pending.items()])


def del_item(store: Store, base: str, name: Any) -> None:
    from ._store import Op

    store._check_writable()
    full = _full(base, name)
    ns = store._ns
    with store._atomic():
        # A leaf first, as a lookup reads it. A name that is also a branch (keys stored
        # without dot names) loses its leaf and stays a branch, which repairs it; a check
        # would cost a branch scan per delete (delete_many() runs one per key).
        if store._rdelete(ns, full):
            return
        ops = [Op(ns, k, None, None) for k in list(store._rkeys(ns, full + "."))]
        if not ops:
            raise MissingKeyError(name)
        store._rapply(ops)


def delete_many(store: Store, base: str, names: Iterable[Any]) -> int:
    """``del view[name]`` for each of *names* that exists, in one atomic write; return how
    many existed. Every name is checked before anything is read; a name is looked up
    against the store minus the deletions before it (``["a", "a.b"]`` deletes branch
    ``a`` and counts 1), as the loop of single deletes would."""
    from ._store import Op

    store._check_writable()
    fulls = list(dict.fromkeys(_full(base, name) for name in names))
    ns = store._ns
    gone: set[str] = set()
    n = 0
    with store._atomic():
        for full in fulls:
            if full not in gone and store._rrecord(ns, full) is not None:
                gone.add(full)  # a leaf first, as del_item
                n += 1
                continue
            below = [k for k in store._rkeys(ns, full + ".") if k not in gone]
            if below:
                gone.update(below)
                n += 1
        if gone:
            store._rapply([Op(ns, k, None, None) for k in gone])
    return n


def contains(store: Store, base: str, name: Any) -> bool:
    full = _full(base, name)
    return _is_leaf(store, full) or _is_branch(store, full)


def _prefix(base: str) -> str:
    return base + "." if base else ""


def iter_children(store: Store, base: str) -> Iterator[str]:
    prefix = _prefix(base)
    cut = len(prefix)
    # child -> is a branch. A child seen as both, or an empty one, comes from keys stored
    # without dot names: the listing raises when it meets the second kind, so a whole
    # listing raises whatever the order the backend scans in.
    seen: dict[str, bool] = {}
    for key in store._rkeys(store._ns, prefix):
        child, dot, _ = key[cut:].partition(".")
        branch = dot != ""
        kind = seen.get(child)
        if kind is None:
            if not child:
                raise _empty_segment(key)
            seen[child] = branch
            yield child
        elif kind is not branch and not _torn(store, prefix + child):
            raise _both(prefix + child)


def count_children(store: Store, base: str) -> int:
    return sum(1 for _ in iter_children(store, base))


def iter_child_items(store: Store, base: str) -> Iterator[tuple[str, Any]]:
    prefix = _prefix(base)
    cut = len(prefix)
    ns = store._ns
    seen: dict[str, bool] = {}  # as in iter_children
    for key, data in store._ritems(ns, prefix):
        child, dot, _ = key[cut:].partition(".")
        branch = dot != ""
        kind = seen.get(child)
        if kind is not None:
            if kind is not branch and not _torn(store, prefix + child):
                raise _both(prefix + child)
            continue
        if not child:
            raise _empty_segment(key)
        seen[child] = branch
        if branch:
            yield child, View(store, prefix + child)
        else:
            yield child, store._decode(ns, key, data)


def _build(store: Store, prefix: str) -> tuple[dict[str, Any], list[str]]:
    """The nested dict of the keys under *prefix*, and those keys, from one scan.

    Keys that do not form a tree (a name both a leaf and a branch, an empty segment) raise
    :class:`NameConflictError` in any scan order: a leaf's value may itself be a dict, so
    the dicts made here for branches are told apart by identity, never by type.
    """
    cut = len(prefix)
    ns = store._ns
    out: dict[str, Any] = {}
    branches = {id(out)}
    keys: list[str] = []
    for key, data in store._ritems(ns, prefix):
        parts = key[cut:].split(".")
        if "" in parts:
            raise _empty_segment(key)
        keys.append(key)
        node: dict[str, Any] | None = out
        for i in range(len(parts) - 1):
            assert node is not None
            child = node.get(parts[i], MISSING)  # a leaf's value may be None
            if child is MISSING:
                child = node[parts[i]] = {}
                branches.add(id(child))
            elif id(child) not in branches:
                name = prefix + ".".join(parts[: i + 1])
                if not _torn(store, name):
                    raise _both(name)
                node = None  # a torn listing: keep the leaf met first
                break
            node = child
        if node is None:
            continue
        if parts[-1] in node:  # a branch: keys are unique, so never a leaf
            if not _torn(store, key):
                raise _both(key)
            continue  # a torn listing: keep the branch met first
        node[parts[-1]] = store._decode(ns, key, data)
    return out, keys


def to_dict(store: Store, base: str) -> dict[str, Any]:
    return _build(store, _prefix(base))[0]


def pop_item(store: Store, base: str, name: Any, default: Any, *, strict: bool = False) -> Any:
    """``pop(name)``: a leaf first, as a lookup reads it (a name that is also a branch, from
    keys stored without dot names, loses its leaf and stays a branch). With *strict*, such a
    name raises :class:`NameConflictError` instead, for :func:`pop_any`."""
    from ._store import Op

    full = _full(base, name)
    ns = store._ns
    with store._atomic():
        rec = store._rrecord(ns, full)
        if rec is not None:
            if strict and _is_branch(store, full):
                raise _both(full)
            # Decode before deleting: a corrupt or undecryptable value raises and stays.
            value = store._decode(ns, full, rec[0])
            store._rdelete(ns, full)
            return value
        tree, keys = _build(store, full + ".")
        if keys:
            store._rapply([Op(ns, k, None, None) for k in keys])
            return tree
    if default is MISSING:
        raise MissingKeyError(name)
    return default


def pop_any(store: Store, base: str) -> tuple[str, Any]:
    """``popitem()`` of the branch *base* (``""``: the store): some ``(name, value)``, a
    branch as a dict. A name that is both a leaf and a branch raises
    :class:`NameConflictError`: popping its leaf would leave the name, and the next call
    would return it again. That check costs one branch scan, so it is made here and not in
    ``pop``, where a set of the same name pays as much."""
    while True:
        name = next(iter_children(store, base), MISSING)
        if name is MISSING:
            what = f"branch {base!r}" if base else "store"
            raise MissingKeyError(f"popitem(): {what} is empty")
        value = pop_item(store, base, name, MISSING, strict=True)
        if value is not MISSING:  # another writer may have taken it first
            return name, value


def setdefault_item(store: Store, base: str, name: Any, default: Any) -> Any:
    with store._atomic():
        try:
            return get_item(store, base, name)
        except KeyError:
            pass
        set_item(store, base, name, default, ttl=None, encrypt=None)
        # A mapping default is now a branch: hand out a live view of it (of an empty
        # branch too, so ``d.setdefault(k, {})[x] = y`` writes through, as on a dict).
        return View(store, _full(base, name)) if isinstance(default, Mapping) else default


def make_view(store: Store, name: Any) -> View:
    if not store._dot:
        raise InvalidOptionError("views need a store opened with dot_names=True")
    full = check_dotted(name)
    with store._uncached():  # a structural check: never a cache's old entry
        if _is_leaf(store, full):
            if _is_branch(store, full):
                raise _both(full)
            raise NameConflictError(f"{full!r} is a leaf, not a branch")
    return View(store, full)


class View(MutableMapping[str, Any]):
    """A live sub-mapping of the branch at :attr:`path` of a dot-names store.

    Reads and writes go straight to the store: ``view["x"] = 1`` sets ``"<path>.x"``.
    Names may themselves be dotted (``view["b.c"]``). A view of a branch that has no
    leaves is empty, and stays usable: writing to it creates the branch again. Every
    mutator is atomic (``update`` too: all or nothing); thread safety is the store's.
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

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Like ``dict.update``, relative to this branch, and atomic like
        :meth:`Store.update`: every item is checked and encoded first, and a bad name,
        value or pair, or a leaf/branch conflict, writes nothing."""
        from ._store import _update_pairs

        self._store._check_writable()
        pairs = chain(_update_pairs(other), kwargs.items())
        assign_many(self._store, self._path, pairs, ttl=None, encrypt=None)

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

    def popitem(self) -> tuple[str, Any]:
        """Remove and return some ``(name, value)`` pair (a dict for a branch, as
        :meth:`pop` returns); ``KeyError`` when the branch is empty."""
        self._store._check_writable()
        return pop_any(self._store, self._path)

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

    def values(self) -> Any:
        """The values (a sub-branch as a :class:`View`), from one scan of the branch."""
        return _ViewValues(self)

    def __repr__(self) -> str:
        return f"<View {self._path!r} of {self._store!r}>"

    __hash__ = None  # type: ignore[assignment]


from collections.abc import ItemsView, ValuesView  # noqa: E402


class _ViewItems(ItemsView[str, Any]):
    _mapping: View

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        view = self._mapping
        view._store._check_open()
        return iter_child_items(view._store, view._path)

    def __contains__(self, item: object) -> bool:
        # As dict_items (and the store's items view): only a (key, value) tuple.
        return isinstance(item, tuple) and len(item) == 2 and super().__contains__(item)


class _ViewValues(ValuesView[Any]):
    _mapping: View

    def __iter__(self) -> Iterator[Any]:
        # One scan, as the store's values view: never a listing, then a read per name
        # (which a name deleted or expired in between would turn into a KeyError).
        view = self._mapping
        view._store._check_open()
        return (value for _, value in iter_child_items(view._store, view._path))

    def __contains__(self, value: object) -> bool:
        return any(v is value or v == value for v in self)
