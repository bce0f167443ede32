"""Dot names: ``"a.b.c"`` paths, live views, leaf/branch conflicts."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import pytest

from .._store import Store
from .._tree import View
from ..errors import (
    InvalidKeyError,
    InvalidOptionError,
    NameConflictError,
    SerializationError,
    StoreClosedError,
)
from ._base import OpenStore, SuiteBase
from ._fixtures import FakeClock

__all__ = ["DotNamesTests"]

#: The AppDataStore acceptance scenario (research notes, seeds.md section 1.6).
SEED = {"1": "1_v", "2.1": "2.1_v", "2.2": "2.2_v", "2.3.1": "2.3.1_v"}
SEED_TREE = {"1": "1_v", "2": {"1": "2.1_v", "2": "2.2_v", "3": {"1": "2.3.1_v"}}}


class DotNamesTests(SuiteBase):
    """Behaviour under ``dot_names=True``."""

    @pytest.fixture
    def seeded(self, dstore: Store) -> Store:
        dstore.update(SEED)
        return dstore

    def test_seed_scenario(self, seeded: Store) -> None:
        assert seeded.to_dict() == SEED_TREE
        assert sorted(seeded) == ["1", "2"]
        assert len(seeded) == 2
        branch = seeded["2"]
        assert isinstance(branch, MutableMapping)
        assert isinstance(branch, View)
        assert branch.path == "2"
        assert sorted(branch) == ["1", "2", "3"]
        assert len(branch) == 3
        assert seeded["2"]["3"]["1"] == "2.3.1_v"
        assert seeded["2"]["3.1"] == "2.3.1_v"
        assert seeded["2.3.1"] == "2.3.1_v"
        assert seeded["2.3"].to_dict() == {"1": "2.3.1_v"}
        assert seeded["1"] == "1_v"
        seeded["2"]["5"] = "x"
        assert seeded["2.5"] == "x"
        assert sorted(seeded.names()) == ["1", "2.1", "2.2", "2.3.1", "2.5"]
        for name in list(seeded.names()):
            del seeded[name]
        assert len(seeded) == 0
        assert seeded.to_dict() == {}
        assert not seeded

    @pytest.mark.parametrize(
        ("name", "value"),
        [("1.1", "x"), ("1.1.1", "x"), ("2", "x"), ("2.3", 5), ("2", None), ("2", [1])],
    )
    def test_conflicts_change_nothing(self, seeded: Store, name: str, value: Any) -> None:
        for call in (
            lambda: seeded.__setitem__(name, value),
            lambda: seeded.set(name, value, ttl=60),
            lambda: seeded.update({"fresh": 1, name: value}),
            lambda: seeded.set_many([("fresh", 1), (name, value)]),
            lambda: seeded.modify(name, lambda _: value, default=None),
            lambda: seeded.import_json(f'{{"fresh": 1, "{name}": 5}}'),
        ):
            with pytest.raises(NameConflictError) as info:
                call()
            assert isinstance(info.value, ValueError)
            assert seeded.to_dict() == SEED_TREE

    def test_conflict_inside_an_assigned_mapping(self, seeded: Store) -> None:
        with pytest.raises(NameConflictError):
            seeded["x"] = {"a": 1, "a.b": 2}
        with pytest.raises(NameConflictError):
            seeded["2"] = {"a.b": 2, "a": 1}
        assert seeded.to_dict() == SEED_TREE

    def test_membership(self, seeded: Store) -> None:
        seeded["20"] = "twenty"
        assert "2" in seeded and "2.3" in seeded and "2.3.1" in seeded
        assert "2.4" not in seeded and "3" not in seeded and "2.3.1.9" not in seeded
        assert "20" in seeded and "20.1" not in seeded
        assert seeded.get("2.4", "d") == "d"
        assert isinstance(seeded.get("2"), View)
        with pytest.raises(KeyError):
            seeded["2.4"]

    def test_branch_2_is_not_key_20(self, seeded: Store) -> None:
        seeded["20"] = "twenty"
        seeded["20x.1"] = "other"
        seeded["2x"] = "two x"
        assert sorted(seeded.names("2")) == ["2.1", "2.2", "2.3.1"]
        assert sorted(seeded.names("2.")) == ["2.1", "2.2", "2.3.1"]
        assert sorted(seeded.names("20")) == ["20"]
        assert sorted(seeded.names("1")) == ["1"]
        assert sorted(seeded["2"]) == ["1", "2", "3"]
        assert sorted(seeded.view("2").names()) == ["2.1", "2.2", "2.3.1"]
        del seeded["2"]
        assert seeded.to_dict() == {
            "1": "1_v",
            "20": "twenty",
            "20x": {"1": "other"},
            "2x": "two x",
        }

    def test_views_are_live_and_write_through(self, seeded: Store) -> None:
        view = seeded["2"]
        seeded["2.7"] = 7
        assert "7" in view and view["7"] == 7
        view["8"] = 8
        assert seeded["2.8"] == 8
        view["9.9"] = 99
        assert seeded["2.9.9"] == 99
        del view["1"]
        assert "2.1" not in seeded
        assert view.pop("7") == 7
        assert view.pop("9") == {"9": 99}
        assert view.pop("missing", "d") == "d"
        with pytest.raises(KeyError):
            view.pop("missing")
        assert view.setdefault("2", "ignored") == "2.2_v"
        assert view.setdefault("new", "n") == "n"
        assert seeded["2.new"] == "n"
        view.update({"u": 1}, w=2)
        assert seeded["2.u"] == 1 and seeded["2.w"] == 2
        assert dict(view.items())["3"].to_dict() == {"1": "2.3.1_v"}
        assert view.to_dict() == {
            "2": "2.2_v",
            "3": {"1": "2.3.1_v"},
            "8": 8,
            "new": "n",
            "u": 1,
            "w": 2,
        }
        view.clear()
        assert "2" not in seeded
        assert len(view) == 0
        view["again"] = 1  # a view of a vanished branch stays usable
        assert seeded.to_dict() == {"1": "1_v", "2": {"again": 1}}

    def test_delete_branch(self, seeded: Store) -> None:
        del seeded["2.3"]
        assert "2.3" not in seeded and "2.3.1" not in seeded
        assert seeded.to_dict() == {"1": "1_v", "2": {"1": "2.1_v", "2": "2.2_v"}}
        assert seeded.pop("2") == {"1": "2.1_v", "2": "2.2_v"}
        assert seeded.to_dict() == {"1": "1_v"}
        with pytest.raises(KeyError):
            del seeded["2"]

    def test_empty_branch_disappears(self, seeded: Store) -> None:
        del seeded["2.3.1"]
        assert "2.3" not in seeded
        assert sorted(seeded["2"]) == ["1", "2"]
        del seeded["2.1"]
        del seeded["2.2"]
        assert "2" not in seeded
        assert list(seeded) == ["1"]

    def test_view_of_empty_branch(self, seeded: Store) -> None:
        view = seeded.view("new.branch")
        assert isinstance(view, View)
        assert len(view) == 0 and list(view) == [] and view.to_dict() == {}
        assert "new" not in seeded
        view["x"] = 1
        assert seeded["new.branch.x"] == 1
        assert seeded.view("2").to_dict() == SEED_TREE["2"]
        with pytest.raises(NameConflictError):
            seeded.view("2")["3"].view("1")
        with pytest.raises(NameConflictError):
            seeded.view("1")
        with pytest.raises(InvalidKeyError):
            seeded.view("a..b")

    def test_views_after_close(self, seeded: Store) -> None:
        view = seeded["2"]
        seeded.close()
        calls: dict[str, Callable[[], Any]] = {
            "getitem": lambda: view["1"],
            "setitem": lambda: view.__setitem__("x", 1),
            "delitem": lambda: view.__delitem__("1"),
            "contains": lambda: "1" in view,
            "len": lambda: len(view),
            "iter": lambda: list(view),
            "items": lambda: list(view.items()),
            "names": lambda: list(view.names()),
            "to_dict": lambda: view.to_dict(),
            "pop": lambda: view.pop("1"),
            "clear": lambda: view.clear(),
            "view": lambda: view.view("3"),
        }
        for name, call in calls.items():
            try:
                call()
            except StoreClosedError:
                continue
            pytest.fail(f"View.{name} worked on a closed store")

    def test_view_needs_dot_names(self, store: Store) -> None:
        with pytest.raises(InvalidOptionError):
            store.view("a")

    def test_self_assignment(self, seeded: Store) -> None:
        seeded["2"] = seeded["2"]
        assert seeded.to_dict() == SEED_TREE
        seeded["2"]["3"] = seeded["2"]["3"]
        assert seeded.to_dict() == SEED_TREE
        seeded["copy"] = seeded["2"]
        assert seeded.to_dict()["copy"] == SEED_TREE["2"]

    def test_assigning_a_mapping_replaces_the_branch(self, seeded: Store) -> None:
        seeded["2"] = {"9": 1, "8": {"7": 2}}
        assert seeded.to_dict() == {"1": "1_v", "2": {"9": 1, "8": {"7": 2}}}
        seeded["2"] = {}
        assert "2" not in seeded
        seeded["1"] = {"a": 1}  # a leaf replaced by a branch
        assert seeded.to_dict() == {"1": {"a": 1}}

    def test_mapping_assignment_is_atomic(self, seeded: Store) -> None:
        with pytest.raises(SerializationError):
            seeded["2"] = {"ok": 1, "bad": object()}
        with pytest.raises(TypeError):
            seeded["2"] = {"ok": 1, 5: "non-str key"}
        with pytest.raises(InvalidKeyError):
            seeded["2"] = {"ok": 1, "a..b": 1}
        assert seeded.to_dict() == SEED_TREE

    @pytest.mark.parametrize("bad", ["a..b", ".a", "a.", ".", "..", "a...b"])
    def test_empty_segments(self, dstore: Store, bad: str) -> None:
        for call in (
            lambda: dstore[bad],
            lambda: dstore.__setitem__(bad, 1),
            lambda: dstore.__delitem__(bad),
            lambda: bad in dstore,
            lambda: dstore.set(bad, 1),
            lambda: dstore.modify(bad, lambda v: v, 0),
        ):
            with pytest.raises(InvalidKeyError):
                call()
        assert len(dstore) == 0

    def test_dots_are_plain_characters_without_dot_names(self, store: Store) -> None:
        store["a..b"] = 1
        store[".a"] = 2
        store["a.b"] = 3
        store["a"] = 4
        assert store == {"a..b": 1, ".a": 2, "a.b": 3, "a": 4}

    def test_modify_under_dot_names(self, seeded: Store) -> None:
        assert seeded.modify("2.1", lambda v: v + "!") == "2.1_v!"
        assert seeded.modify("2.new", lambda v: v + 1, default=0) == 1
        with pytest.raises(NameConflictError):
            seeded.modify("2.1", lambda v: {"x": 1})
        with pytest.raises(NameConflictError):
            seeded.modify("2", lambda v: 1)
        assert seeded["2.1"] == "2.1_v!"

    def test_setdefault_and_pop_on_branches(self, seeded: Store) -> None:
        assert isinstance(seeded.setdefault("2", "x"), View)
        got = seeded.setdefault("n", {"a": 1})
        assert isinstance(got, View) and got.to_dict() == {"a": 1}
        assert seeded.pop("n") == {"a": 1}
        assert seeded.pop("1") == "1_v"
        assert seeded.pop("nope", None) is None

    def test_items_and_values(self, seeded: Store) -> None:
        items = dict(seeded.items())
        assert items["1"] == "1_v"
        assert isinstance(items["2"], View) and items["2"].to_dict() == SEED_TREE["2"]
        values = list(seeded.values())
        assert len(values) == 2
        assert seeded == {"1": "1_v", "2": seeded["2"]}

    def test_ttl_under_dot_names(self, open_store: OpenStore, clock: FakeClock) -> None:
        store = open_store("dttl", dot_names=True, clock=clock)
        store.set("t.x", 1, ttl=10)
        store["t.y"] = 2
        store.set("u.x", 1, ttl=10)
        assert store.ttl("t.x") == pytest.approx(10)
        clock.advance(10)
        assert store.to_dict() == {"t": {"y": 2}}
        assert "u" not in store
        store["u"] = "leaf now"  # the expired branch no longer blocks a leaf
        assert store["u"] == "leaf now"

    def test_get_many_and_delete_many(self, seeded: Store) -> None:
        got = seeded.get_many(["1", "2.1", "nope"])
        assert got == {"1": "1_v", "2.1": "2.1_v"}
        assert seeded.delete_many(["2.1", "2.3", "nope"]) == 2
        assert seeded.to_dict() == {"1": "1_v", "2": {"2": "2.2_v"}}

    def test_export_import_under_dot_names(self, seeded: Store, open_store: OpenStore) -> None:
        text = seeded.export_json()
        assert text is not None
        target = open_store("dimport", dot_names=True)
        target.import_json(text)
        assert target.to_dict() == SEED_TREE
