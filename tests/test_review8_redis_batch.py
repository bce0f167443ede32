"""A batch holding a read-modify-write never overwrites another client's update on Redis.

``Store.batch()`` commits a batch that read records (``modify``, ``pop``,
``setdefault``...) by checking, under the store lock, that each is still what the batch
saw, then writing. Single-key writes of other clients (``set``, ``delete``, ``modify``'s
compare-and-set) never take that lock, so one could land between the check and the write
and be overwritten. RedisStore repeats the check on the server, in the script that writes
(GAPPLY): a record that changed makes the commit raise ``BatchConflictError`` and write
nothing.

The races are made deterministic: the batch's store runs the competing write (another
``RedisStore`` on the same server) from inside its own ``_apply``, i.e. after the commit's
check and before its write script.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import RedisStore
from mappingstore._redis_layout import bucket
from mappingstore.errors import BatchConflictError
from tests.redis_cluster import RedisClusterProcess, running_cluster
from tests.servers import REDIS_URL

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.redis

NS = "review8-batch"


def _open(url: str, prefix: str) -> RedisStore:
    return RedisStore(url, prefix=prefix, namespace=NS)


def _race(store: RedisStore, competing: Callable[[], None]) -> list[int]:
    """Make the next ``_apply`` of *store* (the write of a batch's commit, after its
    check) run *competing* first, once; returns a list that counts the runs."""
    real = store._apply
    runs: list[int] = []

    def apply(ops: Any) -> None:
        if not runs:
            runs.append(1)
            competing()
        real(ops)

    store._apply = apply  # type: ignore[method-assign]
    return runs


def _keys_in_other_buckets(avoid: set[int], n: int) -> list[str]:
    """*n* keys whose buckets are none of *avoid*, spread over the other buckets."""
    out: list[str] = []
    i = 0
    while len(out) < n:
        name = f"w{i}"
        if bucket(name.encode()) not in avoid:
            out.append(name)
        i += 1
    return out


def _other_bucket_key(of: str, stem: str) -> str:
    """A key named from *stem* whose bucket differs from the bucket of *of*."""
    i = 0
    while True:
        name = f"{stem}{i}"
        if bucket(name.encode()) != bucket(of.encode()):
            return name
        i += 1


# -- the checks, on a standalone server and on a cluster --------------------------------


def check_update_in_window_is_not_lost(a: RedisStore, b: RedisStore) -> None:
    a["n"] = 0
    others = _keys_in_other_buckets({bucket(b"n")}, 20)
    runs = _race(a, lambda: b.modify("n", lambda v: v + 100))

    def run() -> None:
        with a.batch():
            a.modify("n", lambda v: v + 1)
            for k in others:
                a[k] = "batch"

    with pytest.raises(BatchConflictError):
        run()
    assert runs == [1]
    assert b["n"] == 100  # the competing update stands
    assert all(k not in b for k in others)  # nothing of the batch was written
    run()  # run again: it now commits on top of the competing update
    assert b["n"] == 101
    assert all(b[k] == "batch" for k in others)


def check_key_created_in_window_is_not_overwritten(a: RedisStore, b: RedisStore) -> None:
    others = _keys_in_other_buckets({bucket(b"k")}, 20)

    def create() -> None:
        b["k"] = "theirs"

    runs = _race(a, create)

    def run() -> None:
        with a.batch():
            assert a.setdefault("k", "mine") == "mine"  # read: missing
            for k in others:
                a[k] = "batch"

    with pytest.raises(BatchConflictError):
        run()
    assert runs == [1]
    assert b["k"] == "theirs"
    assert all(k not in b for k in others)


def check_key_deleted_in_window(a: RedisStore, b: RedisStore) -> None:
    a["d"] = 1
    runs = _race(a, lambda: b.__delitem__("d"))

    def run() -> None:
        with a.batch():
            a.modify("d", lambda v: v + 1)
            a["side"] = 1

    with pytest.raises(BatchConflictError):
        run()
    assert runs == [1]
    assert "d" not in b
    assert "side" not in b


def check_guard_in_unwritten_slot(a: RedisStore, b: RedisStore) -> None:
    """``pop`` of a missing key reads it and writes nothing: its guard's slot may be
    written by no other op of the batch (on a cluster, checked in a script of its own)."""
    gone = "gone"
    writes = _keys_in_other_buckets({bucket(gone.encode())}, 20)

    def create() -> None:
        b[gone] = "theirs"

    runs = _race(a, create)

    def run() -> None:
        with a.batch():
            assert a.pop(gone, None) is None
            for k in writes:
                a[k] = "batch"

    with pytest.raises(BatchConflictError):
        run()
    assert runs == [1]
    assert b[gone] == "theirs"
    assert all(k not in b for k in writes)


def check_two_guarded_slots(a: RedisStore, b: RedisStore, changed: int) -> None:
    """Two read-modify-writes in two buckets (on a cluster, two slots): a competing update
    of either one fails the whole batch, whichever slot is written first."""
    first = "p"
    second = _other_bucket_key(first, "q")
    keys = [first, second]
    for k in keys:
        a[k] = 0
    others = _keys_in_other_buckets({bucket(k.encode()) for k in keys}, 20)
    target = keys[changed]
    runs = _race(a, lambda: b.modify(target, lambda v: v + 100))

    def run() -> None:
        with a.batch():
            for k in keys:
                a.modify(k, lambda v: v + 1)
            for k in others:
                a[k] = "batch"

    with pytest.raises(BatchConflictError):
        run()
    assert runs == [1]
    assert b[target] == 100
    assert b[keys[1 - changed]] == 0
    assert all(k not in b for k in others)


def check_no_false_conflicts(a: RedisStore, b: RedisStore) -> None:
    # Unchanged records (present, missing, expired) commit.
    a["x"] = 1
    a.set("short", 1, ttl=0.05)
    for _ in range(400):  # the server expires it; no timing assertion, only a bound
        if "short" not in b:
            break
        time.sleep(0.01)
    assert "short" not in b
    others = _keys_in_other_buckets({bucket(b"x"), bucket(b"y"), bucket(b"short")}, 10)
    with a.batch():
        a.modify("x", lambda v: v + 1)
        assert a.setdefault("y", 5) == 5
        assert a.pop("short", None) is None  # expired: read as missing, guarded as missing
        assert a.setdefault("short", 7) == 7
        for k in others:
            a[k] = 1
    assert b["x"] == 2
    assert b["y"] == 5
    assert b["short"] == 7
    assert all(b[k] == 1 for k in others)
    # A nested batch joins the outer one: one guarded commit at the end.
    with a.batch():
        with a.batch():
            a.modify("x", lambda v: v + 1)
        a.modify("x", lambda v: v + 1)
    assert b["x"] == 4
    # A batch without reads still commits (plain APPLY), and one that raises writes nothing.
    with a.batch():
        a["plain"] = 1

    def failing() -> None:
        with a.batch():
            a.modify("x", lambda v: v + 1)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        failing()
    assert b["x"] == 4
    assert b["plain"] == 1


def check_counter(url: str, prefix: str, per_worker: int = 300) -> None:
    """Two clients increment one counter: one in batches (retried on conflict), one with
    plain ``modify``; no increment is lost."""
    with _open(url, prefix) as s:
        s["n"] = 0
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def batched() -> None:
        try:
            with _open(url, prefix) as s:
                start.wait()
                done = 0
                while done < per_worker:
                    try:
                        with s.batch():
                            s.modify("n", lambda v: v + 1)
                    except BatchConflictError:
                        continue
                    done += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def plain() -> None:
        try:
            with _open(url, prefix) as s:
                start.wait()
                for _ in range(per_worker):
                    s.modify("n", lambda v: v + 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=batched), threading.Thread(target=plain)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with _open(url, prefix) as s:
        assert s["n"] == 2 * per_worker


# -- standalone server -------------------------------------------------------------------


@pytest.fixture
def pair(prefix: str) -> Iterator[tuple[RedisStore, RedisStore]]:
    """The batch's store and a competing client's store (another instance, own pool)."""
    with _open(REDIS_URL, prefix) as a, _open(REDIS_URL, prefix) as b:
        yield a, b


def test_update_in_window_is_not_lost(pair: tuple[RedisStore, RedisStore]) -> None:
    check_update_in_window_is_not_lost(*pair)


def test_key_created_in_window_is_not_overwritten(pair: tuple[RedisStore, RedisStore]) -> None:
    check_key_created_in_window_is_not_overwritten(*pair)


def test_key_deleted_in_window(pair: tuple[RedisStore, RedisStore]) -> None:
    check_key_deleted_in_window(*pair)


def test_guard_in_unwritten_slot(pair: tuple[RedisStore, RedisStore]) -> None:
    check_guard_in_unwritten_slot(*pair)


@pytest.mark.parametrize("changed", [0, 1])
def test_two_guarded_slots(pair: tuple[RedisStore, RedisStore], changed: int) -> None:
    check_two_guarded_slots(*pair, changed)


def test_no_false_conflicts(pair: tuple[RedisStore, RedisStore]) -> None:
    check_no_false_conflicts(*pair)


def test_counter_batch_and_plain_modify(prefix: str) -> None:
    check_counter(REDIS_URL, prefix)


# -- Redis Cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    with running_cluster(Path(tmp_path_factory.mktemp("cluster"))) as running:
        yield running


@pytest.fixture
def cprefix(cluster: RedisClusterProcess) -> Iterator[str]:
    from redis.cluster import RedisCluster

    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    client = RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        for key in list(client.scan_iter(match=name.encode() + b"*", count=1000)):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def cpair(cluster: RedisClusterProcess, cprefix: str) -> Iterator[tuple[RedisStore, RedisStore]]:
    with _open(cluster.url, cprefix) as a, _open(cluster.url, cprefix) as b:
        assert a.cluster
        yield a, b


def test_cluster_update_in_window_is_not_lost(cpair: tuple[RedisStore, RedisStore]) -> None:
    check_update_in_window_is_not_lost(*cpair)


def test_cluster_key_created_in_window(cpair: tuple[RedisStore, RedisStore]) -> None:
    check_key_created_in_window_is_not_overwritten(*cpair)


def test_cluster_key_deleted_in_window(cpair: tuple[RedisStore, RedisStore]) -> None:
    check_key_deleted_in_window(*cpair)


def test_cluster_guard_in_unwritten_slot(cpair: tuple[RedisStore, RedisStore]) -> None:
    check_guard_in_unwritten_slot(*cpair)


@pytest.mark.parametrize("changed", [0, 1])
def test_cluster_two_guarded_slots(cpair: tuple[RedisStore, RedisStore], changed: int) -> None:
    check_two_guarded_slots(*cpair, changed)


def test_cluster_no_false_conflicts(cpair: tuple[RedisStore, RedisStore]) -> None:
    check_no_false_conflicts(*cpair)


def test_cluster_counter_batch_and_plain_modify(cluster: RedisClusterProcess, cprefix: str) -> None:
    check_counter(cluster.url, cprefix)
