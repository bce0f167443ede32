"""The parts of dict's API beyond MutableMapping that a store offers, as os.environ does:
copy() and the | and |= operators."""

from __future__ import annotations

from pathlib import Path

import pytest

import mappingstore
from mappingstore import MemoryStore


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp}/s.db"])
def test_copy_and_or_operators(url: str, tmp_path: Path) -> None:
    with mappingstore.open(url.format(tmp=tmp_path)) as store:
        store.update({"a": 1, "b": [1, 2]})
        snapshot = store.copy()
        assert type(snapshot) is dict and snapshot == {"a": 1, "b": [1, 2]}
        snapshot["b"].append(3)
        assert store["b"] == [1, 2]
        merged = store | {"b": 0, "c": 3}
        assert merged == {"a": 1, "b": 0, "c": 3} and type(merged) is dict
        assert {"a": 0, "z": 9} | store == {"a": 1, "z": 9, "b": [1, 2]}
        assert dict(store) == {"a": 1, "b": [1, 2]}  # | changes neither side
        same = store
        store |= {"c": 3}
        store |= [("d", 4)]
        assert store is same and store == {"a": 1, "b": [1, 2], "c": 3, "d": 4}
        with pytest.raises(TypeError):
            store | 5  # type: ignore[operator]


def test_copy_of_a_dot_names_store_is_nested_plain_dicts() -> None:
    store = MemoryStore(dot_names=True)
    store["x.y"] = 1
    assert store.copy() == {"x": {"y": 1}}
    assert type(store.copy()["x"]) is dict
