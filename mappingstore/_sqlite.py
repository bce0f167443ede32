"""SQLite backend (``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite://:memory:``).

One table holds every namespace, each namespace named once in a side table::

    mappingstore_kv(ns_id INTEGER, key TEXT, expires REAL, value BLOB,
                    PRIMARY KEY (ns_id, key)) WITHOUT ROWID
    mappingstore_ns(id INTEGER PRIMARY KEY, name TEXT UNIQUE)

A row carries its namespace as a small integer (the first namespace of a file, id 1, takes
no byte at all in the record) instead of the namespace's text: a narrower row and key make
every point query, count and scan cheaper. An id is assigned on the first write to a
namespace and never changes nor is reused (rows of ``mappingstore_ns`` are never deleted),
so a store caches the ids it has seen committed.

``expires`` comes before ``value`` on purpose: SQLite reads a row's columns in order, so a
TTL check never has to walk a large value's overflow pages. Keys are stored as TEXT and
compared with the BINARY collation (``memcmp`` of UTF-8, which orders like code points),
so NUL and any other character round-trip, and a prefix scan is the indexed range
``key >= prefix AND key < successor(prefix)``; ``LIKE``/``GLOB`` are never used on keys
(they stop at NUL and treat ``%``, ``_``, ``*`` as wildcards).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import sqlite3
import stat
import threading
import time
import types
import urllib.parse
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any, ClassVar

from . import _walwatch
from ._codec import PLAIN_HEADER, decode_plain, pack, wrap_plain
from ._store import Op, Record, Store
from ._url import file_path, file_url, parse_url
from .errors import (
    BackendError,
    InvalidOptionError,
    InvalidURLError,
    LockTimeoutError,
    MappingStoreError,
    MissingKeyError,
    OptionTypeError,
    ReadOnlyError,
    StoreClosedError,
    StoreCorruptError,
    StoreNotFoundError,
)

__all__ = ["SQLiteStore"]

TABLE = "mappingstore_kv"
NS_TABLE = "mappingstore_ns"
_COLUMNS = ["ns_id", "key", "expires", "value"]
_NS_COLUMNS = ["id", "name"]
#: ``PRAGMA application_id`` of a database file created by mappingstore ("mSto").
APPLICATION_ID = 0x6D53746F
_MAGIC = b"SQLite format 3\x00"


def _live(now: str) -> str:
    """SQL: the record is live at the parameter *now* (CAST: see _VALUE)."""
    return f"(expires IS NULL OR CAST(expires AS REAL) > {now})"


def _expired(now: str) -> tuple[str, str]:
    """SQL: exactly ``NOT _live(now)``, as two conditions for two ranges of the partial
    expiry index: the numbers at or before *now*, then the rare expiries that are not
    numbers (text and BLOBs sort after every number), where the cast decides as it does
    for reads. One condition with an OR scans every expiring record instead."""
    return (
        f"expires IS NOT NULL AND expires <= {now}",
        f"expires IS NOT NULL AND expires >= '' AND CAST(expires AS REAL) <= {now}",
    )


_LIVE = _live("?3")


def _text_rows(rows: list[Any], column: int = 0) -> list[Any]:
    """*rows* (a page in key order) without those whose key is not text.

    A row whose key another program stored as a BLOB is not one of the store's keys (a
    str never equals a BLOB, so reads miss it too). BLOBs sort after every TEXT key, so
    only a page's tail can hold one: one check a page, not one a row (an upper bound
    ``key < x''`` in the SQL cost key iteration about 7%).
    """
    if rows and type(rows[-1][column]) is not str:
        return [row for row in rows if type(row[column]) is str]
    return rows


# Values are read as CAST(value AS BLOB) and expiries handed to Python as CAST(expires AS
# REAL): SQLite does not enforce column types, so a file another program wrote into may
# hold an integer, a float or text there. Such a value then reads as bytes that are not a
# record (CorruptValueError), an expiry that is not a number as expired, never as a
# TypeError from our own code. A cast of the right type is a no-op.
_VALUE = "CAST(value AS BLOB)"
# Point reads check the expiry in Python: no clock call and one parameter less for the
# common item without a TTL.
_GET = f"SELECT {_VALUE}, CAST(expires AS REAL) FROM {TABLE} WHERE ns_id = ? AND key = ?"
# The inlined read of __getitem__ fetches one column: the value of a record without expiry,
# else its expiry (cast to REAL: never a BLOB, even one another program stored there), and
# then reads the record again with _GET. A second column costs every read more (the NULL
# and a 2-tuple) than the rare second query.
_GET_FOREVER = (
    f"SELECT coalesce(CAST(expires AS REAL), {_VALUE}) FROM {TABLE} WHERE ns_id = ? AND key = ?"
)
_CONTAINS = f"SELECT CAST(expires AS REAL) FROM {TABLE} WHERE ns_id = ? AND key = ?"
# Columns in the order of an Op (ns, key, data, expires). sqlite3 binds int, float, str and
# bytearray parameters directly, but sends None and bytes through its adapter registry
# (a failed attribute lookup that builds an exception, about 0.3 us each on CPython 3.11):
# a record without expiry is written with a NULL literal, and a small value is bound as a
# bytearray (copying up to _COPY_MAX bytes costs less than that lookup).
_PUT = f"INSERT OR REPLACE INTO {TABLE} (ns_id, key, value, expires) VALUES (?, ?, ?, ?)"
_PUT_FOREVER = f"INSERT OR REPLACE INTO {TABLE} (ns_id, key, value, expires) VALUES (?, ?, ?, NULL)"
_COPY_MAX = 16384
# Deletes only a live record, so the row count says whether one existed; an expired row
# stays (invisible) until it is overwritten or purge_expired() runs.
_DELETE_LIVE = f"DELETE FROM {TABLE} WHERE ns_id = ?1 AND key = ?2 AND {_LIVE}"
_DELETE = f"DELETE FROM {TABLE} WHERE ns_id = ? AND key = ?"
_CLEAR = f"DELETE FROM {TABLE} WHERE ns_id = ?"
# len(): the live rows of ns = its rows minus its expired ones (the partial index finds
# those without a scan), in one statement so all counts come from one snapshot. A bare
# count(*) uses SQLite's b-tree count, which reads page headers instead of stepping
# through every row (about 30x faster): when the file has only ever held one namespace
# (the common case; the caller's namespace is registered, so that one is it) every row
# is the namespace's. When nearly every row of the file is in ns, its rows are counted as
# "all rows minus the few others": checking that the others are few costs at most
# 2 * _FEW index steps. Otherwise the namespace's own index range is counted.
_FEW = 1000
_COUNT = f"""SELECT CASE WHEN (SELECT count(*) FROM {NS_TABLE}) = 1
THEN (SELECT count(*) FROM {TABLE})
ELSE (SELECT CASE WHEN others < {_FEW} THEN (SELECT count(*) FROM {TABLE}) - others
    ELSE (SELECT count(*) FROM {TABLE} WHERE ns_id = ?1) END
  FROM (SELECT (SELECT count(*) FROM (SELECT 1 FROM {TABLE} WHERE ns_id < ?1 LIMIT {_FEW}))
    + (SELECT count(*) FROM (SELECT 1 FROM {TABLE} WHERE ns_id > ?1 LIMIT {_FEW})) AS others))
END - (SELECT count(*) FROM {TABLE} WHERE ns_id = ?1 AND {_expired("?2")[0]})
  - (SELECT count(*) FROM {TABLE} WHERE ns_id = ?1 AND {_expired("?2")[1]})"""
# Two statements, each one range of the partial index (an OR, or an IN over a UNION,
# makes SQLite scan the namespace or add a key lookup per row): the numbers, then the
# rare expiries that are not numbers.
_PURGE = f"DELETE FROM {TABLE} WHERE ns_id = ?1 AND {_expired('?2')[0]}"
_PURGE_OTHERS = f"DELETE FROM {TABLE} WHERE ns_id = ?1 AND {_expired('?2')[1]}"
# SQLite has no loose index scan for DISTINCT: hop from one namespace to the next with
# one index seek each instead of reading every row.
_NAMESPACES = (
    f"WITH RECURSIVE n(id) AS (SELECT min(ns_id) FROM {TABLE} UNION ALL "
    f"SELECT (SELECT min(ns_id) FROM {TABLE} WHERE ns_id > n.id) FROM n WHERE n.id IS NOT NULL) "
    f"SELECT {NS_TABLE}.name FROM n JOIN {NS_TABLE} ON {NS_TABLE}.id = n.id"
)
_NS_ID = f"SELECT id FROM {NS_TABLE} WHERE name = ?"
_NS_ADD = f"INSERT OR IGNORE INTO {NS_TABLE} (name) VALUES (?)"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {TABLE} (ns_id INTEGER NOT NULL, key TEXT NOT NULL, "
    "expires REAL, value BLOB NOT NULL, PRIMARY KEY (ns_id, key)) WITHOUT ROWID",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_expires ON {TABLE} (ns_id, expires) "
    "WHERE expires IS NOT NULL",
    f"CREATE TABLE IF NOT EXISTS {NS_TABLE} (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
)
_IN_CHUNK = 500  # well under SQLITE_MAX_VARIABLE_NUMBER (999 before SQLite 3.32)
_FETCH = 512  # rows per fetchmany() while streaming
_PAGE_BYTES = 1 << 20  # about the most value bytes per fetchmany() page of items()
_MAX_IDLE_READERS = 4
# SQLiteStore._rget_polled keeps at most this many records per connection, each at most
# this large (bigger ones are read every time).
_POLLED_RECORDS = 64
_POLLED_BYTES = 16384
# ... and looks for the -shm mapping (a read of /proc/self/maps) at this poll.
_POLLS_BEFORE_WATCH = 3
_UNREAD: Any = object()  # not in the connection's polled records
_SYNC_MODES = ("normal", "full")

# SQLite primary result codes (the low byte of an extended code).
_BUSY, _LOCKED, _READONLY, _CORRUPT, _CANTOPEN, _NOTADB = 5, 6, 8, 11, 14, 26
_READONLY_DBMOVED = _READONLY | (4 << 8)  # an extended result code

# -- fork detection -------------------------------------------------------------------------
# A connection must never be used (nor closed: closing could checkpoint and delete the WAL
# under the parent) in a child process. The generation changes in every child; stores
# compare it on each call (cheaper than os.getpid(), which is a system call) and abandon
# the inherited connections, keeping them referenced here forever so they are never closed.
_fork_gen = 0
_INHERITED: list[sqlite3.Connection] = []


def _forked() -> None:
    global _fork_gen
    _fork_gen += 1
    _GATE.after_fork_in_child()
    _TXN.__dict__.pop("held", None)  # a transaction on the parent's connection
    # The inlined reads use the thread's connection without looking at the generation:
    # off until the store has abandoned the parent's connections (_after_fork).
    for store in list(_STORES.values()):
        store._fastnid = None


class _ThreadWrites:
    """One thread's SQLite writes in progress (only that thread changes the counts)."""

    __slots__ = ("__weakref__", "active", "own")

    def __init__(self) -> None:
        self.active = 0  # write statements and transactions in progress
        self.own = 0  # of which open ``_exclusive`` transactions


class _ForkGate:
    """Holds ``fork()`` back while other threads of this process are writing to SQLite.

    SQLite records in a per-process table which connection holds which file lock, and
    ``fork()`` copies that table: a child forked while another thread is inside a write
    transaction believes that (abandoned) connection still holds the write lock, and no
    connection in the child can ever write the file (``LockTimeoutError`` forever). So
    ``fork()`` waits, up to :data:`_FORK_WAIT` seconds, for the writes in progress in other
    threads to end, and new ones wait for the fork. The bound keeps a transaction whose
    callback waits for the forking thread from deadlocking; the child then gets a clean
    ``LockTimeoutError`` for that file, never a hang or damage.

    The write path takes no lock: each thread counts its own writes (a write first
    counts itself, then looks at ``forking``; a fork first sets ``forking``, then sums
    the counts, so one of the two always sees the other).

    Closing a connection is held back the same way (:meth:`close`): it frees memory
    under SQLite's allocator mutex, and a child forked meanwhile inherits that mutex
    locked and hangs at its first SQLite call. A thread's connection is closed when the
    thread ends, so this happened whenever a thread that had used the store ended as
    another forked (``tests/torture/test_fork_safety.py``).
    """

    def __init__(self) -> None:
        # Reentrant: a connection's finalizer may run (and close it) in a thread that
        # already holds the lock, the forking thread included.
        self.cond = threading.Condition(threading.RLock())
        self.forking = False
        self.forker: int | None = None
        self.closing = 0  # connections being closed
        self.local = threading.local()
        self.threads: weakref.WeakSet[_ThreadWrites] = weakref.WeakSet()

    def _mine(self) -> _ThreadWrites:
        try:
            mine: _ThreadWrites = self.local.w
        except AttributeError:
            mine = self.local.w = _ThreadWrites()
            with self.cond:
                self.threads.add(mine)
        return mine

    def enter(self, own: bool = False) -> None:
        mine = self._mine()
        while True:
            mine.active += 1
            # A statement inside this thread's own open transaction must not wait: the
            # fork is waiting for that transaction to end.
            if not self.forking or mine.own:
                break
            mine.active -= 1
            with self.cond:
                self.cond.notify_all()
                while self.forking:
                    self.cond.wait()
        if own:
            mine.own += 1

    def leave(self, own: bool = False) -> None:
        mine = self._mine()
        mine.active -= 1
        if own:
            mine.own -= 1
        if self.forking:
            with self.cond:
                self.cond.notify_all()

    def close(
        self, conn: sqlite3.Connection, cursor: sqlite3.Cursor | None = None, pid: int = 0
    ) -> None:
        """Close *conn* (and first *cursor*, its reusable cursor: a statement left in it,
        e.g. by a call that failed, would keep SQLite from closing the file while an
        exception's traceback keeps the cursor alive), holding ``fork()`` back meanwhile
        (see the class docstring).

        Counted in one shared number, not per thread: this runs as a finalizer, also
        while a thread is ending, when its thread-local state may already be gone.
        """
        if pid and os.getpid() != pid:
            # Inherited from the parent: freed in a child, while fork() itself deletes the
            # parent's other threads (before any after-fork hook runs). Closing it would
            # take SQLite locks a parent thread may have held at the fork: never.
            _INHERITED.append(conn)
            return
        me = threading.get_ident()
        with self.cond:
            while self.forking and self.forker != me:
                self.cond.wait()
            self.closing += 1
        try:
            if cursor is not None:
                with contextlib.suppress(sqlite3.Error):
                    cursor.close()
            conn.close()
        finally:
            with self.cond:
                self.closing -= 1
                self.cond.notify_all()

    def before_fork(self) -> None:
        # The forking thread's own open transaction cannot end while it forks: not waited.
        mine = self._mine()
        deadline = time.monotonic() + _FORK_WAIT
        with self.cond:
            self.forking = True
            self.forker = threading.get_ident()
            while (
                self.closing
                or sum(w.active for w in self.threads) > mine.active
                or _calls_in_other_threads(self.forker)
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Writes notify when they end; reads do not (their path stays lock-free),
                # so look again soon.
                self.cond.wait(min(left, 0.002))

    def writing_here(self) -> bool:
        """Whether this thread is inside a write the fork waits for."""
        return self._mine().active > 0

    def wait_for_fork(self) -> None:
        with self.cond:
            while self.forking:
                self.cond.wait()

    def after_fork_in_parent(self) -> None:
        with self.cond:
            self.forking = False
            self.forker = None
            self.cond.notify_all()

    def after_fork_in_child(self) -> None:
        # Fresh locks (the parent's other threads are gone); only the forking thread's own
        # writes (if it forked inside a transaction) are still in progress here.
        mine = self._mine()
        self.__init__()  # type: ignore[misc]
        self.local.w = mine
        self.threads.add(mine)


def _calls_in_other_threads(me: int | None) -> bool:
    """Whether a thread other than *me* is inside a call on one of this process's SQLite
    connections: a child forked then could inherit SQLite's allocator mutex locked."""
    return any(c.busy and c.owner not in (None, me) for c in list(_CONNS))


#: Every SQLite connection of this process (see _calls_in_other_threads).
_CONNS: weakref.WeakSet[_Conn] = weakref.WeakSet()

#: Longest wait of fork() for other threads' SQLite writes (see _ForkGate).
_FORK_WAIT = 5.0
_GATE = _ForkGate()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_GATE.before_fork,
        after_in_parent=_GATE.after_fork_in_parent,
        after_in_child=_forked,
    )

#: Every SQLiteStore of this process, by id() (see _forked; a store is not hashable).
_STORES: weakref.WeakValueDictionary[int, SQLiteStore] = weakref.WeakValueDictionary()

# (st_dev, st_ino) -> the open SQLiteStore instances on that file in this process, by id().
# Closing *any* descriptor of a file drops every POSIX lock the process holds on it,
# including SQLite's own: the header check only reads a file no instance here has open.
# _lend_transaction() finds a file's other stores here.
_OPEN_FILES: dict[tuple[int, int], weakref.WeakValueDictionary[int, SQLiteStore]] = {}
_OPEN_FILES_LOCK = threading.Lock()
# Per thread, ``held``: (st_dev, st_ino) -> the connection of this thread's open write
# transaction on that file, for stores that have no connection of their own yet.
_TXN = threading.local()


def _unregister_file(file_id: tuple[int, int], ident: int) -> None:
    with _OPEN_FILES_LOCK:
        stores = _OPEN_FILES.get(file_id)
        if stores is not None:
            stores.pop(ident, None)
            if not stores:
                del _OPEN_FILES[file_id]


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with *prefix* (or None).

    UTF-8 byte order (SQLite's BINARY collation) is code point order, so incrementing the
    last code point that can be incremented gives the exclusive upper bound. Surrogates
    never occur in keys (they are not valid UTF-8), so U+D7FF steps to U+E000.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars.pop()) + 1
        if code == 0xD800:
            code = 0xE000
        if code <= 0x10FFFF:
            return "".join(chars) + chr(code)
    return None


_NS, _KEY, _DATA, _EXPIRES = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
_DELETE_KIND, _FOREVER_KIND, _PUT_KIND = 0, 1, 2


def _op_kind(op: Op) -> int:
    if op.data is None:
        return _DELETE_KIND
    return _FOREVER_KIND if op.expires is None else _PUT_KIND


def _float_option(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise InvalidOptionError(f"expected a number of seconds, got {text!r}") from exc


_URL_OPTIONS: dict[str, Callable[[str], Any]] = {"synchronous": str, "timeout": _float_option}
#: The longest ``timeout``: SQLite's busy timeout is an int of milliseconds.
_MAX_TIMEOUT = 2147483.647
#: Seconds: writes of a store closer together than this share one check that its file is
#: still at its path (see SQLiteStore._check_write).
_RECHECK = 0.001
_monotonic = time.monotonic


# What _run() returns.
_ONE, _ALL, _COUNT_CHANGED = 0, 1, 2


class _Conn:
    """One connection, and the depth of its open ``_exclusive()`` transaction.

    ``close()`` may run in any thread, and Python's ``sqlite3`` crashes (a segfault, not
    an exception) when a connection is closed while another thread is inside one of its
    calls. So each use of a connection is bracketed by :meth:`enter` and :meth:`leave`
    (inlined on the hot paths), and ``close()`` calls :meth:`close_when_idle`: it closes
    an idle connection at once and leaves a busy one to its user, who closes it on
    leaving. The two sides write their own flag and then read the other's (``busy``,
    then ``closing``; ``closing``, then ``busy``), and the GIL orders these reads and
    writes, so at least one side sees the other and no call runs on a closed connection.
    Only the thread using a connection changes ``busy`` (the shared connection of a
    memory database is used under its lock), so ``+= 1`` loses no update.
    """

    __slots__ = (
        "__weakref__",
        "busy",
        "closing",
        "conn",
        "cursor",
        "depth",
        "finalizer",
        "owner",
        "pending",
        "polled",
        "polls",
        "ptoken",
        "shm",
    )

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.busy = 0
        self.closing = False
        # The thread using it (a thread's own connection, or a reader it took), for the
        # fork gate, which waits for the calls of every other thread; None: the shared
        # connection of a memory database.
        self.owner: int | None = None
        # Reused for single-row statements (a point read reaches SQLITE_DONE at once, so
        # it never holds a read snapshot open): saves a Cursor object per call.
        self.cursor = conn.cursor()
        self.depth = 0
        # Namespace ids read inside the open _exclusive() transaction: cached only once it
        # commits (an id this transaction assigned vanishes with a rollback).
        self.pending: dict[str, int] = {}
        # SQLiteStore._rget_polled: the records read on this connection since the database
        # last changed (the wal-index header "ptoken"), and where this process maps the
        # -shm file (None: not looked up yet; -1: nowhere, no cache on this connection).
        self.polled: dict[tuple[str, str], Record | None] = {}
        self.ptoken: bytes | None = None
        self.shm: int | None = None
        self.polls = 0
        # Closes the connection when its owner (a thread's local storage, or the reader
        # pool) lets go of it, e.g. when a thread ends: no descriptor leaks per thread.
        self.finalizer = weakref.finalize(self, _GATE.close, conn, self.cursor, os.getpid())
        # Not at interpreter exit: the main thread would close connections that daemon
        # threads are still writing with (tracebacks, or a segfault mid-statement). The
        # OS closes the descriptor, and every acknowledged write is already committed.
        self.finalizer.atexit = False

    def enter(self) -> None:
        """Mark the connection in use; ``StoreClosedError`` once its store is closing."""
        self.busy += 1
        if self.closing or _GATE.forking:
            try:
                self.recheck()
            except BaseException:
                self.leave()
                raise

    def recheck(self) -> None:
        """Just marked in use, and the store is closing or a thread is forking: raise
        ``StoreClosedError``, or wait (unmarked) until the fork is done (see _ForkGate)."""
        while True:
            if self.closing:
                raise StoreClosedError("SQLiteStore is closed")
            if not _GATE.forking or _GATE.forker == threading.get_ident():
                return
            if _GATE.writing_here():  # counted by the gate already: the fork waits for it
                return
            self.busy -= 1
            try:
                _GATE.wait_for_fork()
            finally:
                self.busy += 1

    def leave(self) -> None:
        self.busy -= 1
        if self.closing and not self.busy:
            self.finalizer()

    def close_when_idle(self) -> None:
        self.closing = True
        if not self.busy:
            self.finalizer()


def _read_header(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(100)


class SQLiteStore(Store):
    """A store in one SQLite database file (or in memory with ``":memory:"``).

    ``SQLiteStore("data.db")`` or ``open("sqlite:///data.db")`` (relative) /
    ``open("sqlite:////srv/data.db")`` (absolute). Extra options: ``synchronous``
    (``"normal"``, the default, or ``"full"``) and ``timeout`` (seconds a writer waits
    for another one, default 30, then :class:`~mappingstore.errors.LockTimeoutError`).

    Durability: WAL journal. With ``synchronous="normal"`` a crashed or killed process
    loses no acknowledged write; a power cut or OS crash may lose the last commits but
    never corrupts the file. ``synchronous="full"`` also survives power loss.

    Thread safety: safe; each thread gets its own connection (closed when the thread
    ends), and iteration streams from a separate pooled reader connection, so a thread
    may write while it iterates. Multi-process: safe; several processes may read and
    write the same file at once (WAL readers never block the writer; writers wait up to
    ``timeout``). :meth:`modify`, :meth:`pop`, :meth:`setdefault`, :meth:`batch` and
    every other read-modify-write run in one ``BEGIN IMMEDIATE`` transaction. After
    ``fork()`` the child opens fresh connections by itself.

    ``":memory:"`` keeps the data in this process only, shared by the threads through one
    connection guarded by a lock (iteration then reads in pages and is not a snapshot).

    Limits: do not put the file on a network file system (NFS, SMB): SQLite's locking is
    unreliable there and the file can be corrupted. Never copy the file while it is in
    use. Do not replace, rename or delete it while a store has it open: the store then
    refuses every write (``BackendError``, nothing written; only the writes of the first
    millisecond may still go to the old file) and every new connection, until it is
    closed and opened again. A value is limited to SQLite's maximum blob size (1 GB by
    default).
    """

    scheme: ClassVar[str] = "sqlite"
    durability: ClassVar[str] = (
        "WAL, synchronous=NORMAL by default: a killed or crashed process loses no "
        "acknowledged write; a power cut may lose the last commits but never corrupts "
        "the file (synchronous=FULL: survives power loss too)"
    )
    shared_across_processes: ClassVar[bool] = True
    _fast = False  # until __init__ has finished: see there
    _rfast = False  # likewise, for the inlined reads of __getitem__ and __len__
    _nid: int | None = None  # the id of this store's namespace, once known (see _ns_id)
    # The inlined reads run when this is set: _nid, once known, in a file store (_rfast)
    # that is open and has not been forked since it last looked (see _forked).
    _fastnid: int | None = None
    # (st_dev, st_ino) of the file the connections have open, once opened (see _check_path).
    _ident: tuple[int, int] | None = None
    # time.monotonic() from which the next write checks the path again (infinity until the
    # file is known: then nothing to check).
    _next_check = float("inf")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "normal",
        timeout: float = 30.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        # Set before anything can fail: close() must work on a half-opened store.
        self._holders: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self._readers: list[_Conn] = []
        self._conn_lock = threading.Lock()
        self._file_id: tuple[int, int] | None = None
        self._file_unregister: weakref.finalize[[tuple[int, int], int], SQLiteStore] | None = None
        self._gen = _fork_gen
        self._memlock: threading.RLock | None = None
        self._local: Any = threading.local()
        self._ids: dict[str, int] = {}  # namespace -> id, committed ones only (see _ns_id)
        try:
            self._configure(path, synchronous, timeout)
            _GATE.enter()  # SQLite calls outside any connection's use: held off a fork
            try:
                self._open()
            finally:
                _GATE.leave()
        except BaseException:
            self.close()
            raise
        self._start()
        # The common write (a plain value without TTL, no dot names, writable) takes an
        # inlined path in __setitem__, in and out of a batch (bench/bench_core.py).
        self._fast = not (
            self._dot or self._readonly or self._encrypt_default or self._default_ttl is not None
        )
        self._rfast = not self._dot and self._memlock is None
        _STORES[id(self)] = self
        self._arm()

    # -- opening ------------------------------------------------------------------------

    def _configure(self, path: str | os.PathLike[str], synchronous: str, timeout: float) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise OptionTypeError(f"path must be str or os.PathLike, not {type(path).__qualname__}")
        path = os.fspath(path)
        if not isinstance(path, str):
            raise OptionTypeError("path must be text, not bytes")
        if not path:
            raise InvalidOptionError("empty database path (use ':memory:' for an in-memory store)")
        if not isinstance(synchronous, str) or synchronous.lower() not in _SYNC_MODES:
            raise InvalidOptionError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise OptionTypeError("timeout must be a number of seconds")
        # An int too large for a float (or for repr()) is shown by its size only.
        shown = (
            repr(timeout)
            if not isinstance(timeout, int) or abs(timeout) < 10**15
            else "an int of over 15 digits"
        )
        if not timeout >= 0:
            raise InvalidOptionError(f"timeout must be >= 0 seconds, got {shown}")
        # SQLite's busy timeout is a C int of milliseconds: sqlite3 turns anything longer
        # (infinity too) into no wait at all, and an int beyond a float into OverflowError.
        if not timeout <= _MAX_TIMEOUT:
            raise InvalidOptionError(
                f"timeout must be at most {_MAX_TIMEOUT} seconds (about 24 days, SQLite's "
                f"limit), got {shown}"
            )
        self._sync = synchronous.lower()
        self._timeout = float(timeout)
        self._memory = path == ":memory:"
        self._path = path if self._memory else os.path.abspath(path)
        if self._memory:
            # One private database per instance. A shared-cache URI would let each thread
            # have its own connection, but shared-cache table locks fail at once with
            # SQLITE_LOCKED instead of waiting: one connection and a lock are simpler.
            self._uri = f"file:mappingstore-{uuid.uuid4().hex}?mode=memory"
        else:
            mode = "ro" if self._readonly else "rwc"
            self._uri = f"file:{urllib.parse.quote(self._path)}?mode={mode}"

    def _open(self) -> None:
        if self._memory:
            holder = self._make_conn()
            self._memlock = threading.RLock()
            self._local = types.SimpleNamespace(holder=holder)
            try:
                self._create_schema(holder.conn)
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            return
        self._check_file()
        holder = self._thread_conn()
        conn = holder.conn
        # Processes opening a new file at once race to switch it to WAL and create the
        # tables. Switching the journal mode needs the file to itself and SQLite answers
        # "database is locked" at once there, without its busy handler: so retry (the
        # schema step is one transaction, so it may run again) until the timeout.
        deadline = time.monotonic() + self._timeout
        delay = 0.001
        while True:
            try:
                if not self._readonly:
                    conn.execute("PRAGMA journal_mode=WAL").fetchall()
                self._check_schema(conn)
                break
            except sqlite3.Error as exc:
                error = self._error(exc)
                if not isinstance(error, LockTimeoutError) or time.monotonic() >= deadline:
                    raise error from exc
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)
        try:
            st = os.stat(self._path)
        except OSError as exc:
            raise BackendError(f"cannot stat {self._path!r}: {exc}") from exc
        if self._file_id is None:  # SQLite created the file: later opens must not read it
            with _OPEN_FILES_LOCK:
                self._register_file(st)
        # From now on every new connection, and every write, checks that the path still
        # names this file (see _check_path).
        self._ident = (st.st_dev, st.st_ino)
        self._next_check = float("-inf")

    def _check_path(self, writing: bool = False) -> None:
        """Raise ``BackendError`` unless the path still names the file this store opened.

        A file replaced (``os.replace`` of a restored backup) or deleted under an open store
        stays open in its connections, and SQLite (in WAL mode) notices nothing: writes
        would land in a file no one can open any more, acknowledged and lost, and the
        connections opened afterwards (another thread's, a reader's) would read the new
        file. So each new connection checks the path (before connecting too: it would
        create a deleted file again), and so do the writes (_check_write). Reads on the
        connections already open are not checked (that would cost every ``get``): they go
        on seeing the file they opened, never the new one.
        """
        ident = self._ident
        if ident is None:
            return
        try:
            st = os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            what = "deleted or moved"
        except OSError:
            return  # cannot tell (a directory made unsearchable): SQLite reports what matters
        else:
            if st.st_ino == ident[1] and st.st_dev == ident[0]:
                return
            what = "replaced by another file"
        raise BackendError(
            f"{self._path}: the database file was {what} while this store had it open"
            f"{' (nothing was written)' if writing else ''}: close the store and open it again"
        )

    def _check_write(self) -> None:
        """Before a write (a statement outside a transaction, or a transaction that has just
        taken the write lock): :meth:`_check_path`, nothing written if it raises.

        A ``stat`` before every write cost 15% of a ``set()`` (bench/bench_core.py on a
        2-core VM: 0.73x raw sqlite3, against a target of 0.8x), so writes less than
        :data:`_RECHECK` seconds after this store's last check share it (a clock read and a
        compare per write, about 2% to 4% of a ``set()``): only the writes of the first
        millisecond after a replacement can still go to the old file, as one in flight
        during the replacement always could.
        """
        now = _monotonic()
        if now >= self._next_check:
            self._check_path(writing=True)
            self._next_check = now + _RECHECK

    def _check_file(self) -> None:
        """Reject a file that is not a SQLite database before SQLite sees it (never hang)."""
        path = self._path
        parent = os.path.dirname(path) or "."
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self._readonly:
                raise StoreNotFoundError(
                    f"no SQLite store at {path!r} (opened read-only)"
                ) from None
            if not os.path.isdir(parent):
                raise StoreNotFoundError(
                    f"cannot create {path!r}: directory {parent!r} does not exist"
                ) from None
            return
        except OSError as exc:
            raise BackendError(f"cannot open {path!r}: {exc}") from exc
        if stat.S_ISDIR(st.st_mode):
            raise BackendError(f"{path!r} is a directory, not a SQLite database file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device could block the read forever
            raise StoreCorruptError(f"{path!r} is not a regular file")
        with _OPEN_FILES_LOCK:
            if _OPEN_FILES.get((st.st_dev, st.st_ino)):
                # Already open (and checked) here; reading it ourselves could drop its locks.
                self._register_file(st)
                return
            try:
                header = _read_header(path) if st.st_size else b""
            except OSError as exc:
                raise BackendError(f"cannot read {path!r}: {exc}") from exc
            if header:
                self._check_header(header, st.st_size)
            self._register_file(st)

    def _register_file(self, st: os.stat_result) -> None:
        """Count this instance as having the file open (caller holds _OPEN_FILES_LOCK)."""
        file_id = (st.st_dev, st.st_ino)
        _OPEN_FILES.setdefault(file_id, weakref.WeakValueDictionary())[id(self)] = self
        self._file_id = file_id
        # Runs once: at close(), or when a store nobody closed is garbage-collected.
        self._file_unregister = weakref.finalize(self, _unregister_file, file_id, id(self))

    def _check_header(self, header: bytes, size: int) -> None:
        path = self._path
        if len(header) < 100 or header[:16] != _MAGIC:
            raise StoreCorruptError(f"{path!r} is not a SQLite database (bad or truncated header)")
        page_size = int.from_bytes(header[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        if page_size < 512 or page_size & (page_size - 1):
            raise StoreCorruptError(f"{path!r} is damaged: invalid page size {page_size}")
        pages = int.from_bytes(header[28:32], "big")
        # The in-header page count is valid when "version-valid-for" equals the change
        # counter. A database with a hot -wal or -journal may legitimately differ.
        hot = any(os.path.exists(path + suffix) for suffix in ("-wal", "-journal"))
        if pages and header[92:96] == header[24:28] and size < pages * page_size and not hot:
            raise StoreCorruptError(
                f"{path!r} is truncated: {size} bytes, its header says {pages * page_size}"
            )

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            raise StoreCorruptError(
                f"{self._path!r} belongs to another application (application_id {app_id:#x})"
            )
        if TABLE not in tables:
            if self._readonly:
                raise StoreCorruptError(
                    f"{self._path!r} is not a mappingstore database (no {TABLE} table)"
                )
            self._create_schema(conn)
            return
        for table, expected in ((TABLE, _COLUMNS), (NS_TABLE, _NS_COLUMNS)):
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            if columns != expected:
                raise StoreCorruptError(
                    f"{self._path!r}: table {table} has columns {columns}, expected {expected}"
                )
        # Touch the table's root page: a damaged file fails here, at open.
        conn.execute(f"SELECT 1 FROM {TABLE} LIMIT 1").fetchall()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # two processes creating the file at once: one wins
        try:
            fresh = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
            for statement in _SCHEMA:
                conn.execute(statement)
            if fresh:  # mark only a file we created; never relabel another app's database
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute("COMMIT")
        except BaseException:
            conn.rollback()
            raise

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or ``sqlite://:memory:``.

        Query options: the common ones plus ``synchronous`` and ``timeout``.
        """
        parsed = parse_url(url, cls.scheme, _URL_OPTIONS)
        if parsed.netloc == ":memory:" and parsed.path in ("", "/"):
            path = ":memory:"
        else:
            path = file_path(parsed)
            if not path:
                raise InvalidURLError("sqlite:// URL has no path")
        return cls(path, **{**parsed.options, **options})

    @property
    def url(self) -> str:
        """docstring inherited"""
        query = []
        if self._sync != "normal":
            query.append(f"synchronous={self._sync}")
        if self._timeout != 30.0:
            # Every digit (":g" kept 6: timeout=12.3456789 reopened as 12.3457).
            timeout = self._timeout
            query.append(f"timeout={int(timeout) if timeout.is_integer() else timeout!r}")
        if self._memory:
            return "sqlite://:memory:" + ("?" + "&".join(query) if query else "")
        return file_url(self.scheme, self._path, query)

    @property
    def path(self) -> str:
        """The absolute path of the database file, or ``":memory:"``."""
        return self._path

    # -- connections --------------------------------------------------------------------

    def _make_conn(self) -> _Conn:
        if self._closed:
            raise StoreClosedError("SQLiteStore is closed")
        # Opening a connection allocates under SQLite's allocator lock, which a child
        # forked meanwhile would inherit locked: the fork waits for it (see _ForkGate).
        _GATE.enter()
        try:
            return self._new_conn()
        finally:
            _GATE.leave()

    def _new_conn(self) -> _Conn:
        # Before connecting too: the connection would create a deleted file again, empty.
        self._check_path()
        try:
            conn = sqlite3.connect(
                self._uri,
                uri=True,
                timeout=self._timeout,
                isolation_level=None,  # autocommit; transactions are explicit
                check_same_thread=False,  # close() may run in another thread
                cached_statements=64,
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            conn.execute(f"PRAGMA synchronous={self._sync}")
            self._check_path()  # replaced while connecting: this one has the other file open
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc) from exc
        except BaseException:
            conn.close()
            raise
        holder = _Conn(conn)
        if not self._memory:  # a file: one thread at a time uses a connection
            holder.owner = threading.get_ident()
        with self._conn_lock:
            self._holders.add(holder)
        _CONNS.add(holder)
        return holder

    def _after_fork(self) -> None:
        with self._conn_lock:
            for holder in list(self._holders):
                holder.finalizer.detach()
                _INHERITED.append(holder.conn)
            self._holders = weakref.WeakSet()
            self._readers = []
            if self._memlock is not None:
                # The child owns a private copy of the memory database and keeps using
                # it through the inherited connection (its only copy); a lock held by a
                # parent thread at fork time would never be released here.
                self._memlock = threading.RLock()
                holder = _Conn(self._local.holder.conn)
                holder.finalizer.detach()
                self._holders.add(holder)
                self._local = types.SimpleNamespace(holder=holder)
            else:
                self._local = threading.local()
            self._gen = _fork_gen
        self._arm()

    def _thread_conn(self) -> _Conn:
        if self._gen != _fork_gen:
            self._after_fork()
        try:
            holder: _Conn = self._local.holder
        except AttributeError:
            held = getattr(_TXN, "held", None)
            if held and self._file_id in held:  # see _lend_transaction; not kept after it
                return held[self._file_id]  # type: ignore[no-any-return]
            holder = self._local.holder = self._make_conn()
        return holder

    def _conn(self) -> sqlite3.Connection:
        if self._gen != _fork_gen:
            self._after_fork()
        try:
            return self._local.holder.conn  # type: ignore[no-any-return]
        except AttributeError:
            return self._thread_conn().conn

    def _error(self, exc: sqlite3.Error) -> MappingStoreError:
        """Convert a sqlite3 error (the caller chains it with ``raise ... from``)."""
        msg = str(exc)
        code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
        primary = code & 0xFF if isinstance(code, int) else None
        where = self._path
        if self._closed and isinstance(exc, sqlite3.ProgrammingError):
            return StoreClosedError("SQLiteStore is closed")
        if msg.startswith("Could not decode to UTF-8 column"):
            # A key or namespace name that is not UTF-8 (only another program writes such
            # text; values are read as BLOBs). The message quotes the text: not repeated.
            return StoreCorruptError(f"{where}: a stored name is not valid UTF-8 text")
        if primary in (_BUSY, _LOCKED) or "database is locked" in msg or "table is locked" in msg:
            return LockTimeoutError(
                f"{where}: database is locked (waited {self._timeout:g} s for another "
                f"writer): {msg}"
            )
        if code == _READONLY_DBMOVED:  # rollback-journal mode only (WAL never reports it)
            return BackendError(
                f"{where}: the database file was moved, replaced or deleted while open: {msg}"
            )
        if primary == _READONLY or "readonly database" in msg:
            return ReadOnlyError(f"{where}: {msg}")
        if primary in (_CORRUPT, _NOTADB) or "malformed" in msg or "not a database" in msg:
            return StoreCorruptError(f"{where} is damaged or not a mappingstore database: {msg}")
        if primary == _CANTOPEN or "unable to open" in msg:
            return BackendError(f"cannot open {where}: {msg}")
        return BackendError(f"{where}: {msg}")

    # -- statement helpers --------------------------------------------------------------

    def _one(self, sql: str, params: Sequence[Any]) -> Any:
        """The first row of one statement."""
        lock = self._memlock
        if lock is None:
            return self._run(sql, params, _ONE)
        with lock:
            return self._run(sql, params, _ONE)

    def _all(self, sql: str, params: Sequence[Any]) -> list[Any]:
        """Every row of one statement."""
        lock = self._memlock
        if lock is None:
            return self._run(sql, params, _ALL)  # type: ignore[no-any-return]
        with lock:
            return self._run(sql, params, _ALL)  # type: ignore[no-any-return]

    def _write(self, sql: str, params: Sequence[Any]) -> int:
        """The number of rows one statement changed."""
        lock = self._memlock
        _GATE.enter()
        try:
            if lock is None:
                return self._run(sql, params, _COUNT_CHANGED)  # type: ignore[no-any-return]
            with lock:
                return self._run(sql, params, _COUNT_CHANGED)  # type: ignore[no-any-return]
        finally:
            _GATE.leave()

    def _run(self, sql: str, params: Sequence[Any], result: int) -> Any:
        """One statement on the thread's connection, marked in use (see _Conn)."""
        holder = self._thread_conn()
        holder.enter()
        try:
            # A write outside a transaction: is the file still the one at the path? (A
            # transaction checked when it began.) The one cost this adds to a set().
            # (_check_write's time test inlined: no call for the writes that share a check.)
            if result == _COUNT_CHANGED and not holder.depth and _monotonic() >= self._next_check:
                self._check_write()
            cursor = holder.cursor.execute(sql, params)
            if result == _ONE:
                return cursor.fetchone()
            return cursor.rowcount if result == _COUNT_CHANGED else cursor.fetchall()
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            holder.leave()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """One ``BEGIN IMMEDIATE`` transaction per thread; nested calls join it.

        It takes the database's write lock at once (waiting up to ``timeout`` for another
        writer, in any process), so reads inside see data no other writer can change
        before the commit: read-modify-write is atomic across processes.
        """
        lock = self._memlock
        if lock is not None:
            lock.acquire()  # before looking at depth: the memory connection is shared
        try:
            holder = self._thread_conn()
            if holder.depth:
                holder.depth += 1
                try:
                    yield
                finally:
                    holder.depth -= 1
                return
            conn = holder.conn
            # The fork gate first: a thread waiting there for a fork must not be marked
            # in use, or the fork would wait for it in turn.
            _GATE.enter(own=True)
            try:
                holder.enter()  # for the whole transaction: close() lets it end first
            except BaseException:
                _GATE.leave(own=True)
                raise
            try:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc
                if self._ident is not None:  # once the lock is ours: after any wait for it
                    try:
                        self._check_write()
                    except BaseException:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                        raise
                holder.depth = 1
                lent = self._lend_transaction(holder)
                try:
                    yield
                except BaseException as exc:
                    holder.depth = 0
                    self._take_back(lent)
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    if isinstance(exc, sqlite3.Error):
                        raise self._error(exc) from exc
                    raise
                holder.depth = 0
                self._take_back(lent)
                try:
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise self._error(exc) from exc
                if holder.pending:  # committed: the ids seen inside are now for good
                    self._remember_ids(holder.pending)
            finally:
                holder.pending.clear()
                holder.leave()
                _GATE.leave(own=True)
        finally:
            if lock is not None:
                lock.release()

    def _lend_transaction(self, holder: _Conn) -> list[tuple[SQLiteStore, Any, _Conn | None]]:
        """Make *holder*, which has just begun this thread's write transaction, the thread's
        connection of every other open store of the same file, until _take_back().

        A ``modify()`` function (or any code inside the transaction) that writes through a
        second store of the file then joins the transaction, as it would on PostgreSQL,
        instead of waiting ``timeout`` seconds for the lock its own thread holds. The
        swap is per thread (the stores' connections are thread-local); other threads keep
        their own connections and wait for the commit as before. Every write transaction
        runs this: with no other store open on the file it is one dictionary store.
        """
        file_id = self._file_id
        lent: list[tuple[SQLiteStore, Any, _Conn | None]] = []
        if file_id is None or self._memlock is not None:
            return lent
        try:
            held = _TXN.held
        except AttributeError:
            held = _TXN.held = {}
        held[file_id] = holder  # for stores opened, or first used here, inside it
        stores = _OPEN_FILES.get(file_id)
        if stores is None or len(stores) < 2:  # this store is the file's only one
            return lent
        with _OPEN_FILES_LOCK:
            others = [s for s in stores.values() if s is not self]
        for store in others:
            if store._closed or store._memlock is not None or store._gen != _fork_gen:
                continue
            local = store._local
            lent.append((store, local, getattr(local, "holder", None)))
            local.holder = holder
        return lent

    def _take_back(self, lent: list[tuple[SQLiteStore, Any, _Conn | None]]) -> None:
        """Undo _lend_transaction(): each store gets its own connection back."""
        held = getattr(_TXN, "held", None)
        if held:
            held.pop(self._file_id, None)
        for store, local, own in lent:
            if store._local is not local:  # closed or forked since: it has a fresh one
                continue
            if own is None:
                with contextlib.suppress(AttributeError):
                    del local.holder
            else:
                local.holder = own

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """The thread's connection inside one read transaction (several statements, one view)."""
        lock = self._memlock
        if lock is not None:
            with lock:
                yield self._conn()
            return
        holder = self._thread_conn()
        if holder.depth:  # already inside this thread's write transaction
            yield holder.conn
            return
        conn = holder.conn
        holder.enter()
        try:
            try:
                conn.execute("BEGIN")
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            try:
                yield conn
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")
        finally:
            holder.leave()

    def _rows(self, sql: str, params: tuple[Any, ...], column: int | None) -> Iterator[Any]:
        """Stream the rows of one SELECT ordered by key (only column *column* if given).

        A file store reads from a pooled reader connection: one statement, one consistent
        snapshot, and the thread's own connection stays free for writes made while it
        iterates (upgrading a reader's stale snapshot to a writer would fail with
        SQLITE_BUSY_SNAPSHOT instead of waiting). Inside this thread's transaction the
        rows come from the transaction itself, fetched at once (they must see its writes,
        and a ROLLBACK would abort a pending statement). The memory store reads pages of
        rows under its lock, continuing after the last key (parameter ?2).
        """
        lock = self._memlock
        if lock is not None:
            rows: Iterator[Any] = self._paged_rows(lock, sql, params)
            return rows if column is None else map(itemgetter(column), rows)
        holder = self._thread_conn()
        if holder.depth:
            try:
                fetched = _text_rows(holder.conn.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            return iter(fetched if column is None else [row[column] for row in fetched])
        return self._stream(sql, params, column)

    def _stream(self, sql: str, params: tuple[Any, ...], column: int | None) -> Iterator[Any]:
        if column is None:  # whole rows, one at a time: values may be large
            return self._stream_rows(sql, params)
        # One column (keys): chain() steps through each page in C, with no Python frame
        # per key. The pages grow from one row, so bool(store) or next(iter(store))
        # still reads a single row.
        return itertools.chain.from_iterable(self._column_pages(sql, params, column))

    def _stream_rows(self, sql: str, params: tuple[Any, ...]) -> Iterator[Any]:
        with self._reading(sql, params) as (reader, cursor):
            while True:
                reader.enter()
                try:
                    row = cursor.fetchone()
                finally:
                    reader.leave()
                if row is None or type(row[0]) is not str:
                    return  # the end, or a BLOB key: it and every row after it (_text_rows)
                yield row

    def _column_pages(
        self, sql: str, params: tuple[Any, ...], column: int
    ) -> Iterator[Iterator[Any]]:
        with self._reading(sql, params) as (reader, cursor):
            pick = itemgetter(column)
            size = 1
            while True:
                reader.enter()
                try:
                    rows = cursor.fetchmany(size)
                finally:
                    reader.leave()
                if not rows:
                    return
                yield map(pick, _text_rows(rows, column))
                size = min(size * 8, _FETCH)

    @contextlib.contextmanager
    def _reading(self, sql: str, params: tuple[Any, ...]) -> Iterator[tuple[_Conn, sqlite3.Cursor]]:
        """A pooled reader connection and a cursor over *sql* on it, returned to the pool
        at the end. Each fetch is marked in use (``reader.enter()``/``leave()``, see _Conn):
        a stream left suspended does not keep close() from closing its connection, and
        its next fetch raises ``StoreClosedError``."""
        reader = self._take_reader()
        cursor: sqlite3.Cursor | None = None
        try:
            try:
                reader.enter()
                try:
                    cursor = reader.conn.execute(sql, params)
                finally:
                    reader.leave()
                yield reader, cursor
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
        finally:
            if cursor is not None:
                with contextlib.suppress(StoreClosedError, sqlite3.Error):
                    reader.enter()  # raises once closing: the connection goes anyway
                    try:
                        cursor.close()
                    finally:
                        reader.leave()
            self._return_reader(reader)

    def _paged_rows(self, lock: Any, sql: str, params: tuple[Any, ...]) -> Iterator[Any]:
        sql_first = f"{sql} ORDER BY key LIMIT {_FETCH}"
        sql_next = sql.replace("key >= ?", "key > ?") + f" ORDER BY key LIMIT {_FETCH}"
        current, args = sql_first, params
        while True:
            try:
                with lock:
                    rows = self._conn().execute(current, args).fetchall()
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            text = _text_rows(rows)
            yield from text
            if len(rows) < _FETCH or text is not rows:
                return
            current = sql_next
            args = (params[0], rows[-1][0], *params[2:])

    def _take_reader(self) -> _Conn:
        if self._gen != _fork_gen:
            self._after_fork()
        with self._conn_lock:
            if self._readers:
                reader = self._readers.pop()
                reader.owner = threading.get_ident()
                return reader
        return self._make_conn()

    def _return_reader(self, reader: _Conn) -> None:
        with self._conn_lock:
            if (
                not self._closed
                and len(self._readers) < _MAX_IDLE_READERS
                and reader in self._holders
            ):
                self._readers.append(reader)
                return
        reader.finalizer()

    # -- namespace ids ------------------------------------------------------------------

    def _remember_ids(self, ids: dict[str, int]) -> None:
        """Cache committed namespace ids (they never change: see the module docstring)."""
        self._ids.update(ids)
        if self._nid is None:
            self._nid = self._ids.get(self._ns)
            self._arm()

    def _arm(self) -> None:
        """Enable the inlined reads once they can run (see _fastnid)."""
        if self._rfast and not self._closed and self._gen == _fork_gen:
            self._fastnid = self._nid

    def _ns_id(self, ns: str) -> int | None:
        """The id of namespace *ns*, or None while nothing was ever written to it."""
        nid = self._ids.get(ns)
        if nid is not None:
            return nid
        lock = self._memlock
        try:
            with lock if lock is not None else contextlib.nullcontext():
                holder = self._thread_conn()
                holder.enter()
                try:
                    row = holder.cursor.execute(_NS_ID, (ns,)).fetchone()
                finally:
                    holder.leave()
                if row is None:
                    return None
                nid = int(row[0])
                if holder.depth:
                    # Perhaps assigned by this very transaction, which may still roll back:
                    # cached when it commits (see _exclusive).
                    holder.pending[ns] = nid
                    return nid
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        self._remember_ids({ns: nid})
        return nid

    def _ns_id_for_write(self, ns: str) -> int:
        """The id of *ns*, assigned now (in the current transaction, if any) if it has none."""
        nid = self._ns_id(ns)
        if nid is None:
            self._write(_NS_ADD, (ns,))
            nid = self._ns_id(ns)
            if nid is None:  # pragma: no cover - the row was inserted just above
                raise BackendError(f"{self._path}: cannot register namespace {ns!r}")
        return nid

    # -- backend contract ---------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        # docstring inherited. Store.__getitem__ and _get() inlined for the common read (an
        # ASCII key of a file store's own namespace, outside a batch; bench/bench_core.py).
        nid = self._fastnid
        if nid is not None and not self._nbatch and type(key) is str and key and key.isascii():
            try:
                holder = self._local.holder
            except AttributeError:
                holder = self._thread_conn()
            holder.busy += 1  # holder.enter() and leave() inlined (see _Conn)
            try:
                if holder.closing or _GATE.forking:
                    holder.recheck()
                row = holder.cursor.execute(_GET_FOREVER, (nid, key)).fetchone()
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            finally:
                holder.busy -= 1
                if holder.closing and not holder.busy:
                    holder.finalizer()
            if row is None:
                raise MissingKeyError(key)
            data = row[0]
            if type(data) is not bytes:  # a record with an expiry: read it in full
                data = self._get(self._ns, key)
                if data is None:
                    raise MissingKeyError(key)
            if data[:2] == PLAIN_HEADER:
                return decode_plain(data)
            return self._decode(self._ns, key, data)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: Any) -> None:
        # docstring inherited. Store.set() inlined for the common write; an ASCII key needs
        # no further check. Anything else (and every error) takes the general path.
        if self._fast and type(key) is str and key and key.isascii() and not self._closed:
            data = wrap_plain(pack(value))
            if self._nbatch:  # Store._rput() inlined: a batch of many sets runs this per item
                batch = getattr(self._tls, "batch", None)
                if batch is not None:
                    batch.ops[(self._ns, key)] = (data, None)
                    return
            self._put(self._ns, key, data, None)
            return
        self.set(key, value)

    def _get_record(self, ns: str, key: str) -> Record | None:
        nid = self._ns_id(ns)
        if nid is None:
            return None
        row = self._one(_GET, (nid, key))
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        return row[0], row[1]

    def _get(self, ns: str, key: str) -> bytes | None:
        nid = self._ids.get(ns)
        if nid is None:
            nid = self._ns_id(ns)
            if nid is None:
                return None
        # The hottest path: _one() inlined for the common case.
        try:
            if self._memlock is None and self._gen == _fork_gen:
                try:
                    holder = self._local.holder
                except AttributeError:
                    holder = self._thread_conn()
                holder.busy += 1  # holder.enter() and leave() inlined (see _Conn)
                try:
                    if holder.closing or _GATE.forking:
                        holder.recheck()
                    row = holder.cursor.execute(_GET, (nid, key)).fetchone()
                finally:
                    holder.busy -= 1
                    if holder.closing and not holder.busy:
                        holder.finalizer()
            else:
                row = self._one(_GET, (nid, key))
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        if row is None or (row[1] is not None and row[1] <= self._clock()):
            return None
        return row[0]  # type: ignore[no-any-return]

    def _rget_polled(self, ns: str, key: str) -> bytes | None:
        """:meth:`_rget`, answered from the records this thread's connection read since the
        last commit to the file by anyone (one read of the wal-index header tells; see
        ``_walwatch``): a series' ``first()``/``last()`` polled in a loop costs no
        SQLite read transaction while nothing changes. Outside a batch and a transaction
        only (their own writes are not committed yet), on a file in WAL mode."""
        if self._nbatch or self._memlock is not None or self._gen != _fork_gen:
            return self._rget(ns, key)
        try:
            holder: _Conn = self._local.holder
        except AttributeError:  # no connection of its own in this thread yet
            return self._rget(ns, key)
        address = holder.shm
        # (in_transaction: a read snapshot get_many() holds open on this connection, and
        # a poll from a signal handler or a finalizer that runs inside it.)
        if holder.depth or address is None or address < 0 or holder.conn.in_transaction:
            data = self._rget(ns, key)
            if address is None and not holder.depth:
                # After a few reads (a thread that polls once or twice does not pay for
                # the lookup) and after a read: the connection has the WAL open.
                holder.polls += 1
                if holder.polls >= _POLLS_BEFORE_WATCH:
                    self._watch(holder)
            return data
        now = _walwatch.token(address)
        if now is None:  # a writer is writing the header
            return self._rget(ns, key)
        polled = holder.polled
        token = holder.ptoken
        if now == token:
            rec = polled.get((ns, key), _UNREAD)
        else:  # something committed since (or the first poll): everything read is old
            polled.clear()
            holder.ptoken = token = now
            rec = _UNREAD
        if rec is _UNREAD:
            # Read after the token: what the read returns is at least as new as the token,
            # and the next commit anywhere changes the token again. The row as stored,
            # expired or not (expiry is checked at each answer: a clock set back makes it
            # live again, as for a plain read).
            nid = self._ns_id(ns)
            row = None if nid is None else self._one(_GET, (nid, key))
            rec = None if row is None else (row[0], row[1])
            if len(polled) >= _POLLED_RECORDS:
                polled.clear()
            # Kept only if no other poll ran on this connection meanwhile (one nested in
            # this read, from a signal handler say, may have moved the token on: this row
            # is older).
            if holder.ptoken is token and (rec is None or len(rec[0]) <= _POLLED_BYTES):
                polled[(ns, key)] = rec
        if rec is None or (rec[1] is not None and rec[1] <= self._clock()):
            return None
        return rec[0]  # type: ignore[no-any-return]

    def _watch(self, holder: _Conn) -> None:
        """Find where this process maps the -shm file, for :meth:`_rget_polled`, once per
        connection: only for a file in WAL mode (which it cannot leave while this
        connection is open), the very file this store opened (SQLite's name for it,
        symlinks resolved, still naming the file the store checked at open)."""
        try:
            mode = self._one("PRAGMA journal_mode", ())
            files = self._all("PRAGMA database_list", ())
        except LockTimeoutError:  # busy: try again on the next poll
            return
        except MappingStoreError:  # e.g. a file name that is not UTF-8: no cache here
            holder.shm = -1
            return
        address = None
        main = next((str(f[2]) for f in files if f[1] == "main"), "")
        if mode is not None and str(mode[0]).lower() == "wal" and main and self._names_it(main):
            address = _walwatch.header_address(main + "-shm")
            if address is not None and not self._names_it(main):  # swapped meanwhile
                address = None
        holder.shm = -1 if address is None else address

    def _names_it(self, path: str) -> bool:
        """Does *path* name the file this store opened (and checks, see _check_path)?"""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def _contains(self, ns: str, key: str) -> bool:
        nid = self._ns_id(ns)
        if nid is None:
            return False
        row = self._one(_CONTAINS, (nid, key))
        return row is not None and (row[0] is None or row[0] > self._clock())

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        nid = self._ids.get(ns)
        if nid is None:
            nid = self._ns_id_for_write(ns)
        value: bytes | bytearray = bytearray(data) if len(data) <= _COPY_MAX else data
        params: tuple[Any, ...]
        if expires is None:
            sql, params = _PUT_FOREVER, (nid, key, value)
        else:
            sql, params = _PUT, (nid, key, value, expires)
        self._write(sql, params)

    def _delete(self, ns: str, key: str) -> bool:
        nid = self._ns_id(ns)
        return nid is not None and self._write(_DELETE_LIVE, (nid, key, self._clock())) > 0

    def _select(self, columns: str, nid: int, prefix: str) -> tuple[str, tuple[Any, ...]]:
        # Parameters: ?1 namespace id, ?2 lower bound, ?3 now, ?4 upper bound. The rows
        # come in key order: a key another program stored as a BLOB sorts after every
        # TEXT key, so each reader of these rows drops a page's BLOB tail (_text_rows).
        head = f"SELECT {columns} FROM {TABLE} WHERE ns_id = ?1 AND key >= ?2"
        end = _prefix_end(prefix) if prefix else None
        if end is None:
            return f"{head} AND {_LIVE}", (nid, prefix, self._clock())
        return f"{head} AND key < ?4 AND {_LIVE}", (nid, prefix, self._clock(), end)

    def __len__(self) -> int:
        # docstring inherited. Outside a batch, straight to the one counting query (inlined
        # for a file store's own namespace: bench/bench_core.py measures len()).
        nid = self._fastnid
        if nid is not None and not self._nbatch:
            try:
                holder = self._local.holder
            except AttributeError:
                holder = self._thread_conn()
            holder.busy += 1  # holder.enter() and leave() inlined (see _Conn)
            try:
                if holder.closing or _GATE.forking:
                    holder.recheck()
                count: int = holder.cursor.execute(_COUNT, (nid, self._clock())).fetchone()[0]
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            finally:
                holder.busy -= 1
                if holder.closing and not holder.busy:
                    holder.finalizer()
            return count
        if self._nbatch or self._dot or self._closed:
            return super().__len__()
        return self._count(self._ns)

    def __iter__(self) -> Iterator[str]:
        # docstring inherited. Outside a batch, hand out the stream itself: one generator
        # layer less per key (iteration speed is measured in bench/bench_core.py).
        if self._nbatch or self._dot or self._closed:
            return super().__iter__()
        return self._iter_keys(self._ns, "")

    def _iter_pairs(self) -> Iterator[tuple[str, Any]]:
        # docstring inherited. Outside a batch, decode straight from the stream: two
        # generator layers and a call less per item (items() is measured in bench_core).
        if self._nbatch or self._dot or self._closed:
            return super()._iter_pairs()
        nid = self._ns_id(self._ns)
        if nid is None:
            return iter(())
        sql, params = self._select(f"key, {_VALUE}", nid, "")
        if self._memlock is None and not self._thread_conn().depth:
            return self._decoded_pages(self._ns, sql, params)
        return self._decoded(self._ns, self._rows(sql, params, None))

    def _decoded(self, ns: str, rows: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, Any]]:
        decode = self._decode
        for key, data in rows:
            if data[:2] == PLAIN_HEADER:
                yield key, decode_plain(data)
            else:
                yield key, decode(ns, key, data)

    def _decoded_pages(
        self, ns: str, sql: str, params: tuple[Any, ...]
    ) -> Iterator[tuple[str, Any]]:
        """Decoded rows of *sql*, read from a pooled reader in pages.

        Pages grow from one row (``next(iter(store.items()))`` reads one) up to _FETCH rows
        or about _PAGE_BYTES of values, whichever is less: large values stream a few at a
        time. A page of plain records is decoded at once and handed out through C
        iterators (``chain`` over ``zip``), so the generator resumes once a page, not once
        an item (items() is measured in bench_core).
        """
        return itertools.chain.from_iterable(self._decoded_page_runs(ns, sql, params))

    def _decoded_page_runs(
        self, ns: str, sql: str, params: tuple[Any, ...]
    ) -> Iterator[Iterable[tuple[str, Any]]]:
        with self._reading(sql, params) as (reader, cursor):
            size = 1
            while True:
                reader.enter()
                try:
                    rows = _text_rows(cursor.fetchmany(size))
                finally:
                    reader.leave()
                if not rows:
                    return
                keys, datas = zip(*rows, strict=True)
                average = sum(map(len, datas)) // len(datas) + 1
                size = max(1, min(size * 8, _FETCH, _PAGE_BYTES // average))
                values = self._decode_page(ns, keys, datas)
                if values is None:  # one by one, for the right error at the right record
                    yield self._decoded(ns, rows)
                else:
                    yield zip(keys, values, strict=True)

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        nid = self._ns_id(ns)
        if nid is None:
            return iter(())
        sql, params = self._select("key", nid, prefix)
        return self._rows(sql, params, 0)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        nid = self._ns_id(ns)
        if nid is None:
            return iter(())
        sql, params = self._select(f"key, {_VALUE}", nid, prefix)
        return self._rows(sql, params, None)

    def _count(self, ns: str) -> int:
        nid = self._ids.get(ns)
        if nid is None:
            nid = self._ns_id(ns)
            if nid is None:
                return 0
        count: int = self._one(_COUNT, (nid, self._clock()))[0]
        return count

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        nid = self._ns_id(ns)
        if nid is None:
            return [None] * len(keys)
        unique = list(dict.fromkeys(keys))
        found: dict[str, bytes] = {}
        now = self._clock()

        def run(conn: sqlite3.Connection) -> None:
            for start in range(0, len(unique), _IN_CHUNK):
                chunk = unique[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = (
                    f"SELECT key, {_VALUE} FROM {TABLE} WHERE ns_id = ? AND key IN ({marks}) "
                    f"AND {_live('?')}"
                )
                found.update(conn.execute(sql, (nid, *chunk, now)).fetchall())

        try:
            if len(unique) <= _IN_CHUNK and self._memlock is None:
                holder = self._thread_conn()
                holder.enter()
                try:
                    run(holder.conn)
                finally:
                    holder.leave()
            else:
                with self._snapshot() as conn:
                    run(conn)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        return [found.get(k) for k in keys]

    def _apply(self, ops: Sequence[Op]) -> None:
        """docstring inherited"""
        if not ops:
            return
        with self._exclusive():
            conn = self._conn()
            names = set(map(_NS, ops))
            # The common batch, only writes without expiry, as one executemany fed from C
            # (no Python call per row, the test included; see _PUT for the bytearray copy).
            datas = list(map(_DATA, ops))
            if None not in datas and list(map(_EXPIRES, ops)).count(None) == len(ops):
                by_ns = {ns: self._ns_id_for_write(ns) for ns in names}
                data: Iterable[bytes | bytearray] = datas
                if max(map(len, datas)) <= _COPY_MAX:
                    data = map(bytearray, datas)
                nids: Iterator[int] = (
                    itertools.repeat(by_ns.popitem()[1])
                    if len(by_ns) == 1
                    else map(by_ns.__getitem__, map(_NS, ops))
                )
                # zip() stops with the keys: the ids may be an endless repeat().
                conn.executemany(_PUT_FOREVER, zip(nids, map(_KEY, ops), data, strict=False))
                return
            # A namespace only deleted from is not registered (None: its deletes match no row).
            written = {op.ns for op in ops if op.data is not None}
            ids = {
                ns: self._ns_id_for_write(ns) if ns in written else self._ns_id(ns) for ns in names
            }
            # Consecutive ops of one kind go in one executemany each, in order.
            for kind, group in itertools.groupby(ops, key=_op_kind):
                if kind == _PUT_KIND:
                    conn.executemany(_PUT, [(ids[o.ns], o.key, o.data, o.expires) for o in group])
                elif kind == _FOREVER_KIND:
                    conn.executemany(_PUT_FOREVER, [(ids[o.ns], o.key, o.data) for o in group])
                else:
                    conn.executemany(_DELETE, [(ids[o.ns], o.key) for o in group])

    def _clear(self, ns: str) -> None:
        nid = self._ns_id(ns)
        if nid is not None:
            self._write(_CLEAR, (nid,))

    def _purge_expired(self, ns: str) -> int:
        nid = self._ns_id(ns)
        if nid is None:
            return 0
        now = self._clock()
        return self._write(_PURGE, (nid, now)) + self._write(_PURGE_OTHERS, (nid, now))

    def _namespaces(self) -> Iterable[str]:
        # A name another program stored as a BLOB names no namespace of the store (a str
        # never equals a BLOB): skipped, as listings skip such keys (_text_rows). A name
        # stored as TEXT that is not UTF-8 raises StoreCorruptError (see _error).
        return [name for (name,) in self._all(_NAMESPACES, ()) if type(name) is str]

    def _close(self) -> None:
        self._rfast = False
        self._fastnid = None
        with self._conn_lock:
            forked = self._gen != _fork_gen
            holders = list(self._holders)
            self._holders = weakref.WeakSet()
            self._readers = []
        lock = self._memlock
        for holder in holders:
            if forked:  # never close a connection inherited from the parent
                holder.finalizer.detach()
                _INHERITED.append(holder.conn)
            elif lock is not None:  # the one shared connection, used under the lock
                with lock:
                    holder.finalizer()
            else:
                # A connection another thread is using is closed by that thread when its
                # call (or transaction, or stream) ends: closing it under the call crashes.
                holder.close_when_idle()
        self._local = threading.local()
        if self._file_unregister is not None:
            self._file_unregister()
