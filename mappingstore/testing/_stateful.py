"""Hypothesis state machines: a store against a plain ``dict`` model, step by step.

:func:`run_state_machine` runs one against any opener (``factory(name, **options)``);
:class:`~mappingstore.testing.StoreTests` calls it for every backend. The settings come
from the active Hypothesis profile (the project's ``tests/conftest.py`` registers a fast
deterministic ``ci`` profile and a ``torture`` one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import settings as Settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from .._store import Store
from .._tree import View
from ..errors import NameConflictError
from ._fixtures import assert_same

__all__ = ["DotNamesStateMachine", "StoreStateMachine", "run_state_machine"]

Opener = Callable[..., Store]
_ABSENT = object()

# Few distinct keys, so operations collide often; look-alikes and hostile characters.
KEYS = st.sampled_from(["a", "b", "ab", "a*", "2", "20", "ü", "x/y", "\x00", "%", "a.b"]) | st.text(
    st.characters(exclude_categories=["Cs"]), min_size=1, max_size=3
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=4)
    | st.binary(max_size=4)
)
LEAF_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.frozensets(_SCALARS, max_size=2)
    ),
    max_leaves=5,
)
VALUES = st.recursive(
    LEAF_VALUES, lambda inner: st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6
)


class StoreStateMachine(RuleBasedStateMachine):
    """Every dict operation on a store and on a ``dict``; their results must agree."""

    def __init__(self, opener: Opener, persistent: bool, name: str = "statemachine") -> None:
        super().__init__()
        self.opener, self.persistent, self.name = opener, persistent, name
        self.store = opener(name)
        self.store.clear()
        self.model: dict[str, Any] = {}

    def teardown(self) -> None:
        self.store.clear()
        self.store.close()

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: Any) -> None:
        self.store[key] = value
        self.model[key] = value

    @rule(key=KEYS)
    def getitem(self, key: str) -> None:
        if key in self.model:
            assert_same(self.store[key], self.model[key])
        else:
            try:
                self.store[key]
            except KeyError:
                pass
            else:
                raise AssertionError(f"{key!r} should be missing")

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert_same(self.store.get(key, _ABSENT), self.model.get(key, _ABSENT))

    @rule(key=KEYS)
    def contains(self, key: str) -> None:
        assert (key in self.store) == (key in self.model)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        try:
            del self.store[key]
        except KeyError:
            assert key not in self.model
        else:
            del self.model[key]

    @rule(key=KEYS, with_default=st.booleans())
    def pop(self, key: str, with_default: bool) -> None:
        if with_default:
            assert_same(self.store.pop(key, _ABSENT), self.model.pop(key, _ABSENT))
            return
        try:
            got = self.store.pop(key)
        except KeyError:
            assert key not in self.model
        else:
            assert_same(got, self.model.pop(key))

    @rule()
    def popitem(self) -> None:
        try:
            key, value = self.store.popitem()
        except KeyError:
            assert not self.model
        else:
            assert_same(value, self.model.pop(key))

    @rule(key=KEYS, value=VALUES)
    def setdefault(self, key: str, value: Any) -> None:
        assert_same(self.store.setdefault(key, value), self.model.setdefault(key, value))

    @rule(pairs=st.lists(st.tuples(KEYS, VALUES), max_size=4), kwargs=st.booleans())
    def update(self, pairs: list[tuple[str, Any]], kwargs: bool) -> None:
        if kwargs:
            self.store.update(**dict(pairs))
        else:
            self.store.update(iter(pairs))
        self.model.update(pairs)

    @rule(key=KEYS)
    def modify(self, key: str) -> None:
        got = self.store.modify(key, lambda v: ("wrapped", v), default=None)
        self.model[key] = ("wrapped", self.model.get(key))
        assert_same(got, self.model[key])

    @rule(keys=st.lists(KEYS, max_size=4))
    def delete_many(self, keys: list[str]) -> None:
        expected = len({k for k in keys if k in self.model})
        assert self.store.delete_many(keys) == expected
        for key in keys:
            self.model.pop(key, None)

    @rule(ops=st.lists(st.tuples(KEYS, VALUES | st.just(_ABSENT)), max_size=4), fail=st.booleans())
    def batch(self, ops: list[tuple[str, Any]], fail: bool) -> None:
        pending = dict(self.model)
        try:
            with self.store.batch():
                for key, value in ops:
                    if value is _ABSENT:
                        self.store.pop(key, None)
                        pending.pop(key, None)
                    else:
                        self.store[key] = value
                        pending[key] = value
                    assert_same(self.store.get(key, _ABSENT), pending.get(key, _ABSENT))
                if fail:
                    raise _Abort
        except _Abort:
            return
        self.model = pending

    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.model.clear()

    @precondition(lambda self: self.persistent)
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self.opener(self.name)

    @invariant()
    def same_content(self) -> None:
        assert len(self.store) == len(self.model)
        # iter(): sorted(store) would call len() again first (the list's length hint),
        # one more round trip to a server after every step.
        assert sorted(iter(self.store)) == sorted(self.model)
        got = dict(self.store.items())
        assert got.keys() == self.model.keys()
        for key, value in self.model.items():
            assert_same(got[key], value, repr(key))


class _Abort(Exception):
    pass


SEGMENTS = st.sampled_from(["1", "2", "20", "a", "b"])
NAMES = st.lists(SEGMENTS, min_size=1, max_size=3).map(".".join)
BRANCHES: st.SearchStrategy[Any] = st.recursive(
    st.dictionaries(SEGMENTS, LEAF_VALUES, max_size=3),
    lambda inner: st.dictionaries(SEGMENTS, LEAF_VALUES | inner, max_size=3),
    max_leaves=6,
)


def _flatten(prefix: str, tree: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in tree.items():
        full = f"{prefix}.{key}"
        if isinstance(value, dict):
            _flatten(full, value, out)
        else:
            out[full] = value


class DotNamesStateMachine(RuleBasedStateMachine):
    """Leaves, branches and views under ``dot_names=True`` against a flat ``dict`` of leaves."""

    def __init__(self, opener: Opener, persistent: bool, name: str = "dotmachine") -> None:
        super().__init__()
        self.opener, self.persistent, self.name = opener, persistent, name
        self.store = opener(name, dot_names=True)
        self.store.clear()
        self.model: dict[str, Any] = {}

    def teardown(self) -> None:
        self.store.clear()
        self.store.close()

    # -- the model ----------------------------------------------------------------------

    def is_branch(self, name: str) -> bool:
        return any(k.startswith(name + ".") for k in self.model)

    def has_leaf_ancestor(self, name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in self.model for i in range(1, len(parts)))

    def subtree(self, name: str) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        cut = len(name) + 1 if name else 0
        for key, value in self.model.items():
            if name and not key.startswith(name + "."):
                continue
            node = tree
            *parents, last = key[cut:].split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return tree

    def expect_conflict(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except NameConflictError:
            return
        raise AssertionError("expected NameConflictError")

    # -- rules --------------------------------------------------------------------------

    @rule(name=NAMES, value=LEAF_VALUES)
    def set_leaf(self, name: str, value: Any) -> None:
        if self.has_leaf_ancestor(name) or self.is_branch(name):
            self.expect_conflict(lambda: self.store.__setitem__(name, value))
        else:
            self.store[name] = value
            self.model[name] = value

    @rule(name=NAMES, tree=BRANCHES)
    def set_branch(self, name: str, tree: dict[str, Any]) -> None:
        if self.has_leaf_ancestor(name):
            self.expect_conflict(lambda: self.store.__setitem__(name, tree))
            return
        self.store[name] = tree
        self.model = {
            k: v for k, v in self.model.items() if k != name and not k.startswith(name + ".")
        }
        _flatten(name, tree, self.model)

    @rule(branch=NAMES, rel=NAMES, value=LEAF_VALUES)
    def view_set(self, branch: str, rel: str, value: Any) -> None:
        if branch in self.model:
            self.expect_conflict(lambda: self.store.view(branch))
            return
        view = self.store.view(branch)
        full = f"{branch}.{rel}"
        if self.has_leaf_ancestor(full) or self.is_branch(full):
            self.expect_conflict(lambda: view.__setitem__(rel, value))
        else:
            view[rel] = value
            self.model[full] = value

    @rule(branch=NAMES, rel=NAMES)
    def view_delete(self, branch: str, rel: str) -> None:
        if branch in self.model or not self.is_branch(branch):
            return
        view = self.store[branch]
        assert isinstance(view, View)
        self._delete(f"{branch}.{rel}", lambda: view.__delitem__(rel))

    @rule(name=NAMES)
    def delete(self, name: str) -> None:
        self._delete(name, lambda: self.store.__delitem__(name))

    def _delete(self, full: str, call: Callable[[], None]) -> None:
        if full in self.model:
            call()
            del self.model[full]
        elif self.is_branch(full):
            call()
            self.model = {k: v for k, v in self.model.items() if not k.startswith(full + ".")}
        else:
            try:
                call()
            except KeyError:
                return
            raise AssertionError(f"{full!r} should be missing")

    @rule(name=NAMES)
    def get(self, name: str) -> None:
        got = self.store.get(name, _ABSENT)
        if name in self.model:
            assert_same(got, self.model[name])
        elif self.is_branch(name):
            assert isinstance(got, View)
            assert got.to_dict() == self.subtree(name)
            assert sorted(iter(got)) == sorted(self.subtree(name))
            assert len(got) == len(self.subtree(name))
        else:
            assert got is _ABSENT
        assert (name in self.store) == (name in self.model or self.is_branch(name))

    @rule(name=NAMES)
    def names_prefix(self, name: str) -> None:
        expected = [k for k in self.model if k == name or k.startswith(name + ".")]
        assert sorted(self.store.names(name)) == sorted(expected)

    @precondition(lambda self: self.persistent)
    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self.opener(self.name, dot_names=True)

    @invariant()
    def same_tree(self) -> None:
        top = self.subtree("")
        assert sorted(iter(self.store)) == sorted(top)  # iter(): see same_content
        assert len(self.store) == len(top)
        assert self.store.to_dict() == top
        assert sorted(self.store.names()) == sorted(self.model)


def run_state_machine(
    opener: Opener,
    *,
    persistent: bool,
    dot_names: bool = False,
    settings: Settings | None = None,
) -> None:
    """Run :class:`StoreStateMachine` (or :class:`DotNamesStateMachine`) against *opener*.

    *opener* is ``factory(name, **options)``; *persistent* enables the close-and-reopen
    rule. *settings* default to the active Hypothesis profile.
    """
    machine = DotNamesStateMachine if dot_names else StoreStateMachine
    run_state_machine_as_test(
        # Hypothesis accepts any zero-argument factory, though its stub says "type".
        lambda: machine(opener, persistent),  # type: ignore[arg-type]
        settings=settings if settings is not None else Settings(),
    )
