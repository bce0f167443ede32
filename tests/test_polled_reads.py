"""A time series' ``first()``/``last()`` on SQLite answer from the records the thread's
connection read since the last commit to the file (``SQLiteStore._rget_polled``, the
wal-index header check of ``mappingstore._walwatch``). These tests check that such an
answer is never stale (commits of other connections, other processes, WAL restarts,
batches, transactions), that it keeps no descriptor and never drops SQLite's locks."""

from __future__ import annotations

import gc
import multiprocessing
import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

import mappingstore
from mappingstore import SQLiteStore

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the header is read through /proc/self/mem"
)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "polled.db")


def _statements(store: SQLiteStore) -> list[str]:
    """Start recording the statements the calling thread's connection runs."""
    seen: list[str] = []
    store._local.holder.conn.set_trace_callback(seen.append)
    return seen


def _polling(store: SQLiteStore, name: str = "s") -> None:
    """Polls until the connection has found the -shm mapping and filled its cache."""
    for _ in range(4):
        store.series(name).last()
    assert store._local.holder.shm is not None and store._local.holder.shm >= 0


def test_repeated_polls_run_no_statement(db: str) -> None:
    store = SQLiteStore(db)
    series = store.series("s")
    series.extend([(1, "a"), (5, "e")])
    _polling(store)
    seen = _statements(store)
    for _ in range(10):
        assert series.first() == (1, "a")
        assert series.last() == (5, "e")
    assert seen == []  # answered from the cache: nothing committed meanwhile
    other = SQLiteStore(db)
    other.series("s")[9] = "i"
    assert series.last() == (9, "i")
    assert len(seen) == 1  # one read after the other connection's commit
    other.close()
    store.close()


def test_a_polled_result_is_a_fresh_copy(db: str) -> None:
    store = SQLiteStore(db)
    series = store.series("s")
    series[1] = {"n": [1]}
    _polling(store)
    got = series.first()
    assert got is not None
    got[1]["n"].append(2)
    assert series.first() == (1, {"n": [1]})
    store.close()


def test_commits_of_other_connections_and_wal_restarts(db: str) -> None:
    reader, writer = SQLiteStore(db), SQLiteStore(db)
    raw = sqlite3.connect(db, isolation_level=None)
    polled = reader.series("s")
    _polling(reader)
    for i in range(300):
        writer.series("s")[i] = i
        assert polled.last() == (i, i)
        assert polled.first() == (0, 0)
        if i % 7 == 0:
            # Checkpoint and truncate the WAL: the next commit restarts it from frame 0.
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        if i and i % 11 == 0:
            writer.series("s").remove(0, 0)
            assert polled.first() == (1, 1)
            writer.series("s")[0] = 0
            assert polled.first() == (0, 0)
    assert polled.last() == (299, 299)
    raw.close()
    reader.close()
    writer.close()


def test_uncommitted_writes_of_another_connection_stay_unseen(db: str) -> None:
    reader = SQLiteStore(db)
    reader.series("s")[1] = "one"
    _polling(reader)
    raw = sqlite3.connect(db, isolation_level=None)
    raw.execute("BEGIN IMMEDIATE")
    raw.execute("DELETE FROM mappingstore_kv")
    assert reader.series("s").last() == (1, "one")
    raw.execute("ROLLBACK")
    assert reader.series("s").last() == (1, "one")
    raw.execute("DELETE FROM mappingstore_kv")  # committed
    assert reader.series("s").last() is None
    assert reader.series("s").first() is None
    raw.close()
    reader.close()


def test_own_writes_batches_and_transactions(db: str) -> None:
    store = SQLiteStore(db)
    series = store.series("s")
    series[1] = 1
    _polling(store)
    assert series.last() == (1, 1)
    series[2] = 2
    assert series.last() == (2, 2)
    with store.batch():
        series[3] = 3
        assert series.last() == (3, 3)  # the batch's own write, not yet committed
    assert series.last() == (3, 3)

    def abandoned_batch() -> None:
        with store.batch():
            series[4] = 4
            assert series.last() == (4, 4)
            raise KeyError("abandon")

    with pytest.raises(KeyError):
        abandoned_batch()
    assert series.last() == (3, 3)

    # An open write transaction (what modify() and batches commit with): its own writes
    # are read inside it, and are gone after its rollback.
    def rolled_back() -> None:
        with store._exclusive():
            series[7] = 7
            assert series.last() == (7, 7)
            raise KeyError("roll back")

    with pytest.raises(KeyError):
        rolled_back()
    assert series.last() == (3, 3)
    with store._exclusive():
        series[8] = 8
        assert series.last() == (8, 8)
    assert store.series("s").last() == (8, 8)
    store.close()


def _append(url: str, t: int) -> None:
    store = mappingstore.open(url)
    store.series("s")[t] = f"from {os.getpid()}"
    store.close()


def test_commits_of_other_processes(db: str) -> None:
    store = SQLiteStore(db)
    store.series("s")[0] = "start"
    _polling(store)
    ctx = multiprocessing.get_context("spawn")
    for t in (10, 20):
        proc = ctx.Process(target=_append, args=(f"sqlite:///{db}", t))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        got = store.series("s").last()
        assert got is not None and got[0] == t and got[1] == f"from {proc.pid}"
    store.close()


def test_threads_poll_with_their_own_connections(db: str) -> None:
    store = SQLiteStore(db)
    store.series("s")[0] = 0
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def poll() -> None:
        try:
            _polling(store)
            barrier.wait(10)  # the writer writes now
            barrier.wait(10)
            assert store.series("s").last() == (1, 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for thread in threads:
        thread.start()
    barrier.wait(10)
    store.series("s")[1] = 1
    barrier.wait(10)
    for thread in threads:
        thread.join(10)
    assert errors == []
    store.close()


def test_a_memory_database_and_a_readonly_reader(db: str) -> None:
    memory = SQLiteStore(":memory:")
    memory.series("s")[1] = 1
    for _ in range(3):
        assert memory.series("s").last() == (1, 1)
    memory.series("s")[2] = 2
    assert memory.series("s").last() == (2, 2)
    memory.close()
    writer = SQLiteStore(db)
    writer.series("s")[1] = 1
    reader = SQLiteStore(db, readonly=True)
    _polling(reader)
    for t in range(2, 50):
        writer.series("s")[t] = t
        assert reader.series("s").last() == (t, t)
    reader.close()
    writer.close()


def _shm_locks(shm: str) -> list[str]:
    """This process's POSIX locks on *shm*'s byte 128, SQLite's "DMS" lock (held shared by
    every process with the database open in WAL mode), from /proc/locks."""
    st = os.stat(shm)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as fh:
        lines = fh.read().splitlines()
    mine = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a blocked request
            continue
        ours = fields[1] == "POSIX" and fields[4] == str(os.getpid())
        if ours and fields[5] == inode and fields[6] == "128":
            mine.append(line)
    return mine


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks")
def test_closing_a_polling_store_keeps_sqlites_locks(db: str) -> None:
    """POSIX locks belong to the process and closing any descriptor of a file drops them
    all: polling must never open (and so close) the -shm file, or the other connections
    of the process would lose their locks (a checkpoint could then reuse the WAL under
    their readers). It reads SQLite's own mapping of it instead."""
    keeper = SQLiteStore(db)
    keeper.series("s")[1] = 1
    shm = db + "-shm"
    assert _shm_locks(shm), "SQLite holds the DMS lock while a connection is open"
    poller = SQLiteStore(db)
    _polling(poller)
    poller.close()
    assert _shm_locks(shm), "the poller's close dropped the process's locks on the -shm"
    # The check above can fail: closing any descriptor of the file drops them.
    os.close(os.open(shm, os.O_RDONLY))
    assert not _shm_locks(shm)
    keeper.close()


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("how", ["closed", "readonly", "dropped"])
def test_polling_many_stores_keeps_no_descriptor(tmp_path: Path, how: str) -> None:
    """Polling opens nothing per store: no descriptor outlives the stores that were open
    (a read-only last user leaves its -shm file behind; a store may never be closed)."""
    before = _descriptors()
    for i in range(60):
        path = str(tmp_path / f"s{i}.db")
        raw = None
        if how == "readonly":
            writer = SQLiteStore(path)
            writer.series("s")[1] = 1
            writer.close()
            raw = sqlite3.connect(path)  # keeps the -shm alive until the reader has it
            raw.execute("SELECT 1 FROM mappingstore_kv").fetchall()
        store = SQLiteStore(path, readonly=how == "readonly")
        if how != "readonly":
            store.series("s")[1] = 1
        _polling(store)
        assert store.series("s").last() == (1, 1)
        if raw is not None:
            raw.close()  # the read-only store is the last user: the -shm file stays
        if how == "dropped":
            del store  # never closed: its connections close when it is collected
        else:
            store.close()
    gc.collect()
    assert _descriptors() <= before + 2


def test_a_store_opened_through_a_symlink(tmp_path: Path) -> None:
    """SQLite resolves a symlinked database file (its -shm sits next to the target): the
    polls watch the target's header, even with a stale -shm file beside the link."""
    real, link = str(tmp_path / "real.db"), str(tmp_path / "link.db")
    first = SQLiteStore(real)
    first.series("s")[1] = "one"
    with open(real + "-shm", "rb") as fh:
        stale = fh.read()
    first.close()
    with open(link + "-shm", "wb") as fh:  # what a crash of an earlier link.db left
        fh.write(stale)
    os.symlink(real, link)
    reader, writer = SQLiteStore(link), SQLiteStore(real)
    _polling(reader)
    assert reader.series("s").last() == (1, "one")
    writer.series("s")[2] = "two"
    assert reader.series("s").last() == (2, "two")
    reader.close()
    writer.close()


def test_a_directory_swapped_under_an_open_store(tmp_path: Path) -> None:
    """Replacing the directory under an open store is not supported, but its connection
    goes on reading the file it opened: a poll never watches the new file instead."""
    folder = tmp_path / "data"
    folder.mkdir()
    store = SQLiteStore(str(folder / "x.db"))
    store.series("s")[1] = "old-1"
    store.get("k")  # the thread's connection exists; no poll yet
    folder.rename(tmp_path / "data.old")
    folder.mkdir()
    other = SQLiteStore(str(folder / "x.db"))
    other["x"] = 1
    series = store.series("s")
    assert series.last() == (1, "old-1")
    assert series.last() == (1, "old-1")
    old = SQLiteStore(str(tmp_path / "data.old" / "x.db"))
    old.series("s")[2] = "old-2"
    assert series.last() == (2, "old-2")
    for each in (old, other, store):
        each.close()


def test_a_clock_set_back_revives_a_polled_record(db: str) -> None:
    now = [1000.0]
    store = SQLiteStore(db, clock=lambda: now[0])
    series = store.series("s")
    series[1] = 1
    ns, edge = series._ns, series._edge_key
    data = store._rget(ns, edge)
    assert data is not None
    store._rput(ns, edge, data, 1500.0)  # the edge record now expires at 1500
    now[0] = 2000.0  # expired before the first poll: the series reads as empty
    for _ in range(4):
        series.last()
    assert store._local.holder.shm is not None and store._local.holder.shm >= 0
    assert series.last() is None
    assert series.first() is None
    now[0] = 1200.0
    assert series.last() == (1, 1)
    store.close()


def test_a_poll_inside_a_read_snapshot_caches_nothing(db: str) -> None:
    """get_many() of many keys reads in one snapshot (BEGIN on the thread's connection):
    a poll made inside it (a signal handler, a finalizer) reads that old snapshot, which
    must not be kept under the header of a later commit."""
    store, other = SQLiteStore(db), SQLiteStore(db)
    series = store.series("s")
    series[1] = "one"
    _polling(store)
    with store._snapshot():
        store.get("k")  # the first read of the transaction takes its snapshot
        other.series("s")[2] = "two"  # committed after the snapshot began
        assert series.last() == (1, "one")  # what a plain read in the snapshot sees
    assert series.last() == (2, "two")
    other.close()
    store.close()


def test_a_second_mapping_of_the_shm_file_turns_the_cache_off(db: str) -> None:
    """Two mappings of the -shm file (a second SQLite library in the process, say): which
    one stays mapped as long as the store's connection cannot be told, so none is used."""
    import mmap

    store = SQLiteStore(db)
    store.series("s")[1] = 1
    fd = os.open(db + "-shm", os.O_RDONLY)
    try:
        extra = mmap.mmap(fd, 32768, prot=mmap.PROT_READ)
        try:
            _polling(store)
        except AssertionError:
            pass
        assert store._local.holder.shm == -1
        other = SQLiteStore(db)
        other.series("s")[2] = 2
        assert store.series("s").last() == (2, 2)
        other.close()
        store.close()
        extra.close()
    finally:
        os.close(fd)  # after the stores: closing drops this process's locks on the file
