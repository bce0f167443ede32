"""Issue 8, required test 9: network faults during writes (Redis and PostgreSQL).

A workload of two writer threads on one store runs single ``set``s, ``modify``
increments on shared counters, and multi-key ``batch()``es (a few of them large enough
to take PostgreSQL's ``COPY`` path). Each operation is attempted once, never resent by
the test: the writer records what was acknowledged, what failed and with which exception,
and what was reported :class:`~mappingstore.errors.UnknownOutcomeError`. Meanwhile faults
are injected:

* Redis (a private ``redis-server`` with ``appendonly yes``, ``appendfsync always``):
  ``SIGKILL`` and restart on the same data directory, ``CLIENT KILL`` of every store
  connection, and a slow server (``DEBUG SLEEP``) while the store has a short
  ``socket_timeout``.
* PostgreSQL: the store's own backends (selected by an ``application_name`` unique to the
  test) terminated with ``pg_terminate_backend``, some while idle, some while running a
  statement or sitting inside a transaction; and, through a TCP proxy, connections cut
  right after the client sent a chosen statement (``COMMIT``, a batch's upsert, a
  ``modify``'s row lock, a set) plus whole outages where every connection drops and new
  ones are refused for 0.2 to 8.5 s.

What the library promises, and what is checked afterwards on a fresh connection:

* every acknowledged write is present with its value (0 lost);
* a failure that is *not* ``UnknownOutcomeError`` left nothing behind (0 applied);
* a batch is all or nothing, whatever its outcome (0 half-applied);
* a counter's final value lies between its acknowledged increments and those plus the
  increments reported unknown (``UnknownOutcomeError``: the write may or may not have
  run, and the library never resends it, so it counts at most once): 0 doubled, 0 lost;
* every failure is a documented mappingstore error, here always a
  ``BackendUnavailableError`` (an ``OSError``) or its subclass ``UnknownOutcomeError``;
  0 raw ``redis``/``psycopg``/socket exceptions leak;
* the store recovers by itself: after each fault, the time from the server being back
  (restart answered ``PING``, ``DEBUG SLEEP`` returned, the proxy accepting again, the
  termination done) to the first operation that succeeds is below 5 s, the bound issue 8
  demands. It is a behavioural bound, not a benchmark: it fails only if the store stays
  stuck (a poisoned pool, a reconnect backoff growing without limit, a lost script
  cache); the measured figures are far below it.

Redis Cluster failover (a planned ``CLUSTER FAILOVER`` and a primary killed with
``SIGKILL`` on a 3-primary, 3-replica cluster) is covered by
``tests/test_redis_cluster_failover.py``.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mappingstore import Store
from mappingstore.errors import (
    BackendUnavailableError,
    MappingStoreError,
    UnknownOutcomeError,
)
from tests.faultproxy import FaultProxy
from tests.redis_cluster import PrivateRedis, require_binaries
from tests.servers import POSTGRES_URL
from tests.torture.harness import Target, reps

#: The issue's bound: the store works again within this many seconds of the server's return.
RECOVERY_BOUND = 5.0
#: Counters shared by both writers (so increments race as well as fail).
COUNTERS = 8
WRITERS = 2


# -- the workload ------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What one writer attempted and what it was told."""

    #: single sets: key -> (value, outcome) with outcome "ok", "unknown" or "failed"
    sets: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: batches: (keys, value, outcome)
    batches: list[tuple[tuple[str, ...], int, str]] = field(default_factory=list)
    #: increments per counter, by outcome
    incs: dict[str, Counter[str]] = field(
        default_factory=lambda: {"ok": Counter(), "unknown": Counter(), "failed": Counter()}
    )
    #: failures by exception type name
    failures: Counter[str] = field(default_factory=Counter)
    #: exceptions that are not mappingstore errors (must stay empty)
    leaked: list[str] = field(default_factory=list)
    #: mappingstore errors that are not BackendUnavailableError (must stay empty)
    undocumented: list[str] = field(default_factory=list)
    attempted: int = 0
    acknowledged: int = 0


class Workload:
    """Two writer threads on one store; each operation is attempted exactly once."""

    def __init__(self, store: Store, ops: int, seed: int) -> None:
        self.store = store
        self.ledgers = [Ledger() for _ in range(WRITERS)]
        #: time.monotonic() after every acknowledged operation
        self.ok_times: list[float] = []
        self.threads = [
            threading.Thread(
                target=self._writer,
                args=(w, ops // WRITERS + (w < ops % WRITERS), random.Random(seed + w)),
                daemon=True,
            )
            for w in range(WRITERS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not self.alive(), "a writer hung"

    def progress(self) -> int:
        return sum(ledger.attempted for ledger in self.ledgers)

    def wait_progress(self, target: int) -> bool:
        """Wait until *target* operations were attempted; False if the writers ended."""
        while self.progress() < target:
            if not self.alive():
                return False
            time.sleep(0.002)
        return True

    def recovery_after(self, since: float, timeout: float = 30.0) -> float:
        """Seconds from *since* to the first acknowledged operation after it (inf: none)."""
        deadline = time.monotonic() + timeout
        while True:
            after = [t for t in self.ok_times[-64:] if t >= since]
            if after:
                return min(after) - since
            if not self.alive() or time.monotonic() > deadline:
                return float("inf")
            time.sleep(0.001)

    def _writer(self, w: int, n: int, rng: random.Random) -> None:
        ledger = self.ledgers[w]
        for i in range(n):
            ledger.attempted += 1
            r = rng.random()
            keys: tuple[str, ...]
            if r < 0.45:
                kind, keys = "set", (f"s{w}-{i}",)
            elif r < 0.75:
                kind, keys = "inc", (f"c{rng.randrange(COUNTERS)}",)
            else:  # a few batches large enough for PostgreSQL's COPY path
                size = 1100 if rng.random() < 0.004 else rng.randint(2, 8)
                kind, keys = "batch", tuple(f"b{w}-{i}-{j}" for j in range(size))
            try:
                self._write_once(kind, keys, i)
            except UnknownOutcomeError as exc:
                outcome = "unknown"
                ledger.failures[type(exc).__name__] += 1
            except MappingStoreError as exc:
                outcome = "failed"
                ledger.failures[type(exc).__name__] += 1
                if not isinstance(exc, BackendUnavailableError):
                    ledger.undocumented.append(repr(exc))
            except Exception as exc:  # a raw driver error leaked: outcome unknown
                outcome = "unknown"
                ledger.failures[type(exc).__name__] += 1
                ledger.leaked.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
            else:
                outcome = "ok"
                ledger.acknowledged += 1
                self.ok_times.append(time.monotonic())
            if kind == "set":
                ledger.sets[keys[0]] = (i, outcome)
            elif kind == "inc":
                ledger.incs[outcome][keys[0]] += 1
            else:
                ledger.batches.append((keys, i, outcome))
            if outcome != "ok":
                time.sleep(0.005)  # the server is in trouble: do not spin

    def _write_once(self, kind: str, keys: tuple[str, ...], value: int) -> None:
        store = self.store
        if kind == "set":
            store[keys[0]] = value
        elif kind == "inc":
            store.modify(keys[0], _plus_one, default=0)
        else:
            with store.batch():
                for key in keys:
                    store[key] = value


def _plus_one(value: int) -> int:
    return value + 1


@dataclass
class Verdict:
    """What the store holds afterwards, compared with what the writers were told."""

    attempted: int
    acknowledged: int
    unknown: int
    lost: int  # acknowledged writes (keys, batches, increments) missing or wrong
    failed_but_applied: int  # reported failed (not unknown), yet written
    half_batches: int
    doubled: int  # increments beyond acknowledged + unknown
    unexpected_keys: int
    leaked: list[str]
    undocumented: list[str]
    failures: Counter[str]
    problems: list[str]


def verify(store: Store, work: Workload) -> Verdict:
    data = dict(store.items())
    lost = failed_applied = half = doubled = 0
    known: set[str] = {f"c{c}" for c in range(COUNTERS)}
    incs: dict[str, Counter[str]] = {"ok": Counter(), "unknown": Counter(), "failed": Counter()}
    failures: Counter[str] = Counter()
    problems: list[str] = []
    leaked: list[str] = []
    undocumented: list[str] = []
    for ledger in work.ledgers:
        failures.update(ledger.failures)
        leaked += ledger.leaked
        undocumented += ledger.undocumented
        for out, counts in ledger.incs.items():
            incs[out].update(counts)
        for key, (value, outcome) in ledger.sets.items():
            known.add(key)
            if outcome == "ok" and data.get(key) != value:
                lost += 1
                problems.append(f"acknowledged set {key} lost")
            elif outcome == "failed" and key in data:
                failed_applied += 1
                problems.append(f"set {key} reported failed but applied")
            elif outcome == "unknown" and key in data and data[key] != value:
                lost += 1  # a wrong value is never acceptable
                problems.append(f"set {key} holds {data[key]!r}, not {value!r}")
        for keys, value, outcome in ledger.batches:
            known.update(keys)
            present = sum(1 for key in keys if data.get(key) == value)
            if present not in (0, len(keys)):
                half += 1
                problems.append(f"batch {keys[0]}.. half applied: {present}/{len(keys)}")
            if outcome == "ok" and present != len(keys):
                lost += 1
                problems.append(f"acknowledged batch {keys[0]}.. lost")
            elif outcome == "failed" and present:
                failed_applied += 1
                problems.append(f"batch {keys[0]}.. reported failed but applied")
    for c in range(COUNTERS):
        name = f"c{c}"
        final = data.get(name, 0)
        ok, unknown = incs["ok"][name], incs["unknown"][name]
        lost += max(0, ok - final)
        doubled += max(0, final - ok - unknown)
        if not ok <= final <= ok + unknown:
            problems.append(f"counter {name} = {final}: {ok} acknowledged, {unknown} unknown")
    unexpected = sorted(set(data) - known)
    problems += [f"key {key!r} was never written" for key in unexpected[:5]]
    return Verdict(
        attempted=work.progress(),
        acknowledged=sum(ledger.acknowledged for ledger in work.ledgers),
        unknown=failures["UnknownOutcomeError"] + len(leaked),
        lost=lost,
        failed_but_applied=failed_applied,
        half_batches=half,
        doubled=doubled,
        unexpected_keys=len(unexpected),
        leaked=leaked,
        undocumented=undocumented,
        failures=failures,
        problems=problems,
    )


def report(
    figure: Callable[..., None],
    backend: str,
    verdict: Verdict,
    recovery: dict[str, list[float]],
    faults: dict[str, int],
    hits: int | None = None,
) -> None:
    """Record the figures, then assert every promise (figures first: they help debugging).

    *hits*: how many faults are known to have struck work in flight, where a struck write
    may rightly succeed (a retry that was safe): then the check that the faults reached
    the workload counts those instead of the failures."""
    worst = max((max(times) for times in recovery.values() if times), default=0.0)
    figure("writes attempted", verdict.attempted, backend=backend, **faults)
    figure("writes acknowledged", verdict.acknowledged, backend=backend)
    figure("writes with unknown outcome", verdict.unknown, backend=backend)
    figure("lost acknowledged writes", verdict.lost, backend=backend)
    figure("failed writes applied anyway", verdict.failed_but_applied, backend=backend)
    figure("half-applied batches", verdict.half_batches, backend=backend)
    figure("doubled increments", verdict.doubled, backend=backend)
    figure("raw exceptions leaked", len(verdict.leaked), backend=backend)
    figure("failures by error type", dict(verdict.failures), backend=backend)
    figure(
        "max recovery time (s)",
        round(worst, 3),
        backend=backend,
        by_fault={k: round(max(v), 3) for k, v in recovery.items() if v},
    )
    assert verdict.leaked == [], verdict.leaked[:5]
    assert verdict.undocumented == [], verdict.undocumented[:5]
    assert verdict.problems == [], verdict.problems[:10]
    assert verdict.lost == 0
    assert verdict.failed_but_applied == 0
    assert verdict.half_batches == 0
    assert verdict.doubled == 0
    assert verdict.unexpected_keys == 0
    assert worst < RECOVERY_BOUND, {k: max(v) for k, v in recovery.items() if v}
    # The faults must actually have hit the workload, or the test proves nothing.
    assert (hits if hits is not None else sum(verdict.failures.values())) > 0
    assert verdict.acknowledged > verdict.attempted // 2


# -- Redis -------------------------------------------------------------------------------------


def test_redis_killed_restarted_clients_killed_and_slow(
    tier: str, figure: Callable[..., None], tmp_path: Path
) -> None:
    """A private ``redis-server`` (AOF, ``appendfsync always``) is SIGKILLed and restarted,
    its clients are killed with ``CLIENT KILL``, and it stalls in ``DEBUG SLEEP`` longer
    than the store's 0.25 s ``socket_timeout``, all during the writes: no acknowledged
    write lost, no failed write applied, no batch half-applied, no increment doubled,
    only ``BackendUnavailableError``/``UnknownOutcomeError`` raised, and the same store
    object works again within 5 s of every fault ending."""
    import redis

    from mappingstore import RedisStore

    require_binaries()
    ops = reps(tier, 1000, 10_000)
    rounds = reps(tier, 2, 6)  # each round: one kill+restart, one CLIENT KILL, one DEBUG SLEEP
    rng = random.Random(0x9E7)
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    store: RedisStore | None = None
    try:
        store = RedisStore(server.url, socket_timeout=0.25, namespace="net")
        work = Workload(store, ops, seed=1)
        plan = ["kill", "client-kill", "sleep"] * rounds
        rng.shuffle(plan)
        recovery: dict[str, list[float]] = {"kill": [], "client-kill": [], "sleep": []}
        faults: Counter[str] = Counter()
        work.start()
        for step, fault in enumerate(plan):
            # Spread the faults over the run; the last leaves a tail of writes after it.
            if not work.wait_progress((step + 1) * ops // (len(plan) + 2)):
                break
            if fault == "kill":
                server.kill()
                time.sleep(rng.uniform(0.05, 1.0))  # down for a while: writes must wait
                server.start()  # returns once the server answers PING (AOF loaded)
            else:
                admin = redis.Redis(port=server.port, socket_timeout=10)
                try:
                    if fault == "client-kill":
                        # Every client but this one is the store's (a private server);
                        # a burst, so that some kills land on a command in flight.
                        for _ in range(3):
                            faults["clients killed"] += int(
                                admin.client_kill_filter(_type="normal", skipme=True)
                            )
                            time.sleep(0.003)
                    else:
                        admin.execute_command(  # type: ignore[no-untyped-call]
                            "DEBUG", "SLEEP", f"{rng.uniform(0.4, 1.2):.2f}"
                        )
                finally:
                    admin.close()
            back = time.monotonic()
            faults[fault] += 1
            recovery[fault].append(work.recovery_after(back))
        work.join()
        assert faults["kill"] + faults["client-kill"] + faults["sleep"] == len(plan)
        store.close()
        with RedisStore(server.url, namespace="net") as fresh:
            verdict = verify(fresh, work)
    finally:
        if store is not None:
            store.close()
        server.stop()
    report(
        figure,
        "redis",
        verdict,
        recovery,
        {
            "kills and restarts": faults["kill"],
            "CLIENT KILL bursts": faults["client-kill"],
            "clients killed": faults["clients killed"],
            "DEBUG SLEEPs": faults["sleep"],
        },
    )


# -- PostgreSQL --------------------------------------------------------------------------------


def _terminate(admin: Any, app: str, busy_only: bool) -> int:
    """``pg_terminate_backend`` every session of *app* (our own, never others'); with
    *busy_only*, only those running a statement or inside a transaction."""
    state = " AND state IN ('active', 'idle in transaction')" if busy_only else ""
    rows = admin.execute(
        # In the target list, so it runs only for rows the WHERE clause kept.
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = %s AND pid <> pg_backend_pid()" + state,
        (app,),
    ).fetchall()
    return sum(1 for (ok,) in rows if ok)


@pytest.mark.parametrize("backend", ["postgres"])
def test_postgres_backends_terminated_during_writes(
    backend: str, target: Target, tier: str, figure: Callable[..., None]
) -> None:
    """The store's own PostgreSQL sessions are terminated (``pg_terminate_backend``, picked
    by the store's ``application_name``) at random moments, idle or in the middle of a
    statement or transaction, during sets, increments and batches: no acknowledged write
    lost, no failed write applied, batches all-or-nothing, no increment doubled, only
    ``BackendUnavailableError``/``UnknownOutcomeError`` raised, and the same store works
    again within 5 s of every termination."""
    import psycopg

    ops = reps(tier, 600, 6000)  # with the proxy test's 4,000: 10,000 writes under faults
    # A termination costs the store a new session (a server process): at most one per
    # ~50 ms on average keeps the long tier's 10,000 writes within its time budget.
    gap = 0.06 if tier == "fast" else 0.1
    app = f"msnet{uuid.uuid4().hex[:10]}"
    rng = random.Random(0x9E8)
    store = target.open(
        application_name=app, pool_min_size=2, pool_max_size=4, pool_timeout=5, namespace="net"
    )
    work = Workload(store, ops, seed=2)
    recovery: dict[str, list[float]] = {"terminate idle or busy": [], "terminate busy": []}
    faults: Counter[str] = Counter()
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        work.start()
        while work.alive():
            time.sleep(rng.uniform(0.0, gap))
            busy = rng.random() < 0.6
            killed = 0
            for _ in range(50 if busy else 1):  # poll until a session is caught working
                killed = _terminate(admin, app, busy_only=busy)
                if killed or not work.alive():
                    break
            if not killed:
                continue
            back = time.monotonic()
            faults["sessions terminated"] += killed
            faults["terminate busy" if busy else "terminate idle or busy"] += 1
            rec = work.recovery_after(back)
            if rec != float("inf") or work.alive():
                recovery["terminate busy" if busy else "terminate idle or busy"].append(rec)
    work.join()
    store.close()
    verdict = verify(target.open(namespace="net"), work)
    report(
        figure,
        "postgres",
        verdict,
        recovery,
        {
            "terminations": faults["terminate idle or busy"] + faults["terminate busy"],
            "of busy sessions": faults["terminate busy"],
            "sessions terminated": faults["sessions terminated"],
        },
        # A session terminated while running a statement or inside a transaction struck
        # a write in flight; the store retries it when that is safe (nothing was
        # committed), so every struck write may well succeed.
        hits=faults["terminate busy"],
    )


#: Statements to cut a connection after: a COMMIT (of a batch or a modify), a batch's
#: upsert before its COMMIT, a modify's row lock, a single set (its prepared statement's
#: name in the Bind message).
_MARKERS = (b"COMMIT", b"unnest", b"FOR UPDATE", b"_put")


@pytest.mark.parametrize("backend", ["postgres"])
def test_postgres_connections_cut_and_outages_during_writes(
    backend: str, target: Target, tier: str, figure: Callable[..., None]
) -> None:
    """Through a TCP proxy, the store's connections are cut right after it sent a
    ``COMMIT``, a batch's upsert, a ``modify``'s row lock or a set (the server acts, the
    reply never arrives), and the whole server disappears for 0.2 to 8.5 s (every connection
    dropped, new ones refused): acknowledged writes all there, failed ones absent, batches
    all-or-nothing, increments never doubled, only ``BackendUnavailableError``/
    ``UnknownOutcomeError`` raised, and the store works again within 5 s of the server
    coming back."""
    import mappingstore

    ops = reps(tier, 600, 4000)
    rounds = reps(tier, 1, 5)  # each round: a cut per marker, two outages (one after a cut)
    split = urllib.parse.urlsplit(target.url)
    user = split.netloc.rpartition("@")[0]
    proxy = FaultProxy(split.hostname or "127.0.0.1", split.port or 5432, settle=0.1)
    via = split._replace(
        netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
    )
    rng = random.Random(0x9E9)
    # (marker to cut after or None, outage seconds or 0): cuts alone, outages alone
    # (short ones that a waiting operation rides out, and ones longer than the 2 s
    # pool_timeout that make operations fail), and a COMMIT cut followed at once by an
    # outage, so that the store cannot ask the server what became of the transaction.
    plan: list[tuple[bytes | None, float]] = []
    for _ in range(rounds):
        plan += [(marker, 0.0) for marker in _MARKERS]
        plan += [(None, rng.uniform(0.2, 1.0)), (b"COMMIT", rng.uniform(2.2, 3.5))]
    # Longer than psycopg_pool's first reconnection delays (1 + 2 + 4 s): it found the
    # server again only ~7 s after such an outage before _postgres capped its backoff.
    plan.append((None, rng.uniform(7.5, 8.5)))
    rng.shuffle(plan)
    recovery: dict[str, list[float]] = {"cut": [], "outage": []}
    faults: Counter[str] = Counter()
    store = mappingstore.open(
        urllib.parse.urlunsplit(via),
        pool_min_size=2,
        pool_max_size=4,
        pool_timeout=2,
        namespace="net",
    )
    work = Workload(store, ops, seed=3)
    try:
        work.start()
        for step, (marker, outage) in enumerate(plan):
            if not work.wait_progress((step + 1) * ops // (len(plan) + 2)):
                break
            if marker is not None:
                cuts = proxy.cuts
                proxy.cut_after(marker)
                deadline = time.monotonic() + 10
                while proxy.cuts == cuts and work.alive() and time.monotonic() < deadline:
                    time.sleep(0.0005)
                proxy.cut_after(None)
                if proxy.cuts > cuts:
                    faults["cuts"] += 1
                elif not outage:
                    continue  # the writers ended (or never sent it): no fault to measure
            if outage:
                proxy.down()
                time.sleep(outage)
                proxy.up()
                faults["outages"] += 1
            back = time.monotonic()
            recovery["outage" if outage else "cut"].append(work.recovery_after(back))
        work.join()
    finally:
        store.close()
        proxy.close()
    verdict = verify(target.open(namespace="net"), work)
    report(
        figure,
        "postgres",
        verdict,
        recovery,
        {"outages": faults["outages"], "connections cut": faults["cuts"]},
    )
    assert faults["outages"] == 2 * rounds + 1
    assert faults["cuts"] >= (len(_MARKERS) + 1) * rounds * 3 // 4


@pytest.mark.parametrize("backend", ["postgres"])
def test_postgres_set_lost_then_server_gone_is_unknown_outcome(
    backend: str, target: Target, figure: Callable[..., None]
) -> None:
    """A set whose connection is cut after the server received (and applied) it, with the
    server unreachable for the one retry, must raise ``UnknownOutcomeError``: a plain
    ``BackendUnavailableError`` says nothing was written, which is false here. (Defect
    found by the workload tests: ``PostgresStore._write`` raised the plain error.)"""
    import mappingstore

    split = urllib.parse.urlsplit(target.url)
    user = split.netloc.rpartition("@")[0]
    proxy = FaultProxy(split.hostname or "127.0.0.1", split.port or 5432, settle=0.1)
    via = split._replace(
        netloc=f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
    )
    store = mappingstore.open(
        urllib.parse.urlunsplit(via), pool_min_size=1, pool_max_size=1, pool_timeout=1
    )
    try:
        store["k"] = 0  # prepares the set's statement on the one pooled connection
        proxy.cut_after(b"_put", then_down=True)  # its name is in the Bind message
        with pytest.raises(UnknownOutcomeError) as info:
            store["k"] = 1
        assert proxy.cuts == 1
    finally:
        store.close()
        proxy.close()
    assert target.open()["k"] == 1  # it was applied, though never acknowledged
    figure("set cut then server gone: error raised", type(info.value).__name__, backend=backend)
