"""The file backends' write lock: one per lock file in a process, shared by its stores.

``flock`` excludes open file descriptions, so with a lock each, two stores of one file
would exclude each other even in one thread: a write through the second from inside a
write of the first (a ``modify`` function, say) waited for itself.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mappingstore import DirectoryStore, IniStore, Store
from mappingstore._filelock import LockHandle
from mappingstore.errors import LockTimeoutError

Opener = Callable[..., Store]


def _ini(tmp_path: Path, **options: Any) -> Store:
    return IniStore(tmp_path / "f.ini", **options)


def _dir(tmp_path: Path, **options: Any) -> Store:
    return DirectoryStore(tmp_path / "d", **options)


def _lock_file(store: Store) -> str:
    return store._flock.lock.path  # type: ignore[attr-defined,no-any-return]


BACKENDS = [pytest.param(_ini, id="ini"), pytest.param(_dir, id="dir")]


@pytest.mark.parametrize("opener", BACKENDS)
def test_a_write_through_a_second_store_inside_a_write_of_the_first(
    tmp_path: Path, opener: Callable[..., Store]
) -> None:
    a, b = opener(tmp_path), opener(tmp_path, lock_timeout=2)
    try:
        a["n"] = 1

        def bump(value: Any) -> Any:
            b["inner"] = "written while a holds the lock"  # this thread: no wait
            return value + 1

        a.modify("n", bump)
        with a.batch():
            a["x"] = 1
            b["y"] = 2  # b is not in a batch: written at once
        assert a["n"] == 2 and a["inner"] == "written while a holds the lock"
        assert (a["x"], b["y"]) == (1, 2)
        ro = opener(tmp_path, readonly=True)
        try:
            a.modify("n", lambda v: v + ro["n"])  # a read-only store reads inside it
            assert ro["n"] == 4
        finally:
            ro.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("opener", BACKENDS)
def test_the_shared_lock_still_excludes_other_threads_and_processes(
    tmp_path: Path, opener: Callable[..., Store]
) -> None:
    a, b = opener(tmp_path), opener(tmp_path, lock_timeout=0.2)
    try:
        entered, leave = threading.Event(), threading.Event()
        seen: list[Any] = []

        def slow(value: Any) -> Any:
            entered.set()
            leave.wait(5)
            return 1

        holder = threading.Thread(target=lambda: a.modify("k", slow, default=0))
        holder.start()
        assert entered.wait(5)

        def other() -> None:
            b["other"] = 1  # waits for the holder thread, then writes
            seen.append(b["k"])

        waiter = threading.Thread(target=other)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and seen == []
        leave.set()
        holder.join(5)
        waiter.join(5)
        assert seen == [1] and a["other"] == 1
        # Another open file description (as another process has) holding the lock:
        # b's own timeout applies, a's (none) is not b's.
        fd = os.open(_lock_file(a), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with pytest.raises(LockTimeoutError):
                b["late"] = 1
        finally:
            os.close(fd)
        b["late"] = 2
        assert a["late"] == 2
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("opener", BACKENDS)
def test_the_last_store_closes_the_lock(tmp_path: Path, opener: Callable[..., Store]) -> None:
    a, b = opener(tmp_path), opener(tmp_path)
    lock = a._flock.lock  # type: ignore[attr-defined]
    assert b._flock.lock is lock  # type: ignore[attr-defined]
    a["k"] = 1
    a.close()
    a.close()  # idempotent: gives its handle back once
    assert lock._fd >= 0  # b still uses it
    b["k"] = 2
    b.close()
    assert lock._fd == -1
    c = opener(tmp_path)
    try:
        assert c._flock.lock is not lock  # type: ignore[attr-defined]
        assert c["k"] == 2
        c["k"] = 3
    finally:
        c.close()


def test_handles_count_users_and_key_by_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    one = LockHandle.open(str(real / ".lock"))
    two = LockHandle.open(str(tmp_path / "link" / ".lock"), timeout=0.1)
    try:
        assert one.lock is two.lock
        assert one.acquire() is True and two.acquire() is False  # re-entrant in a thread
        assert one.held and two.held
        two.release()
        one.release()
        assert not one.held
    finally:
        one.close()
        assert two.lock._fd >= 0
        two.close()
    assert str(real / ".lock") not in str(LockHandle._locks)
