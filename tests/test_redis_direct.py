"""Adversarial tests of two parts of RedisStore: the direct command path (the store's
own standalone client sends GET/MGET/EXISTS/EVALSHA/EVAL straight onto a pooled
connection) and the per-bucket counters behind ``len()`` (kept by every write script;
the COUNT script when a bucket holds expiring keys).

The invariant checked everywhere: every bucket counter equals
``ZCARD(index) + ZCARD(expiries) * 2**32`` (absent when 0), and ``len()`` equals the
number of keys iterated and the COUNT script's answer. Real servers only: the shared one
(db 15, a key prefix per test) and private ``redis-server`` processes for the kills.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import RedisStore, aio
from mappingstore import _redis_lua as lua
from mappingstore._redis_layout import Layout, count_of
from mappingstore.errors import MappingStoreError
from tests.redis_cluster import PrivateRedis, require_binaries
from tests.servers import REDIS_URL

redis = pytest.importorskip("redis")

pytestmark = pytest.mark.redis

SHORT = 0.03  # a TTL that is over by the time the next check runs (the test sleeps past it)
LONG = 600.0  # a TTL that never runs out during a test


def script_count(store: RedisStore) -> int:
    """The COUNT script's answer (what ``len()`` falls back to), bypassing the counters."""
    ns = store.namespace
    return sum(int(n) for n in store._read_all(lua.COUNT, store._groups(ns), []))


def check_counters(client: Any, prefix: str, ns: str) -> list[bytes | None]:
    """Every bucket counter equals ZCARD(I) + ZCARD(X) * 2**32 (absent when 0)."""
    lay = Layout(prefix.encode(), ns)
    pipe = client.pipeline(transaction=True)
    for (ikey, xkey), ckey in zip(lay.pairs, lay.counters, strict=True):
        pipe.zcard(ikey)
        pipe.zcard(xkey)
        pipe.get(ckey)
    replies = pipe.execute()
    counters = []
    for b in range(len(lay.counters)):
        ni, nx, c = replies[3 * b : 3 * b + 3]
        want = ni + (nx << 32)
        assert (int(c) if c is not None else 0) == want, f"bucket {b}: counter {c!r}, want {want}"
        assert c is None or int(c) != 0, f"bucket {b}: a zero counter is left behind"
        counters.append(c)
    return counters


def check_len(store: RedisStore, client: Any, prefix: str) -> int:
    counters = check_counters(client, prefix, store.namespace)
    n = len(store)
    assert n == len(list(store)) == script_count(store)
    fast = count_of(counters)
    assert fast is None or fast == n
    return n


# -- random operation sequences against a model -----------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_counters_follow_random_operations(raw: Any, prefix: str, seed: int) -> None:
    """Random sequences of every write (plain, long and short TTL; expire/persist; pop,
    popitem, setdefault, modify, update, set_many, delete_many; batches mixing sets and
    deletes; clear; purge) keep every counter exact, and len() equals iteration, the COUNT
    script and a model; short TTLs run out between checks, so the fallback path and the
    way back to the MGET (after purge_expired) are both taken."""
    rng = random.Random(seed)
    pool = [f"k{i}" for i in range(40)]
    model: dict[str, Any] = {}
    short: set[str] = set()  # model keys whose short TTL will have run out at the next check
    fell_back = went_back = False
    with RedisStore(REDIS_URL, prefix=prefix, namespace=f"n{seed}") as s:

        def ttl_of() -> tuple[float | None, bool]:
            r = rng.random()
            return (None, False) if r < 0.5 else (LONG, False) if r < 0.85 else (SHORT, True)

        def note(key: str, value: Any, is_short: bool) -> None:
            model[key] = value
            (short.add if is_short else short.discard)(key)

        for step in range(160):
            key = rng.choice(pool)
            op = rng.randrange(14)
            if op == 0:
                ttl, sh = ttl_of()
                s.set(key, step, ttl=ttl)
                note(key, step, sh)
            elif op == 1:
                ttl, sh = ttl_of()
                if key in model:
                    s.expire(key, ttl)
                    note(key, model[key], sh)
                else:
                    with pytest.raises(KeyError):
                        s.expire(key, ttl)
            elif op == 2:
                if key in model:
                    del s[key]
                    del model[key]
                    short.discard(key)
                else:
                    with pytest.raises(KeyError):
                        del s[key]
            elif op == 3:
                assert s.pop(key, None) == model.pop(key, None)
                short.discard(key)
            elif op == 4:
                assert s.setdefault(key, step) == model.setdefault(key, step)
            elif op == 5:
                got = s.modify(key, lambda v: v + 1, default=0)
                model[key] = model.get(key, 0) + 1  # modify keeps the key's expiry
                assert got == model[key]
            elif op == 6:
                with s.batch() as b:
                    for k in rng.sample(pool, 6):
                        if rng.random() < 0.4:
                            b.pop(k, None)
                            model.pop(k, None)
                            short.discard(k)
                        else:
                            ttl, sh = ttl_of()
                            b.set(k, step, ttl=ttl)
                            note(k, step, sh)
            elif op == 7:
                items = {k: step for k in rng.sample(pool, 5)}
                ttl, sh = ttl_of()
                s.set_many(items, ttl=ttl)
                for k, v in items.items():
                    note(k, v, sh)
            elif op == 8:
                items = {k: -step for k in rng.sample(pool, 4)}
                s.update(items)
                for k, v in items.items():
                    note(k, v, False)
            elif op == 9:
                gone = rng.sample(pool, 5)
                assert s.delete_many(gone) == sum(k in model for k in gone)
                for k in gone:
                    model.pop(k, None)
                    short.discard(k)
            elif op == 10 and rng.random() < 0.15:
                s.clear()
                model.clear()
                short.clear()
            elif op == 11:
                s.purge_expired()
            elif op == 12:
                if model:
                    k, v = s.popitem()
                    assert model.pop(k) == v
                else:
                    with pytest.raises(KeyError):
                        s.popitem()
            else:
                assert s.get(key) == model.get(key)
            if short:
                time.sleep(SHORT + 0.02)  # the short TTLs are over (server clock: PXAT)
                for k in short:
                    del model[k]
                short.clear()
            if step % 4 == 0 or step > 150:
                counters = check_counters(raw, prefix, s.namespace)
                fell_back |= count_of(counters) is None
                assert check_len(s, raw, prefix) == len(model)
                assert dict(s.items()) == model
        # Back to the fast path: every expiry removed or run out and purged.
        for k in list(model):
            s.expire(k, None)
        s.purge_expired()
        counters = check_counters(raw, prefix, s.namespace)
        went_back = count_of(counters) == len(model)
        assert check_len(s, raw, prefix) == len(model)
        assert dict(s.items()) == model
    assert fell_back and went_back


def test_expired_then_overwritten_and_pruned(raw: Any, prefix: str) -> None:
    """Keys the server expired itself (index and expiry entries left behind, over 64 per
    bucket so writes prune them), then written again without a TTL, with a TTL, deleted,
    popped: every counter stays exact and len() comes back to the MGET once no expiry is
    left."""
    n = 2000  # ~125 per bucket: over prune's threshold of 64 dead entries
    with RedisStore(REDIS_URL, prefix=prefix) as s:
        # A 1 s TTL: with SHORT, a loaded machine could take longer than the TTL to encode
        # the batch, and keys whose TTL is over before they are written are not written at
        # all (no expiry entries would be left for this test to see pruned). The keys
        # without TTL go first, so their writes cannot prune the others' buckets either.
        s.set_many({f"p{i}": i for i in range(50)})
        s.set_many({f"e{i}": i for i in range(n)}, ttl=1)
        assert count_of(check_counters(raw, prefix, s.namespace)) is None
        time.sleep(1.1)
        assert count_of(check_counters(raw, prefix, s.namespace)) is None
        assert check_len(s, raw, prefix) == 50
        s["e0"] = 0  # no TTL: its dead expiry entry goes, and its bucket prunes
        check_counters(raw, prefix, s.namespace)
        for i in range(3, n, 3):
            s[f"e{i}"] = i
        for i in range(1, n, 3):
            s.set(f"e{i}", i, ttl=LONG)
        with pytest.raises(KeyError):
            del s["e2"]
        assert s.pop("e5", None) is None
        live = 50 + len(range(0, n, 3)) + len(range(1, n, 3))
        assert check_len(s, raw, prefix) == live
        for i in range(1, n, 3):
            s.expire(f"e{i}", None)
        s.purge_expired()
        counters = check_counters(raw, prefix, s.namespace)
        assert count_of(counters) == live
        assert check_len(s, raw, prefix) == live


def test_large_batches_clear_and_a_passed_in_client(raw: Any, prefix: str) -> None:
    """Writes of over 1,000 keys per bucket (the scripts work in slices and sum the slices'
    replies), a clear() in several rounds, and a store on a client passed in (redis-py's
    own command path, no direct pool) keep the counters exact."""
    n = 20_000
    with RedisStore(REDIS_URL, prefix=prefix) as s:
        s.set_many({f"a{i}": i for i in range(n)})
        s.set_many({f"b{i}": i for i in range(n // 4)}, ttl=LONG)
        assert check_len(s, raw, prefix) == n + n // 4
        assert s.delete_many([f"a{i}" for i in range(0, n, 2)] + ["none"]) == n // 2
        s.set_many({f"b{i}": -i for i in range(n // 4)})  # persists them: expiries go
        counters = check_counters(raw, prefix, s.namespace)
        assert count_of(counters) == n // 2 + n // 4 == len(s)
        s.set_many({f"c{i}": i for i in range(3000)}, ttl=LONG)
        s.clear()
        assert check_counters(raw, prefix, s.namespace) == [None] * len(counters)
        assert len(s) == 0 == script_count(s) and list(s) == []
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with RedisStore(client=client, prefix=prefix, namespace="given") as g:
            g.update({f"k{i}": i for i in range(100)})
            g.set("t", 1, ttl=LONG)
            assert g["k7"] == 7 and "k8" in g and g.get_many(["k9", "x"]) == {"k9": 9}
            assert g._pool is None  # not its own client: redis-py's execute_command
            assert check_len(g, raw, prefix) == 101
            del g["t"]
            assert count_of(check_counters(raw, prefix, "given")) == 100 == len(g)
    finally:
        client.close()


# -- threads ------------------------------------------------------------------------------------


def test_threads_hammering_one_store(raw: Any, prefix: str) -> None:
    """8 threads on one store (one connection pool, the direct path): gets, sets, len,
    iteration, modify, pop and batches. Every read of a thread's own key returns what that
    thread wrote (a reply handed to the wrong caller would show), the shared counter is
    exact, and afterwards len() == iteration == the COUNT script == the counters."""
    errors: list[BaseException] = []
    threads_n, rounds = 8, 150
    with RedisStore(REDIS_URL, prefix=prefix) as s:

        def work(t: int) -> None:
            rng = random.Random(t)
            mine: dict[str, Any] = {}
            try:
                for i in range(rounds):
                    key = f"t{t}-{rng.randrange(20)}"
                    r = rng.randrange(9)
                    if r == 0:
                        s[key] = [t, i]
                        mine[key] = [t, i]
                    elif r == 1:
                        s.set(key, [t, i], ttl=LONG)
                        mine[key] = [t, i]
                    elif r == 2:
                        assert s.pop(key, None) == mine.pop(key, None)
                    elif r == 3:
                        assert len(s) >= 0
                    elif r == 4:
                        keys = list(s)
                        assert all(isinstance(k, str) for k in keys)
                    elif r == 5:
                        s.modify("shared", lambda v: v + 1, default=0)
                    elif r == 6:
                        assert s.get_many(list(mine)) == mine
                    elif r == 7:
                        with s.batch() as b:
                            b[key] = [t, -i]
                            b.pop(f"t{t}-x", None)
                        mine[key] = [t, -i]
                    assert s.get(key) == mine.get(key)
                    assert (key in s) == (key in mine)
                assert {k: v for k, v in s.items() if k.startswith(f"t{t}-")} == mine
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert not any(w.is_alive() for w in workers)
        assert not errors, errors
        n = check_len(s, raw, prefix)
        assert n == len(dict(s.items()))
        assert s.get("shared", 0) == _expected_increments(threads_n, rounds)


def _expected_increments(threads_n: int, rounds: int) -> int:
    """How many modify calls the threads' seeded choices make (r == 5)."""
    total = 0
    for t in range(threads_n):
        rng = random.Random(t)
        for _ in range(rounds):
            rng.randrange(20)
            total += rng.randrange(9) == 5
    return total


# -- connections killed, server killed ------------------------------------------------------


@pytest.fixture
def private(tmp_path: Path) -> Iterator[PrivateRedis]:
    require_binaries()
    with PrivateRedis(tmp_path / "redis") as server:
        yield server


def test_client_kill_never_desynchronises_replies(private: PrivateRedis) -> None:
    """Connections of a busy store are killed over and over (CLIENT KILL TYPE normal) while
    4 threads read keys whose value is their own name, and len() / get_many run: every
    answer is right or a mappingstore error, never another command's reply or a raw
    redis-py exception; after the kills stop every read is right again."""
    admin = redis.Redis(port=private.port)
    stop = threading.Event()
    wrong: list[Any] = []
    killed = 0
    raw_errors: list[BaseException] = []
    keys = [f"k{i}" for i in range(64)]
    with RedisStore(private.url, retries=1, socket_timeout=5) as s:
        s.update({k: k for k in keys})

        def reader(t: int) -> None:
            rng = random.Random(t)
            while not stop.is_set():
                k = rng.choice(keys)
                try:
                    r = rng.randrange(5)
                    if r == 0:
                        got = s.get_many([k, "missing", keys[0]])
                        if got != {k: k, keys[0]: keys[0]}:
                            wrong.append(("get_many", k, got))
                    elif r == 1:
                        if (n := len(s)) != len(keys):
                            wrong.append(("len", n))
                    elif r == 2:
                        if k not in s or "missing" in s:
                            wrong.append(("contains", k))
                    elif r == 3:
                        s[k] = k  # rewrite the same value: the data never changes
                    elif (v := s.get(k)) != k:
                        wrong.append(("get", k, v))
                except MappingStoreError:
                    pass
                except BaseException as exc:
                    raw_errors.append(exc)

        workers = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for w in workers:
            w.start()
        try:
            for _ in range(60):
                killed += admin.client_kill_filter(_type="normal", skipme=True)
                time.sleep(0.01)
        finally:
            stop.set()
            for w in workers:
                w.join(60)
        admin.close()
        assert killed > 0  # the readers' connections really were cut under them
        assert s._pool is not None  # ... on the direct path
        assert not raw_errors, raw_errors
        assert not wrong, wrong[:5]
        assert {k: s[k] for k in keys} == {k: k for k in keys}
        assert len(s) == len(list(s)) == script_count(s) == len(keys)
        assert s.get_many(keys) == {k: k for k in keys}


class Interrupted(BaseException):
    """What a signal handler (Ctrl-C's KeyboardInterrupt, a timeout alarm) raises."""


def test_interrupted_command_leaves_no_reply_behind(private: PrivateRedis) -> None:
    """An exception raised between sending a command and reading its reply (a signal
    handler's, at an unlucky moment) while the server is still busy: the connection must
    not go back to the pool with that reply pending, or the next command on it reads the
    previous command's reply (here: another key's value, silently)."""
    admin = redis.Redis(port=private.port)
    with RedisStore(private.url, socket_timeout=10) as s:
        s.update({"a": "value of a", "b": "value of b"})
        pool = s._pool
        assert pool is not None  # the direct path
        conn = s._get_conn()  # the pool's only connection: the next command gets it again
        pool.release(conn)

        def interrupted(*args: Any, **kwargs: Any) -> Any:
            del conn.read_response  # once: the class's method again
            raise Interrupted

        conn.read_response = interrupted
        sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", 0.5))
        sleeper.start()
        try:
            time.sleep(0.1)  # the server sleeps: GET a is queued, its reply comes later
            with pytest.raises(Interrupted):
                s["a"]
            assert s["b"] == "value of b"
            assert s.get_many(["a", "b"]) == {"a": "value of a", "b": "value of b"}
        finally:
            sleeper.join(10)
            admin.close()


def test_server_restart_then_every_read_is_right(private: PrivateRedis) -> None:
    """The server is killed (SIGKILL) and restarted under a store: commands while it is
    down raise mappingstore errors only; after the restart (empty script cache: EVALSHA
    gets NOSCRIPT) reads, len() and writes are right, and the counters survived (AOF)."""
    with RedisStore(private.url, retries=0, socket_timeout=2) as s:
        s.update({f"k{i}": i for i in range(40)})
        s.set("t", "x", ttl=LONG)
        assert len(s) == 41
        private.kill()
        for call in (lambda: s["k1"], lambda: len(s), lambda: s.set("k1", 0), lambda: list(s)):
            with pytest.raises(MappingStoreError):
                call()
        private.start()
        assert s["k1"] == 1
        assert len(s) == len(list(s)) == script_count(s) == 41
        s.expire("t", None)
        admin = redis.Redis(port=private.port)
        try:
            check_counters(admin, "ms", s.namespace)
            assert count_of(admin.mget(Layout(b"ms", s.namespace).counters)) == 41
        finally:
            admin.close()
        del s["k2"]
        assert len(s) == 40 and s.get_many(["k3", "k2"]) == {"k3": 3}


def test_server_killed_under_writes_keeps_counters_exact(
    private: PrivateRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the server (AOF, fsync always) in the middle of a stream of counted
    writes (sets with and without TTL, deletes, batches), twice: after the restart every
    counter still matches its bucket's index and expiry sets (a script's effects, counter
    included, are all in the AOF or none are), and len() is right."""
    from mappingstore import _redis

    # A kill inside delete_many's exclusive section leaves its lease behind (persisted
    # in the AOF): the next section waits for the lease to run out (10 s, documented).
    # A short lease keeps this test short; the lease itself is tested elsewhere.
    monkeypatch.setattr(_redis, "_LOCK_LEASE_MS", 1_000)
    stop = threading.Event()
    raw_errors: list[BaseException] = []
    done = [0]

    def writer() -> None:
        rng = random.Random(7)
        with RedisStore(private.url, retries=0, socket_timeout=2) as w:
            while not stop.is_set():
                k = f"k{rng.randrange(300)}"
                try:
                    r = rng.randrange(4)
                    if r == 0:
                        w.set(k, 1, ttl=LONG if rng.random() < 0.5 else None)
                    elif r == 1:
                        w.pop(k, None)
                    elif r == 2:
                        with w.batch() as b:
                            for j in range(8):
                                b.set(f"{k}-{j}", j, ttl=LONG if j % 2 else None)
                            b.pop(f"k{rng.randrange(300)}", None)
                    else:
                        w.delete_many([f"{k}-{j}" for j in range(4)])
                    done[0] += 1
                except MappingStoreError:
                    time.sleep(0.01)
                except BaseException as exc:
                    raw_errors.append(exc)
                    return

    worker = threading.Thread(target=writer)
    worker.start()
    try:
        for round_ in range(2):
            while done[0] < 200 * (round_ + 1) and worker.is_alive():
                time.sleep(0.005)
            private.kill()
            private.start()
    finally:
        stop.set()
        worker.join(60)
    assert not raw_errors, raw_errors
    assert done[0] >= 400
    admin = redis.Redis(port=private.port)
    try:
        with RedisStore(private.url) as s:
            check_counters(admin, "ms", s.namespace)
            assert count_of(admin.mget(Layout(b"ms", s.namespace).counters)) is None
            assert len(s) == len(list(s)) == script_count(s) > 0
    finally:
        admin.close()


# -- fork ---------------------------------------------------------------------------------------


def test_fork_inherited_and_fresh_store(raw: Any, prefix: str) -> None:
    """A child process uses the store it inherited (its pool reconnects: no socket shared
    with the parent) and a fresh one; both see and write the right data; the parent's
    store keeps working, with the child's writes in len() and the counters."""
    with RedisStore(REDIS_URL, prefix=prefix) as s:
        s.update({f"p{i}": i for i in range(20)})
        assert len(s) == 20 and s["p3"] == 3  # the parent's pool holds a live connection
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                assert s["p4"] == 4 and len(s) == 20
                s.set("child-inherited", 1, ttl=LONG)
                with RedisStore(REDIS_URL, prefix=prefix) as fresh:
                    assert fresh["p5"] == 5 and fresh["child-inherited"] == 1
                    fresh["child-fresh"] = 2
                    assert len(fresh) == 22
                assert s.get_many(["child-fresh", "p6"]) == {"child-fresh": 2, "p6": 6}
                assert len(s) == 22
                code = 0
            finally:
                os._exit(code)
        for i in range(200):  # the parent keeps using its connection meanwhile
            assert s[f"p{i % 20}"] == i % 20
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert s["child-inherited"] == 1 and s["child-fresh"] == 2
        assert check_len(s, raw, prefix) == 22


# -- async --------------------------------------------------------------------------------------


def test_async_len_agrees_with_sync(raw: Any, prefix: str) -> None:
    """The async driver's len() (one MGET of the counters, the COUNT script when keys
    expire) agrees with the sync store's on the same data, through every phase; its writes
    keep the counters exact too."""
    import asyncio

    async def main(s: RedisStore) -> None:
        async with await aio.open(REDIS_URL, prefix=prefix) as a:
            assert a.native == "redis"
            assert await a.len() == len(s) == 0
            await a.set_many({f"a{i}": i for i in range(30)})
            s.update({f"s{i}": i for i in range(30)})
            assert await a.len() == len(s) == 60
            await a.set("t", 1, ttl=SHORT)
            s.set("u", 1, ttl=LONG)
            await asyncio.sleep(SHORT + 0.05)
            assert count_of(check_counters(raw, prefix, s.namespace)) is None
            assert await a.len() == len(s) == script_count(s) == 61
            assert await a.delete_many(["a1", "a2", "s1", "nope"]) == 3
            await a.delete("u")
            assert await a.pop("s2") == 2
            s.purge_expired()
            assert count_of(check_counters(raw, prefix, s.namespace)) == 56
            assert await a.len() == len(s) == len(list(s)) == 56

    with RedisStore(REDIS_URL, prefix=prefix) as s:
        asyncio.run(main(s))
