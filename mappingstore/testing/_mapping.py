"""Dict semantics, values, keys and copies: the heart of the conformance suite."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from typing import Any

import pytest

from .._store import Store
from ..errors import (
    InvalidKeyError,
    InvalidOptionError,
    KeyTypeError,
    MappingStoreError,
    MissingKeyError,
    SerializationError,
)
from ._base import OpenStore, SuiteBase
from ._fixtures import HOSTILE_KEYS, UNSUPPORTED_VALUES, VALUE_SAMPLES, assert_same

__all__ = ["MappingTests"]

_VALUE_IDS = [name for name, _ in VALUE_SAMPLES]


def _short(key: str) -> str:
    return repr(key[:12]) + (f"..{len(key)}" if len(key) > 12 else "")


class MappingTests(SuiteBase):
    """``MutableMapping[str, Any]`` with exact ``dict`` semantics."""

    # -- missing keys -------------------------------------------------------------------

    def test_missing_key_errors(self, store: Store) -> None:
        with pytest.raises(KeyError) as info:
            store["nope"]
        assert isinstance(info.value, MappingStoreError)
        assert info.value.args[0] == "nope"
        with pytest.raises(KeyError):
            del store["nope"]
        with pytest.raises(KeyError):
            store.pop("nope")
        with pytest.raises(KeyError):
            store.popitem()
        assert store.get("nope") is None
        assert store.get("nope", 5) == 5
        assert store.pop("nope", "d") == "d"
        assert "nope" not in store
        assert len(store) == 0

    def test_set_get_delete(self, store: Store) -> None:
        store["k"] = "v"
        assert store["k"] == "v"
        assert "k" in store
        assert store.get("k") == "v"
        assert len(store) == 1
        store["k"] = "w"
        assert store["k"] == "w"
        assert len(store) == 1
        del store["k"]
        assert "k" not in store
        assert len(store) == 0
        with pytest.raises(KeyError):
            store["k"]

    def test_none_is_distinct_from_missing(self, store: Store) -> None:
        store["n"] = None
        assert "n" in store
        assert store["n"] is None
        assert store.get("n", "default") is None
        assert store.setdefault("n", 1) is None
        assert len(store) == 1
        assert dict(store.items()) == {"n": None}
        assert store.pop("n", "default") is None
        assert "n" not in store

    def test_pop(self, store: Store) -> None:
        store["a"] = [1, 2]
        assert store.pop("a") == [1, 2]
        assert "a" not in store
        assert store.pop("a", None) is None

    def test_popitem_empties_the_store(self, store: Store) -> None:
        expected = {"a": 1, "b": (2,), "c": None}
        store.update(expected)
        seen = {}
        while store:
            k, v = store.popitem()
            assert k not in seen
            seen[k] = v
        assert seen == expected
        assert len(store) == 0
        with pytest.raises(KeyError):
            store.popitem()

    def test_setdefault(self, store: Store) -> None:
        assert store.setdefault("a", [1]) == [1]
        assert store["a"] == [1]
        assert store.setdefault("a", [2]) == [1]
        assert store["a"] == [1]
        assert store.setdefault("b") is None
        assert "b" in store and store["b"] is None

    def test_update_forms(self, store: Store) -> None:
        store.update({"a": 1})
        store.update([("b", 2), ("c", 3)])
        store.update(d=4, e=5)
        store.update({"f": 6}, g=7)
        store.update(iter([("h", 8)]))  # a one-shot iterator is consumed once
        store.update(pair for pair in [("i", 9)])
        store.update(OrderedDict(j=10))
        store.update({"a": 11}.items())
        store.update()

        class KeysOnly:  # dict.update accepts any object with keys() and __getitem__
            def keys(self) -> list[str]:
                return ["k"]

            def __getitem__(self, key: str) -> int:
                return 12

        store.update(KeysOnly())
        expected = {"a": 11, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6, "g": 7, "h": 8, "i": 9}
        expected.update(j=10, k=12)
        assert store == expected
        other = dict(expected)
        store.update(store)  # updating with itself changes nothing
        assert store == other

    def test_update_later_pairs_win(self, store: Store) -> None:
        store.update([("a", 1), ("a", 2)], a=3)
        assert store["a"] == 3
        store.update([("b", 1), ("b", 2)])
        assert store["b"] == 2

    def test_update_bad_input_like_dict(self, store: Store) -> None:
        store["keep"] = 1
        with pytest.raises(TypeError):
            store.update([1])  # dict: "cannot convert ... to a sequence"
        with pytest.raises(ValueError):
            store.update([("a", 1, 2)])  # dict: "has length 3; 2 is required"
        with pytest.raises(ValueError):
            store.update(["abc"])
        with pytest.raises(TypeError):
            store.update(5)
        with pytest.raises(TypeError):
            store.update([(1, "int key")])
        with pytest.raises(TypeError):
            store.update({"a": 1}, {"b": 2})  # type: ignore[call-arg]
        assert store == {"keep": 1}

    def test_update_is_atomic_on_a_bad_value(self, store: Store) -> None:
        store["a"] = 1
        with pytest.raises(SerializationError):
            store.update([("a", 2), ("b", 3), ("c", object())])
        with pytest.raises(TypeError):
            store.update([("a", 2), (3, 3)])
        assert store == {"a": 1}

    def test_clear(self, store: Store) -> None:
        store.update({str(i): i for i in range(20)})
        store.clear()
        assert len(store) == 0
        assert list(store) == []
        assert not store
        store.clear()  # clearing an empty store is fine
        store["again"] = 1
        assert store == {"again": 1}

    def test_len_bool_iter(self, store: Store) -> None:
        assert not store
        assert bool(store) is False
        data = {f"k{i}": i for i in range(50)}
        store.update(data)
        assert store
        assert len(store) == 50
        assert sorted(store) == sorted(data)
        assert sorted(iter(store)) == sorted(data)

    def test_views_are_real_views(self, store: Store) -> None:
        keys, items, values = store.keys(), store.items(), store.values()
        assert isinstance(keys, KeysView)
        assert isinstance(items, ItemsView)
        assert isinstance(values, ValuesView)
        assert len(keys) == len(items) == len(values) == 0
        store.update(a=1, b=2)  # views are live
        assert len(keys) == len(items) == len(values) == 2
        assert "a" in keys and "z" not in keys
        assert ("a", 1) in items and ("a", 2) not in items and ("z", 1) not in items
        assert 2 in values and 3 not in values
        assert keys == {"a", "b"}
        assert keys & {"a", "z"} == {"a"}
        assert keys | {"z"} == {"a", "b", "z"}
        assert keys - {"a"} == {"b"}
        assert keys ^ {"a", "z"} == {"b", "z"}
        assert keys <= {"a", "b", "c"}
        assert keys.isdisjoint({"x", "y"})
        assert items == {("a", 1), ("b", 2)}
        assert items - {("a", 1)} == {("b", 2)}
        assert sorted(values) == [1, 2]
        assert sorted(items) == [("a", 1), ("b", 2)]
        assert keys == dict(a=0, b=0).keys()
        del store["a"]
        assert list(keys) == ["b"]
        assert list(items) == [("b", 2)]
        assert list(values) == [2]

    def test_equality(self, store: Store, open_store: OpenStore) -> None:
        assert store == {}
        store.update(a=1, b=(1, 2))
        assert store == {"a": 1, "b": (1, 2)}
        assert {"a": 1, "b": (1, 2)} == store  # noqa: SIM300 - the reflected ==, on purpose
        assert store != {"a": 1, "b": [1, 2]}
        assert store != {"a": 1}
        assert store != {"a": 1, "b": (1, 2), "c": 3}
        assert store != [("a", 1), ("b", (1, 2))]  # type: ignore[comparison-overlap]
        other = open_store("other")
        other.update(store)
        assert store == other
        other["c"] = 1
        assert store != other

    def test_unhashable_and_unpicklable(self, store: Store) -> None:
        with pytest.raises(TypeError):
            hash(store)
        with pytest.raises(TypeError):
            pickle.dumps(store)

    # -- values -------------------------------------------------------------------------

    # Loops rather than parametrisation keep the suite fast on backends whose open is
    # costly (a server round trip, a pool); every assertion names the sample it checks.

    def test_value_round_trip(self, store: Store) -> None:
        for name, value in VALUE_SAMPLES:
            store["v"] = value
            assert_same(store["v"], value, f"{name}: []")
            assert_same(store.get("v"), value, f"{name}: get")
            assert_same(dict(store.items())["v"], value, f"{name}: items")
            assert_same(next(iter(store.values())), value, f"{name}: values")
            assert_same(store.get_many(["v"])["v"], value, f"{name}: get_many")
            assert_same(store.pop("v"), value, f"{name}: pop")
            store.set("v", value)
            assert_same(store.modify("v", lambda old: old), value, f"{name}: modify")
            assert_same(store["v"], value, f"{name}: after modify")

    def test_every_value_together(self, store: Store) -> None:
        store.update(VALUE_SAMPLES)
        for name, value in VALUE_SAMPLES:
            assert_same(store[name], value, name)
        got = store.to_dict()
        assert sorted(got) == sorted(_VALUE_IDS)
        for name, value in VALUE_SAMPLES:
            assert_same(got[name], value, name)

    def test_deepest_nesting_reads_back(self, store: Store) -> None:
        # msgpack writes one level of nesting more than it reads: a value at the writer's
        # limit must read back, and one past it must be refused, never stored unreadable.
        for kind in (list, dict):
            for depth, fits in ((1025, True), (1026, False)):
                value = _nested(kind, depth)
                label = f"{kind.__name__} {depth} deep"
                try:
                    store["deep"] = value
                except SerializationError:  # refusing is fine; storing it unreadable is not
                    assert "deep" not in store, label
                    continue
                assert fits, f"{label}: stored"
                _assert_nested(store["deep"], kind, depth, label)
                _assert_nested(store.get_many(["deep"])["deep"], kind, depth, label)
                _assert_nested(dict(store.items())["deep"], kind, depth, label)
                del store["deep"]

    def test_subclasses_are_stored_as_their_base_type(self, store: Store) -> None:
        from enum import IntEnum

        class Color(IntEnum):
            RED = 1

        class Text(str):
            pass

        store["od"] = OrderedDict([("b", 1), ("a", 2)])
        store["enum"] = Color.RED
        store["text"] = Text("t")
        store["bytearray"] = bytearray(b"ab")
        assert_same(store["od"], {"b": 1, "a": 2})
        assert_same(store["enum"], 1)
        assert_same(store["text"], "t")
        assert_same(store["bytearray"], b"ab")

    def test_nan_round_trips(self, store: Store) -> None:
        store["nan"] = float("nan")
        assert_same(store["nan"], float("nan"))

    def test_unsupported_value_stores_nothing(self, store: Store) -> None:
        store["existing"] = "old"
        for name, value in UNSUPPORTED_VALUES:
            calls: dict[str, Callable[[], Any]] = {
                "setitem": lambda: store.__setitem__("new", value),  # noqa: B023
                "overwrite": lambda: store.__setitem__("existing", value),  # noqa: B023
                "set": lambda: store.set("new", value, ttl=60),  # noqa: B023
                "setdefault": lambda: store.setdefault("new", value),  # noqa: B023
                "set_many": lambda: store.set_many({"ok": 1, "new": value}),  # noqa: B023
                "update": lambda: store.update(ok=1, new=value),  # noqa: B023
                "modify": lambda: store.modify("existing", lambda _: value),  # noqa: B023
            }
            for how, call in calls.items():
                try:
                    call()
                except SerializationError:
                    pass
                else:
                    pytest.fail(f"{how}({name}) stored an unsupported value")
                assert store == {"existing": "old"}, f"{how}({name}) changed the store"
        assert isinstance(SerializationError("x"), TypeError)

    def test_recursive_value_is_rejected(self, store: Store) -> None:
        loop: list[Any] = []
        loop.append(loop)
        with pytest.raises(SerializationError):
            store["loop"] = loop
        assert "loop" not in store

    # -- copies -------------------------------------------------------------------------

    def test_reads_return_copies(self, store: Store) -> None:
        original: dict[str, Any] = {"list": [1, [2]], "set": {1}, "dict": {"x": 1}}
        store["k"] = original
        original["list"].append(99)  # mutating what was stored does not reach the store
        got = store["k"]
        assert got == {"list": [1, [2]], "set": {1}, "dict": {"x": 1}}
        got["list"].append(3)
        got["list"][1].append(4)
        got["set"].add(2)
        got["dict"]["y"] = 2
        for again in (
            store["k"],
            store.get("k"),
            dict(store.items())["k"],
            next(iter(store.values())),
        ):
            assert again == {"list": [1, [2]], "set": {1}, "dict": {"x": 1}}
        assert store["k"] is not store["k"]
        default = store.setdefault("k", None)
        default["list"].clear()
        assert store["k"]["list"] == [1, [2]]
        fresh = store.setdefault("new", [1])
        fresh.append(2)
        assert store["new"] == [1]

    # -- keys ---------------------------------------------------------------------------

    @pytest.mark.parametrize("bad", [1, 1.5, None, b"k", ("k",), True], ids=repr)
    def test_non_str_keys_raise_type_error(self, store: Store, bad: Any) -> None:
        store["1"] = "one"  # a coerced key would find this
        store["b'k'"] = "bytes repr"
        store["True"] = "bool"
        calls: list[Callable[[], Any]] = [
            lambda: store[bad],
            lambda: store.__setitem__(bad, 1),
            lambda: store.__delitem__(bad),
            lambda: bad in store,
            lambda: store.get(bad),
            lambda: store.pop(bad),
            lambda: store.pop(bad, None),
            lambda: store.setdefault(bad, 1),
            lambda: store.set(bad, 1),
            lambda: store.modify(bad, lambda v: v, 0),
            lambda: store.update({bad: 1}),
            lambda: store.get_many([bad]),
            lambda: store.set_many([(bad, 1)]),
            lambda: store.delete_many([bad]),
            lambda: store.ttl(bad),
            lambda: store.expire(bad, 10),
        ]
        for call in calls:
            with pytest.raises(TypeError) as info:
                call()
            assert isinstance(info.value, KeyTypeError)
        assert store == {"1": "one", "b'k'": "bytes repr", "True": "bool"}

    def test_str_subclass_key_is_its_text(self, store: Store) -> None:
        class Name(str):
            pass

        store[Name("k")] = 1
        assert store["k"] == 1
        assert [type(k) for k in store] == [str]

    @pytest.mark.parametrize("bad", ["", "\ud800", "a\udfffb", "x\udc80"], ids=repr)
    def test_invalid_keys_raise_value_error(self, store: Store, bad: str) -> None:
        for call in (
            lambda: store[bad],
            lambda: store.__setitem__(bad, 1),
            lambda: store.__delitem__(bad),
            lambda: store.set(bad, 1),
            lambda: store.update({bad: 1}),
        ):
            with pytest.raises(InvalidKeyError) as info:
                call()
            assert isinstance(info.value, ValueError)
        assert len(store) == 0

    def test_hostile_keys_one_by_one(self, store: Store) -> None:
        store["neighbour"] = "n"
        for key in HOSTILE_KEYS:
            k = _short(key)
            store[key] = ("value", key)
            assert key in store, k
            assert store[key] == ("value", key), k
            assert set(store) == {key, "neighbour"}, k
            assert [name for name in store.names() if name == key] == [key], k
            assert dict(store.items())[key] == ("value", key), k
            assert store.get_many([key, "missing"]) == {key: ("value", key)}, k
            assert store.modify(key, lambda v: (*v, 1)) == ("value", key, 1), k
            del store[key]
            assert key not in store, k
            assert set(store) == {"neighbour"}, k

    def test_hostile_keys_all_together(self, store: Store) -> None:
        store.update((key, i) for i, key in enumerate(HOSTILE_KEYS))
        assert len(store) == len(HOSTILE_KEYS)
        assert sorted(store) == sorted(HOSTILE_KEYS)
        listed = list(store)
        assert all(type(k) is str for k in listed)
        for i, key in enumerate(HOSTILE_KEYS):
            assert store[key] == i, _short(key)
        assert sorted(store.names()) == sorted(HOSTILE_KEYS)
        assert dict(store.items()) == {key: i for i, key in enumerate(HOSTILE_KEYS)}
        assert self.raw_keys(store) == set(HOSTILE_KEYS)
        for key in HOSTILE_KEYS[::2]:
            del store[key]
        assert sorted(store) == sorted(HOSTILE_KEYS[1::2])

    def test_names_prefix(self, store: Store) -> None:
        store.update({"a": 1, "ab": 2, "a.b": 3, "b": 4, "a*": 5, "[a]": 6, "%a": 7})
        assert sorted(store.names()) == sorted(store)
        assert sorted(store.names("a")) == ["a", "a*", "a.b", "ab"]
        assert sorted(store.names("a*")) == ["a*"]
        assert sorted(store.names("[")) == ["[a]"]
        assert sorted(store.names("%")) == ["%a"]
        assert list(store.names("zz")) == []
        with pytest.raises(TypeError):
            list(store.names(1))  # type: ignore[arg-type]

    # -- many at once -------------------------------------------------------------------

    def test_get_set_delete_many(self, store: Store) -> None:
        store.set_many({"a": 1, "b": (2,)})
        store.set_many([("c", None)])
        assert store.get_many(["a", "b", "c", "x"]) == {"a": 1, "b": (2,), "c": None}
        assert store.get_many([]) == {}
        assert store.get_many(iter(["a"])) == {"a": 1}
        assert store.delete_many(["a", "x", "a"]) == 1
        assert store.delete_many([]) == 0
        assert store.delete_many(iter(["b", "c"])) == 2
        assert len(store) == 0

    # -- modify -------------------------------------------------------------------------

    def test_modify(self, store: Store) -> None:
        store["n"] = 1
        assert store.modify("n", lambda v: v + 1) == 2
        assert store["n"] == 2
        assert store.modify("new", lambda v: [*v, 1], default=[]) == [1]
        assert store["new"] == [1]
        assert store.modify("none", lambda v: v, default=None) is None
        assert "none" in store
        with pytest.raises(KeyError):
            store.modify("missing", lambda v: v)
        assert "missing" not in store

    def test_modify_gets_a_copy_and_may_mutate_it(self, store: Store) -> None:
        store["l"] = [1]

        def append(v: list[int]) -> list[int]:
            v.append(2)
            return v

        assert store.modify("l", append) == [1, 2]
        assert store["l"] == [1, 2]

    def test_modify_raising_writes_nothing(self, store: Store) -> None:
        store["n"] = 1

        class Boom(Exception):
            pass

        def boom(_: Any) -> Any:
            raise Boom

        with pytest.raises(Boom):
            store.modify("n", boom)
        with pytest.raises(Boom):
            store.modify("absent", boom, default=0)
        assert store == {"n": 1}

    # -- options ------------------------------------------------------------------------

    def test_bad_options(self, open_store: OpenStore) -> None:
        with pytest.raises(InvalidOptionError):
            open_store("bad", security="extreme")
        with pytest.raises(InvalidOptionError):
            open_store("bad", ttl=0)
        with pytest.raises(InvalidOptionError):
            open_store("bad", ttl=-1)
        with pytest.raises(TypeError):
            open_store("bad", ttl="10")
        with pytest.raises(TypeError):
            open_store("bad", namespace=1)
        with pytest.raises(InvalidKeyError):
            open_store("bad", namespace="")
        with pytest.raises(InvalidKeyError):
            open_store("bad", namespace="\x00meta\x00")

    def test_missing_key_error_message(self, store: Store) -> None:
        with pytest.raises(MissingKeyError) as info:
            store["k 1"]
        assert str(info.value) == "'k 1'"


def _nested(kind: type[Any], depth: int) -> Any:
    """A list (or dict) holding one list (dict) ... *depth* containers deep, innermost empty."""
    value: Any = kind()
    for _ in range(depth - 1):
        value = [value] if kind is list else {"k": value}
    return value


def _assert_nested(value: Any, kind: type[Any], depth: int, label: str) -> None:
    # Walked by hand: == on two such values exceeds Python's recursion limit.
    for level in range(depth):
        assert type(value) is kind, f"{label}: level {level} is {type(value).__name__}"
        if level == depth - 1:
            assert len(value) == 0, f"{label}: innermost not empty"
        else:
            assert len(value) == 1, f"{label}: level {level} holds {len(value)} items"
            value = value[0] if kind is list else value["k"]
