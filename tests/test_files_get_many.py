"""get_many() on the directory and INI stores reads every key from one state.

A batch is all or none for other readers (docs/concepts.md); read key by key, one
get_many() call could return half of a batch that another process or thread committed
between two of its reads. The directory store holds its shared lock for the read (batches
commit under the exclusive one); the INI store looks every key up in one parsed copy of
the file. The deterministic tests commit a batch from a forked process in the middle of a
get_many() (between the reads of its first and second key); the short stress tests race a
writer of batches against readers, in threads and in processes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import DirectoryStore, IniStore, Store
from mappingstore._directory import _encode_journal
from mappingstore._ini import _Doc, _Line, _Shared
from mappingstore._store import Op
from mappingstore.errors import LockTimeoutError
from mappingstore.testing import FakeClock

FORK = multiprocessing.get_context("fork")
KEYS = [f"k{i}" for i in range(6)]

Opener = Callable[..., Store]


def _open_dir(path: Path, **options: Any) -> Store:
    return DirectoryStore(path / "store", durable=False, **options)


def _open_ini(path: Path, **options: Any) -> Store:
    return IniStore(path / "s.ini", durable=False, **options)


OPENERS = {"dir": _open_dir, "ini": _open_ini}


@pytest.fixture(autouse=True)
def _no_recent_ini() -> Iterator[None]:
    # Parsed copies of closed INI files must not leak from one test into the next.
    _Shared._recent.clear()
    yield
    _Shared._recent.clear()


@pytest.fixture(params=sorted(OPENERS))
def opener(request: pytest.FixtureRequest) -> Opener:
    return OPENERS[request.param]


def _commit(store: Store, value: int) -> int:
    """Commit one batch writing *value* to every key; 0 if done, 1 if the lock was busy."""
    try:
        with store.batch():
            for key in KEYS:
                store[key] = value
    except LockTimeoutError:
        return 1
    return 0


def _commit_in_child(store: Store, value: int) -> None:
    os._exit(_commit(store, value))


def _in_child(store: Store, value: int) -> int:
    """Commit the batch from a forked process (another process, as it would be), with
    *store* inherited; its exit code (see :func:`_commit`)."""
    proc = FORK.Process(target=_commit_in_child, args=(store, value))
    proc.start()
    proc.join(30)
    assert proc.exitcode is not None, "the writer hung"
    return proc.exitcode


# -- a batch committed in the middle of one get_many() --------------------------------------


@pytest.mark.parametrize("first_batch", [False, True])
def test_dir_batch_committed_between_two_reads(tmp_path: Path, first_batch: bool) -> None:
    reader = _open_dir(tmp_path)
    # lock_timeout=0: the writer tries the lock once, so a batch that must wait for the
    # reader reports it (exit 1) instead of blocking the test.
    writer = _open_dir(tmp_path, lock_timeout=0)
    for key in KEYS:  # one by one: no batch has run yet (first_batch: .epoch is absent)
        writer[key] = 0
    if not first_batch:
        writer.update(dict.fromkeys(KEYS, 0))
    assert os.path.exists(tmp_path / "store" / ".epoch") is not first_batch
    assert isinstance(reader, DirectoryStore)
    load = reader._load
    loads: list[str] = []
    outcome: list[int] = []

    def first_read_then_commit(ns: str, key: str) -> Any:
        rec = load(ns, key)
        loads.append(key)
        if len(loads) in (1, len(KEYS) + 1):  # after the first read of each attempt
            outcome.append(_in_child(writer, len(outcome) + 1))
        return rec

    reader._load = first_read_then_commit  # type: ignore[method-assign]
    got = reader.get_many(KEYS)
    del reader._load
    # The lock-free read let the first batch commit (readers never hold writers back),
    # saw that a batch ran and read again under the shared lock, which kept the second
    # batch out until it was done.
    assert outcome == [0, 1]
    assert len(loads) == 2 * len(KEYS)
    assert got == dict.fromkeys(KEYS, 1), f"half a batch: {got}"
    assert _in_child(writer, 3) == 0
    assert reader.get_many(KEYS) == dict.fromkeys(KEYS, 3)
    reader.close()
    writer.close()


def test_dir_get_many_does_not_wait_for_writers(tmp_path: Path) -> None:
    store = _open_dir(tmp_path, lock_timeout=0.05)
    store.update(dict.fromkeys(KEYS, 0))
    assert isinstance(store, DirectoryStore)
    locked, release = FORK.Event(), FORK.Event()

    def hold() -> None:
        with store._exclusive():
            locked.set()
            release.wait(30)

    proc = FORK.Process(target=hold)
    proc.start()
    try:
        assert locked.wait(30)
        # Another process holds the write lock (a slow durable write, say): get_many()
        # reads without it, since no batch ran meanwhile.
        assert store.get_many(KEYS) == dict.fromkeys(KEYS, 0)
        # When a batch did run during the read (.epoch replaced), the read is done again
        # under the shared lock, which waits for the writer up to lock_timeout.
        load = store._load

        def batch_ran(ns: str, key: str) -> Any:
            epoch = tmp_path / "store" / ".epoch"
            fresh = tmp_path / "store" / ".tmp" / "fresh-epoch"
            fresh.touch()
            os.replace(fresh, epoch)
            return load(ns, key)

        store._load = batch_ran  # type: ignore[method-assign]
        with pytest.raises(LockTimeoutError):
            store.get_many(KEYS)
        del store._load
        assert store["k1"] == 0  # a single read takes no lock
    finally:
        release.set()
        proc.join(30)
    assert store.get_many(KEYS) == dict.fromkeys(KEYS, 0)
    store.close()


def test_ini_batch_committed_between_two_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = _open_ini(tmp_path)
    writer = _open_ini(tmp_path)
    writer.update(dict.fromkeys(KEYS, 0))
    record = _Doc.record
    outcome: list[int] = []

    def first_read_then_commit(doc: _Doc, line: _Line) -> bytes:
        rec = record(doc, line)
        if not outcome:
            outcome.append(_in_child(writer, 1))  # rewrites the file meanwhile
        return rec

    monkeypatch.setattr(_Doc, "record", first_read_then_commit)
    got = reader.get_many(KEYS)
    monkeypatch.undo()
    assert outcome == [0]
    assert set(got.values()) == {0}, f"half a batch: {got}"
    assert reader.get_many(KEYS) == dict.fromkeys(KEYS, 1)  # the next read sees it whole
    reader.close()
    writer.close()


# -- races, bounded -----------------------------------------------------------------------


def _torn_reads(reader: Store, stop: float) -> tuple[int, int]:
    torn = reads = 0
    while time.monotonic() < stop:
        got = reader.get_many(KEYS)
        reads += 1
        torn += len(set(got.values())) != 1 or len(got) != len(KEYS)
    return torn, reads


def test_threads_never_see_half_a_batch(tmp_path: Path, opener: Opener) -> None:
    writer, reader = opener(tmp_path), opener(tmp_path)
    writer.update(dict.fromkeys(KEYS, 0))
    stop = time.monotonic() + 1.0
    failures: list[BaseException] = []

    def write() -> None:
        try:
            value = 0
            while time.monotonic() < stop:
                value += 1
                _commit(writer, value)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    torn, reads = _torn_reads(reader, stop)
    thread.join(30)
    assert not thread.is_alive() and not failures
    assert reads and torn == 0, f"{torn} of {reads} get_many() calls saw half a batch"
    writer.close()
    reader.close()


def _write_batches(opener: Opener, path: Path, stop: float) -> None:
    store = opener(path)
    value = 0
    while time.time() < stop:
        value += 1
        _commit(store, value)
    store.close()


def test_processes_never_see_half_a_batch(tmp_path: Path, opener: Opener) -> None:
    reader = opener(tmp_path)
    reader.update(dict.fromkeys(KEYS, 0))
    stop = time.time() + 1.0
    proc = FORK.Process(target=_write_batches, args=(opener, tmp_path, stop))
    proc.start()
    torn, reads = _torn_reads(reader, time.monotonic() + max(0.0, stop - time.time()))
    proc.join(30)
    assert proc.exitcode == 0
    assert reads and torn == 0, f"{torn} of {reads} get_many() calls saw half a batch"
    reader.close()


# -- what get_many() still does -------------------------------------------------------------


def test_missing_expired_and_repeated_keys(tmp_path: Path, opener: Opener) -> None:
    clock = FakeClock()
    store = opener(tmp_path, clock=clock)
    store["a"] = 1
    store.set("t", 2, ttl=10)
    store["x.y"] = {"deep": [1]}
    assert store.get_many(["a", "t", "x.y", "nope", "a"]) == {"a": 1, "t": 2, "x.y": {"deep": [1]}}
    clock.advance(11)
    assert store.get_many(["a", "t", "nope"]) == {"a": 1}
    assert store.get_many(["t", "nope"]) == {}
    assert store.get_many(["a"]) == {"a": 1}
    assert store.get_many([]) == {}
    store.close()


def test_encrypted_values(tmp_path: Path, opener: Opener) -> None:
    store = opener(tmp_path, password="get many", security="low")
    store.update({"a": 1, "b": (2, 3)})
    assert store.get_many(["a", "b", "c"]) == {"a": 1, "b": (2, 3)}
    store.close()


def test_dir_replays_a_dead_writers_journal_first(tmp_path: Path) -> None:
    store = _open_dir(tmp_path)
    assert isinstance(store, DirectoryStore)
    store.update(dict.fromkeys(KEYS, 0))
    # What a writer killed mid-batch leaves: the journal, and no lock held.
    ops = [Op(store._ns, k, store._encode(store._ns, k, 7, False), None) for k in KEYS]
    journal = os.path.join(store.path, ".journal")
    with open(journal, "wb") as f:
        f.write(_encode_journal(ops))
    assert store.get_many(KEYS) == dict.fromkeys(KEYS, 7)
    assert not os.path.exists(journal)
    store.close()


def test_dir_without_a_lock_file_reads_key_by_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _open_dir(tmp_path)
    store.update({"a": 1, "b": 2})
    store.close()
    os.unlink(tmp_path / "store" / ".lock")
    ro = _open_dir(tmp_path, readonly=True)
    assert isinstance(ro, DirectoryStore)
    load = ro._load

    def batch_ran(ns: str, key: str) -> Any:  # so the lock-free read is not enough
        fresh = tmp_path / "store" / ".tmp" / "fresh-epoch"
        fresh.touch()
        os.replace(fresh, tmp_path / "store" / ".epoch")
        return load(ns, key)

    ro._load = batch_ran  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        assert ro.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
        assert ro.get_many(["a", "b"]) == {"a": 1, "b": 2}
    del ro._load
    warned = [r for r in caplog.records if "get_many() reads key by key" in r.getMessage()]
    assert len(warned) == 1
    ro.close()


def test_dir_get_many_inside_a_write_of_the_same_thread(tmp_path: Path) -> None:
    # The thread already holds the exclusive lock (a modify function reading through
    # another store of the directory): the shared lock is taken re-entrantly.
    store, other = _open_dir(tmp_path), _open_dir(tmp_path)
    store.update({"a": 1, "b": 2})
    store.modify("a", lambda v: v + sum(other.get_many(["a", "b"]).values()))
    assert store.get_many(["a", "b"]) == {"a": 4, "b": 2}
    store.close()
    other.close()


def test_dir_batch_leaves_an_empty_epoch_and_no_journal(tmp_path: Path) -> None:
    store = _open_dir(tmp_path)
    root = tmp_path / "store"
    store.update({"a": "secret", "b": 2})
    first = os.stat(root / ".epoch").st_ino
    assert not (root / ".journal").exists()
    assert (root / ".epoch").read_bytes() == b""  # no copy of the values left behind
    store.update({"a": 1, "b": 3})
    assert os.stat(root / ".epoch").st_ino != first
    store["c"] = 4  # a single write is no batch: .epoch stays
    store.update({"a": 1, "b": 3})
    store.close()


def test_dir_emptied_journal_of_a_dead_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A writer killed between emptying its journal and renaming it to .epoch had applied
    # its whole batch: the next reader renames it (readers learn a batch ran), quietly.
    store = _open_dir(tmp_path)
    store.update(dict.fromkeys(KEYS, 5))
    root = tmp_path / "store"
    before = os.stat(root / ".epoch").st_ino
    (root / ".journal").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        assert store.get_many(KEYS) == dict.fromkeys(KEYS, 5)
    assert not (root / ".journal").exists()
    assert os.stat(root / ".epoch").st_ino != before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    store.close()
