"""``shm://`` and ``SharedBytes`` under threads: ``close()`` while other threads use the
object, and ``get_many`` against a concurrent multi-key write.

Expected: ``close()`` may run in any thread; calls already running finish (or raise
``StoreClosedError`` before they touch the segment), later calls raise it; no hang, no
other exception, and the cross-process lock (``flock``) is never dropped while a thread
of this process is inside a locked section. ``get_many`` sees a batch whole or not at all.

Hang detection: threads are joined with a generous timeout; a thread still alive then is
reported as hung (the time bounds only that report, never a measured speed).
"""

from __future__ import annotations

import fcntl
import functools
import glob
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mappingstore import SharedBytes, SharedMemoryStore
from mappingstore._store import Op
from mappingstore.errors import StoreClosedError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /dev/shm")

SHM = "/dev/shm"
HUNG = 20.0  # seconds before a thread that should have ended is reported as hung


@pytest.fixture
def name() -> Iterator[str]:
    """A unique name; every segment under it is removed at teardown."""
    n = "tc" + uuid.uuid4().hex[:12]
    yield n
    for path in glob.glob(f"{SHM}/mappingstore.{n}*") + glob.glob(f"{SHM}/mappingstore-bytes.{n}*"):
        os.unlink(path)


def _flock_is_free(path: str) -> bool:
    """Whether another open file description (as another process would) can take the
    exclusive ``flock`` on *path* right now (taken and released at once)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _race_close(
    target: Any, ops: list[Callable[[], object]], rounds_seed: int, nthreads: int = 3
) -> tuple[Counter[str], int]:
    """Run *ops* at random in *nthreads* threads until each has done some, close *target*
    in this thread, and return (unexpected exceptions, threads still running)."""
    bad: Counter[str] = Counter()
    done = [0] * nthreads
    warm = threading.Barrier(nthreads + 1)

    def user(i: int) -> None:
        rnd = random.Random(rounds_seed * 100 + i)
        warmed = False
        while True:
            try:
                rnd.choice(ops)()
            except StoreClosedError:
                if not warmed:
                    warm.abort()
                return
            except Exception as exc:  # the defect: anything else
                bad[f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"] += 1
                if not warmed:
                    warm.abort()
                return
            done[i] += 1
            if not warmed and done[i] >= 20:
                warmed = True
                try:
                    warm.wait(HUNG)
                except threading.BrokenBarrierError:
                    pass

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(nthreads)]
    for t in threads:
        t.start()
    try:
        warm.wait(HUNG)  # every thread is busy: close in the middle of their calls
    except threading.BrokenBarrierError:
        pass
    target.close()
    for t in threads:
        t.join(HUNG)
    return bad, sum(t.is_alive() for t in threads)


# -- SharedMemoryStore.close() while other threads use it ------------------------------


def _store_ops(store: SharedMemoryStore) -> list[Callable[[], object]]:
    return [
        lambda: store.__setitem__("k1", 1),  # the inlined fast path
        lambda: store.set("k5", "x" * 5000),  # the general _put path (big value)
        lambda: store.get("k2"),
        lambda: store.modify("k3", lambda v: v + 1, default=0),
        lambda: list(store.items()),
        lambda: store.get_many(["k1", "k2", "k3"]),
        lambda: store.pop("k6", None),
        lambda: store.update({"k7": 1, "k8": 2}),  # a rebuild (new generation)
        lambda: len(store),
    ]


def test_close_while_threads_use_the_store(name: str) -> None:
    """Only StoreClosedError, no hang, the store undamaged (it used to leak ValueError,
    OSError(EBADF), AssertionError, a released memoryview, a BackendError about fork(),
    and to hang a thread on the lock's RLock)."""
    bad: Counter[str] = Counter()
    hung = 0
    for r in range(12):
        store = SharedMemoryStore(name)
        store.update({f"k{i}": i for i in range(50)})
        b, h = _race_close(store, _store_ops(store), r)
        bad += b
        hung += h
        # Nothing was damaged: a fresh instance reads every key and writes.
        with SharedMemoryStore(name) as check:
            assert all(check[f"k{i}"] == i for i in (0, 2, 9, 49))
            check["after"] = 1
            assert check["after"] == 1
            check.unlink()
    assert not hung, f"{hung} threads hung after close()"
    assert not bad, dict(bad)


def test_close_lets_a_write_in_progress_finish_and_keeps_the_lock(name: str) -> None:
    """A thread inside modify() when another thread closes the store keeps the
    cross-process lock until it leaves (closing the lock's descriptor under it used to
    drop the flock: another process could then write the segment at the same time), and
    its write is stored. Later calls raise StoreClosedError."""
    ctl = f"{SHM}/mappingstore.{name}"
    store = SharedMemoryStore(name)
    store["n"] = 0
    inside, leave = threading.Event(), threading.Event()
    result: list[object] = []

    def fn(v: int) -> int:
        inside.set()
        leave.wait(HUNG)
        return v + 1

    def writer() -> None:
        try:
            result.append(store.modify("n", fn))
        except Exception as exc:
            result.append(exc)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    assert inside.wait(HUNG)
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(0.5)  # let close() run as far as it goes while the writer is inside
    try:
        assert not _flock_is_free(ctl), "the lock was dropped under a writer"
    finally:
        leave.set()
    w.join(HUNG)
    closer.join(HUNG)
    assert not w.is_alive() and not closer.is_alive()
    assert result == [1]
    assert _flock_is_free(ctl)
    with pytest.raises(StoreClosedError):
        store["n"] = 5
    with pytest.raises(StoreClosedError):
        store.modify("n", lambda v: v + 1)
    with SharedMemoryStore(name) as check:
        assert check["n"] == 1
        check.unlink()


def test_close_lets_a_multi_step_locked_section_finish(name: str) -> None:
    """A locked section of several raw writes (as a series append or an event log makes)
    that is running when another thread closes the store finishes whole, rebuilds
    included: close() waits for it, and no step fails halfway."""
    store = SharedMemoryStore(name)
    store["a"] = 0
    inside, leave = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    ns = store._ns

    def section() -> None:
        try:
            with store._exclusive():
                store._apply([Op(ns, "x", store._encode(ns, "x", 1), None)])
                store._apply(
                    [Op(ns, k, store._encode(ns, k, 1), None) for k in ("y", "z")]
                )  # a new generation
                inside.set()
                leave.wait(HUNG)
                store._put(ns, "b", store._encode(ns, "b", 2), None)
                store._apply(
                    [Op(ns, k, store._encode(ns, k, 3), None) for k in ("c", "d")]
                )  # another one, after close() started
                store._put(ns, "e", store._encode(ns, "e", 4), None)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=section, daemon=True)
    t.start()
    assert inside.wait(HUNG)
    closer = threading.Thread(target=store.close, daemon=True)
    closer.start()
    closer.join(0.5)
    leave.set()
    t.join(HUNG)
    closer.join(HUNG)
    assert not t.is_alive() and not closer.is_alive()
    assert not errors, errors
    with SharedMemoryStore(name) as check:
        assert dict(check.items()) == {
            "a": 0,
            "x": 1,
            "y": 1,
            "z": 1,
            "b": 2,
            "c": 3,
            "d": 3,
            "e": 4,
        }
        check.unlink()


def test_close_from_inside_a_locked_section(name: str) -> None:
    """close() called by the thread that is inside modify(): the write raises
    StoreClosedError, the lock is released when the section ends (it used to raise
    AssertionError and leave the thread lock held, hanging the next writer)."""
    ctl = f"{SHM}/mappingstore.{name}"
    store = SharedMemoryStore(name)
    store["n"] = 0

    def fn(v: int) -> int:
        store.close()
        return v + 1

    with pytest.raises(StoreClosedError):
        store.modify("n", fn)
    assert _flock_is_free(ctl)
    # Another instance in this process (same lock object while both were open) writes.
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with SharedMemoryStore(name) as s:
                s.modify("n", lambda v: v + 10)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other, daemon=True)
    t.start()
    t.join(HUNG)
    assert not t.is_alive(), "the lock was left held"
    assert not errors
    with SharedMemoryStore(name) as check:
        assert check["n"] == 10
        check.unlink()


def test_close_with_another_instance_open_keeps_its_lock(name: str) -> None:
    """Two instances of one name share the process's lock; closing one while the other
    is inside modify() neither drops the other's flock nor blocks it."""
    ctl = f"{SHM}/mappingstore.{name}"
    a, b = SharedMemoryStore(name), SharedMemoryStore(name)
    b["n"] = 0
    inside, leave = threading.Event(), threading.Event()

    def fn(v: int) -> int:
        inside.set()
        leave.wait(HUNG)
        return v + 1

    t = threading.Thread(target=lambda: b.modify("n", fn), daemon=True)
    t.start()
    assert inside.wait(HUNG)
    closer = threading.Thread(target=a.close, daemon=True)
    closer.start()
    closer.join(0.5)
    try:
        assert not _flock_is_free(ctl)
    finally:
        leave.set()
    t.join(HUNG)
    closer.join(HUNG)
    assert not t.is_alive() and not closer.is_alive()
    with pytest.raises(StoreClosedError):
        a["n"]
    b.modify("n", lambda v: v + 1)
    assert b["n"] == 2
    b.unlink()


# -- SharedBytes.close() while other threads use it -------------------------------------


def _bytes_ops(sb: SharedBytes) -> list[Callable[[], object]]:
    return [
        sb.get,
        lambda: sb.set(b"v" * random.randrange(1, 300)),  # grows now and then
        lambda: sb.update(lambda old: old[:100] + b"!"),
        lambda: sb.size,
    ]


def test_shared_bytes_close_while_threads_use_it(name: str) -> None:
    bad: Counter[str] = Counter()
    hung = 0
    for r in range(12):
        sb = SharedBytes(name, 64)
        sb.set(b"start")
        b, h = _race_close(sb, _bytes_ops(sb), r)
        bad += b
        hung += h
        with SharedBytes(name) as check:
            check.get()
            check.set(b"after")
            assert check.get() == b"after"
            check.unlink()
    assert not hung, f"{hung} threads hung after close()"
    assert not bad, dict(bad)


# -- get_many against a concurrent batch -------------------------------------------------


class _CommitAfterFirst(list[str]):
    """Keys whose iteration commits a multi-key write after yielding the first key: a
    batch that lands between two of get_many's reads."""

    def __init__(self, keys: list[str], commit: Callable[[], None]) -> None:
        super().__init__(keys)
        self._commit = commit

    def __iter__(self) -> Iterator[str]:
        it = super().__iter__()
        yield next(it)
        self._commit()
        yield from it


@pytest.mark.parametrize("warm", [False, True])
def test_get_many_reads_one_generation(name: str, warm: bool) -> None:
    """A batch committed while get_many runs is seen whole or not at all (the keys used
    to be read one by one, each in the generation current at that moment)."""
    reader, writer = SharedMemoryStore(name), SharedMemoryStore(name)
    keys = [f"b{j}" for j in range(10)]
    writer.update({k: 0 for k in keys})
    if warm:  # the reader's cache holds every key (its fast path)
        assert reader.get_many(keys) == {k: 0 for k in keys}
    for g in (1, 2, 3):
        sneaky = _CommitAfterFirst(keys, functools.partial(writer.update, dict.fromkeys(keys, g)))
        datas = reader._get_many(reader._ns, sneaky)
        values = reader._decode_many(reader._ns, keys, datas)
        assert len(set(values.values())) == 1, values
        assert reader.get_many(keys) == {k: g for k in keys}
    reader.close()
    writer.unlink()


def test_get_many_never_sees_half_a_batch(name: str) -> None:
    """The same under a real race: one thread commits batches of 10 keys, another reads
    them with get_many (bounded by the number of batches)."""
    reader, writer = SharedMemoryStore(name), SharedMemoryStore(name)
    keys = [f"b{j}" for j in range(10)]
    writer.update({k: 0 for k in keys})
    stop = threading.Event()

    def write() -> None:
        for g in range(1, 400):
            with writer.batch():
                for k in keys:
                    writer[k] = g
        stop.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    torn = []
    while not stop.is_set():
        m = reader.get_many(keys)
        if len(set(m.values())) != 1:
            torn.append(m)
        time.sleep(0)  # let the writer run (a tight loop holds the GIL)
    t.join(HUNG)
    assert not torn, torn[:3]
    assert reader.get_many(keys) == {k: 399 for k in keys}
    reader.close()
    writer.unlink()
