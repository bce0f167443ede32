"""Typed JSON export and import at the edges of what the codec stores: ints of any
number of digits and the deepest nesting msgpack allows."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import Any

import pytest

from mappingstore import MemoryStore
from mappingstore.errors import CorruptValueError


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    inner = value
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return value


@pytest.mark.parametrize("digits", [4299, 4301, 20_000])
def test_ints_of_any_number_of_digits_export_and_import(digits: int) -> None:
    # str(int) refuses more than sys.get_int_max_str_digits() digits (4,300 by default):
    # export_json() raised a builtin ValueError, and the CLI printed a traceback.
    assert sys.get_int_max_str_digits() in (0, 4300)
    big = -(10 ** (digits - 1) + 7)
    store = MemoryStore()
    store["big"] = big
    copy = MemoryStore()
    copy.import_json(store.export_json())
    assert copy["big"] == big
    plain = json.loads(store.export_json(typed=False))["big"]
    if digits < 4000:
        assert plain == big
    else:  # plain JSON: a string of the digits
        assert plain == str(Decimal(big))


@pytest.mark.parametrize("depth", [400, 510])
def test_the_deepest_values_the_store_takes_export_and_import(depth: int) -> None:
    # A value the store accepted (msgpack nests up to 511) raised RecursionError on export
    # above about 496 levels.
    store = MemoryStore()
    store["deep"] = _nested(depth)
    copy = MemoryStore()
    copy.import_json(store.export_json())
    assert copy["deep"] == _nested(depth)


def test_import_of_json_nested_beyond_the_stack_is_corrupt_value_error() -> None:
    with pytest.raises(CorruptValueError):
        MemoryStore().import_json('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")


@pytest.mark.parametrize("text", ['{"$int": "1e5"}', '{"$int": 5}', '{"$int": "12a"}'])
def test_int_tags_take_only_digits(text: str) -> None:
    with pytest.raises(CorruptValueError):
        MemoryStore().import_json('{"a": ' + text + "}")
