"""Review 7, servers and listings (real servers on 127.0.0.1):

* ``names(prefix)`` with a prefix holding a lone surrogate is empty on every backend (a
  raw ``UnicodeEncodeError`` on PostgreSQL and Redis before);
* ``export_json()`` reads records in one scan: a key deleted or expired between a listing
  and its read was exported as ``"key": null``;
* PostgreSQL refuses, at open, a relation of our table's name whose layout is not ours (a
  view, a column more, another primary key), and reserved ``pg_*`` schema names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import MemoryStore, aio
from mappingstore.errors import InvalidOptionError, StoreCorruptError
from tests.servers import POSTGRES_URL, REDIS_URL

SURROGATE = "a\ud800"


def _urls(tmp_path: Path, prefix: str, table: str) -> list[str]:
    return [
        "memory://",
        f"sqlite:///{tmp_path}/n.db",
        f"dir:///{tmp_path}/d",
        f"{REDIS_URL}?prefix={prefix}",
        f"{POSTGRES_URL}?table={table}",
    ]


def test_names_with_a_surrogate_prefix_is_empty(tmp_path: Path, prefix: str, pg_table: str) -> None:
    for url in _urls(tmp_path, prefix, pg_table):
        with mappingstore.open(url) as store:
            store["a"] = 1
            assert list(store.names(SURROGATE)) == [], url
            assert list(store.names("a")) == ["a"], url
            store.clear()


def test_async_names_with_a_surrogate_prefix_is_empty(prefix: str, pg_table: str) -> None:
    async def main(url: str) -> None:
        async with await aio.open(url) as store:
            await store.set("a", 1)
            assert [n async for n in store.names(SURROGATE)] == []
            await store.clear()

    for url in (f"{REDIS_URL}?prefix={prefix}", f"{POSTGRES_URL}?table={pg_table}"):
        asyncio.run(main(url))


class _Phantom(MemoryStore):
    """A memory store whose key listings show a key ``ghost`` that is not stored (a key
    deleted between a listing and a read)."""

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        return iter([*super()._iter_keys(ns, prefix), "ghost"])


def test_export_never_writes_null_for_a_vanished_key() -> None:
    store = _Phantom()
    store.update({"a": 1, "b": None})
    assert json.loads(store.export_json() or "") == {"a": 1, "b": None}


def test_export_skips_keys_that_expire_during_the_export() -> None:
    ticks = [1_700_000_000.0]

    def clock() -> float:  # every read moves time on: a listing, then reads, expire it
        ticks[0] += 1.0
        return ticks[0]

    store = mappingstore.open("memory://", clock=clock)
    store.set("k", 1, ttl=1.5)
    store["keep"] = 2
    exported = json.loads(store.export_json() or "")
    assert exported in ({"keep": 2}, {"k": 1, "keep": 2})


# -- PostgreSQL: a relation of our name with another layout ---------------------------------


_COLUMNS = (
    "ns bytea NOT NULL, key bytea NOT NULL, value bytea NOT NULL, expires double precision,"
    " long_ns bytea, long_key bytea"
)


@pytest.mark.parametrize(
    "layout",
    [
        f"CREATE TABLE {{t}} ({_COLUMNS}, owner text NOT NULL, PRIMARY KEY (ns, key))",
        f"CREATE TABLE {{t}} ({_COLUMNS})",
        f"CREATE TABLE {{t}} ({_COLUMNS}, PRIMARY KEY (key))",
        f"CREATE TABLE {{t}} ({_COLUMNS}, PRIMARY KEY (key, ns))",
        f"CREATE TABLE {{t}}_base ({_COLUMNS}, PRIMARY KEY (ns, key));"
        " CREATE VIEW {t} AS SELECT * FROM {t}_base",
    ],
)
def test_postgres_refuses_a_relation_with_another_layout(pg_table: str, layout: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        for statement in layout.format(t=pg_table).split(";"):
            conn.execute(statement)  # type: ignore[call-overload]
    with pytest.raises(StoreCorruptError):
        mappingstore.open(f"{POSTGRES_URL}?table={pg_table}")


def test_postgres_opens_its_own_table_again(pg_table: str) -> None:
    url = f"{POSTGRES_URL}?table={pg_table}"
    with mappingstore.open(url) as store:
        store["k"] = 1
    with mappingstore.open(url) as store:
        assert store["k"] == 1


@pytest.mark.parametrize("schema", ["pg_temp", "pg_myapp", "PG_catalog"])
def test_postgres_refuses_reserved_schema_names(schema: str) -> None:
    with pytest.raises(InvalidOptionError):
        mappingstore.open(f"{POSTGRES_URL}?table=t&schema={schema}")


# -- async API (native Redis/PostgreSQL) ----------------------------------------------------


def test_async_postgres_loop_may_end_with_the_store_open(pg_table: str) -> None:
    import subprocess
    import sys

    child = (
        "import asyncio, mappingstore.aio\n"
        "async def main():\n"
        f"    return await mappingstore.aio.open({POSTGRES_URL + '?table=' + pg_table!r})\n"
        "a = asyncio.run(main())\n"
        "print('loop ended', flush=True)\n"
        "a.sync.close()\n"
    )
    # Before the fix asyncio.run() never returned (the pool's connect task).
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "loop ended" in done.stdout, done.stderr


def test_async_native_delete_many_on_a_readonly_store(prefix: str) -> None:
    from mappingstore.errors import ReadOnlyError

    url = f"{REDIS_URL}?prefix={prefix}"
    with mappingstore.open(url) as w:
        w["a"] = 1

    async def main() -> list[str]:
        async with await aio.open(url, readonly=True) as store:
            assert store.native is not None
            with pytest.raises(ReadOnlyError):
                await store.delete_many(5)  # type: ignore[arg-type]
            keys = iter(["a", "b"])
            with pytest.raises(ReadOnlyError):
                await store.delete_many(keys)
            return list(keys)

    assert asyncio.run(main()) == ["a", "b"]  # the caller's keys were not read


def test_async_native_batch_calls_work_from_another_loop(prefix: str) -> None:
    url = f"{REDIS_URL}?prefix={prefix}"
    store = asyncio.run(aio.open(url))  # opened in one loop

    async def second_loop() -> Any:
        async with store.batch():
            await store.set("x", 1)
            assert await store.get("x") == 1
        return await store.pop("x")

    try:
        assert asyncio.run(second_loop()) == 1
    finally:
        store.sync.close()
