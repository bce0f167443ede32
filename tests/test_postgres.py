"""PostgreSQL-specific behaviour of :class:`~mappingstore.PostgresStore`, on a real server.

The dict semantics every backend shares are in the conformance suite (``TestPostgres``
at the end). This module checks what only PostgreSQL has: URL forms and redaction,
identifier validation, the table format, NUL keys and indexed prefix ranges, streaming
through a server-side cursor, atomicity across processes, fork, and faults injected with
``pg_terminate_backend`` and with a TCP proxy that drops a connection mid-COMMIT.

Every test works in tables of its own (unique names), dropped afterwards. Without a
server the tests skip on a laptop and fail under ``CI=true`` (``tests/servers.py``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultproxy import FaultProxy
from servers import POSTGRES_URL, unavailable

import mappingstore
from mappingstore.errors import (
    BackendUnavailableError,
    InvalidOptionError,
    InvalidURLError,
    StoreCorruptError,
    StoreNotFoundError,
    UnknownOutcomeError,
)

psycopg = pytest.importorskip("psycopg")
psycopg_pool = pytest.importorskip("psycopg_pool")

from mappingstore import _postgres  # noqa: E402  (needs psycopg)
from mappingstore._postgres import PostgresStore  # noqa: E402

pytestmark = pytest.mark.postgres

LOOKALIKES = [
    "a",
    "a\x00",
    "a\x00b",
    "a\x01",
    "a\x00\x00",
    "ab",
    "a%",
    "a_",
    "a*",
    "a?",
    "a[",
    "a/",
    "a.b",
    "A",
    "b",
    "\x00",
    "\x00a",
    "é",
    "e\u0301",
    "\ud7ff",
    "\ue000",
    "\U0010ffff",
    "\U0010ffff\U0010ffff",
    "x\U0010ffff",
    "x\U0010ffffy",
    "y",
    "2",
    "20",
    "2.0",
]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin() -> Iterator[Any]:
    """A plain autocommit connection, for ground truth and clean-up."""
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable("PostgreSQL", exc)
    with conn:
        yield conn


class Tables:
    """Unique table names for one test; every table is dropped at teardown."""

    def __init__(self) -> None:
        self.prefix = f"mst_{uuid.uuid4().hex[:10]}"
        self.names: dict[str, str] = {}

    def __call__(self, name: str = "a") -> str:
        if name not in self.names:
            self.names[name] = f"{self.prefix}_{re.sub(r'[^a-z0-9_]', '_', name.lower())}"[:63]
        return self.names[name]


@pytest.fixture
def tables(admin: Any) -> Iterator[Tables]:
    made = Tables()
    yield made
    for table in made.names.values():
        admin.execute(
            psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table))
        )


@pytest.fixture
def pg(tables: Tables) -> Iterator[Callable[..., PostgresStore]]:
    """``pg(name="a", **options)``: a store on this test's table *name*; closed after."""
    opened: list[PostgresStore] = []

    def open_(name: str = "a", **options: Any) -> PostgresStore:
        store = PostgresStore(POSTGRES_URL, table=tables(name), **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def _terminate(admin: Any, application_name: str, *, wait: bool = True) -> int:
    """Terminate every session of *application_name*; with *wait*, until they are gone
    (``pg_terminate_backend`` only sends the signal)."""
    rows = admin.execute(
        # In the target list, so it runs only for rows the WHERE clause kept.
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()",
        (application_name,),
    ).fetchall()
    pids = [pid for pid, ok in rows if ok]
    deadline = time.monotonic() + 10
    while wait and pids and time.monotonic() < deadline:
        alive = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
        ).fetchone()
        if alive == (0,):
            break
        time.sleep(0.01)
    return len(pids)


# -- URLs, options, identifiers -------------------------------------------------------------


def test_both_schemes_open_the_same_table(tables: Tables) -> None:
    table = tables("a")
    rest = POSTGRES_URL.split("://", 1)[1]
    with mappingstore.open(f"postgresql://{rest}?table={table}") as one:
        one["k"] = 1
        with mappingstore.open(f"postgres://{rest}?table={table}&pool_max_size=3") as two:
            assert two["k"] == 1
            assert two.url == one.url
            assert f"table={table}" in two.url


def test_url_options_are_typed_and_checked(tables: Tables) -> None:
    rest = POSTGRES_URL.split("://", 1)[1]
    table = tables("a")
    url = (
        f"postgresql://{rest}?table={table}&pool_min_size=0&pool_max_size=2"
        f"&pool_timeout=5&connect_timeout=3&sslmode=disable&application_name=msx&namespace=n1"
    )
    with mappingstore.open(url) as store:
        assert store.namespace == "n1"
        assert store._max_size == 2 and store._min_size == 0
        store["x"] = 1
        assert store["x"] == 1
    with pytest.raises(InvalidURLError, match="unknown URL option"):
        mappingstore.open(f"postgresql://{rest}?tabel={table}")
    with pytest.raises(InvalidOptionError):
        mappingstore.open(f"postgresql://{rest}?table={table}&pool_max_size=lots")
    with pytest.raises(InvalidURLError, match="never put a password"):
        mappingstore.open(f"postgresql://{rest}?password=x")
    with pytest.raises(InvalidOptionError, match="pool_max_size"):
        PostgresStore(POSTGRES_URL, table=table, pool_min_size=5, pool_max_size=2)


@pytest.mark.parametrize(
    "name",
    [
        'x"; DROP TABLE pg_class; --',
        "t; DELETE FROM t",
        "1abc",
        "a" * 64,
        "",
        "a-b",
        "a b",
        "é",
        'a"b',
        "a.b",
        "a\x00",
    ],
)
def test_hostile_identifiers_are_rejected(name: str) -> None:
    with pytest.raises(InvalidOptionError, match="identifier"):
        PostgresStore(POSTGRES_URL, table=name)
    with pytest.raises(InvalidOptionError, match="identifier"):
        PostgresStore(POSTGRES_URL, table="fine", schema=name)


def test_identifiers_are_quoted_case_and_schema_kept(admin: Any, tables: Tables) -> None:
    schema = tables("schema")
    table = "MixedCase"
    try:
        with PostgresStore(POSTGRES_URL, table=table, schema=schema) as store:
            store["k"] = "v"
            assert store.table == f"{schema}.{table}"
        row = admin.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = %s",
            (schema, table),
        ).fetchone()
        assert row == (1,)
        with PostgresStore(POSTGRES_URL, table=table, schema=schema) as again:
            assert again["k"] == "v"
    finally:
        admin.execute(
            psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                psycopg.sql.Identifier(schema)
            )
        )


def test_password_never_shown(tables: Tables) -> None:
    secret = "s3cr3t-pw"
    # A port nothing listens on: the error must explain without revealing the password.
    url = f"postgresql://postgres:{secret}@127.0.0.1:1/test?table={tables('a')}&connect_timeout=2"
    with pytest.raises(BackendUnavailableError) as info:
        mappingstore.open(url)
    assert secret not in str(info.value)
    assert "127.0.0.1" in str(info.value)
    # Trust authentication ignores the password, so this one connects.
    host = POSTGRES_URL.split("@", 1)[1]
    with mappingstore.open(f"postgresql://postgres:{secret}@{host}?table={tables('a')}") as store:
        assert secret not in repr(store)
        assert secret not in store.url
        assert secret not in str(store.info())


def test_unreachable_server_fails_with_reason(tables: Tables) -> None:
    with pytest.raises(BackendUnavailableError, match=r"refused|connect") as info:
        PostgresStore("postgresql://postgres@127.0.0.1:1/test", table=tables("a"))
    assert isinstance(info.value, OSError)  # what a caller of a network store catches


def test_ready_pool_is_used_and_not_closed(tables: Tables) -> None:
    pool = psycopg_pool.ConnectionPool(
        POSTGRES_URL, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True
    )
    with pool:
        with PostgresStore(pool, table=tables("a")) as store:
            store["k"] = 1
            assert store["k"] == 1
        assert not pool.closed
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_statements_survive_psycopg_deallocate_all(tables: Tables) -> None:
    """psycopg, preparing its own statements, sends DEALLOCATE ALL after a rollback: the
    store's prepared statements must cope, also inside a transaction."""
    pool = psycopg_pool.ConnectionPool(
        POSTGRES_URL,
        min_size=1,
        max_size=1,
        kwargs={"autocommit": True, "prepare_threshold": 0},
        open=True,
    )
    with pool, PostgresStore(pool, table=tables("a"), dot_names=True) as store:
        for i in range(6):
            store[f"x.k{i}"] = i
            assert store.setdefault(f"x.k{i}", -1) == i  # KEEP: a ROLLBACK
            with pool.connection() as conn:  # psycopg prepares, then rolls back
                conn.execute("SELECT 1")
                conn.execute("BEGIN")
                conn.execute("ROLLBACK")
            store.modify(f"x.k{i}", lambda v: v + 1)  # dot names: in a transaction
            assert store[f"x.k{i}"] == i + 1
            assert f"x.k{i}" in store and len(store["x"]) == i + 1


def test_ready_pool_must_be_autocommit(tables: Tables) -> None:
    pool = psycopg_pool.ConnectionPool(POSTGRES_URL, min_size=0, max_size=1, open=True)
    with pool, pytest.raises(InvalidOptionError, match="autocommit"):
        PostgresStore(pool, table=tables("a"))


# -- the table ------------------------------------------------------------------------------


def test_table_layout_and_no_text_columns(
    admin: Any, pg: Callable[..., PostgresStore], tables: Tables
) -> None:
    pg()
    cols = admin.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = %s ORDER BY ordinal_position",
        (tables("a"),),
    ).fetchall()
    assert cols == [
        ("ns", "bytea"),
        ("key", "bytea"),
        ("value", "bytea"),
        ("expires", "double precision"),
        ("long_ns", "bytea"),
        ("long_key", "bytea"),
    ]


def test_foreign_table_is_refused(admin: Any, tables: Tables) -> None:
    table = tables("foreign")
    admin.execute(
        psycopg.sql.SQL("CREATE TABLE {} (k text, v text)").format(psycopg.sql.Identifier(table))
    )
    with pytest.raises(StoreCorruptError, match="not a mappingstore table"):
        PostgresStore(POSTGRES_URL, table=table)


def test_readonly_on_missing_table(admin: Any, tables: Tables) -> None:
    with pytest.raises(StoreNotFoundError):
        PostgresStore(POSTGRES_URL, table=tables("missing"), readonly=True)
    row = admin.execute("SELECT to_regclass(%s)", (tables("missing"),)).fetchone()
    assert row == (None,)  # read-only created nothing


def test_concurrent_creation_of_one_table(tables: Tables) -> None:
    table = tables("race")
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def open_and_write(i: int) -> None:
        try:
            barrier.wait()
            with PostgresStore(POSTGRES_URL, table=table, pool_min_size=0) as store:
                store[f"k{i}"] = i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with PostgresStore(POSTGRES_URL, table=table) as store:
        assert dict(store) == {f"k{i}": i for i in range(6)}


def test_raw_rows_are_utf8_bytea(
    admin: Any, pg: Callable[..., PostgresStore], tables: Tables
) -> None:
    store = pg(namespace="n\x00s")
    store["k\x00é"] = 1
    rows = admin.execute(
        psycopg.sql.SQL("SELECT ns, key FROM {}").format(psycopg.sql.Identifier(tables("a")))
    ).fetchall()
    assert (b"n\x00s", "k\x00é".encode()) in [(bytes(n), bytes(k)) for n, k in rows]


# -- keys, prefixes, scans -------------------------------------------------------------------


def test_lookalike_prefixes(pg: Callable[..., PostgresStore]) -> None:
    store = pg()
    store.update({k: i for i, k in enumerate(LOOKALIKES)})
    other = pg(namespace="a")  # a namespace whose name is a prefix of keys: isolated
    other["a"] = "other"
    for prefix in ["", *LOOKALIKES, "a\x00a", "\U0010ffff\U0010ffff\U0010ffff", "z"]:
        expected = sorted(k for k in LOOKALIKES if k.startswith(prefix))
        assert sorted(store.names(prefix)) == expected, prefix
        assert sorted(k for k, _ in store._iter_items("default", prefix)) == expected, prefix
    assert sorted(store) == sorted(LOOKALIKES)
    assert dict(other) == {"a": "other"}


def test_long_random_names(
    monkeypatch: pytest.MonkeyPatch, pg: Callable[..., PostgresStore]
) -> None:
    """Names beyond a btree entry's ~2,700 bytes: incompressible, sharing long prefixes."""
    rng = random.Random(7)
    base = "".join(rng.choice(string.ascii_letters) for _ in range(3000))
    names = [
        base,
        base + "x",
        base + "\x00",
        base[:1024],
        base[:1023] + "é",  # 1,025 bytes: just over the limit, split inside a character
        base[:1500],
        "".join(rng.choice("é€𝄞a\x00") for _ in range(4000)),
    ]
    namespace = "".join(rng.choice(string.ascii_letters) for _ in range(5000))
    store = pg(namespace=namespace)
    store.update({n: i for i, n in enumerate(names)})
    other = pg(namespace=namespace[:-1])  # a look-alike long namespace: isolated
    other[base] = "other"
    for i, n in enumerate(names):
        assert store[n] == i
        assert store.get_many([n, n + "?"]) == {n: i}
    assert sorted(store) == sorted(names)
    for prefix in (base[:1000], base[:1024], base[:1025], base[:2000], base, base + "x", "zz"):
        expected = sorted(n for n in names if n.startswith(prefix))
        assert sorted(store.names(prefix)) == expected, len(prefix)
    assert store.modify(base, lambda v: v + 10) == 10
    assert store.pop(base + "x") == 1
    with store.batch():
        store[base + "y"] = "batched"
        del store[base[:1500]]
    monkeypatch.setattr(_postgres, "_COPY_THRESHOLD", 2)
    store.update({base + "z1": 1, base + "z2": 2})  # the COPY path
    assert store[base + "y"] == "batched" and store[base + "z2"] == 2
    assert base[:1500] not in store and base + "x" not in store
    assert dict(other) == {base: "other"}
    assert store.namespaces() == sorted([namespace, namespace[:-1]])
    assert _postgres._ident(base.encode()) != _postgres._ident((base + "x").encode())
    assert len(_postgres._ident(base.encode())) == _postgres._SHORT + 32


def test_prefix_scan_is_an_index_range(admin: Any, pg: Callable[..., PostgresStore]) -> None:
    store = pg()
    query = store._q_scan[False, True, True]
    with admin.transaction():
        admin.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in admin.execute(
                "EXPLAIN "
                + query.replace("%s", "'default'::bytea", 1)
                .replace("%s", "'a'::bytea", 1)
                .replace("%s", "'b'::bytea", 1)
                .replace("%s", "0::float8", 1)
            )
        )
    assert "Index" in plan and "key >=" in plan and "key <" in plan, plan
    assert "~~" not in plan and "LIKE" not in plan.upper()


def test_successor() -> None:
    assert _postgres._successor(b"a") == b"b"
    assert _postgres._successor(b"a\x00") == b"a\x01"
    assert _postgres._successor(b"a\xff\xff") == b"b"
    assert _postgres._successor(b"\xff") is None
    top = "\U0010ffff".encode()
    assert _postgres._successor(top) == top[:-1] + bytes([top[-1] + 1])


def test_streaming_over_many_chunks(
    monkeypatch: pytest.MonkeyPatch, pg: Callable[..., PostgresStore]
) -> None:
    monkeypatch.setattr(_postgres, "_CHUNK", 7)
    store = pg()
    keys = [f"k{i:03d}" for i in range(60)] + [f"j{i}" for i in range(9)]
    store.update({k: k.upper() for k in keys})
    assert list(store) == sorted(keys)
    assert dict(store.items()) == {k: k.upper() for k in keys}
    assert sorted(store.names("k0")) == [k for k in sorted(keys) if k.startswith("k0")]
    assert len(store) == len(keys)
    # Breaking out of a streaming iteration gives its connection back.
    for _ in range(3 * store._max_size):
        it = iter(store)
        assert [next(it) for _ in range(20)] == sorted(keys)[:20]
        it.close()  # type: ignore[attr-defined]
    assert store["k000"] == "K000"


def test_scan_resumes_after_connection_loss(
    monkeypatch: pytest.MonkeyPatch, admin: Any, pg: Callable[..., PostgresStore]
) -> None:
    monkeypatch.setattr(_postgres, "_CHUNK", 5)
    app = f"msscan{uuid.uuid4().hex[:8]}"
    store = pg(application_name=app)
    keys = [f"k{i:03d}" for i in range(40)]
    store.update(dict.fromkeys(keys, 0))
    seen = []
    for i, key in enumerate(store):
        seen.append(key)
        if i == 12:  # inside the server-side cursor part
            assert _terminate(admin, app) >= 1
    assert seen == keys  # every key exactly once, in order


def test_get_many_and_delete_many(pg: Callable[..., PostgresStore]) -> None:
    store = pg()
    store.update({"a": 1, "a\x00": 2, "b": 3})
    assert store.get_many(["a", "a\x00", "zz", "a"]) == {"a": 1, "a\x00": 2}
    assert store.delete_many(["a", "zz"]) == 1
    assert dict(store) == {"a\x00": 2, "b": 3}


def test_large_batch_uses_copy_and_mixes_deletes(pg: Callable[..., PostgresStore]) -> None:
    store = pg()
    store.update({f"old{i}": i for i in range(10)})
    n = _postgres._COPY_THRESHOLD + 500
    with store.batch():
        for i in range(n):
            store[f"k{i:05d}"] = i
        for i in range(5):
            del store[f"old{i}"]
        store.set("ttl", 1, ttl=100)
    assert len(store) == n + 5 + 1
    assert store["k00000"] == 0 and store[f"k{n - 1:05d}"] == n - 1
    assert "old0" not in store and store["old9"] == 9
    assert 0 < store.ttl("ttl") <= 100  # type: ignore[operator]


def test_namespaces_listing_and_expired(pg: Callable[..., PostgresStore]) -> None:
    first = pg(namespace="n_1")
    second = pg(namespace="n%1")
    first["k"] = 1
    second["k"] = 2
    assert first.namespaces() == ["n%1", "n_1"]
    second.clear()
    assert first.namespaces() == ["n_1"]


def test_purge_expired_removes_rows(
    admin: Any, pg: Callable[..., PostgresStore], tables: Tables
) -> None:
    now = [1000.0]
    store = pg(clock=lambda: now[0])
    store.set("gone", 1, ttl=5)
    store.set("stays", 2, ttl=50)
    store["forever"] = 3
    now[0] += 10
    assert sorted(store) == ["forever", "stays"]
    assert store.purge_expired() == 1
    count = admin.execute(
        psycopg.sql.SQL("SELECT count(*) FROM {} WHERE ns = %s").format(
            psycopg.sql.Identifier(tables("a"))
        ),
        (b"default",),
    ).fetchone()
    assert count == (2,)


# -- atomicity across threads and processes --------------------------------------------------


def _no_fsync_wait() -> str:
    # Atomicity does not depend on durability: not waiting for the WAL flush at each
    # commit keeps this test fast on slow disks without changing what it checks.
    return str(psycopg.conninfo.make_conninfo(POSTGRES_URL, options="-c synchronous_commit=off"))


def _increment(table: str, n: int) -> None:
    code = 1
    try:
        with PostgresStore(_no_fsync_wait(), table=table, pool_max_size=2) as store:
            for _ in range(n):
                store.modify("counter", lambda v: v + 1, default=0)
        code = 0
    finally:
        os._exit(code)


def test_four_processes_modify_exactly_10000(tables: Tables) -> None:
    table = tables("procs")
    with PostgresStore(POSTGRES_URL, table=table) as store:
        ctx = multiprocessing.get_context("fork")
        # The counter does not exist yet: the processes race to create it too.
        procs = [ctx.Process(target=_increment, args=(table, 2500)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert store["counter"] == 10_000


def test_threads_setdefault_and_pop_race(pg: Callable[..., PostgresStore]) -> None:
    store = pg(pool_max_size=8)
    winners: list[int] = []
    popped: list[Any] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        if store.setdefault("slot", i) == i:
            winners.append(i)
        barrier.wait()
        popped.append(store.pop("slot", None))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert [v for v in popped if v is not None] == winners


def test_more_threads_than_connections(pg: Callable[..., PostgresStore]) -> None:
    store = pg(pool_max_size=3, pool_timeout=30)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(100):
                store[f"t{t}-{i}"] = i
                assert store[f"t{t}-{i}"] == i
                store.modify("total", lambda v: v + 1, default=0)
                if i % 25 == 0:
                    assert sum(1 for k in store if k.startswith(f"t{t}-")) == i + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store["total"] == 800
    assert len(store) == 801
    assert len(store._idle) <= 3  # never more connections than the pool allows


def test_fork_child_uses_inherited_store_parent_keeps_working(
    pg: Callable[..., PostgresStore],
) -> None:
    store = pg()
    store["before"] = 1
    ctx = multiprocessing.get_context("fork")

    def child() -> None:
        code = 1
        try:
            store["child"] = store["before"] + 1
            code = 0
        finally:
            os._exit(code)

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    # The parent's pooled connection was not terminated by the child.
    assert store["child"] == 2
    store["after"] = 3
    assert dict(store) == {"before": 1, "child": 2, "after": 3}


# -- faults ---------------------------------------------------------------------------------


def test_terminated_connections_are_replaced(admin: Any, pg: Callable[..., PostgresStore]) -> None:
    app = f"msterm{uuid.uuid4().hex[:8]}"
    store = pg(application_name=app, pool_min_size=2)
    store["k"] = 1
    for step in range(4):
        assert _terminate(admin, app) >= 1
        # Idle connections died: reads retry, and writes the server refused are retried.
        if step == 0:
            assert store["k"] == 1
        elif step == 1:
            store["k"] = 2
        elif step == 2:
            assert store.modify("k", lambda v: v + 1) == 3
        else:
            del store["k"]
    assert "k" not in store


def test_terminate_backend_during_batches(admin: Any, pg: Callable[..., PostgresStore]) -> None:
    app = f"msbatch{uuid.uuid4().hex[:8]}"
    log = logging.getLogger(f"mappingstore.test.{app}")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log.addHandler(Keep())
    store = pg(application_name=app, pool_min_size=2, pool_max_size=4, logger=log)
    stop = threading.Event()
    killed = [0]

    def killer() -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            while not stop.is_set():
                killed[0] += _terminate(conn, app, wait=False)
                time.sleep(0.004)

    outcomes: dict[int, str] = {}
    sizes: dict[int, int] = {}
    thread = threading.Thread(target=killer)
    thread.start()
    try:
        for i in range(150):
            size = 1100 if i % 25 == 0 else 40  # some batches take the COPY path
            sizes[i] = size
            try:
                with store.batch():
                    for j in range(size):
                        store[f"b{i:03d}-{j:04d}"] = i
                outcomes[i] = "ok"
            except UnknownOutcomeError:
                outcomes[i] = "unknown"
            except BackendUnavailableError:
                outcomes[i] = "failed"
    finally:
        stop.set()
        thread.join()
    assert killed[0] > 0
    present: dict[int, int] = {}
    for key in store:
        batch = int(key[1:4])
        present[batch] = present.get(batch, 0) + 1
    for i, outcome in outcomes.items():
        count = present.get(i, 0)
        assert count in (0, sizes[i]), f"batch {i} partially visible: {count}/{sizes[i]}"
        if outcome == "ok":
            assert count == sizes[i], f"acknowledged batch {i} lost"
        elif outcome == "failed":
            assert count == 0, f"batch {i} reported failed but applied"
    assert any("connection lost" in m for m in seen), "no fault ever hit the store"
    # The store recovered without being reopened.
    store["after"] = 1
    assert store["after"] == 1


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    match = re.match(r"postgres(?:ql)?://(?:[^@/]*@)?([^:/]+)(?::(\d+))?/", POSTGRES_URL)
    assert match, POSTGRES_URL
    made = FaultProxy(match.group(1), int(match.group(2) or 5432))
    yield made
    made.close()


def _via(proxy: FaultProxy) -> str:
    user = POSTGRES_URL.split("://", 1)[1].split("@", 1)[0] if "@" in POSTGRES_URL else "postgres"
    dbname = POSTGRES_URL.rsplit("/", 1)[1].split("?", 1)[0]
    return f"postgresql://{user}@127.0.0.1:{proxy.port}/{dbname}"


def test_commit_lost_with_connection_is_resolved(proxy: FaultProxy, tables: Tables) -> None:
    with PostgresStore(_via(proxy), table=tables("a"), pool_timeout=3) as store:
        store["n"] = 0
        proxy.cut_after(b"COMMIT")
        with store.batch():
            store["x"] = 1
            store["y"] = 2
        # The reply to COMMIT never arrived; txid_status() on a fresh connection
        # found the transaction committed, so the batch reports success, applied once.
        assert proxy.cuts == 1
        assert store.get_many(["x", "y"]) == {"x": 1, "y": 2}
        proxy.cut_after(b"COMMIT")
        assert store.modify("n", lambda v: v + 1) == 1
        assert proxy.cuts == 2
        assert store["n"] == 1  # not incremented twice


def test_commit_outcome_unknown_is_reported_not_retried(proxy: FaultProxy, tables: Tables) -> None:
    # One connection at most: once it is cut, nothing can ask the server what happened.
    with PostgresStore(_via(proxy), table=tables("a"), pool_timeout=2, pool_max_size=1) as store:
        store["n"] = 0
        proxy.cut_after(b"COMMIT")
        proxy.refuse = True
        with pytest.raises(UnknownOutcomeError):
            store.modify("n", lambda v: v + 1)
        proxy.refuse = False
        assert store["n"] == 1  # it was applied exactly once: never retried
        # A DELETE cut while it is being prepared never ran: retried, it succeeds.
        store.update(first=1, gone=1)
        proxy.cut_after(b"DELETE")
        del store["first"]
        assert proxy.cuts == 2 and "first" not in store
        # A DELETE cut after it was sent: not idempotent, so not retried.
        proxy.cut_after(b"_delete")  # the prepared statement's name, in Bind/Execute
        with pytest.raises(UnknownOutcomeError) as info:
            del store["gone"]
        assert isinstance(info.value, BackendUnavailableError)
        assert proxy.cuts == 3
        assert "gone" not in store


# -- the conformance suite -------------------------------------------------------------------

try:
    from mappingstore.testing import StoreTests
except ImportError:  # pragma: no cover - the suite ships with the package
    StoreTests = None


if StoreTests is not None:

    class TestPostgres(StoreTests):  # type: ignore[misc, valid-type]
        persistent = True
        multiprocess = True
        fake_clock = True

        @pytest.fixture
        def factory(self, tables: Tables) -> Iterator[Callable[..., PostgresStore]]:
            opened: list[PostgresStore] = []

            def make(name: str = "a", **options: Any) -> PostgresStore:
                store = PostgresStore(POSTGRES_URL, table=tables(name), pool_min_size=0, **options)
                opened.append(store)
                return store

            yield make
            for store in opened:
                store.close()


# -- the connection that opened a store serves it until a second one is needed -------------


def _sessions(admin: Any, app: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
    ).fetchone()
    return int(row[0])


def test_one_thread_uses_one_connection_and_no_pool(admin: Any, tables: Tables) -> None:
    app = f"msone{uuid.uuid4().hex[:8]}"
    with PostgresStore(POSTGRES_URL, table=tables(), application_name=app) as store:
        store["a"] = 1
        assert list(store) == ["a"] and len(store) == 1
        store.modify("a", lambda v: v + 1)
        with store.batch():
            store["b"] = 2
        assert store._pool is None
        assert _sessions(admin, app) == 1
    assert _wait_sessions(admin, app, 0) == 0  # closing the store closed it


def _wait_sessions(admin: Any, app: str, count: int) -> int:
    """Sessions of *app*, polled until there are *count* (a closed connection's server
    process leaves ``pg_stat_activity`` a moment after the client is gone)."""
    deadline = time.monotonic() + 10
    while (now := _sessions(admin, app)) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


@pytest.mark.parametrize("max_size", [2, 3])
def test_concurrent_use_never_exceeds_pool_max_size(
    admin: Any, tables: Tables, max_size: int
) -> None:
    """A second connection needed at once makes the store create its pool: the opening
    connection counts toward ``pool_max_size`` until it is retired, then the pool grows
    back to full size; the server never sees more than ``pool_max_size`` sessions."""
    app = f"msmax{uuid.uuid4().hex[:8]}"
    store = PostgresStore(
        POSTGRES_URL,
        table=tables(),
        application_name=app,
        pool_max_size=max_size,
        pool_timeout=30,
    )
    store["held"] = 0
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            while not stop.is_set():
                peak[0] = max(peak[0], _sessions(conn, app))
                time.sleep(0.005)

    inside, release = threading.Event(), threading.Event()

    def hold(value: int) -> int:  # keeps a connection busy inside modify()
        inside.set()
        assert release.wait(30)
        return value + 1

    def work(t: int) -> None:
        for i in range(60):
            store[f"{t}-{i}"] = i
            assert sum(1 for _ in store) >= 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    holder = threading.Thread(target=store.modify, args=("held", hold))
    holder.start()
    assert inside.wait(30)
    store["while held"] = 1  # needs a second connection at once: the pool starts
    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    release.set()
    holder.join()
    for th in threads:
        th.join()
    stop.set()
    watcher.join()
    assert len(store) == 362 and store["held"] == 1
    assert store._pool is not None and store._direct is None  # the pool took over
    assert store._pool.max_size == max_size  # grown back to the full size
    assert 2 <= peak[0] <= max_size
    store.close()
    assert _wait_sessions(admin, app, 0) == 0


def test_pool_max_size_1_and_min_size_2_keep_the_pool(pg: Callable[..., PostgresStore]) -> None:
    store = pg(pool_max_size=1)
    store["a"] = 1
    assert store._direct is None and store._pool is not None
    store = pg(pool_min_size=2)
    store["a"] = 1
    assert store._direct is None and store._pool is not None


def test_a_terminated_opening_connection_is_replaced(admin: Any, tables: Tables) -> None:
    app = f"msterm{uuid.uuid4().hex[:8]}"
    with PostgresStore(POSTGRES_URL, table=tables(), application_name=app) as store:
        store["k"] = 1
        assert store._direct is not None
        _terminate(admin, app)
        assert store["k"] == 1  # the read retried on a pooled connection
        store["k"] = 2
        assert store.modify("k", lambda v: v + 1) == 3
        assert store._direct is None


# -- a thread's own statements inside its open transaction ----------------------------------


def test_a_modify_function_may_write_through_the_store_and_another_store_of_the_table(
    pg: Callable[..., PostgresStore],
) -> None:
    """The function runs while its row is locked: a write of that row through a store of
    its own would wait for this very thread forever. It joins the transaction instead."""
    a, b = pg(), pg()
    a["k"] = 1

    def fn(value: Any) -> Any:
        a["other"] = 2
        a["k"] = 5  # the locked row itself
        b["k"] = 7  # through another store of the table
        b["seen"] = b["k"]
        return value + 1

    assert a.modify("k", fn) == 2
    assert (a["k"], a["other"], b["seen"]) == (2, 2, 7)

    def fails(value: Any) -> Any:
        a["rolled back"] = True
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        a.modify("k", fails)
    assert "rolled back" not in a and a["k"] == 2  # the whole transaction rolled back


def test_dot_name_sections_nest_across_stores_of_the_table(
    pg: Callable[..., PostgresStore],
) -> None:
    a, b = pg(dot_names=True), pg(dot_names=True)
    a["p.q"] = 1

    def fn(value: Any) -> Any:
        b["p.r"] = 3  # b's own exclusive section joins a's (same advisory lock)
        return value + 1

    assert a.modify("p.q", fn) == 2
    assert a["p"].to_dict() == {"q": 2, "r": 3}
    other = pg("other", dot_names=True)  # another table: its own transaction
    a.modify("p.q", lambda v: (other.__setitem__("x.y", 1), v)[1])
    assert other["x.y"] == 1
