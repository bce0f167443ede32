"""Bad options and bad arguments to the common API: each raises the library's own error
(also the builtin a caller expects) and changes nothing."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import MemoryStore
from mappingstore.errors import (
    InvalidOptionError,
    InvalidURLError,
    MappingStoreError,
    OptionTypeError,
    SerializationError,
)

URLS = ["memory://", "sqlite:///{tmp}/s.db", "dir:///{tmp}/d", "ini:///{tmp}/s.ini"]


@pytest.mark.parametrize("url", URLS)
def test_an_unknown_keyword_option_is_our_type_error(url: str, tmp_path: Path) -> None:
    with pytest.raises(OptionTypeError, match="no option 'bogus'") as info:
        mappingstore.open(url.format(tmp=tmp_path), bogus=1)
    assert isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    "options",
    [
        {"readonly": "false"},
        {"dot_names": "no"},
        {"readonly": 2},
        {"dot_names": None},
        {"logger": 1},
        {"logger": "mappingstore"},
        {"clock": 1},
    ],
)
def test_options_of_the_wrong_type(options: dict[str, Any]) -> None:
    # "false" used to turn a flag on (bool("false") is True).
    with pytest.raises(OptionTypeError):
        MemoryStore(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"security": ["low"]},
        {"security": "bogus"},
        {"password": "pw", "key": bytes(32)},
        {"ttl": -(10**400)},
    ],
)
def test_options_with_bad_values(options: dict[str, Any]) -> None:
    # A list used to raise "unhashable type"; password and key together silently used the
    # key and ignored the password.
    with pytest.raises(InvalidOptionError):
        MemoryStore(**options)


def test_flags_accept_bools_and_0_or_1() -> None:
    assert MemoryStore(readonly=1)._readonly is True
    assert MemoryStore(dot_names=0)._dot is False
    assert MemoryStore(logger=logging.getLogger("x")) is not None


def test_a_ttl_beyond_any_float_is_forever() -> None:
    # It used to raise a raw OverflowError, from open(), set() and expire().
    store = MemoryStore(ttl=10**400)
    store["a"] = 1
    store.set("b", 2, ttl=10**400)
    store.expire("a", 10**400)
    assert store.ttl("a") is None and store.ttl("b") is None


def test_setdefault_of_an_existing_key_ignores_an_unstorable_default() -> None:
    # As dict.setdefault: the default matters only when the key is missing.
    store = MemoryStore()
    store["a"] = 1
    assert store.setdefault("a", object()) == 1
    with pytest.raises(SerializationError):
        store.setdefault("b", object())
    assert dict(store) == {"a": 1}


@pytest.mark.parametrize("dot_names", [False, True])
def test_bulk_methods_refuse_what_is_not_iterable(dot_names: bool) -> None:
    store = MemoryStore(dot_names=dot_names)
    store["a"] = 1
    calls = [
        lambda: store.update(5),  # type: ignore[arg-type]
        lambda: store.update(None),  # type: ignore[arg-type]
        lambda: store.set_many(5),  # type: ignore[arg-type]
        lambda: store.get_many(5),  # type: ignore[arg-type]
        lambda: store.delete_many(5),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(OptionTypeError) as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, MappingStoreError)
    assert dict(store) == {"a": 1}


def test_a_generator_error_passes_through_bulk_methods() -> None:
    def pairs() -> Any:
        yield ("a", 1)
        raise LookupError("from the caller's generator")

    store = MemoryStore()
    with pytest.raises(LookupError, match="caller's generator"):
        store.update(pairs())
    assert dict(store) == {}


def _failing_block(store: Any) -> None:
    with store.batch():
        store["inner"] = 2
        del store["a"]
        raise RuntimeError("inner block fails")


@pytest.mark.parametrize("url", URLS)
def test_a_nested_batch_that_raises_takes_back_only_its_own_writes(
    url: str, tmp_path: Path
) -> None:
    # The docs: "if the block raises, nothing is written". A nested block used to keep its
    # writes when the caller caught its error, and so did a failing update() or
    # delete_many() of a dot-names store inside a batch (each runs as a nested batch).
    with mappingstore.open(url.format(tmp=tmp_path), dot_names=True) as store:
        store["a"] = 0
        with store.batch():
            store["x"] = 1
            with pytest.raises(RuntimeError):
                _failing_block(store)
            assert "inner" not in store and store["a"] == 0 and store["x"] == 1
            with pytest.raises(SerializationError):
                store.update({"b": 1, "bad": object()})
            with pytest.raises(TypeError):
                store.delete_many(["a", 5])  # type: ignore[list-item]
            store["y"] = 3
        assert store.to_dict() == {"a": 0, "x": 1, "y": 3}


@pytest.mark.parametrize("dot_names", [False, True])
def test_malformed_pairs_raise_the_same_errors_with_dot_names(dot_names: bool) -> None:
    store = MemoryStore(dot_names=dot_names)
    with pytest.raises(InvalidOptionError):
        store.update([("a", 1, 2)])
    with pytest.raises(InvalidOptionError):
        store.update([("a",)])
    with pytest.raises(OptionTypeError):
        store.update([1])  # type: ignore[list-item]
    assert dict(store) == {}


@pytest.mark.parametrize("scheme", ["sqlite", "dir", "ini"])
@pytest.mark.parametrize("path", ["a\x00b", "x%00y", "\udc80.f"])
def test_file_urls_with_a_nul_or_a_lone_surrogate(scheme: str, path: str) -> None:
    # A NUL (raw or %00) raised a builtin ValueError, a lone surrogate UnicodeEncodeError.
    with pytest.raises(InvalidURLError):
        mappingstore.open(f"{scheme}:///{path}")


def test_extra_slashes_of_an_absolute_file_url_mean_one(tmp_path: Path) -> None:
    # sqlite://///abs used to reach SQLite as "//abs": "invalid uri authority".
    with mappingstore.open(f"sqlite:///{'//'}{tmp_path}/s.db") as store:
        store["a"] = 1
    with mappingstore.open(f"sqlite:///{tmp_path}/s.db") as store:
        assert store["a"] == 1


def test_only_a_pair_tuple_is_in_items() -> None:
    # As dict_items: ItemsView unpacked any iterable (["a", 1] counted, 5 raised TypeError).
    store = MemoryStore()
    store["a"] = 1
    assert ("a", 1) in store.items() and ("a", 2) not in store.items()
    for other in (5, ["a", 1], ("a",), ("a", 1, 2), "a1"):
        assert other not in store.items()
    dotted = MemoryStore(dot_names=True)
    dotted["v.a"] = 1
    items = dotted["v"].items()
    assert ("a", 1) in items and ["a", 1] not in items and 5 not in items


def test_every_series_mutator_of_a_read_only_store_refuses_even_with_nothing_to_do() -> None:
    # clear() of an empty series, update({}), pop(t, default) of a missing point and
    # setdefault() of a present one returned without error on a read-only store.
    from mappingstore.errors import ReadOnlyError

    writer = mappingstore.open("memory://ro-series")
    writer.series("s")[1] = "a"
    reader = mappingstore.open("memory://ro-series", readonly=True)
    for name in ("s", "empty"):
        series = reader.series(name)
        calls = [
            series.clear,
            partial(series.update, {}),
            partial(series.pop, 5, None),
            series.popitem,
            partial(series.setdefault, 1, "x"),
        ]
        for call in calls:
            with pytest.raises(ReadOnlyError):
                call()
    assert list(writer.series("s").items()) == [(1, "a")]


def test_series_update_and_clear_are_one_atomic_write_each() -> None:
    store = MemoryStore()
    series = store.series("s")
    series.update({2: "b", 1: "a"})
    series.update([(3, "c")])
    with pytest.raises(SerializationError):
        series.update({4: "d", 5: object()})
    assert list(series.items()) == [(1, "a"), (2, "b"), (3, "c")]
    series.clear()
    assert len(series) == 0 and store.series_names() == []


def test_async_bulk_methods_refuse_what_is_not_iterable() -> None:
    import asyncio

    from mappingstore import aio

    async def main() -> None:
        store = await aio.open("memory://")
        await store.set("a", 1)
        for call in (store.get_many, store.delete_many, store.set_many, store.update):
            with pytest.raises(OptionTypeError):
                await call(5)
        assert await store.to_dict() == {"a": 1}
        await store.close()

    asyncio.run(main())


def test_prefixed_refuses_an_empty_dot_segment_over_dot_names() -> None:
    # Prefixed(db, "a..") wrote keys the wrapped dot-names store refuses, after which its
    # to_dict(), iteration and popitem() raised.
    from mappingstore import Prefixed

    db = MemoryStore(dot_names=True)
    for prefix in ("a..", ".p.", "."):
        with pytest.raises(InvalidOptionError):
            Prefixed(db, prefix)
    for prefix in ("a.b.", "a.b", "app"):
        Prefixed(db, prefix)["x"] = 1
    assert db.to_dict() == {"a": {"b": {"x": 1}, "bx": 1}, "appx": 1}
