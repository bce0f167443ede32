"""Dot names over keys that do not form a tree, atomic ``View.update``, and mappings that
cannot be flattened (review of the embedded backends and of bad input).

* Keys stored without dot names may be both a leaf and a branch (``"a"`` and ``"a.b"``)
  or have an empty segment (``"x..y"``, ``".p"``, ``"q."``). Opened with ``dot_names=True``,
  lookups by full name read the leaf; listings and removals of the branch holding them
  raise ``NameConflictError`` (never a builtin, never a guess that depends on the
  backend's scan order) and change nothing.
* ``View.update`` checks and encodes everything, plays the assignments in order, and
  writes once: any failure writes nothing, inside an open batch too.
* A mapping that contains itself, or nests deeper than the codec allows, raises
  ``SerializationError`` under dot names, as it does without them.

Every test runs on memory, sqlite, dir, ini and shm, whose scan orders differ
(insertion, sorted, hash).
"""

from __future__ import annotations

import contextlib
import random
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import Store
from mappingstore._tree import MAX_DEPTH
from mappingstore.errors import (
    InvalidKeyError,
    InvalidOptionError,
    KeyTypeError,
    MissingKeyError,
    NameConflictError,
    OptionTypeError,
    SerializationError,
)

KINDS = ["memory", "sqlite", "dir", "ini"]
if sys.platform.startswith("linux"):
    KINDS.append("shm")


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    kind = request.param
    name = f"dotreview{uuid.uuid4().hex[:12]}"
    yield {
        "memory": f"memory://{name}",
        "sqlite": f"sqlite:///{tmp_path}/s.db",
        "dir": f"dir:///{tmp_path}/d",
        "ini": f"ini:///{tmp_path}/s.ini",
        "shm": f"shm://{name}",
    }[kind]
    if kind == "shm":
        store = mappingstore.open(f"shm://{name}")
        store.unlink()  # type: ignore[attr-defined]


@contextlib.contextmanager
def stores(url: str, keys: dict[str, Any]) -> Iterator[tuple[Store, Store]]:
    """(plain, dot): *keys* written without dot names, then the same store with them."""
    plain = mappingstore.open(url)
    dot = mappingstore.open(url, dot_names=True)
    try:
        for key, value in keys.items():
            plain[key] = value
        yield plain, dot
    finally:
        dot.close()
        plain.close()


def raw(store: Store) -> dict[str, Any]:
    """The store's keys and values as stored (read without dot names)."""
    return {key: store[key] for key in store}


# -- 1. keys that do not form a tree -------------------------------------------------------


@pytest.mark.parametrize("order", ["leaf first", "branch first"])
def test_leaf_and_branch_keys_raise_name_conflict_on_listings(url: str, order: str) -> None:
    keys = {"a": 1, "a.b": 2, "a.c.d": 3, "z": 4}
    if order == "branch first":
        keys = dict(reversed(keys.items()))
    with stores(url, keys) as (plain, dot):
        for listing in (
            dot.to_dict,
            lambda: list(dot),
            lambda: len(dot),
            lambda: list(dot.keys()),
            lambda: dict(dot.items()),
            lambda: list(dot.values()),
            lambda: dot == {"a": 1, "z": 4},
            lambda: dot == {"a": {"b": 2, "c": {"d": 3}}, "z": 4},
        ):
            with pytest.raises(NameConflictError, match="'a' is both a leaf and a branch"):
                listing()
        # Lookups by full name read the leaf stored at that exact key.
        assert dot["a"] == 1
        assert dot["a.b"] == 2
        assert dot.get("a.c.d") == 3
        assert "a" in dot and "a.c" in dot
        assert dot.view("a.c").to_dict() == {"d": 3}
        with pytest.raises(NameConflictError, match="both a leaf and a branch"):
            dot.view("a")
        assert raw(plain) == keys
        # del and pop by full name act on the leaf, as a lookup does; the branch stays.
        if order == "leaf first":
            del dot["a"]
        else:
            assert dot.pop("a") == 1
        assert raw(plain) == {"a.b": 2, "a.c.d": 3, "z": 4}
        assert dot.to_dict() == {"a": {"b": 2, "c": {"d": 3}}, "z": 4}
        assert dot == {"a": {"b": 2, "c": {"d": 3}}, "z": 4}


def test_popitem_of_a_view_never_returns_a_name_twice(url: str) -> None:
    keys = {"n.a": 1, "n.a.b": 2}
    with stores(url, keys) as (plain, dot):
        with pytest.raises(NameConflictError, match=r"'n\.a' is both a leaf and a branch"):
            dot.view("n").popitem()
        assert raw(plain) == keys


def test_popitem_of_the_store_never_returns_a_name_twice(url: str) -> None:
    keys = {"a": 1, "a.b": 2}
    with stores(url, keys) as (plain, dot):
        with pytest.raises(NameConflictError, match="'a' is both a leaf and a branch"):
            dot.popitem()
        assert raw(plain) == keys


def test_assigning_a_mapping_replaces_both_sides_of_a_conflict(url: str) -> None:
    with stores(url, {"a": 1, "a.b": 2, "x..y": 3}) as (plain, dot):
        dot["a"] = {"c": 3}
        dot.view("x").update({"y": 4})
        dot["x"] = {"z": 5}
        assert raw(plain) == {"a.c": 3, "x.z": 5}
        assert dot.to_dict() == {"a": {"c": 3}, "x": {"z": 5}}


def test_a_conflict_deeper_down_raises_in_its_branch_only(url: str) -> None:
    keys = {"n.a": 1, "n.a.b": 2, "m.x": 4}
    with stores(url, keys) as (plain, dot):
        assert sorted(dot) == ["m", "n"]
        assert len(dot) == 2
        assert dot["m"].to_dict() == {"x": 4}
        view = dot.view("n")
        for listing in (dot.to_dict, view.to_dict, lambda: list(view), lambda: dict(view.items())):
            with pytest.raises(NameConflictError, match=r"'n\.a' is both a leaf and a branch"):
                listing()
        with pytest.raises(NameConflictError):
            dot == {"n": {"a": 1}, "m": {"x": 4}}  # noqa: B015
        for removal in (lambda: dot.pop("n"), view.popitem):
            with pytest.raises(NameConflictError, match=r"'n\.a' is both a leaf and a branch"):
                removal()
        assert raw(plain) == keys
        del dot["n"]  # deleting a whole branch needs no tree
        assert raw(plain) == {"m.x": 4}


@pytest.mark.parametrize("leaf", [None, {"b": 1}, [1]], ids=["None", "dict", "list"])
def test_a_leaf_value_is_never_taken_for_a_branch(url: str, leaf: Any) -> None:
    """A leaf holding None or a dict (stored without dot names) is still a leaf."""
    with stores(url, {"a": leaf, "a.c": 2}) as (plain, dot):
        with pytest.raises(NameConflictError, match="'a' is both a leaf and a branch"):
            dot.to_dict()
        del plain["a.c"]
        assert dot.to_dict() == {"a": leaf}


def test_keys_with_empty_segments_raise_name_conflict(url: str) -> None:
    keys = {"x..y": 1, "q.": 2, "ok": 3}
    with stores(url, keys) as (plain, dot):
        assert sorted(dot) == ["ok", "q", "x"]
        assert dot["ok"] == 3
        for listing in (
            dot.to_dict,
            lambda: list(dot["x"]),
            lambda: len(dot.view("q")),
            lambda: dict(dot.view("x").items()),
            lambda: dot.view("q").to_dict(),
            lambda: dot == {"ok": 3, "q": {}, "x": {}},  # equality looks into the branches
        ):
            with pytest.raises(NameConflictError, match="has an empty dot-name segment"):
                listing()
        for removal in (lambda: dot.pop("x"), lambda: dot.pop("q"), dot.view("x").popitem):
            with pytest.raises(NameConflictError, match="has an empty dot-name segment"):
                removal()
        with pytest.raises(InvalidKeyError):
            dot["x..y"]
        assert raw(plain) == keys
        del dot["x"]  # the whole branch goes, odd keys included
        assert raw(plain) == {"q.": 2, "ok": 3}


def test_an_empty_top_level_name_is_never_listed(url: str) -> None:
    keys = {".p": 1, ".q.r": 2}
    with stores(url, keys) as (plain, dot):
        for listing in (lambda: list(dot), lambda: len(dot), dot.to_dict, dot.popitem):
            with pytest.raises(NameConflictError, match="has an empty dot-name segment"):
                listing()
        with pytest.raises(InvalidKeyError):
            dot[""]
        assert raw(plain) == keys


# -- 3. View mutators are atomic -----------------------------------------------------------


@pytest.mark.parametrize(
    ("arg", "error"),
    [
        ({"new": 1, "old.z": 2}, NameConflictError),
        ({"new": 1, "x": 5, "x.y": 6}, NameConflictError),
        ([("new", 1), ("new.y", 2)], NameConflictError),
        ({"new": 1, "bad": object()}, SerializationError),
        ({"new": 1, "deep": {"bad": object()}}, SerializationError),
        ({"new": 1, "cyclic": None}, SerializationError),
        ([("new", 1), (5, 2)], KeyTypeError),
        ([("new", 1), ("a..b", 2)], InvalidKeyError),
        ({"new": 1, "": 2}, InvalidKeyError),
        ([("new", 1), ("x", 1, 2)], InvalidOptionError),
        ([("new", 1), 7], OptionTypeError),
        (7, OptionTypeError),
    ],
)
def test_view_update_failure_changes_nothing(url: str, arg: Any, error: type) -> None:
    if isinstance(arg, dict) and "cyclic" in arg:
        cyclic: dict[str, Any] = {}
        cyclic["me"] = cyclic
        arg = {**arg, "cyclic": cyclic}
    with stores(url, {"n.old": 1, "top": 2}) as (plain, dot):
        with pytest.raises(error):
            dot.view("n").update(arg)
        assert raw(plain) == {"n.old": 1, "top": 2}
        # Inside an open batch, nothing reaches its buffer either.
        with dot.batch():
            dot["n.kept"] = 3
            with pytest.raises(error):
                dot.view("n").update(arg)
        assert raw(plain) == {"n.old": 1, "n.kept": 3, "top": 2}


def test_view_update_accepts_what_dict_update_accepts(url: str) -> None:
    with stores(url, {"n.old": 1, "n.br.x": 1}) as (plain, dot):
        view = dot.view("n")
        view.update({"a": 1, "b.c": 2}, d=4)
        view.update([("e", 5), ["f", {"g": 6}]])
        view.update(view.store.view("n.b"))  # another view: a mapping
        view.update(k=7)
        view.update()
        view.update({"br": {"y": 2}})  # a mapping replaces the branch
        assert raw(plain) == {
            "n.old": 1,
            "n.a": 1,
            "n.b.c": 2,
            "n.c": 2,
            "n.d": 4,
            "n.e": 5,
            "n.f.g": 6,
            "n.k": 7,
            "n.br.y": 2,
        }


def test_view_update_plays_the_assignments_in_order(url: str) -> None:
    with stores(url, {"n.old": 1, "n.br.x": 1}) as (_, dot):
        view = dot.view("n")
        view.update([("a", 1), ("a", {"b": 2}), ("br.z", 3), ("br", {"w": 4}), ("br.v", 5)])
        view.update([("old", {"p": 1}), ("old.q", 2), ("c.d", 1)])
        assert dot.to_dict() == {
            "n": {"a": {"b": 2}, "br": {"w": 4, "v": 5}, "old": {"p": 1, "q": 2}, "c": {"d": 1}}
        }
        with pytest.raises(NameConflictError, match=r"'n\.c': it is a branch"):
            view.update([("c", 9)])
        assert dot["n.c.d"] == 1


def test_view_update_matches_a_loop_of_assignments() -> None:
    """Differential check of the all-at-once update against a loop of single assignments
    in a batch (whose failure discards the batch), on random sequences over few names."""
    rnd = random.Random(1234)
    names = ["a", "b", "a.b", "a.c", "b.a", "a.b.c", "c"]
    for _ in range(400):
        start = {}
        for name in rnd.sample(names, rnd.randint(0, 4)):
            start[name] = rnd.randint(0, 9)
        seq: list[tuple[str, Any]] = []
        for _ in range(rnd.randint(1, 5)):
            name = rnd.choice(names)
            if rnd.random() < 0.3:
                value: Any = {rnd.choice(["a", "b", "x.y"]): rnd.randint(0, 9)}
            else:
                value = rnd.randint(0, 9)
            seq.append((name, value))
        results = []
        for atomic in (True, False):
            store = mappingstore.open("memory://", dot_names=True)
            for name, value in start.items():
                with contextlib.suppress(NameConflictError):
                    store[f"n.{name}"] = value
            before = store.to_dict()
            try:
                if atomic:
                    store.view("n").update(seq)
                else:
                    with store.batch():
                        for name, value in seq:
                            store.view("n")[name] = value
                outcome: Any = store.to_dict()
            except NameConflictError:
                assert store.to_dict() == before
                outcome = "conflict"
            results.append(outcome)
            store.close()
        assert results[0] == results[1], (start, seq)


def test_view_popitem_returns_a_copy_of_a_branch(url: str) -> None:
    with stores(url, {"n.b.c": 1, "n.b.d.e": 2}) as (plain, dot):
        name, value = dot.view("n").popitem()
        assert (name, value) == ("b", {"c": 1, "d": {"e": 2}})
        assert type(value) is dict
        assert raw(plain) == {}
        with pytest.raises(MissingKeyError):
            dot.view("n").popitem()


def test_other_view_mutators_change_nothing_on_failure(url: str) -> None:
    with stores(url, {"n.old": 1, "n.br.x": 1}) as (plain, dot):
        view = dot.view("n")
        with pytest.raises(SerializationError):
            view.setdefault("new", {"a": 1, "b": object()})
        with pytest.raises(NameConflictError):
            view.setdefault("new", {"a": 1, "a.b": 2})
        with pytest.raises(NameConflictError):
            view.setdefault("old.x", 1)
        with pytest.raises(MissingKeyError):
            view.pop("missing")
        with pytest.raises(MissingKeyError):
            del view["missing"]
        with pytest.raises(InvalidKeyError):
            view.pop("a..b")
        assert raw(plain) == {"n.old": 1, "n.br.x": 1}
        del view["br"]
        assert raw(plain) == {"n.old": 1}
        view.clear()
        assert raw(plain) == {}


# -- 4. mappings that cannot be flattened ----------------------------------------------------


def _nested(depth: int) -> dict[str, Any]:
    """*depth* mappings, one inside the other, the innermost holding ``{"leaf": 1}``."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


def test_cyclic_and_too_deep_mappings_raise_serialization_error(url: str) -> None:
    cyclic: dict[str, Any] = {"ok": 1}
    cyclic["inner"] = {"back": cyclic}
    with stores(url, {"kept": 1}) as (plain, dot):
        for value in (cyclic, _nested(5000), _nested(MAX_DEPTH + 1)):
            for write in (
                lambda v: dot.__setitem__("k", v),
                lambda v: dot.set("k", v, ttl=60),
                lambda v: dot.setdefault("k", v),
                lambda v: dot.update({"j": 1, "k": v}),
                lambda v: dot.view("v").update({"j": 1, "k": v}),
                lambda v: dot.view("v").__setitem__("k", v),
            ):
                with pytest.raises(SerializationError):
                    write(value)
        assert raw(plain) == {"kept": 1}
        # Without dot names the codec refuses the same values.
        with pytest.raises(SerializationError):
            plain["k"] = cyclic


def test_a_mapping_at_the_depth_limit_and_shared_submappings_are_stored(url: str) -> None:
    shared = {"x": 1}
    with stores(url, {}) as (plain, dot):
        dot["deep"] = _nested(MAX_DEPTH)
        (name,) = plain
        assert name == "deep." + "n." * (MAX_DEPTH - 1) + "leaf"
        assert plain[name] == 1
        del dot["deep"]
        dot["s"] = {"a": shared, "b": shared}  # the same dict twice is not a cycle
        assert dot.to_dict() == {"s": {"a": {"x": 1}, "b": {"x": 1}}}
