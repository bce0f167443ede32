"""The Redis store's cross-client lock for multi-step writes: a lease that its live
holder renews and that frees itself when the holder dies (real server on 127.0.0.1)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from mappingstore import RedisStore
from tests.servers import REDIS_URL, redis_client

pytest.importorskip("redis")


@pytest.fixture
def short_lease(monkeypatch: pytest.MonkeyPatch) -> int:
    from mappingstore import _redis

    monkeypatch.setattr(_redis, "_LOCK_LEASE_MS", 600)
    return 600


def test_a_long_section_keeps_its_lease_and_excludes_other_clients(
    raw: Any, prefix: str, short_lease: int
) -> None:
    with RedisStore(REDIS_URL, prefix=prefix) as a, RedisStore(REDIS_URL, prefix=prefix) as b:
        lock_key = f"{prefix}:lock".encode()
        entered = threading.Event()
        order: list[str] = []

        def other() -> None:
            entered.wait(5)
            with b._exclusive():  # another client: waits for the whole section
                order.append("b")

        t = threading.Thread(target=other)
        t.start()
        with a._exclusive():
            token = raw.get(lock_key)
            assert token is not None and raw.pttl(lock_key) <= short_lease
            entered.set()
            time.sleep(short_lease * 3 / 1000)  # three leases: renewed, never lost
            assert raw.get(lock_key) == token and raw.pttl(lock_key) > 0
            order.append("a")
        t.join(10)
        assert order == ["a", "b"]
        assert raw.exists(lock_key) == 0  # released, not left to expire


def test_a_dead_holders_lease_runs_out_within_one_lease(
    raw: Any, prefix: str, short_lease: int
) -> None:
    lock_key = f"{prefix}:lock".encode()
    # A holder that died inside its section: its lease is there, nobody renews it.
    raw.set(lock_key, os.urandom(16), px=short_lease)
    with RedisStore(REDIS_URL, prefix=prefix) as s:
        start = time.monotonic()
        with s._exclusive():
            waited = time.monotonic() - start
        assert 0.2 < waited < short_lease / 1000 + 1.0
        # Multi-step writes (delete_many takes the lock) go on normally afterwards.
        s.update({"a": 1, "b": 2, "c": 3})
        assert s.delete_many(["a", "b"]) == 2
        assert dict(s) == {"c": 3}


def test_sections_stay_reentrant_and_renewals_stop_after_release(
    raw: Any, prefix: str, short_lease: int
) -> None:
    from mappingstore._redis import _RENEWER

    with RedisStore(REDIS_URL, prefix=prefix) as s:
        with s._exclusive(), s._exclusive():
            s["k"] = 1
            assert len(_RENEWER._held) >= 1
        assert _RENEWER._held == {}  # nothing renewed after the section
        assert s["k"] == 1


def test_a_forked_child_renews_its_own_sections(raw: Any, prefix: str, short_lease: int) -> None:
    with RedisStore(REDIS_URL, prefix=prefix) as s, s._exclusive():
        pass  # the parent's renewer thread exists now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            own = redis_client()  # not the parent's connections
            with RedisStore(REDIS_URL, prefix=prefix) as c, c._exclusive():
                time.sleep(short_lease * 2 / 1000)
                code = 0 if own.exists(f"{prefix}:lock".encode()) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
