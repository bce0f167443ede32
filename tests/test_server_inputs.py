"""Bad input to the server stores (Redis, PostgreSQL), and what their messages show.

Hostile server passwords in URLs (raw and percent-encoded) must never show in an error,
``repr``, ``url``, ``info()`` or a log line; every bad option value is a
``mappingstore.errors`` error raised before anything is written; a write whose new
connection fails during the driver's connect handshake is known not to have been sent;
``namespaces()`` lists only namespaces holding a live record.
"""

from __future__ import annotations

import asyncio
import logging
import select
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultproxy import FaultProxy
from servers import POSTGRES_URL, REDIS_URL, unavailable

import mappingstore
from mappingstore import aio
from mappingstore.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidOptionError,
    InvalidURLError,
    MappingStoreError,
    OptionTypeError,
    UnknownOutcomeError,
)

redis = pytest.importorskip("redis")
psycopg = pytest.importorskip("psycopg")

from mappingstore import PostgresStore, RedisStore  # noqa: E402  (needs the drivers)

#: Passwords that every URL parser splits wrongly unless they are percent-encoded.
HOSTILE = ["s3cr/et99", "s3cr?et99", "s3cr#et99", "a?b=c", "p@ss", "x#y", "pa/ss?wo#rd@x"]

_REDIS = urllib.parse.urlsplit(REDIS_URL)
REDIS_HOST = _REDIS.hostname or "127.0.0.1"
REDIS_PORT = _REDIS.port or 6379
REDIS_DB = int(_REDIS.path.strip("/") or 0)
_PG = urllib.parse.urlsplit(POSTGRES_URL)
PG_USER = _PG.username or "postgres"
PG_HOSTPORT = _PG.netloc.rpartition("@")[2]
PG_DB = _PG.path.strip("/")


def _fragments(password: str) -> set[str]:
    """The password, its percent-encoded form, and every piece of it of 3+ characters."""
    pieces = {password, urllib.parse.quote(password, safe="")}
    for size in range(3, len(password) + 1):
        pieces |= {password[i : i + size] for i in range(len(password) - size + 1)}
    return pieces


def _chain_text(exc: BaseException) -> str:
    """The messages of *exc* and of every exception chained to it."""
    texts = []
    cur: BaseException | None = exc
    while cur is not None and len(texts) < 20:
        texts.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return "\n".join(texts)


def _assert_hidden(password: str, *texts: str) -> None:
    for text in texts:
        for piece in _fragments(password):
            assert piece not in text, f"{piece!r} of the password shows in {text!r}"


@pytest.fixture
def redis_raw() -> Iterator[Any]:
    from servers import redis_client

    client = redis_client()
    yield client
    client.close()


@pytest.fixture
def prefix(redis_raw: Any) -> Iterator[str]:
    from servers import drop_redis_keys

    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    drop_redis_keys(redis_raw, name)


@pytest.fixture(scope="module")
def admin() -> Iterator[Any]:
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable("PostgreSQL", exc)
    with conn:
        yield conn


@pytest.fixture
def table(admin: Any) -> Iterator[str]:
    name = f"msi_{uuid.uuid4().hex[:12]}"
    yield name
    admin.execute(psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def _table_exists(admin: Any, name: str) -> bool:
    return admin.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None


# -- 1. hostile passwords ------------------------------------------------------------------


@pytest.mark.parametrize("password", HOSTILE)
def test_redis_password_never_shown(
    password: str, prefix: str, redis_raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    enc = urllib.parse.quote(password, safe="")
    texts: list[str] = []
    # Written raw: no parser can split it right; refused, without quoting any of it.
    for url in (
        f"redis://u:{password}@{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
        f"redis://:{password}@{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}?prefix={prefix}",
        f"rediss://u:{password}@{REDIS_HOST}:{REDIS_PORT}",
        f"redis+cluster://u:{password}@{REDIS_HOST}:{REDIS_PORT}",
    ):
        with pytest.raises(InvalidURLError) as bad:
            mappingstore.open(url)
        texts.append(_chain_text(bad.value))
        with pytest.raises(InvalidURLError) as bad:
            RedisStore(url)
        texts.append(_chain_text(bad.value))
    # Percent-encoded: an unreachable server, a user the server refuses, then one it takes.
    with pytest.raises(BackendUnavailableError) as down:
        RedisStore(f"redis://u:{enc}@127.0.0.1:1/0", retries=0, socket_connect_timeout=1)
    texts.append(_chain_text(down.value))
    with pytest.raises(BackendError) as refused:
        RedisStore(f"redis://nosuchuser:{enc}@{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}")
    texts.append(_chain_text(refused.value))
    # The test server's default user takes any password: the store opens.
    with mappingstore.open(
        f"redis://:{enc}@{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}?prefix={prefix}"
    ) as store:
        store["k"] = 1
        texts += [repr(store), store.url, str(store.info())]
    assert not any(key.startswith(b"ms:") for key in redis_raw.scan_iter(match=b"ms:*u:*"))
    _assert_hidden(password, *texts, caplog.text)


@pytest.mark.parametrize("password", HOSTILE)
def test_postgres_password_never_shown(
    password: str, table: str, admin: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    enc = urllib.parse.quote(password, safe="")
    texts: list[str] = []
    for scheme in ("postgresql", "postgres"):
        url = f"{scheme}://{PG_USER}:{password}@{PG_HOSTPORT}/{PG_DB}"
        with pytest.raises(InvalidURLError) as bad:
            mappingstore.open(f"{url}?table={table}")
        texts.append(_chain_text(bad.value))
        # A URL given to the class itself as conninfo gets the same checks.
        with pytest.raises(InvalidURLError) as bad:
            PostgresStore(url, table=table)
        texts.append(_chain_text(bad.value))
    assert not _table_exists(admin, table)
    good = f"postgresql://{PG_USER}:{enc}@"
    with pytest.raises(BackendUnavailableError) as down:
        mappingstore.open(f"{good}127.0.0.1:1/{PG_DB}?table={table}&connect_timeout=2")
    texts.append(_chain_text(down.value))
    with pytest.raises(BackendUnavailableError) as down:
        PostgresStore(f"{good}127.0.0.1:1/{PG_DB}", table=table)
    texts.append(_chain_text(down.value))
    # Trust authentication ignores the password: the store opens.
    for opened in (
        mappingstore.open(f"{good}{PG_HOSTPORT}/{PG_DB}?table={table}"),
        PostgresStore(f"{good}{PG_HOSTPORT}/{PG_DB}", table=table),
    ):
        with opened as store:
            store["k"] = 1
            texts += [repr(store), store.url, str(store.info())]
    _assert_hidden(password, *texts, caplog.text)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("redis://us/er:s3cret@h/0", "s3cret"),  # a "/" in the user name too
        ("redis://u:s3cr/et99@h/0", "et99"),
        ("redis://u:a?b=c@h/0", "b=c"),
        ("postgresql://u:x#yz@h/db", "x#yz"),
    ],
)
def test_redact_hides_passwords_with_unescaped_delimiters(text: str, secret: str) -> None:
    from mappingstore._url import redact

    assert secret not in redact(text)


# -- 2. db as a keyword --------------------------------------------------------------------


def test_redis_db_keyword(prefix: str, redis_raw: Any) -> None:
    other = 1 if REDIS_DB != 1 else 2
    # A keyword wins over the URL's database, as every keyword option does.
    base = f"redis://{REDIS_HOST}:{REDIS_PORT}/{other}"
    with RedisStore(base, db=REDIS_DB, prefix=prefix) as store:
        store["k"] = 1
        assert store.url.startswith(f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}")
    assert any(True for _ in redis_raw.scan_iter(match=f"{prefix}:*".encode()))
    with mappingstore.open(f"redis://{REDIS_HOST}:{REDIS_PORT}", db=REDIS_DB, prefix=prefix) as s:
        assert s["k"] == 1
    # ssl, also listed as a keyword option, works as one too.
    with RedisStore(REDIS_URL, ssl=False, prefix=prefix) as store:
        assert store["k"] == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"db": -1}, InvalidOptionError),
        ({"db": True}, OptionTypeError),
        ({"db": "1"}, OptionTypeError),
        ({"db": 1.0}, OptionTypeError),
        ({"ssl": "yes"}, OptionTypeError),
    ],
)
def test_redis_bad_db_keyword(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RedisStore(REDIS_URL, **kwargs)


def test_redis_cluster_db_keyword_is_refused() -> None:
    with pytest.raises(InvalidOptionError):
        RedisStore(f"redis+cluster://{REDIS_HOST}:{REDIS_PORT}", db=1)


def test_redis_database_the_server_lacks(prefix: str, redis_raw: Any) -> None:
    with pytest.raises(InvalidOptionError):
        RedisStore(REDIS_URL, db=1_000_000, prefix=prefix)


# -- 3. out-of-range Redis options ---------------------------------------------------------

BAD_VALUES: list[tuple[str, Any, type[Exception]]] = [
    ("socket_timeout", -1, InvalidOptionError),
    ("socket_timeout", 0, InvalidOptionError),
    ("socket_timeout", float("nan"), InvalidOptionError),
    ("socket_timeout", float("inf"), InvalidOptionError),
    ("socket_timeout", "abc", OptionTypeError),
    ("socket_timeout", 1e10, InvalidOptionError),  # beyond a socket's limit: OverflowError
    ("socket_connect_timeout", 1e10, InvalidOptionError),
    ("socket_connect_timeout", -1, InvalidOptionError),
    ("socket_connect_timeout", float("nan"), InvalidOptionError),
    ("health_check_interval", -1, InvalidOptionError),
    ("health_check_interval", float("nan"), InvalidOptionError),
    ("max_connections", -1, InvalidOptionError),
    ("max_connections", 0, InvalidOptionError),
    ("max_connections", 2.5, OptionTypeError),
    ("retries", -1, InvalidOptionError),
    ("retries", "5", OptionTypeError),
    ("client_name", "two words", InvalidOptionError),
    ("client_name", 7, OptionTypeError),
    ("db", -1, InvalidOptionError),
    ("db", 2**31, InvalidOptionError),  # beyond the server's range: a late BackendError
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_VALUES)
def test_redis_bad_option_keyword(
    name: str, value: Any, error: type[Exception], prefix: str, redis_raw: Any
) -> None:
    with pytest.raises(error):
        RedisStore(REDIS_URL, prefix=prefix, **{name: value})
    assert not list(redis_raw.scan_iter(match=f"{prefix}:*".encode()))


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("socket_timeout=-1", InvalidOptionError),
        ("socket_timeout=nan", InvalidOptionError),
        ("socket_timeout=abc", InvalidOptionError),
        ("socket_connect_timeout=-1", InvalidOptionError),
        ("health_check_interval=-1", InvalidOptionError),
        ("max_connections=-1", InvalidOptionError),
        ("max_connections=0", InvalidOptionError),
        ("retries=-1", InvalidOptionError),
        ("db=-1", InvalidOptionError),
        ("client_name=a%20b", InvalidOptionError),
    ],
)
def test_redis_bad_option_in_url(
    query: str, error: type[Exception], prefix: str, redis_raw: Any
) -> None:
    url = f"redis://{REDIS_HOST}:{REDIS_PORT}?prefix={prefix}&{query}"
    with pytest.raises(error) as info:
        mappingstore.open(url)
    assert isinstance(info.value, MappingStoreError)
    assert not list(redis_raw.scan_iter(match=f"{prefix}:*".encode()))


# -- 4. an empty ?prefix= ------------------------------------------------------------------


def test_redis_empty_prefix_in_url_is_refused(redis_raw: Any) -> None:
    ns = f"ns{uuid.uuid4().hex[:12]}"
    with pytest.raises(InvalidOptionError):
        mappingstore.open(f"{REDIS_URL}?prefix=&namespace={ns}")
    with pytest.raises(InvalidOptionError):
        RedisStore(REDIS_URL, prefix="")
    assert not list(redis_raw.scan_iter(match=f"ms:{{{ns}*".encode()))


# -- 5. bad libpq settings -----------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["sslmode=bogus", "target_session_attrs=bogus", "sslmode="],
)
def test_postgres_bad_libpq_option_in_url(query: str, table: str, admin: Any) -> None:
    with pytest.raises(InvalidOptionError):
        mappingstore.open(f"{POSTGRES_URL}?table={table}&{query}")
    name, _, value = query.partition("=")
    with pytest.raises(InvalidOptionError):
        PostgresStore(POSTGRES_URL, table=table, **{name: value})
    assert not _table_exists(admin, table)


@pytest.mark.parametrize("port", ["abc", "0", "70000", "54x32"])
def test_postgres_bad_port(port: str, table: str, admin: Any) -> None:
    host = PG_HOSTPORT.rpartition(":")[0] if ":" in PG_HOSTPORT else PG_HOSTPORT
    with pytest.raises(InvalidURLError):
        mappingstore.open(f"postgresql://{PG_USER}@{host}:{port}/{PG_DB}?table={table}")
    with pytest.raises(InvalidURLError):
        PostgresStore(f"host={host} port={port} user={PG_USER} dbname={PG_DB}", table=table)
    assert not _table_exists(admin, table)


@pytest.mark.parametrize(
    "setting",
    [
        "gssencmode=bogus",  # refused by libpq before any I/O
        "channel_binding=bogus",
        "keepalives=abc",
        "options='-c TimeZone=xyzzy'",  # refused by the server at connection
        "options='-c no_such_param=1'",
        "options='-c work_mem=1'",  # outside the valid range
        "options='-c shared_buffers=1'",  # cannot be changed without a restart
        "options='-c'",
    ],
)
def test_postgres_settings_libpq_refuses(setting: str, table: str, admin: Any) -> None:
    host = PG_HOSTPORT.rpartition(":")[0] if ":" in PG_HOSTPORT else PG_HOSTPORT
    port = PG_HOSTPORT.rpartition(":")[2] if ":" in PG_HOSTPORT else "5432"
    conninfo = f"host={host} port={port} user={PG_USER} dbname={PG_DB} {setting}"
    with pytest.raises(InvalidOptionError) as info:
        PostgresStore(conninfo, table=table)
    assert not isinstance(info.value, OSError)
    assert not _table_exists(admin, table)


def test_postgres_unreachable_is_still_unavailable(table: str) -> None:
    with pytest.raises(BackendUnavailableError):
        PostgresStore(f"postgresql://{PG_USER}@127.0.0.1:1/{PG_DB}", table=table)


# -- 6. a failure during the connect handshake ---------------------------------------------


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    made = FaultProxy(REDIS_HOST, REDIS_PORT, settle=0.05)
    yield made
    made.close()


#: The client name the handshake sends (CLIENT SETNAME, or inside HELLO): the marker that
#: makes the proxy cut a connection during its handshake and no later.
MARK = "mshandshake"


def _via(proxy: FaultProxy, prefix: str) -> str:
    return f"redis://127.0.0.1:{proxy.port}/{REDIS_DB}?prefix={prefix}&client_name={MARK}"


def _wait_readable(sock: Any) -> None:
    """Wait until the client sees its end of a connection the proxy closed."""
    ready, _, _ = select.select([sock], [], [], 10)
    assert ready, "the closed connection never became readable"


def test_write_cut_during_a_new_connections_handshake_is_retried(
    redis_proxy: FaultProxy, prefix: str, redis_raw: Any
) -> None:
    with RedisStore(_via(redis_proxy, prefix)) as store:
        store["warm"] = 1
        # (a) The pooled connection died while idle; its replacement dies in the handshake.
        pool = store.client.connection_pool
        socks = [c._sock for c in pool._available_connections if c._sock is not None]
        assert socks
        redis_proxy.down()
        for sock in socks:
            _wait_readable(sock)
        redis_proxy.up()
        redis_proxy.cut_after(MARK.encode())
        store["x"] = 1  # never sent on the cut connection: retried, not "unknown"
        assert redis_proxy.cuts == 1
        # (b) No pooled connection left: the new one dies in the handshake.
        pool.disconnect()
        redis_proxy.cut_after(MARK.encode())
        store["y"] = 2
        assert redis_proxy.cuts == 2
        assert store["x"] == 1 and store["y"] == 2
        # A cut after the write itself was sent stays an unknown outcome.
        redis_proxy.cut_after(b"EVALSHA")
        with pytest.raises(UnknownOutcomeError):
            store["z"] = 3
        assert redis_proxy.cuts == 3
    assert len(list(redis_raw.scan_iter(match=f"{prefix}:*:k:*".encode()))) >= 3


def test_async_write_cut_during_a_new_connections_handshake_is_retried(
    redis_proxy: FaultProxy, prefix: str
) -> None:
    async def main() -> None:
        async with await aio.open(_via(redis_proxy, prefix)) as store:
            await store.set("warm", 1)
            await store._native.client.connection_pool.disconnect()  # type: ignore[union-attr]
            redis_proxy.cut_after(MARK.encode())
            await store.set("x", 1)
            assert redis_proxy.cuts == 1
            assert await store.getitem("x") == 1

    asyncio.run(main())


# -- 8. namespaces() and expired records -----------------------------------------------------


def test_redis_namespaces_skip_namespaces_with_only_expired_records(prefix: str) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, namespace="gone") as gone:
        gone.set("k", 1, ttl=0.05)
        with RedisStore(REDIS_URL, prefix=prefix, namespace="kept") as kept:
            kept.set("a", 1, ttl=0.05)
            kept["b"] = 2
            deadline = time.monotonic() + 10
            while len(gone) and time.monotonic() < deadline:  # Redis's own clock expires it
                time.sleep(0.02)
            assert len(gone) == 0
            assert gone.namespaces() == ["kept"]
            del kept["b"]
            assert gone.namespaces() == []


def test_postgres_namespaces_skip_namespaces_with_only_expired_records(table: str) -> None:
    now = [1000.0]

    def clock() -> float:
        return now[0]

    opened: list[Callable[[], None]] = []
    try:
        gone = PostgresStore(POSTGRES_URL, table=table, namespace="gone", clock=clock)
        opened.append(gone.close)
        kept = PostgresStore(POSTGRES_URL, table=table, namespace="kept", clock=clock)
        opened.append(kept.close)
        gone.set("k", 1, ttl=5)
        kept.set("a", 1, ttl=5)
        kept["b"] = 2
        assert gone.namespaces() == ["gone", "kept"]
        now[0] += 10
        assert gone.namespaces() == ["kept"]
        del kept["b"]
        assert gone.namespaces() == []
    finally:
        for close in opened:
            close()


@pytest.mark.parametrize("name", ["retries", "socket_timeout", "max_connections", "client_name"])
def test_redis_keyword_none_means_not_given(name: str, prefix: str) -> None:
    # None used to be refused (OptionTypeError) after the option checks came in; before
    # them it meant "not given", as for every store option.
    with RedisStore(REDIS_URL, prefix=prefix, **{name: None}) as store:
        store["a"] = 1
        assert store["a"] == 1
        store.clear()


def test_postgres_ready_pool_with_an_at_sign_in_a_query_value(table: str, admin: Any) -> None:
    from psycopg_pool import ConnectionPool

    url = f"postgresql://{PG_USER}@{PG_HOSTPORT}/{PG_DB}?application_name=ops@host"
    pool = ConnectionPool(url, min_size=1, max_size=2, kwargs={"autocommit": True}, open=True)
    with pool, PostgresStore(pool, table=table) as store:
        store["a"] = 1
        assert store["a"] == 1


def test_postgres_multi_host_url_pairs_each_host_with_its_port(table: str) -> None:
    # store.url joined all hosts, then all ports ("h1,h2:p1,p2"), which libpq reads wrong.
    url = f"postgresql://{PG_USER}@127.0.0.1:1,{PG_HOSTPORT}/{PG_DB}"
    with PostgresStore(url, table=table) as store:
        assert f"@127.0.0.1:1,{PG_HOSTPORT}/" in store.url
        with mappingstore.open(store.url) as again:
            again["k"] = 1
            assert store["k"] == 1


def test_redis_huge_float_ttl_is_an_option_error(prefix: str) -> None:
    # 1e308 seconds overflowed to inf in the millisecond conversion: builtin OverflowError.
    with RedisStore(REDIS_URL, prefix=prefix) as store:
        for ttl in (1e308, 10**306, 1e20):
            with pytest.raises(InvalidOptionError):
                store.set("k", 1, ttl=ttl)
        assert "k" not in store
