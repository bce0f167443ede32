"""Review 7 fixes for the Redis and PostgreSQL stores (real servers on 127.0.0.1):

- a Redis exclusive section whose writes committed but whose lock release failed said
  "nothing written" (a plain ``BackendUnavailableError``), or hid the section's own error;
- key and namespace names that are not UTF-8 (written by another program) broke every
  listing with a raw ``UnicodeDecodeError``;
- a Redis bucket counter holding junk broke ``len()`` and the listings with a raw
  ``ValueError``;
- the psycopg error chained to a failed PostgreSQL open kept the URL's password.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import uuid
from typing import Any

import pytest

import mappingstore
from mappingstore import RedisStore, aio
from mappingstore.errors import BackendUnavailableError, UnknownOutcomeError
from tests.servers import POSTGRES_URL, REDIS_URL

# -- Redis: a lock release that fails after the section's writes committed ----------------


def _failing_release(store: RedisStore) -> list[int]:
    """Make the store's lock release fail as if the server died right after the section's
    last write was acknowledged (connection refused). Returns the list of failed releases."""
    import redis.exceptions as rex

    from mappingstore._redis import _RELEASE

    client = store._client
    real_eval = client.eval
    failed: list[int] = []

    def eval_hook(script: Any, *args: Any, **kwargs: Any) -> Any:
        if script == _RELEASE:
            failed.append(1)
            raise rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real_eval(script, *args, **kwargs)

    client.eval = eval_hook
    return failed


@pytest.mark.parametrize("what", ["events.apply", "series.extend", "batch with pop"])
def test_a_committed_section_whose_lock_release_fails_succeeds(
    raw: Any, prefix: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, retries=0) as s:
        log, ser = s.events("log"), s.series("ser")
        log.apply({"n": 0})
        s["p"] = 1
        failed = _failing_release(s)
        with caplog.at_level(logging.WARNING, logger="mappingstore"):
            # Before the fix: BackendUnavailableError ("Redis UNLOCK failed"), which says
            # nothing was written, though the section's writes were.
            if what == "events.apply":
                log.apply({"n": (operator.add, 1)})
            elif what == "series.extend":
                ser.extend([(1, "a"), (2, "b")])
            else:
                with s.batch():
                    s.pop("p")
                    s["q"] = 2
        assert failed, "the section took the store lock"
        assert "could not release the store lock" in caplog.text
        # The lease is left to run out (no longer renewed); a fresh client sees the writes.
        assert raw.pttl(f"{prefix}:lock".encode()) > 0
        raw.delete(f"{prefix}:lock".encode())
    with RedisStore(REDIS_URL, prefix=prefix) as check:
        if what == "events.apply":
            assert check.events("log").current() == {"n": 1}
        elif what == "series.extend":
            assert list(check.series("ser").items()) == [(1, "a"), (2, "b")]
        else:
            assert check.to_dict() == {"q": 2}


def test_a_failed_lock_release_never_hides_the_sections_own_error(raw: Any, prefix: str) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, retries=0) as s:
        failed = _failing_release(s)
        # Before the fix the release's plain BackendUnavailableError replaced the section's
        # UnknownOutcomeError: "nothing written" instead of "may have been applied".
        with pytest.raises(UnknownOutcomeError, match="the section's own"), s._exclusive():
            raise UnknownOutcomeError("the section's own outcome")
        assert failed
        raw.delete(f"{prefix}:lock".encode())
        # The store goes on working.
        s["k"] = 1
        assert s["k"] == 1


def test_a_closed_store_leaves_its_lock_to_the_lease(raw: Any, prefix: str) -> None:
    s = RedisStore(REDIS_URL, prefix=prefix)
    with s._exclusive():
        s.close()  # closed meanwhile (another thread, say): no error from the release
    assert raw.pttl(f"{prefix}:lock".encode()) > 0


# -- Redis: foreign names and junk counters --------------------------------------------------


def _redis_names(prefix: str, ns: str, key: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """(index, counter, data key, member) of the raw key name *key* in *ns*."""
    from mappingstore._redis_layout import Layout, bucket

    base = Layout(prefix.encode(), ns).bases[bucket(key)]
    return base + b"i", base + b"c", base + b"k:" + key, key


def _foreign_key(raw: Any, prefix: str) -> None:
    """Another program adds a record of k0's value under a name that is no UTF-8 (so no
    str key) in namespace "t"."""
    value = raw.get(_redis_names(prefix, "t", b"k0")[2])
    index, counter, dkey, member = _redis_names(prefix, "t", b"\xff\xfe")
    raw.set(dkey, value)
    raw.zadd(index, {member: 0})
    raw.incr(counter)


def test_redis_listings_skip_a_key_name_that_is_not_utf8(raw: Any, prefix: str) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, namespace="t") as s:
        s["k0"] = 0
        _foreign_key(raw, prefix)
        # And a namespace whose escaped name is no UTF-8.
        raw.zadd(prefix.encode() + b":{\xff:00}:i", {b"k": 0})
        # Before the fix: raw UnicodeDecodeError from every listing.
        assert list(s) == ["k0"]
        assert list(s.items()) == [("k0", 0)]
        assert s.to_dict() == {"k0": 0}
        assert list(s.names("k")) == ["k0"]
        assert s.namespaces() == ["t"]
        assert s["k0"] == 0
        # len() counts index entries (documented): the foreign one too.
        assert len(s) == 2


def test_redis_a_junk_bucket_counter_is_counted_from_the_index(raw: Any, prefix: str) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, namespace="t") as s:
        s.update({"k0": 0, "k1": 1})
        counter = _redis_names(prefix, "t", b"k0")[1]
        raw.set(counter, b"junk")
        # Before the fix: raw builtins ValueError from int() in all four.
        assert len(s) == 2
        assert sorted(s) == ["k0", "k1"]
        assert sorted(s.items()) == [("k0", 0), ("k1", 1)]
        assert s.namespaces() == ["t"]
        assert s.get("k0") == 0


def test_redis_a_write_over_a_junk_bucket_counter_succeeds(raw: Any, prefix: str) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, namespace="t") as s:
        s["k0"] = 0
        counter = _redis_names(prefix, "t", b"k0")[1]
        same = next(
            f"n{i}"
            for i in range(10_000)
            if _redis_names(prefix, "t", f"n{i}".encode())[1] == counter
        )
        raw.set(counter, b"junk")
        # Before the fix: the write was applied, but raised BackendError (INCRBY failed
        # after the record and the index had changed).
        s[same] = 5
        s.set("k0", 1, ttl=60)
        assert s[same] == 5 and s["k0"] == 1
        assert len(s) == 2
        assert int(raw.get(counter)) >= 2  # rebuilt from the index
        del s[same]
        assert len(s) == 1 and list(s) == ["k0"]


def test_aio_redis_listings_skip_a_key_name_that_is_not_utf8(raw: Any, prefix: str) -> None:
    with RedisStore(REDIS_URL, prefix=prefix, namespace="t") as s:
        s["k0"] = 0
    _foreign_key(raw, prefix)

    async def main() -> None:
        async with await aio.open(REDIS_URL, prefix=prefix, namespace="t") as store:
            assert [k async for k in store] == ["k0"]
            assert [kv async for kv in store.items()] == [("k0", 0)]

    asyncio.run(main())


# -- PostgreSQL ----------------------------------------------------------------------------


def test_postgres_listings_skip_names_that_are_not_utf8(pg_table: str) -> None:
    import psycopg

    url = f"{POSTGRES_URL}?table={pg_table}"
    with mappingstore.open(url, namespace="t") as s:
        s["k0"] = 0
        s["k1"] = 1
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            t = psycopg.sql.Identifier(pg_table)
            # Another program renames a key and copies a row into a namespace, both
            # to bytes that are no UTF-8.
            admin.execute(
                psycopg.sql.SQL(
                    "UPDATE {} SET key = '\\xff00'::bytea WHERE key = 'k1'::bytea"
                ).format(t)
            )
            admin.execute(
                psycopg.sql.SQL(
                    "INSERT INTO {} (ns, key, value) SELECT '\\xfffe'::bytea, key, value "
                    "FROM {} WHERE key = 'k0'::bytea"
                ).format(t, t)
            )
        # Before the fix: raw UnicodeDecodeError from each of these.
        assert list(s) == ["k0"]
        assert list(s.items()) == [("k0", 0)]
        assert s.to_dict() == {"k0": 0}
        assert list(s.names("k")) == ["k0"]
        assert s.namespaces() == ["t"]
        assert len(s) == 2  # len() counts rows (documented): the foreign one too

        async def native() -> tuple[list[str], dict[str, Any]]:
            async with await aio.open(url, namespace="t") as a:
                return [k async for k in a], await a.to_dict()

        assert asyncio.run(native()) == (["k0"], {"k0": 0})


_SECRET = "supersecret99"


def _secrets_in_chain(exc: BaseException) -> list[str]:
    """Where the password appears among the attributes (also properties such as
    psycopg's ``pgconn``) and arguments of *exc* and every exception chained to it."""
    found: list[str] = []
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        values: dict[str, Any] = {**vars(e), "args": e.args}
        for name in dir(type(e)):
            if isinstance(getattr(type(e), name, None), property):
                try:
                    values[name] = getattr(e, name)
                except Exception:  # a property that fails holds nothing
                    continue
        found += [f"{type(e).__name__}.{n}" for n, v in values.items() if _SECRET in repr(v)]
        stack += [e.__cause__, e.__context__]
    return found


def _pg_url(host_port: str, dbname: str) -> str:
    return f"postgresql://postgres:{_SECRET}@{host_port}/{dbname}?connect_timeout=5"


@pytest.mark.parametrize(
    "url",
    [
        _pg_url("127.0.0.1:1", "test"),  # refused
        _pg_url("127.0.0.1:5432", f"nosuchdb_{uuid.uuid4().hex[:8]}"),  # the server says no
    ],
    ids=["refused", "unknown-database"],
)
def test_a_failed_postgres_open_chains_no_password(url: str) -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(BackendUnavailableError) as info:
        mappingstore.open(url)
    assert info.value.__cause__ is not None  # still chained to psycopg's error
    assert type(info.value.__cause__).__module__.startswith("psycopg")
    # Before the fix: the cause's pgconn held the password (repr showed it).
    assert _secrets_in_chain(info.value) == []

    async def native() -> None:
        async with await aio.open(url):
            pass

    with pytest.raises(BackendUnavailableError) as ainfo:
        asyncio.run(native())
    assert _secrets_in_chain(ainfo.value) == []
