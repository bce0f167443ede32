"""RedisStore against a real standalone Redis server (``MAPPINGSTORE_TEST_REDIS_URL``).

The dict semantics every backend shares are in the conformance suite (``TestRedis``);
this module checks what only Redis has: URLs and redaction, the key layout and its
injectivity, the index behind ``len``/iteration, native expiry, exactly-once writes under
faults (a private ``redis-server`` killed mid-workload, ``CLIENT KILL``, ``DEBUG SLEEP``,
``READONLY``, OOM), fork and multi-process atomicity.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import mappingstore
from mappingstore import RedisStore, Store
from mappingstore._redis_client import classify
from mappingstore._redis_layout import BUCKETS, Layout, bucket, escape_namespace, unescape_namespace
from mappingstore.errors import (
    BackendError,
    BackendUnavailableError,
    CapacityError,
    CorruptValueError,
    InvalidOptionError,
    InvalidURLError,
    StoreClosedError,
    UnknownOutcomeError,
)
from mappingstore.testing import HOSTILE_NAMESPACE_PAIRS, StoreFactory, StoreTests
from tests.redis_cluster import PrivateRedis, require_binaries
from tests.servers import REDIS_URL, drop_redis_keys, unavailable

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.redis


@pytest.fixture
def store(prefix: str) -> Iterator[RedisStore]:
    with RedisStore(REDIS_URL, prefix=prefix) as s:
        yield s


class TestRedis(StoreTests):
    """The whole conformance suite; each test name gets its own key prefix."""

    persistent = True
    multiprocess = True
    fake_clock = False  # expiry is the server's own clock (PXAT)

    @pytest.fixture
    def factory(self, raw: Any) -> Iterator[StoreFactory]:
        run = f"c{uuid.uuid4().hex[:12]}"

        def open_(name: str = "a", **options: Any) -> Store:
            return RedisStore(REDIS_URL, prefix=f"{run}-{name.encode().hex()}"[:64], **options)

        yield open_
        drop_redis_keys(raw, run)


# -- URLs, options, redaction ------------------------------------------------------------


def test_open_by_url_and_options(prefix: str) -> None:
    with mappingstore.open(f"{REDIS_URL}?namespace=n1&prefix={prefix}&socket_timeout=3") as s:
        assert isinstance(s, RedisStore)
        assert s.namespace == "n1"
        assert not s.cluster
        s["k"] = 1
        assert s.url.endswith(f"prefix={prefix}")
        with mappingstore.open(s.url, namespace="n1") as again:
            assert again["k"] == 1


def test_password_never_shown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mappingstore")
    url = "redis://alice:s3cr%23t@127.0.0.1:1/0"
    with pytest.raises(BackendUnavailableError) as info:
        RedisStore(url, retries=0, socket_connect_timeout=0.5)
    assert "s3cr" not in str(info.value)
    assert isinstance(info.value, OSError)
    with pytest.raises(InvalidURLError) as bad:
        RedisStore("redis://alice:s3cret@127.0.0.1:6379/notadb")
    assert "s3cret" not in str(bad.value)
    assert "s3cr" not in caplog.text


def test_server_password_hidden_everywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_binaries()
    caplog.set_level(logging.DEBUG, logger="mappingstore")
    with PrivateRedis(tmp_path, "--requirepass", "topsecret") as server:
        url = server.url.replace("redis://", "redis://:topsecret@")
        with RedisStore(url) as s:
            s["k"] = 1
            assert "topsecret" not in repr(s)
            assert "topsecret" not in s.url
            assert "topsecret" not in str(s.info())
        with RedisStore(server.url, redis_password="topsecret") as s:
            assert s["k"] == 1
        with pytest.raises(BackendError) as wrong:
            RedisStore(server.url.replace("redis://", "redis://:topsecreT@"))
        assert not isinstance(wrong.value, BackendUnavailableError)  # not retried
        assert "topsecre" not in str(wrong.value)
    assert "topsecre" not in caplog.text


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0?bogus=1",
        "redis://127.0.0.1:6379/0?password=x",
        "redis://127.0.0.1:6379/x",
        "redis://127.0.0.1:6379/1?db=2",
        "redis://a:1,b:2/0",
        "redis+cluster://a:1,b:2/3",
        "redis://127.0.0.1:99999/0",
        "memcached://127.0.0.1/0",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(InvalidOptionError):
        RedisStore(url)


def test_bad_options() -> None:
    with pytest.raises(InvalidOptionError):
        RedisStore(REDIS_URL, prefix="a{b}")
    with pytest.raises(InvalidOptionError):
        RedisStore(REDIS_URL, prefix="a*")
    with pytest.raises(InvalidOptionError):
        RedisStore(REDIS_URL, ssl_ca_certs="/x")  # TLS options need rediss://
    with pytest.raises(InvalidOptionError):
        RedisStore(client=redis.Redis(), socket_timeout=1)


def test_ready_client(raw: Any, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis.from_url(REDIS_URL, retry=Retry(NoBackoff(), 0))
    with RedisStore(client=client, prefix=prefix, namespace="c") as s:
        s["k"] = [1, 2]
        assert s.url == f"{REDIS_URL}?prefix={prefix}"
        assert s.client is client
    assert client.ping()  # a client we were given is not closed
    assert raw.exists(
        f"{prefix}:{{c:".encode() + b"%02x}:k:k" % (__import__("zlib").crc32(b"k") & 15)
    )
    client.close()
    with pytest.raises(InvalidOptionError):
        RedisStore(client=redis.Redis.from_url(REDIS_URL, decode_responses=True))
    caplog.set_level(logging.WARNING, logger="mappingstore")
    # A client that resends a command after a timeout (redis-py 6+ does by default).
    from redis.backoff import ExponentialBackoff

    risky = redis.Redis.from_url(REDIS_URL, retry=Retry(ExponentialBackoff(), 3))
    RedisStore(client=risky, prefix=prefix).close()
    risky.close()
    assert "applied twice" in caplog.text


def test_tls(tmp_path: Path) -> None:
    require_binaries()
    if shutil.which("openssl") is None:
        unavailable("openssl", "not found on PATH")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    with PrivateRedis(tmp_path / "srv", tls=(cert, key)) as server:
        assert server.url.startswith("rediss://")
        with RedisStore(f"{server.url}?ssl_ca_certs={cert}", namespace="tls") as s:
            s["k"] = {"secure": True}
            assert s["k"] == {"secure": True}
            assert s.url.startswith("rediss://")
        with pytest.raises(BackendUnavailableError, match="certificate verify failed"):
            RedisStore(server.url, retries=0)  # a self-signed certificate is refused
        with RedisStore(f"{server.url}?ssl_cert_reqs=none", namespace="tls") as s:
            assert s["k"] == {"secure": True}
        with pytest.raises(InvalidOptionError, match="TLS"):
            RedisStore(server.url.replace("rediss", "redis") + "?ssl_certfile=/x")


# -- key layout ----------------------------------------------------------------------------


def _record_key(ns: str, key: str) -> bytes:
    kb = key.encode()
    return Layout(b"ms", ns).bases[bucket(kb)] + b"k:" + kb


@pytest.mark.parametrize(("one", "two"), HOSTILE_NAMESPACE_PAIRS)
def test_key_encoding_is_injective(one: tuple[str, str], two: tuple[str, str]) -> None:
    assert _record_key(*one) != _record_key(*two)
    for ns, _ in (one, two):
        assert b"}" not in escape_namespace(ns)
        assert unescape_namespace(escape_namespace(ns)) == ns


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_key_encoding_is_injective_random(ns1: str, k1: str, ns2: str, k2: str) -> None:
    assume((ns1, k1) != (ns2, k2))
    assume(all(not any(0xD800 <= ord(c) < 0xE000 for c in t) for t in (ns1, k1, ns2, k2)))
    assert _record_key(ns1, k1) != _record_key(ns2, k2)
    assert unescape_namespace(escape_namespace(ns1)) == ns1


def test_layout_in_redis(raw: Any, store: RedisStore, prefix: str) -> None:
    ns = "we}ird%ns"
    s = RedisStore(REDIS_URL, prefix=prefix, namespace=ns)
    s["key"] = 1
    s.set("tmp", 2, ttl=100)
    tag = b"we%7Dird%25ns"
    b = __import__("zlib").crc32(b"key") & 15
    base = prefix.encode() + b":{" + tag + b":%02x}:" % b
    assert raw.exists(base + b"k:key")
    assert raw.zscore(base + b"i", b"key") == 0
    assert raw.ttl(base + b"k:key") == -1
    bt = __import__("zlib").crc32(b"tmp") & 15
    tbase = prefix.encode() + b":{" + tag + b":%02x}:" % bt
    assert 99_000 < raw.pttl(tbase + b"k:tmp") <= 100_000
    assert raw.zscore(tbase + b"x", b"tmp") == pytest.approx(raw.pexpiretime(tbase + b"k:tmp"))
    assert ns in s.namespaces()
    s.close()


def test_namespace_spreads_over_buckets(raw: Any, store: RedisStore, prefix: str) -> None:
    store.update({f"k{i}": i for i in range(200)})
    indexes = [i for i, _ in Layout(prefix.encode(), "default").pairs]
    assert sum(raw.exists(name) for name in indexes) == BUCKETS
    assert sum(raw.zcard(name) for name in indexes) == 200


def test_len_and_iteration_use_the_index_not_scan(tmp_path: Path) -> None:
    require_binaries()
    with PrivateRedis(tmp_path) as server, RedisStore(server.url) as s:
        s.update({f"k{i}": i for i in range(5000)})
        admin = redis.Redis(port=server.port)
        admin.config_resetstat()
        assert len(s) == 5000
        assert sum(1 for _ in s.items()) == 5000
        assert sorted(s.names("k499")) == [
            "k499",
            "k4990",
            "k4991",
            "k4992",
            "k4993",
            "k4994",
            "k4995",
            "k4996",
            "k4997",
            "k4998",
            "k4999",
        ]
        stats = admin.info("commandstats")
        assert "cmdstat_scan" not in stats and "cmdstat_keys" not in stats
        assert stats["cmdstat_evalsha"]["calls"] < 20
        admin.close()


# -- TTL (Redis's own expiry) ----------------------------------------------------------------


def test_native_expiry_everywhere(store: RedisStore) -> None:
    store.update({f"p{i}": i for i in range(10)})
    # Enough expiring keys in every bucket to exercise the index pruning; one atomic
    # write, so none can expire before the first count even on a slow machine.
    store.set_many({f"e{i}": i for i in range(100)}, ttl=1.0)
    assert len(store) == 110
    time.sleep(1.1)
    assert len(store) == 10
    assert sorted(store) == sorted(f"p{i}" for i in range(10))
    assert len(list(store.items())) == 10
    assert "e1" not in store and store.get("e1") is None
    assert store.get_many(["e1", "p1"]) == {"p1": 1}
    store.set("late", 1, ttl=60)  # a write prunes its bucket's dead entries
    assert len(store) == 11
    purged = store.purge_expired()
    assert 0 < purged <= 100
    assert store.purge_expired() == 0
    assert len(store) == 11


def test_overwrite_clears_and_modify_keeps_ttl(store: RedisStore) -> None:
    store.set("k", 1, ttl=30)
    store["k"] = 2
    assert store.ttl("k") is None
    store.set("k", 1, ttl=30)
    before = store.ttl("k")
    store.modify("k", lambda v: v + 1)
    after = store.ttl("k")
    # Kept exactly (KEEPTTL): never extended (1 ms of rounding aside), not cleared.
    assert before is not None and after is not None and 29 < after <= before + 0.001
    store.expire("k", None)
    assert store.ttl("k") is None
    store.set("gone", 1, ttl=0.001)
    time.sleep(0.01)
    assert "gone" not in store


# -- faults ----------------------------------------------------------------------------------


def test_client_kill_recovers(store: RedisStore, raw: Any) -> None:
    store["k"] = 1
    own_id = store.client.client_id()  # single-threaded: the pool's one connection
    raw.client_kill_filter(_id=own_id)
    assert store["k"] == 1  # the dead pooled socket is noticed and replaced before sending
    raw.client_kill_filter(_id=store.client.client_id())
    store["k"] = 2
    assert store["k"] == 2


def test_an_iterator_made_before_close_opens_no_connection(prefix: str) -> None:
    store = mappingstore.open(f"{REDIS_URL}?prefix={prefix}")
    store.update({f"k{i}": i for i in range(5000)})  # several pages of iteration
    keys, items = iter(store), iter(store.items())
    next(keys), next(items)
    store.close()
    # redis-py reconnects a closed client on demand: the next page must not be read.
    for it in (keys, items):
        with pytest.raises(StoreClosedError):
            for _ in it:
                pass


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    require_binaries()
    with PrivateRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def test_debug_sleep_timeouts(private: PrivateRedis) -> None:
    admin = redis.Redis(port=private.port)
    with RedisStore(private.url, socket_timeout=0.3, retries=0, namespace="sleepy") as s:
        s["k"] = 1
        sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", "2"))
        sleeper.start()
        time.sleep(0.3)  # let the server start sleeping before the write arrives
        try:
            with pytest.raises(UnknownOutcomeError):
                s["k"] = 2  # sent on a live connection, then timed out
            with pytest.raises(BackendUnavailableError) as read_err:
                s.get("k")  # reads are retried (here retries=0), never "unknown"
            assert not isinstance(read_err.value, UnknownOutcomeError)
        finally:
            sleeper.join()
        assert s["k"] == 2  # the write ran after the sleep: resending it would be wrong
    with RedisStore(private.url, socket_timeout=5, namespace="sleepy") as patient:
        assert patient["k"] == 2
    admin.close()


def test_readonly_replica(private: PrivateRedis, tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "replica") as replica:
        admin = redis.Redis(port=replica.port)
        with RedisStore(private.url, namespace="ro") as primary:
            primary["k"] = 1
        admin.replicaof("127.0.0.1", private.port)
        deadline = time.monotonic() + 10
        while (
            admin.info("replication").get("master_link_status") != "up"
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        with RedisStore(replica.url, namespace="ro", retries=1) as s:
            assert s["k"] == 1
            with pytest.raises(BackendUnavailableError, match="read-only"):
                s["k"] = 2
        admin.close()


def test_out_of_memory(tmp_path: Path) -> None:
    require_binaries()
    with PrivateRedis(tmp_path, "--maxmemory", "3mb", "--maxmemory-policy", "noeviction") as server:

        def fill(s: RedisStore) -> None:
            for i in range(100):
                s[f"big{i}"] = b"x" * 200_000

        with RedisStore(server.url) as s, pytest.raises(CapacityError) as info:
            fill(s)
        assert isinstance(info.value, BackendError)
        with RedisStore(server.url) as s:
            written = len(s)
            assert 0 < written < 100
            assert f"big{written}" not in s  # the refused write left nothing behind


def _workload(url: str, n: int, acked: Any, unknown: Any, counter: Any) -> None:
    """Write keys and increments through a server crash; record what was acknowledged."""
    with RedisStore(url, socket_timeout=2, namespace="crash") as s:
        i = 0
        while i < n:
            try:
                s[f"k{i}"] = i
                acked.append(i)
                i += 1
            except UnknownOutcomeError:
                unknown.append(i)
                i += 1
            except BackendUnavailableError:
                time.sleep(0.05)  # not sent: safe to try again
                continue
            try:
                s.modify("counter", lambda v: v + 1, default=0)
                counter[0] += 1
            except UnknownOutcomeError:
                counter[1] += 1
            except BackendUnavailableError:
                pass


def test_kill_and_restart_loses_no_acknowledged_write(tmp_path: Path) -> None:
    require_binaries()
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        acked: list[int] = []
        unknown: list[int] = []
        counter = [0, 0]
        worker = threading.Thread(
            target=_workload, args=(server.url, 1500, acked, unknown, counter)
        )
        worker.start()
        for _ in range(2):
            while len(acked) < 300 * (_ + 1) and worker.is_alive():
                time.sleep(0.01)
            server.kill()
            time.sleep(0.3)
            server.start()
        worker.join(120)
        assert not worker.is_alive()
        with RedisStore(server.url, namespace="crash") as s:
            data = dict(s.items())
            for i in acked:
                assert data.get(f"k{i}") == i, f"acknowledged write k{i} lost"
            assert counter[0] <= data["counter"] <= counter[0] + counter[1]
            assert len(s) == len(data)
        assert len(acked) + len(unknown) == 1500
    finally:
        server.stop()


# -- processes -------------------------------------------------------------------------------


def _increment(url: str, prefix: str, n: int) -> None:
    with RedisStore(url, prefix=prefix) as s:
        for _ in range(n):
            s.modify("n", lambda v: v + 1, default=0)


def test_four_processes_modify_exactly(prefix: str) -> None:
    ctx = multiprocessing.get_context("fork")  # nothing is open yet in this process
    procs = [ctx.Process(target=_increment, args=(REDIS_URL, prefix, 2500)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    with RedisStore(REDIS_URL, prefix=prefix) as s:
        assert s["n"] == 10_000


def test_fork_reconnects(store: RedisStore) -> None:
    store["parent"] = 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            store["child"] = store["parent"] + 1
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store["child"] == 2
    store["after"] = 3
    assert len(store) == 3


def test_a_key_of_another_redis_type_is_a_corrupt_value(store: RedisStore, raw: Any) -> None:
    check_keys_of_another_type(store, raw)


def test_async_get_of_another_redis_type_is_a_corrupt_value(
    store: RedisStore, raw: Any, prefix: str
) -> None:
    import asyncio

    from mappingstore import aio

    store["b"] = 2
    raw.delete(dkey := store._data_key("default", "b"))
    raw.rpush(dkey, b"x")

    async def main() -> None:
        async with await aio.open(REDIS_URL, prefix=prefix) as a:
            assert a.native == "redis"
            with pytest.raises(CorruptValueError):
                await a.get("b")
            with pytest.raises(CorruptValueError):
                await a.get("b", 0)

    asyncio.run(main())


def check_keys_of_another_type(store: RedisStore, raw: Any) -> None:
    """A data key another program replaced with a list, a hash or a set is a damaged record
    on every path that reads values (get, items, values, modify, setdefault, pop), never a
    silent gap while keys() and len() still list it; get_many reads it as missing (what
    MGET answers; telling the two apart would cost a second round trip). Deleting or
    overwriting it works."""
    store.update({"a": 1, "b": 2, "c": 3, "d": 4})
    dkey = store._data_key("default", "b")
    for foreign in (lambda: raw.rpush(dkey, b"x"), lambda: raw.hset(dkey, "f", "v")):
        raw.delete(dkey)
        foreign()
        assert "b" in store and len(store) == 4 and sorted(store) == ["a", "b", "c", "d"]
        with pytest.raises(CorruptValueError):
            store["b"]
        with pytest.raises(CorruptValueError):
            store.get("b")
        with pytest.raises(CorruptValueError):
            store.modify("b", lambda v: v)
        with pytest.raises(CorruptValueError):
            store.setdefault("b", 0)
        with pytest.raises(CorruptValueError):
            store.pop("b")
        with pytest.raises(CorruptValueError):
            dict(store.items())
        with pytest.raises(CorruptValueError):
            list(store.values())
        assert store.get_many(["a", "b"]) == {"a": 1}
        assert raw.type(dkey) != b"string"  # nothing above changed it
    store["b"] = 20  # SET replaces any type
    assert store["b"] == 20 and dict(store.items()) == {"a": 1, "b": 20, "c": 3, "d": 4}
    raw.delete(dkey)
    raw.sadd(dkey, b"x")
    del store["b"]
    assert raw.exists(dkey) == 0 and dict(store.items()) == {"a": 1, "c": 3, "d": 4}


def test_iteration_under_concurrent_writes(store: RedisStore, prefix: str) -> None:
    stable = {f"s{i:05d}": i for i in range(3000)}
    store.update(stable)
    stop = threading.Event()

    def churn() -> None:
        with RedisStore(REDIS_URL, prefix=prefix) as other:
            i = 0
            while not stop.is_set():
                other[f"c{i}"] = i  # keys before and after the stable ones in the order
                other[f"t{i}"] = i
                if i >= 5:
                    del other[f"c{i - 5}"]
                i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        seen = [k for k, _ in store.items() if k.startswith("s")]
    finally:
        stop.set()
        writer.join()
    assert len(seen) == len(set(seen)) == len(stable)  # each stable key exactly once


@pytest.mark.parametrize(
    ("exc", "write", "retry", "kind"),
    [
        (
            redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
            True,
            True,
            BackendUnavailableError,
        ),
        (redis.TimeoutError("Timeout connecting to server"), True, True, BackendUnavailableError),
        (
            redis.ConnectionError("Error while reading from 127.0.0.1:1 : (104,)"),
            True,
            False,
            UnknownOutcomeError,
        ),
        (
            redis.ConnectionError("Error while reading from 127.0.0.1:1 : (104,)"),
            False,
            True,
            BackendUnavailableError,
        ),
        (redis.TimeoutError("Timeout reading from socket"), True, False, UnknownOutcomeError),
        (
            redis.exceptions.BusyLoadingError("LOADING Redis is loading"),
            True,
            True,
            BackendUnavailableError,
        ),
        (
            redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
            True,
            True,
            BackendUnavailableError,
        ),
        (redis.exceptions.OutOfMemoryError("OOM command not allowed"), True, False, CapacityError),
        (
            redis.AuthenticationError("WRONGPASS invalid username-password pair"),
            False,
            False,
            BackendError,
        ),
        (redis.ResponseError("WRONGTYPE Operation against a key"), False, False, BackendError),
    ],
)
def test_error_classification(exc: Exception, write: bool, retry: bool, kind: type) -> None:
    verdict = classify(exc, write=write, what="op")
    assert verdict.retry is retry
    assert type(verdict.error) is kind


def test_cluster_error_after_a_sent_write_is_unknown() -> None:
    # RedisCluster re-discovers the nodes after a connection error and raises its own
    # exception when that fails: the original error is its __context__.
    exc = redis.exceptions.RedisClusterException("Redis Cluster cannot be connected")
    exc.__context__ = redis.ConnectionError("Error while reading from 127.0.0.1:7000 : (104,)")
    assert type(classify(exc, write=True, what="op").error) is UnknownOutcomeError
    assert classify(exc, write=False, what="op").retry
    exc.__context__ = redis.ConnectionError("Error 111 connecting to 127.0.0.1:7000.")
    assert classify(exc, write=True, what="op").retry  # nothing was sent


@pytest.mark.parametrize("hiredis", [True, False], ids=["hiredis", "redis-py packer"])
def test_direct_commands_with_and_without_hiredis(
    prefix: str, monkeypatch: pytest.MonkeyPatch, hiredis: bool
) -> None:
    """The store's own client sends its hot commands straight onto a pooled connection,
    packed by hiredis when it is installed and by redis-py's own packer otherwise: both
    give the same results, errors included, and leave the connection usable."""
    from mappingstore import _redis

    if not hiredis:
        monkeypatch.setattr(_redis, "_pack_command", None)
    elif _redis._pack_command is None:
        pytest.skip("hiredis is not installed")
    with RedisStore(REDIS_URL, prefix=prefix) as store:
        store["a"] = {"v": 1}
        store.set("t", "x", ttl=60)
        assert store["a"] == {"v": 1} and "a" in store and "zz" not in store
        assert store.get_many(["a", "zz", "t"]) == {"a": {"v": 1}, "t": "x"}
        assert len(store) == 2 and sorted(store) == ["a", "t"]
        del store["t"]
        assert len(store) == 1
        assert store.modify("n", lambda v: v + 1, default=0) == 1
        with pytest.raises(KeyError):
            store["zz"]
        assert store._pool is not None  # the direct path was taken, not execute_command
        store.client.script_flush()  # NOSCRIPT on the next EVALSHA: EVAL, then cached
        store["b"] = 2
        assert dict(store) == {"a": {"v": 1}, "n": 1, "b": 2}
