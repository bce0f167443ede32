"""RedisStore on a real 3-primary Redis Cluster started for this module.

The conformance suite runs on it unchanged; the tests below check what the cluster adds:
a namespace really spreads over several nodes, multi-key operations never raise
``CROSSSLOT``, and ``len``/iteration/``get_many`` cover every primary.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import RedisStore, Store
from mappingstore.errors import InvalidURLError
from mappingstore.testing import StoreFactory, StoreTests
from tests.redis_cluster import RedisClusterProcess, running_cluster

redis = pytest.importorskip("redis")
from redis.cluster import RedisCluster  # noqa: E402

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    with running_cluster(Path(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


@pytest.fixture(scope="module")
def raw(cluster: RedisClusterProcess) -> Iterator[Any]:
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    yield client
    client.close()


def _drop_prefix(raw: Any, prefix: str) -> None:
    for name in list(raw.scan_iter(match=prefix.encode() + b"*", count=1000)):
        raw.delete(name)


@pytest.fixture
def prefix(raw: Any) -> Iterator[str]:
    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    _drop_prefix(raw, name)


@pytest.fixture
def store(cluster: RedisClusterProcess, prefix: str) -> Iterator[RedisStore]:
    with RedisStore(cluster.url, prefix=prefix) as s:
        yield s


class TestRedisCluster(StoreTests):
    """The whole conformance suite on Redis Cluster."""

    persistent = True
    multiprocess = True
    fake_clock = False

    @pytest.fixture
    def factory(self, cluster: RedisClusterProcess, raw: Any) -> Iterator[StoreFactory]:
        run = f"c{uuid.uuid4().hex[:12]}"

        def open_(name: str = "a", **options: Any) -> Store:
            return RedisStore(cluster.url, prefix=f"{run}-{name.encode().hex()}"[:64], **options)

        yield open_
        _drop_prefix(raw, run)


def _keys_per_node(cluster: RedisClusterProcess, prefix: str) -> dict[int, int]:
    counts = {}
    for port in cluster.ports:
        node = redis.Redis(port=port)
        counts[port] = sum(1 for _ in node.scan_iter(match=prefix.encode() + b"*:k:*", count=1000))
        node.close()
    return counts


def test_namespace_spreads_over_nodes(
    cluster: RedisClusterProcess, store: RedisStore, prefix: str
) -> None:
    assert store.cluster
    store.update({f"k{i}": i for i in range(2000)})
    counts = _keys_per_node(cluster, prefix)
    assert sum(counts.values()) == 2000
    assert sum(1 for n in counts.values() if n) > 1, counts
    # len, iteration and get_many see every primary's share
    assert len(store) == 2000
    assert dict(store.items()) == {f"k{i}": i for i in range(2000)}
    assert len(store.get_many(f"k{i}" for i in range(0, 2000, 3))) == len(range(0, 2000, 3))


def test_multi_key_operations_never_cross_slot(
    store: RedisStore, cluster: RedisClusterProcess, prefix: str
) -> None:
    with store.batch():
        for i in range(300):
            store[f"b{i}"] = i
        del store["b0"]
    assert len(store) == 299
    assert store.delete_many([f"b{i}" for i in range(100)]) == 99
    store.set_many({f"t{i}": i for i in range(100)}, ttl=60)
    assert all(ttl is not None for ttl in (store.ttl(f"t{i}") for i in range(0, 100, 10)))
    other = RedisStore(cluster.url, prefix=prefix, namespace="other")
    other.update({"x": 1})
    assert sorted(store.namespaces()) == ["default", "other"]
    store.clear()
    assert len(store) == 0 and other["x"] == 1
    other.close()


def test_cluster_url(cluster: RedisClusterProcess, prefix: str) -> None:
    with mappingstore.open(cluster.url + f"?prefix={prefix}&namespace=u") as s:
        assert isinstance(s, RedisStore) and s.cluster
        s["k"] = 1
        assert s.url.startswith("redis+cluster://")
        with mappingstore.open(s.url, namespace="u") as again:
            assert again["k"] == 1
    with pytest.raises(InvalidURLError):
        RedisStore(cluster.url + "/2")


def test_ready_cluster_client(raw: Any, prefix: str) -> None:
    with RedisStore(client=raw, prefix=prefix) as s:
        assert s.cluster
        s["k"] = 1
        assert s["k"] == 1
    assert raw.ping()


def _increment(url: str, prefix: str, n: int) -> None:
    with RedisStore(url, prefix=prefix) as s:
        for _ in range(n):
            s.modify("n", lambda v: v + 1, default=0)


def test_four_processes_modify_exactly(cluster: RedisClusterProcess, prefix: str) -> None:
    ctx = multiprocessing.get_context("fork")  # nothing is open yet in this process
    procs = [ctx.Process(target=_increment, args=(cluster.url, prefix, 2500)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    with RedisStore(cluster.url, prefix=prefix) as s:
        assert s["n"] == 10_000


def test_fork_reconnects(store: RedisStore) -> None:
    store.update({f"k{i}": i for i in range(50)})
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            store["child"] = len(store)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store["child"] == 50
    assert len(store) == 51


def test_a_key_of_another_redis_type_is_a_corrupt_value(store: RedisStore, raw: Any) -> None:
    """As on one server: the ITER script's type check and GETREC run on the bucket's node."""
    from tests.test_redis import check_keys_of_another_type

    check_keys_of_another_type(store, raw)
