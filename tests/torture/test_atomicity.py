"""Issue 8, test 4: atomicity of read-modify-write across processes, on every backend
several processes can share (and on Redis Cluster in the long tier).

Each test starts all its worker processes first; every worker opens its own store and
then waits on one barrier, so the operations really race instead of running one after
the other as the processes happen to start. Workers report what they saw (values
returned, keys won, values popped) and the parent checks the union against the store:

- ``modify``: 2 processes x 10,000 increments of one counter end at exactly 20,000, and
  the values ``modify`` returned are exactly 1..20,000 (no increment seen twice);
- ``setdefault``: 8 processes racing on 1,000 fresh keys produce exactly one winner per
  key, every loser got the winner's value back, and the stored value is the winner's;
- ``pop``: 8 processes popping the same 10,000 keys pop each key exactly once, with its
  value, and the store ends empty.

The fast tier runs the same tests with smaller counts; the long tier (``-m torture``)
runs the issue's figures on every backend.
Directory and INI stores run with ``durable=False`` (same locks, no ``fsync``).
"""

from __future__ import annotations

import json
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import Store
from tests.torture.harness import FORK, MULTIPROCESS, Target, make_target

#: File backends opened with ``durable=False`` here: the two ``fsync`` calls per write
#: take no part in atomicity (the same locks are taken) and would dominate the run time.
NO_FSYNC = ("dir", "ini")

#: How long the parent waits for the workers of one test (a deadlock fails the test).
JOIN_TIMEOUT = 240.0
#: How long a worker waits at the start barrier for the others.
BARRIER_TIMEOUT = 60.0


def _cases() -> list[Any]:
    """``(backend, tier)``: every multi-process backend in both tiers, plus Redis
    Cluster in the long tier only (it starts a private 3-node cluster)."""
    cases: list[Any] = [pytest.param(b, "fast", id=f"{b}-fast") for b in MULTIPROCESS]
    cases += [
        pytest.param(b, "long", marks=pytest.mark.torture, id=f"{b}-long") for b in MULTIPROCESS
    ]
    cases.append(
        pytest.param(
            "redis-cluster",
            "long",
            marks=[pytest.mark.torture, pytest.mark.redis],
            id="redis-cluster-long",
        )
    )
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a private 3-primary Redis Cluster, started once for this module."""
    from tests.redis_cluster import running_cluster

    with running_cluster(Path(tmp_path_factory.mktemp("cluster"))) as running:
        yield running.url


@pytest.fixture
def where(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Target]:
    """A fresh location on *backend*; ``redis-cluster`` is a key prefix on the cluster."""
    if backend != "redis-cluster":
        made = make_target(backend, tmp_path)
        if backend in NO_FSYNC:
            made.url += "?durable=false"
        try:
            yield made
        finally:
            made.cleanup()
        return
    url = request.getfixturevalue("cluster_url")
    name = f"tt{uuid.uuid4().hex[:12]}"
    made = Target(backend, f"{url}?prefix={name}", name=name)
    try:
        yield made
    finally:
        made.cleanup()
        from redis.cluster import RedisCluster

        host, port = url.split("://", 1)[1].split(",")[0].split(":")
        client = RedisCluster(host=host, port=int(port))
        try:
            for key in list(client.scan_iter(match=name.encode() + b"*", count=1000)):
                client.delete(key)
        finally:
            client.close()


def _count(tier: str, fast: int, long: int) -> int:
    return fast if tier == "fast" else long


# -- running racing workers -----------------------------------------------------------------

Work = Callable[[Store, int, Any], Any]


def _worker(work: Work, url: str, index: int, arg: Any, barrier: Any, out: str) -> None:
    """Body of one worker process: open, wait for the others, race, report as JSON."""
    try:
        with mappingstore.open(url) as store:
            barrier.wait(BARRIER_TIMEOUT)
            result = work(store, index, arg)
        Path(out).write_text(json.dumps({"ok": result}))
    except BaseException:
        Path(out).write_text(json.dumps({"error": traceback.format_exc()}))
        raise


def race(target: Target, tmp_path: Path, procs: int, work: Work, arg: Any) -> list[Any]:
    """Run *work* in *procs* processes started together; return their results in order.

    Fails the test if a worker raises, exits badly or is still running after
    :data:`JOIN_TIMEOUT` (then it is killed).
    """
    barrier = FORK.Barrier(procs)
    run = uuid.uuid4().hex[:8]
    outs = [str(tmp_path / f"worker-{run}-{i}.json") for i in range(procs)]
    workers = [
        FORK.Process(target=_worker, args=(work, target.url, i, arg, barrier, outs[i]))
        for i in range(procs)
    ]
    for proc in workers:
        proc.start()
    problems: list[str] = []
    for i, proc in enumerate(workers):
        proc.join(JOIN_TIMEOUT)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            problems.append(f"worker {i} still running after {JOIN_TIMEOUT:g} s (killed)")
    results: list[Any] = []
    for i, (proc, out) in enumerate(zip(workers, outs, strict=True)):
        try:
            report = json.loads(Path(out).read_text())
        except FileNotFoundError:
            problems.append(f"worker {i} exited {proc.exitcode} without a report")
            continue
        if "error" in report:
            problems.append(f"worker {i} failed:\n{report['error']}")
        elif proc.exitcode != 0:
            problems.append(f"worker {i} exited {proc.exitcode}")
        results.append(report.get("ok"))
    assert not problems, "\n".join(problems)
    return results


def _order(keys: list[str], index: int) -> list[str]:
    """The order worker *index* walks *keys* in: ascending or descending. Each half of
    the workers races in lockstep on every key (a worker that lost a key skips ahead
    cheaply and catches up with the winner), and the halves cross in the middle."""
    return list(keys) if index % 2 == 0 else keys[::-1]


# -- (a) modify -----------------------------------------------------------------------------


def _increment(store: Store, index: int, n: int) -> list[int]:
    return [store.modify("counter", lambda v: v + 1, default=0) for _ in range(n)]


@pytest.mark.parametrize(("backend", "tier"), CASES)
def test_modify_increments_are_never_lost(
    backend: str, tier: str, where: Target, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """2 processes x N ``modify`` increments of one counter end at exactly 2N, and the
    values ``modify`` returned are exactly 1..2N: no increment was lost or applied to a
    value another process had already incremented (long tier: N = 10,000)."""
    n = _count(tier, 200, 10_000)
    results = race(where, tmp_path, 2, _increment, n)
    with where.open() as store:
        final = store["counter"]
    returned = sorted(v for seen in results for v in seen)
    duplicates = len(returned) - len(set(returned))
    figure("increments", 2 * n, backend=backend, processes=2)
    figure("final counter", final, backend=backend, expected=2 * n)
    figure("lost increments", 2 * n - final, backend=backend)
    assert final == 2 * n
    assert duplicates == 0, f"{duplicates} values returned by more than one modify"
    assert returned == list(range(1, 2 * n + 1))


# -- (b) setdefault -------------------------------------------------------------------------


def _claim(store: Store, index: int, keys: list[str]) -> dict[str, str]:
    mine = f"w{index}"
    return {key: store.setdefault(key, mine) for key in _order(keys, index)}


@pytest.mark.parametrize(("backend", "tier"), CASES)
def test_setdefault_has_exactly_one_winner(
    backend: str, tier: str, where: Target, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """8 processes racing ``setdefault(key, own_value)`` on K fresh keys: every key has
    exactly one winner (the process whose own value came back), every loser got the
    winner's value back, and the stored value is the winner's (long tier: K = 1,000)."""
    procs = 8
    k = _count(tier, 50, 1_000)
    keys = [f"key{i:05d}" for i in range(k)]
    results = race(where, tmp_path, procs, _claim, keys)
    with where.open() as store:
        stored = dict(store)
    winners = Counter(
        key for i, seen in enumerate(results) for key, v in seen.items() if v == f"w{i}"
    )
    doubled = sorted(key for key, wins in winners.items() if wins > 1)
    unwon = sorted(set(keys) - set(winners))
    disagree = sorted(
        key for seen in results for key, v in seen.items() if key not in stored or v != stored[key]
    )
    figure("keys raced", k, backend=backend, processes=procs)
    figure("winners", sum(winners.values()), backend=backend, expected=k)
    figure("keys with two winners", len(doubled), backend=backend)
    assert sorted(stored) == keys
    assert not doubled, f"keys won twice: {doubled[:10]}"
    assert not unwon, f"keys nobody won: {unwon[:10]}"
    assert sum(winners.values()) == k
    assert not disagree, f"setdefault returned a value that is not the stored one: {disagree[:10]}"


# -- (c) pop --------------------------------------------------------------------------------


def _take(store: Store, index: int, keys: list[str]) -> dict[str, Any]:
    got: dict[str, Any] = {}
    for key in _order(keys, index):
        try:
            got[key] = store.pop(key)
        except KeyError:
            pass  # another process popped it first: a loss
    return got


@pytest.mark.parametrize(("backend", "tier"), CASES)
def test_pop_takes_each_key_exactly_once(
    backend: str, tier: str, where: Target, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """8 processes each try to ``pop`` every one of N keys: each key is popped exactly
    once, by one process, with its value; the others get ``KeyError``; the store ends
    empty (long tier: N = 10,000)."""
    procs = 8
    n = _count(tier, 100, 10_000)
    keys = [f"key{i:05d}" for i in range(n)]
    with where.open() as store:
        store.update({key: [key, i] for i, key in enumerate(keys)})  # one write
        assert len(store) == n
    results = race(where, tmp_path, procs, _take, keys)
    with where.open() as store:
        left = list(store)
    popped = Counter(key for got in results for key in got)
    twice = sorted(key for key, times in popped.items() if times > 1)
    never = sorted(set(keys) - set(popped))
    value = {key: [key, i] for i, key in enumerate(keys)}
    wrong = sorted(key for got in results for key, v in got.items() if v != value[key])
    figure("keys popped", sum(popped.values()), backend=backend, keys=n, processes=procs)
    figure("keys popped twice", len(twice), backend=backend)
    figure("keys never popped", len(never), backend=backend)
    assert not twice, f"keys popped by two processes: {twice[:10]}"
    assert not never, f"keys nobody popped: {never[:10]}"
    assert not wrong, f"popped with a wrong value: {wrong[:10]}"
    assert left == [], f"{len(left)} keys left in the store"
