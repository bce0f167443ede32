"""PostgreSQL backend (``postgresql://`` and ``postgres://``), on psycopg 3 and psycopg_pool.

One table holds every namespace: ``(ns, key, value, expires, long_ns, long_key)`` with the
primary key ``(ns, key)``. Names are UTF-8 ``bytea`` rather than ``text`` because
PostgreSQL text cannot hold NUL, which keys and mappingstore's internal namespaces may
contain; ``bytea`` compares bytewise, so a prefix scan is the index range
``prefix <= key < successor(prefix)`` and never a ``LIKE`` pattern (``_`` and ``%`` are
wildcards there: rstore lost data that way). Names longer than a btree entry allows are
indexed by a prefix and a digest (:func:`_ident`) and kept whole in ``long_*``.

Round trips: a single read or write is one prepared statement run through psycopg's libpq
layer (:func:`_run`); ``modify`` is two ("BEGIN; txid; SELECT ... FOR UPDATE", then
"write; COMMIT", several statements per trip with client-side binding); a batch is two
(its writes, as one ``unnest`` upsert or a binary ``COPY``, then COMMIT). A batch whose
read-modify-writes read stored records commits in an ``_exclusive()`` transaction that
first locks every row it read or writes, in one round trip, and then checks those reads
(``PostgresStore._lock_for_commit``).

Failure model (see ``docs/backends/postgresql.md``): a lost connection is replaced by the
pool. Reads and idempotent writes retry once. A transaction learns its id in its first
round trip, so a COMMIT lost with the connection is resolved with ``txid_status()`` on a
fresh connection; ``UnknownOutcomeError`` is raised only when that cannot tell, and for a
single ``DELETE`` cut after it was sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import select
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar, cast

import psycopg
import psycopg.errors
from psycopg import pq, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

from ._store import KEEP, CheckedCommit, Op, Record, Store, checked_commit
from ._url import check_userinfo, parse_float, parse_int, parse_url, redact
from .errors import (
    BackendError,
    BackendUnavailableError,
    InvalidOptionError,
    InvalidURLError,
    MappingStoreError,
    StoreClosedError,
    StoreCorruptError,
    StoreNotFoundError,
    UnknownOutcomeError,
)

__all__ = ["PostgresStore"]

T = TypeVar("T")
Conn = psycopg.Connection[Any]
#: A sync connection, or an async one of the native async driver (``aio/_postgres.py``).
AnyConn = psycopg.Connection[Any] | psycopg.AsyncConnection[Any]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: Rows per round trip when streaming keys or items.
_CHUNK = 2000
#: Batches with at least this many upserts go through COPY into a staging table.
_COPY_THRESHOLD = 1000
#: Attempts for transactions that lose a race (unique violation, deadlock, serialization).
_RACE_ATTEMPTS = 30
#: psycopg_pool retries a failed connection with a doubling delay (1, 2, 4, 8... s) for
#: five minutes by default, so after an outage of a few seconds the pool would wait
#: about as long again before trying: the store stayed unusable for 7 s after an 8 s
#: outage. Pools we own give up a reconnection after this long, and _getconn asks for a
#: connection in slices of _WAIT_SLICE, each of which starts a fresh attempt: a returning
#: server is found within about _WAIT_SLICE + 1 s.
_RECONNECT_WINDOW = 2.0
_WAIT_SLICE = 1.0
_BYTEA, _FLOAT8 = 17, 701
#: Names (keys, namespaces) longer than this many UTF-8 bytes are indexed by a digest.
_SHORT = 1024
_COLUMNS = "ns, key, value, expires, long_ns, long_key"
#: The expiry of the placeholder row a batch commit inserts to lock a missing key: expired
#: for every reader, and never a TTL the store writes.
_PLACEHOLDER = "'-Infinity'::float8"

_RACES: tuple[type[psycopg.Error], ...] = (
    psycopg.errors.UniqueViolation,
    psycopg.errors.SerializationFailure,
    psycopg.errors.DeadlockDetected,
)

# libpq settings a URL may carry besides mappingstore's own options.
_LIBPQ_OPTIONS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "application_name",
    "target_session_attrs",
    "options",
)


#: libpq settings with a fixed set of values, checked before connecting (libpq 14+'s
#: sets; an older libpq refusing a newer value is caught by _OPTION_ERROR).
_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
}
#: libpq's messages for a connection setting it refuses before any network I/O ("invalid
#: sslmode value", "invalid integer value ... for connection option", "could not match 2
#: port numbers to 3 hosts"...), and the server's for a bad ``options=-c name=value``:
#: a bad option (ValueError), never "server unavailable, retry later".
_OPTION_ERROR = re.compile(
    r'invalid integer value "[^"]*" for connection option|\binvalid \w+ value: "'
    r"|invalid port number|could not match \d+ (host names|port numbers)"
    r"|invalid SSL protocol version range|\bmay not be used with\b"
    r"|FATAL:\s+invalid value for parameter|FATAL:\s+unrecognized configuration parameter"
    r"|\bis outside the valid range for parameter"
    r"|FATAL:\s+parameter \S+ cannot be changed|FATAL:\s+permission denied to set parameter"
    r"|FATAL:\s+-c \S* requires a value|FATAL:\s+invalid command-line argument"
)


_URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "table": str,
    "schema": str,
    "pool_min_size": parse_int,
    "pool_max_size": parse_int,
    "pool_timeout": parse_float,
    "connect_timeout": parse_float,
    **dict.fromkeys(_LIBPQ_OPTIONS, str),
}


# The relation kind, its columns and its primary key's columns, in order (identifiers are
# checked plain names, so quoting them is enough for to_regclass).
_LAYOUT = (
    "SELECT c.relkind::text,"
    " ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid"
    " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),"
    " ARRAY(SELECT a.attname::text FROM pg_index i"
    " CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(num, pos)"
    " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.num"
    " WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.pos)"
    " FROM pg_class c WHERE c.oid = to_regclass(%s)"
)


def _check_identifier(what: str, name: Any) -> str:
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidOptionError(
            f"{what} must be a plain SQL identifier (letters, digits, '_'; at most 63 "
            f"characters; not starting with a digit), got {name!r}"
        )
    return name


def _ident(name: bytes) -> bytes:
    """The indexed form of a UTF-8 name: the name itself up to ``_SHORT`` bytes, else its
    first ``_SHORT`` bytes and its SHA-256 (a btree entry holds at most ~2,700 bytes).

    Injective in practice: short forms are at most ``_SHORT`` bytes, long ones exactly
    ``_SHORT + 32``; and a form starts with every prefix of at most ``_SHORT`` bytes that
    the name starts with, so prefix ranges stay index ranges.
    """
    if len(name) <= _SHORT:
        return name
    return name[:_SHORT] + hashlib.sha256(name).digest()


def _long(name: bytes) -> bytes | None:
    """The full name, stored beside its indexed form only when that form is a digest."""
    return name if len(name) > _SHORT else None


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string starting with *prefix*."""
    stripped = prefix.rstrip(b"\xff")  # UTF-8 never contains 0xFF; kept for generality
    if not stripped:
        return None
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _lock_id(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for *parts* (stable across processes)."""
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _dead_while_idle(conn: AnyConn) -> bool:
    """True if an idle connection has something to read: only a server's goodbye (FATAL
    message or EOF) arrives unasked on an idle connection without LISTEN."""
    if conn.closed or conn.broken:
        return True
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _lost(exc: BaseException, conn: AnyConn | None) -> bool:
    """True when *exc* means the connection is gone (rather than a statement failing)."""
    if conn is not None and (conn.broken or conn.closed):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.OperationalError) and (
        sqlstate is None or sqlstate[:2] in ("08", "57")
    )


def _scrubbed(exc: psycopg.Error) -> psycopg.Error:
    """A copy of the failed-connection error *exc* to chain ours to: the same class and
    its message (redacted), nothing else. psycopg keeps the failed attempt in
    ``exc.pgconn``, whose conninfo holds the password in clear (``repr`` shows it), and
    ``exc``'s traceback holds it in the frames' locals."""
    return type(exc)(redact(str(exc).strip()))


def _live(expires: float | None, now: float) -> bool:
    """True when a row with this ``expires`` had not expired at *now*."""
    return expires is None or expires > now


def _row(ns: str, key: str, data: bytes, expires: Any) -> tuple[Any, ...]:
    """The upsert parameters ``(ns, key, value, expires, long_ns, long_key)`` of one
    record (*expires* as the caller's driver wants it: packed for ``_run``, a float for
    psycopg); ``_long`` inlined, since ``_put`` is hot."""
    nsb, kb = ns.encode(), key.encode()
    long_ns = nsb if len(nsb) > _SHORT else None
    return _ident(nsb), _ident(kb), data, expires, long_ns, kb if len(kb) > _SHORT else None


def _batch(ops: Sequence[Op]) -> tuple[list[tuple[Any, ...]], dict[bytes, list[bytes]]]:
    """The writes of a batch: its upsert rows and its deleted keys per namespace, the
    last write of a key winning, in one global order of (ns, key): the row locks of
    concurrent batches are then taken in the same order and never deadlock."""
    latest: dict[tuple[bytes, bytes], tuple[Op, bytes, bytes]] = {}
    for op in ops:
        nsraw, kraw = op.ns.encode(), op.key.encode()
        latest[_ident(nsraw), _ident(kraw)] = (op, nsraw, kraw)
    puts = []
    deletes: dict[bytes, list[bytes]] = {}
    for n, k in sorted(latest):
        op, nsraw, kraw = latest[n, k]
        if op.data is not None:
            puts.append((n, k, op.data, op.expires, _long(nsraw), _long(kraw)))
        else:
            deletes.setdefault(n, []).append(k)
    return puts, deletes


def _pool_slice(deadline: float) -> float:
    """How long the next request for a pooled connection may wait: a slice of at most
    ``_WAIT_SLICE`` (see ``_RECONNECT_WINDOW``), never past *deadline*."""
    return max(min(_WAIT_SLICE, deadline - time.monotonic()), 0.001)


def _pool_failure(exc: psycopg.Error, deadline: float) -> str:
    """What a failed request for a pooled connection means: ``"again"`` (only a slice
    ran out: ask again), ``"unreachable"`` (the wait ran out, or too many requests
    queue: ask libpq why) or ``"error"`` (convert *exc*)."""
    if isinstance(exc, PoolTimeout):
        return "again" if time.monotonic() < deadline else "unreachable"
    if isinstance(exc, TooManyRequests):
        return "unreachable"
    return "error"


class _ScanSQL(NamedTuple):
    """The statements of one prefix scan and their parameters (one reading of the
    clock for all of them: the scan sees one consistent cut of the TTLs)."""

    first: str  # the first page: keys >= the prefix, at most _CHUNK rows
    page: str  # a later page: keys after the last one yielded, at most _CHUNK rows
    rest: str  # every key after the last one yielded (a server-side cursor)
    ns: bytes
    tail: tuple[Any, ...]  # (successor of the prefix, now) or (now,)

    def params(self, after: bytes) -> tuple[Any, ...]:
        return (self.ns, after, *self.tail)


_IDLE = pq.TransactionStatus.IDLE
_F8 = struct.Struct("!d")
_I8 = struct.Struct("!q")


class _NotSent(psycopg.OperationalError):
    """The connection failed while preparing a statement: the statement never ran."""


class _Stmt(NamedTuple):
    """A statement of the fast path: server-side name, text with $n, parameter types."""

    name: bytes
    text: bytes
    types: tuple[int, ...]


def _run(conn: Conn, stmt: _Stmt, params: Sequence[bytes | None]) -> Any:
    """Run *stmt* through psycopg's libpq layer (``psycopg.pq``): prepared once per
    connection, binary parameters and results, no cursor.

    Profiled: ``conn.execute()`` spends about three times the client CPU of this on a
    one-row statement (cursor set-up, adaptation, result loaders), which decides the
    single ``get``/``set`` speed when round trips are fast. The caller holds *conn*
    alone (it comes from the pool), as psycopg's own cursors would require.
    """
    pgconn = conn.pgconn
    formats = [1] * len(params)
    if pgconn.transaction_status != _IDLE:
        # In a transaction a failed EXECUTE (the statement was deallocated: psycopg sends
        # DEALLOCATE ALL after a rollback when it has prepared statements of its own)
        # would abort the whole transaction: run it unnamed instead.
        res = pgconn.exec_params(stmt.text, params, stmt.types, formats, 1)
        if res.status == pq.ExecStatus.FATAL_ERROR:
            raise psycopg.errors.error_from_result(res)
        return res
    prepared: set[bytes] | None = conn.__dict__.get("_mappingstore_prepared")
    if prepared is None:
        prepared = conn.__dict__["_mappingstore_prepared"] = set()
    for attempt in (0, 1):
        if stmt.name not in prepared:
            try:
                res = pgconn.prepare(stmt.name, stmt.text, stmt.types)
            except psycopg.Error as exc:
                raise _NotSent(str(exc)) from exc
            if res.status != pq.ExecStatus.COMMAND_OK and _state(res) != "42P05":
                error = psycopg.errors.error_from_result(res)  # 42P05: already prepared
                if pgconn.status == pq.ConnStatus.BAD:
                    raise _NotSent(str(error)) from error
                raise error
            prepared.add(stmt.name)
        # None is SQL NULL to libpq; psycopg's stubs leave it out.
        res = pgconn.exec_prepared(stmt.name, params, formats, 1)  # type: ignore[arg-type]
        if res.status != pq.ExecStatus.FATAL_ERROR:
            return res
        if attempt == 0 and _state(res) == "26000":
            prepared.discard(stmt.name)  # gone (DISCARD ALL by a pool's reset): again
            continue
        raise psycopg.errors.error_from_result(res)
    raise AssertionError("unreachable")  # pragma: no cover


def _state(res: Any) -> str:
    return (res.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()


def _f8(value: float | None) -> bytes | None:
    return None if value is None else _F8.pack(value)


def _read_f8(raw: bytes | None) -> float | None:
    return None if raw is None else float(_F8.unpack(raw)[0])


_STAGE_DDL = (
    "CREATE TEMP TABLE IF NOT EXISTS mappingstore_stage (ns bytea, key bytea, value bytea,"
    " expires float8, long_ns bytea, long_key bytea) ON COMMIT DELETE ROWS"
)
_STAGE_COPY = f"COPY mappingstore_stage ({_COLUMNS}) FROM STDIN (FORMAT BINARY)"

# Stores whose pool must be recreated in a forked child: the parent's sockets are not
# ours to use there. psycopg never closes a connection inherited through fork() when it
# is garbage-collected (libpq's terminate message would end the parent's session), and
# the abandoned pools are kept referenced so that their finalizers never run.
_STORES: weakref.WeakValueDictionary[int, PostgresStore] = weakref.WeakValueDictionary()
_ABANDONED: list[Any] = []


def _after_fork_in_child() -> None:
    global _TXNS_LOCK
    _TXNS_LOCK = threading.Lock()
    _TXNS.clear()  # the forking thread's open transactions are on the parent's sockets
    for store in list(_STORES.values()):
        store._forget_pool_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Txn(threading.local):
    """This thread's open transaction on one table, if any: an ``_exclusive()`` section,
    or a ``modify`` whose function is running. Every statement of this thread on the
    table joins it, through any store of the same connection string and table
    (:func:`_txn_for`): a store of its own would wait for the row or advisory lock that
    the transaction holds, and the transaction waits for this thread: a deadlock no
    timeout ends."""

    conn: Conn | None = None
    depth: int = 0


#: The _Txn of each (connection string or pool, table) in this process.
_TXNS: dict[tuple[str, str], _Txn] = {}
_TXNS_LOCK = threading.Lock()


def _txn_for(key: tuple[str, str]) -> _Txn:
    with _TXNS_LOCK:
        txn = _TXNS.get(key)
        if txn is None:
            txn = _TXNS[key] = _Txn()
        return txn


class PostgresStore(Store):
    """A store in one PostgreSQL table (created on first use), shared by every client.

    ``PostgresStore(conninfo, table="mappingstore", schema=None)`` where *conninfo* is a
    ``postgresql://`` URL, a libpq ``"key=value"`` string, or a ready
    :class:`psycopg_pool.ConnectionPool` whose connections are in autocommit mode (the
    store then never closes it). Every instance on the same table and namespace sees the
    same data, across threads, processes and machines.

    Thread-safe: each operation borrows a connection from the pool (``pool_max_size``,
    default 10); an unfinished iteration holds one until it ends or is closed. The
    connection that opened the store serves it until a second one is needed at once (or
    one fails): only then is the pool created. After ``fork()`` the child opens its own
    pool (a pool you passed in is not recreated).

    Atomicity: every single operation is one statement or one transaction; ``modify``,
    ``pop`` and ``setdefault`` lock the row (``SELECT ... FOR UPDATE``) and retry lost
    races; ``batch()``/``update()`` commit in one transaction (a batch whose
    read-modify-writes read stored records first locks the rows it read or writes, so
    no writer can change them between its check and its writes); dot-name tree edits
    run in a transaction serialised per table and namespace by an advisory lock.

    Faults: a broken connection is replaced by the pool; reads, and writes known not to
    have been applied, are retried once on a fresh connection; a write whose outcome
    cannot be determined raises :class:`~mappingstore.errors.UnknownOutcomeError` and is
    never retried. Every failure is a :class:`~mappingstore.errors.BackendError`.

    Limits: needs PostgreSQL 10 or later. Expired rows are invisible at once but take
    space until :meth:`purge_expired` (or an overwrite) removes them.
    """

    scheme: ClassVar[str] = "postgresql"
    durability: ClassVar[str] = (
        "server-side: a write returns once PostgreSQL has committed it (durable with the "
        "server default synchronous_commit=on)"
    )
    shared_across_processes: ClassVar[bool] = True

    def __init__(
        self,
        conninfo: str | ConnectionPool[Any] = "",
        *,
        table: str = "mappingstore",
        schema: str | None = None,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        pool_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        libpq = {name: options.pop(name) for name in _LIBPQ_OPTIONS if name in options}
        super().__init__(**options)
        self._table = _check_identifier("table", table)
        self._schema = None if schema is None else _check_identifier("schema", schema)
        if self._schema is not None and self._schema.lower().startswith("pg_"):
            # The server reserves them: creating one fails (and retrying never helps).
            raise InvalidOptionError(f"schema names starting with 'pg_' are reserved: {schema!r}")
        if (
            isinstance(pool_min_size, bool)
            or not isinstance(pool_min_size, int)
            or pool_min_size < 0
        ):
            raise InvalidOptionError(f"pool_min_size must be an int >= 0, got {pool_min_size!r}")
        if (
            isinstance(pool_max_size, bool)
            or not isinstance(pool_max_size, int)
            or pool_max_size < max(1, pool_min_size)
        ):
            raise InvalidOptionError(
                f"pool_max_size must be an int >= max(1, pool_min_size), got {pool_max_size!r}"
            )
        for name, value in (("pool_timeout", pool_timeout), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidOptionError(f"{name} must be a number of seconds > 0, got {value!r}")
        self._pool_timeout = float(pool_timeout)
        self._min_size, self._max_size = pool_min_size, pool_max_size
        self._pool_lock = threading.Lock()
        self._pool: ConnectionPool[Any] | None
        self._retired: ConnectionPool[Any] | None = None
        # Connections this store took from its own pool and keeps between operations: a
        # list's pop()/append() are atomic, and skipping the pool's bookkeeping on every
        # call was measured to cut a get's client time by a third.
        self._idle: list[Conn] = []
        # Threads of this store waiting on the pool: while there are any, a released
        # connection goes back to the pool (which hands it to one) instead of parking.
        self._waiting = 0
        # The connection opened to check the table, kept to serve operations until a
        # second connection is needed at once (see _bootstrap); it counts as one of
        # pool_max_size: a pool created while it lives is one connection smaller
        # (_pool_short) until it retires.
        self._direct: Conn | None = None
        self._pool_short = 0
        self._park_lock = threading.Lock()
        if isinstance(conninfo, ConnectionPool):
            if libpq:
                raise InvalidOptionError(f"{sorted(libpq)} cannot be applied to a ready pool")
            self._pool, self._owns_pool = conninfo, False
            self._conninfo = conninfo.conninfo if isinstance(conninfo.conninfo, str) else ""
        elif isinstance(conninfo, str):
            self._pool, self._owns_pool, self._conninfo = None, True, conninfo
        else:
            raise InvalidOptionError("conninfo must be a URL, a libpq string or a ConnectionPool")
        # libpq wants whole seconds; never 0, which would mean "wait forever".
        self._connect_kwargs: dict[str, Any] = {
            "autocommit": True,
            # psycopg's own automatic preparing is off: when it holds prepared statements
            # it sends DEALLOCATE ALL after every rollback, wiping the fast path's ones.
            "prepare_threshold": None,
            "connect_timeout": max(1, round(connect_timeout)),
            **libpq,
        }
        self._url = self._display_url(libpq)
        source = f"pool:{id(conninfo)}" if isinstance(conninfo, ConnectionPool) else conninfo
        self._txn_key = (source, self.table)
        self._txn = _txn_for(self._txn_key)
        self._prepare_sql()
        _STORES[id(self)] = self  # stores are unhashable, like dicts
        try:
            if self._owns_pool:
                self._bootstrap()
            else:
                self._ensure_table()
        except BaseException:
            self._close()
            raise
        self._start()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """``postgresql://user@host:port/db?table=t&schema=s&pool_max_size=10`` (or ``postgres://``).

        Query options: ``table``, ``schema``, ``pool_min_size``, ``pool_max_size``,
        ``pool_timeout``, ``connect_timeout``, libpq's ``sslmode``, ``sslrootcert``,
        ``sslcert``, ``sslkey``, ``sslcrl``, ``application_name``, ``target_session_attrs``,
        and the options common to every store. Never put a password in the query.
        """
        parsed = parse_url(url, ("postgresql", "postgres"), extra=_URL_OPTIONS)
        # libpq parses the rest of the URL itself (user, password, hosts, port, database).
        conninfo = url.split("?", 1)[0]
        return cls(conninfo, **{**parsed.options, **options})

    # -- set-up -------------------------------------------------------------------------

    def _display_url(self, libpq: dict[str, Any]) -> str:
        """The store's URL, without the password; checks the conninfo and the libpq
        settings first (no I/O), so that a bad one is an ``InvalidOptionError`` and not a
        connection failure, and no part of a password can reach the URL."""
        if self._owns_pool and re.match(r"(?i)postgres(ql)?://", self._conninfo):
            # A URL given as conninfo: the same checks as from_url's (an unescaped "/",
            # "?" or "#" in the password would make libpq read part of it as the port).
            check_userinfo(self._conninfo)
        try:
            params = conninfo_to_dict(make_conninfo(self._conninfo, **libpq))
        except psycopg.Error:
            params = None
        if params is None:
            # Raised outside the handler: libpq's message quotes the text it could not parse,
            # which may be part of a password (an unescaped "/" or "%" in a URL), and would
            # stay attached as the context.
            raise InvalidOptionError(
                "invalid PostgreSQL URL or conninfo: libpq cannot parse it (in a URL, "
                "percent-encode special characters of the user name and password)"
            )
        for one in str(params.get("port") or "").split(","):  # one per host
            if one.strip() and not (one.strip().isdigit() and 0 < int(one) < 65536):
                raise InvalidURLError("the PostgreSQL port must be a number from 1 to 65535")
        for name, choices in _CHOICES.items():
            value = params.get(name)
            if value is not None and value not in choices:
                raise InvalidOptionError(
                    f"{name} must be one of {', '.join(choices)}; got {value!r}"
                )
        user = params.get("user")
        hosts = str(params.get("host") or "").split(",")
        ports = str(params.get("port") or "").split(",")
        if len(ports) == 1:  # one port for every host
            ports *= len(hosts)
        # Each host with its own port (libpq pairs them by position): h1:p1,h2:p2.
        netloc = (f"{user}@" if user else "") + ",".join(
            h + (f":{p}" if p else "") for h, p in zip(hosts, ports, strict=False)
        )
        query = f"?table={self._table}" + (f"&schema={self._schema}" if self._schema else "")
        return f"postgresql://{netloc}/{params.get('dbname') or ''}{query}"

    @property
    def url(self) -> str:
        return self._url  # built without the password, whatever the conninfo held

    @property
    def table(self) -> str:
        """The qualified name of the table holding this store (as given, unquoted)."""
        return f"{self._schema}.{self._table}" if self._schema else self._table

    def _prepare_sql(self) -> None:
        tbl: sql.Composable = sql.Identifier(self._table)
        if self._schema:
            tbl = sql.Identifier(self._schema, self._table)
        self._tbl = tbl
        # Queries are rendered to text once: psycopg then caches their parsing and, from
        # the fifth use on a connection, runs them as prepared statements.
        live = "(expires IS NULL OR expires > %s)"

        def q(template: str) -> str:
            return sql.SQL(template).format(t=tbl).as_string(None)

        self._q_get = q(f"SELECT value FROM {{t}} WHERE ns = %s AND key = %s AND {live}")
        self._q_record = q(
            f"SELECT value, expires FROM {{t}} WHERE ns = %s AND key = %s AND {live}"
        )
        self._q_contains = q(f"SELECT 1 FROM {{t}} WHERE ns = %s AND key = %s AND {live}")
        upsert = " ON CONFLICT (ns, key) DO UPDATE SET value = EXCLUDED.value,"
        upsert += " expires = EXCLUDED.expires"
        self._q_insert = q(f"INSERT INTO {{t}} ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)")
        self._q_put = self._q_insert + upsert
        self._q_update = q("UPDATE {t} SET value = %s, expires = %s WHERE ns = %s AND key = %s")
        self._q_delete = q("DELETE FROM {t} WHERE ns = %s AND key = %s RETURNING expires")
        self._q_delete_many = q("DELETE FROM {t} WHERE ns = %s AND key = ANY(%s)")
        # The expiry of each deleted row: the caller counts the live ones.
        self._q_delete_many_returning = self._q_delete_many + " RETURNING expires"
        self._q_lock = q("SELECT value, expires FROM {t} WHERE ns = %s AND key = %s FOR UPDATE")
        self._q_begin_lock = "BEGIN; SELECT txid_current(); " + self._q_lock
        self._q_delete_plain = q("DELETE FROM {t} WHERE ns = %s AND key = %s")
        self._q_upsert_many = q(
            f"INSERT INTO {{t}} ({_COLUMNS}) SELECT * FROM unnest(%s::bytea[], %s::bytea[],"
            " %s::bytea[], %s::float8[], %s::bytea[], %s::bytea[])" + upsert
        )
        self._q_get_many = q(
            f"SELECT key, value FROM {{t}} WHERE ns = %s AND key = ANY(%s) AND {live}"
        )
        self._q_count = q(f"SELECT count(*) FROM {{t}} WHERE ns = %s AND {live}")
        self._q_clear = q("DELETE FROM {t} WHERE ns = %s")
        self._q_purge = q("DELETE FROM {t} WHERE ns = %s AND expires <= %s")
        # A loose index scan: one index probe per namespace instead of reading every row;
        # then only namespaces with a live row (expired rows stay until purged).
        self._q_namespaces = q(
            "WITH RECURSIVE n(ns) AS ((SELECT ns FROM {t} ORDER BY ns LIMIT 1) UNION ALL"
            " SELECT (SELECT ns FROM {t} WHERE ns > n.ns ORDER BY ns LIMIT 1)"
            " FROM n WHERE n.ns IS NOT NULL) SELECT ns FROM n WHERE ns IS NOT NULL"
            f" AND EXISTS (SELECT 1 FROM {{t}} WHERE ns = n.ns AND {live})"
        )
        self._q_upsert_staged = q(
            f"INSERT INTO {{t}} ({_COLUMNS}) SELECT {_COLUMNS}"
            " FROM mappingstore_stage ORDER BY ns, key" + upsert
        )
        self._q_check = q(f"SELECT {_COLUMNS} FROM {{t}} WHERE false")
        # The lock step of a batch commit that checks reads (_lock_for_commit): every row
        # (ns, key) of the arrays, in their order, is locked if it exists (the DO UPDATE
        # whose WHERE is false updates nothing but locks the row) or else inserted as an
        # expired placeholder, whose uncommitted index entry makes a concurrent insert of
        # that key wait for this transaction.
        self._q_lock_rows = q(
            f"INSERT INTO {{t}} AS r ({_COLUMNS}) SELECT w.ns, w.key, ''::bytea,"
            f" {_PLACEHOLDER}, w.long_ns, w.long_key FROM unnest(%s::bytea[], %s::bytea[],"
            " %s::bytea[], %s::bytea[]) AS w(ns, key, long_ns, long_key)"
            " ON CONFLICT (ns, key) DO UPDATE SET expires = r.expires WHERE false"
        )
        # The placeholders of keys the batch reads but does not write (still locked:
        # deleted by this open transaction, an insert of the key waits for it to end).
        self._q_drop_placeholders = q(
            "DELETE FROM {t} AS r USING unnest(%s::bytea[], %s::bytea[]) AS w(ns, key)"
            f" WHERE r.ns = w.ns AND r.key = w.key AND r.expires = {_PLACEHOLDER}"
        )
        self._q_locked = q(
            "SELECT r.ns, r.key, r.value, r.expires FROM {t} AS r"
            " JOIN unnest(%s::bytea[], %s::bytea[]) AS w(ns, key)"
            " ON r.ns = w.ns AND r.key = w.key"
        )
        self._q_long_ns = q("SELECT long_ns FROM {t} WHERE ns = %s LIMIT 1")
        # Scans: (items?, first chunk?, upper bound?) -> query. A resumed scan starts
        # strictly after the last key it yielded.
        self._q_scan: dict[tuple[bool, bool, bool], str] = {}
        self._q_page: dict[tuple[bool, bool, bool], str] = {}
        for items in (False, True):
            for first in (False, True):
                for upper in (False, True):
                    cols = "key, long_key, value" if items else "key, long_key"
                    cond = "key >= %s" if first else "key > %s"
                    bound = " AND key < %s" if upper else ""
                    scan = q(
                        f"SELECT {cols} FROM {{t}} WHERE ns = %s AND {cond}{bound} AND {live}"
                        " ORDER BY key"
                    )
                    self._q_scan[items, first, upper] = scan
                    self._q_page[items, first, upper] = f"{scan} LIMIT {_CHUNK}"
        self._q_create = q(
            "CREATE TABLE IF NOT EXISTS {t} (ns bytea NOT NULL, key bytea NOT NULL,"
            " value bytea NOT NULL, expires double precision, long_ns bytea, long_key bytea,"
            " PRIMARY KEY (ns, key))"
        )
        self._create_lock = _lock_id("mappingstore:create", self.table)
        # The fast path's prepared statements; the name is per table, since one pool
        # (and so one session) may serve stores on several tables.
        tag = f"mappingstore_{_lock_id(self.table) & 0xFFFFFFFF:08x}"

        def stmt(op: str, text: str, *types: int) -> _Stmt:
            numbered = iter(range(1, len(types) + 1))
            body = re.sub("%s", lambda _: f"${next(numbered)}", text)
            return _Stmt(f"{tag}_{op}".encode(), body.encode(), types)

        self._s_get = stmt("get", self._q_get, _BYTEA, _BYTEA, _FLOAT8)
        self._s_record = stmt("record", self._q_record, _BYTEA, _BYTEA, _FLOAT8)
        self._s_contains = stmt("contains", self._q_contains, _BYTEA, _BYTEA, _FLOAT8)
        self._s_count = stmt("count", self._q_count, _BYTEA, _FLOAT8)
        self._s_put = stmt("put", self._q_put, _BYTEA, _BYTEA, _BYTEA, _FLOAT8, _BYTEA, _BYTEA)
        self._s_delete = stmt("delete", self._q_delete, _BYTEA, _BYTEA)
        # The first page of a scan (items?, upper bound?): most listings fit in it.
        self._s_first = {
            (items, upper): stmt(
                f"first{items:d}{upper:d}",
                self._q_page[items, True, upper],
                *((_BYTEA, _BYTEA, _BYTEA) if upper else (_BYTEA, _BYTEA)),  # ns, low[, high]
                _FLOAT8,  # now
            )
            for items in (False, True)
            for upper in (False, True)
        }

    def _bootstrap(self) -> None:
        """Connect once directly, then check or create the table on that connection.

        A pool retries a refused connection in the background until its timeout and then
        reports no reason; a direct connection fails at once and says why.

        That connection then serves the store's operations (parked like a pooled one)
        and the pool is only created when a second connection is needed at once, or
        after a failure: a store used by one thread at a time costs one connection and
        no pool threads (opening, reading and closing one took 60% of the time).
        Not with ``pool_min_size`` >= 2 (the pool opens those at once, as asked) or
        ``pool_max_size`` 1 (the connection could not count as one of the pool's).
        """
        failed: psycopg.Error | None = None
        try:
            conn: Conn = psycopg.connect(self._conninfo, **self._connect_kwargs)
        except psycopg.Error as exc:
            failed = _scrubbed(exc)
        if failed is not None:
            # Raised here, outside the except block: the original error (which holds the
            # password) is then not our error's __context__ either.
            reason = str(failed)
            if _OPTION_ERROR.search(reason):
                # Refused before any network I/O (or by the server, for options=): a
                # retry can never succeed, so not a BackendUnavailableError.
                raise InvalidOptionError(
                    f"invalid PostgreSQL connection setting for {self._url}: {reason}"
                ) from failed
            raise BackendUnavailableError(
                f"cannot connect to PostgreSQL at {self._url}: {reason}"
            ) from failed
        try:
            self._txn.conn = conn  # route the statements of _ensure_table to it
            self._ensure_table()
        except BaseException:
            conn.close()
            raise
        finally:
            self._txn.conn = None
        if self._min_size <= 1 < self._max_size and conn.pgconn.transaction_status == _IDLE:
            self._direct = conn
            self._idle.append(conn)
        else:
            conn.close()

    def _ensure_table(self) -> None:
        """Check the table is a mappingstore table; create it (race-free) if missing."""

        def probe(conn: Conn) -> Any:
            try:
                return conn.execute(self._q_check).description
            except psycopg.errors.UndefinedColumn:
                return ()  # a table of that name, but not ours

        try:
            description = self._read(probe)
        except StoreNotFoundError:
            description = None
        if description is None:
            if self._readonly:
                raise StoreNotFoundError(f"PostgreSQL table {self.table!r} does not exist")
            self._create_table()
            return
        types = [(col.name, col.type_code) for col in description]
        expected = [("ns", _BYTEA), ("key", _BYTEA), ("value", _BYTEA), ("expires", _FLOAT8)]
        if types != [*expected, ("long_ns", _BYTEA), ("long_key", _BYTEA)] or self._read(
            self._other_layout
        ):
            raise StoreCorruptError(
                f"PostgreSQL table {self.table!r} exists but is not a mappingstore table"
            )

    def _other_layout(self, conn: Conn) -> bool:
        """Whether the relation named like our table has the right columns but not our
        layout: a view, a column more (every write would fail on a NOT NULL one), or a
        primary key other than ``(ns, key)`` (upserts need exactly that key)."""
        name = f'"{self._schema}"."{self._table}"' if self._schema else f'"{self._table}"'
        row = conn.execute(_LAYOUT, (name,)).fetchone()
        if row is None:  # pragma: no cover - the probe just read it
            return True
        relkind, columns, primary = row
        return bool(
            relkind not in ("r", "p")
            or list(columns) != ["ns", "key", "value", "expires", "long_ns", "long_key"]
            or list(primary) != ["ns", "key"]
        )

    def _create_table(self) -> None:
        def body(conn: Conn) -> None:
            # CREATE ... IF NOT EXISTS still fails when two sessions create the same table
            # at once (a unique violation in the catalog): serialise creators first.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._create_lock,))
            if self._schema:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self._schema))
                )
            conn.execute(self._q_create)

        def work(conn: Conn) -> None:
            with conn.transaction():
                body(conn)

        self._read(work)  # idempotent: safe to retry once on a fresh connection

    # -- connections --------------------------------------------------------------------

    def _get_pool(self) -> ConnectionPool[Any]:
        pool = self._pool
        if pool is not None:
            return pool
        with self._pool_lock:
            pool = self._pool
            if pool is None:
                self._check_open()
                # While the direct connection lives it is one of pool_max_size.
                self._pool_short = short = 0 if self._direct is None else 1
                self._pool = ConnectionPool(
                    self._conninfo,
                    kwargs=self._connect_kwargs,
                    min_size=min(self._min_size, self._max_size - short),
                    max_size=self._max_size - short,
                    timeout=self._pool_timeout,
                    name=f"mappingstore:{self.table}",
                    reconnect_timeout=_RECONNECT_WINDOW,
                    open=False,
                )
                pool = self._pool
                pool.open(wait=False)
            # The local: close() (in another thread) sets self._pool to None at any time.
            return pool

    def _forget_pool_after_fork(self) -> None:
        _ABANDONED.extend(self._idle)  # the parent's connections: never closed here
        self._idle = []
        if self._direct is not None:
            _ABANDONED.append(self._direct)
        self._direct, self._pool_short = None, 0
        self._waiting = 0
        self._park_lock = threading.Lock()
        self._txn = _txn_for(self._txn_key)
        self._pool_lock = threading.Lock()
        if self._owns_pool:
            _ABANDONED.extend(p for p in (self._pool, self._retired) if p is not None)
            self._pool = self._retired = None

    def _getconn(self, *, live: bool = False) -> Conn:
        """A pooled connection; with *live*, one known not to have been closed by the
        server while it sat idle (for writes that cannot be retried blindly)."""
        while True:
            with self._park_lock:
                parked = self._idle.pop() if self._idle else None
                if parked is None:
                    self._waiting += 1
            if parked is None:
                break
            if not live or not _dead_while_idle(parked):
                return parked
            self._discard(parked)
        try:
            pool = self._get_pool()
            deadline = time.monotonic() + pool.timeout
            while True:
                try:
                    # In slices: each new request lets a pool whose reconnection attempts
                    # gave up (see _RECONNECT_WINDOW) start a fresh one at once.
                    conn = cast(Conn, pool.getconn(timeout=_pool_slice(deadline)))
                except psycopg.Error as exc:
                    failure = _pool_failure(exc, deadline)
                    if failure == "again":
                        continue
                    if failure == "unreachable":
                        raise self._unreachable(exc) from exc
                    raise self._convert(exc, None) from exc
                if not live or not _dead_while_idle(conn):
                    break
                # Terminated while idle (pg_terminate_backend, a restart): the FATAL
                # message or EOF is already waiting. Nothing was sent on it: take another.
                self._discard(conn)
        finally:
            with self._park_lock:
                self._waiting -= 1
        if not conn.autocommit:
            pool.putconn(conn)
            raise InvalidOptionError(
                "the connection pool given to PostgresStore must create autocommit "
                "connections: ConnectionPool(..., kwargs={'autocommit': True})"
            )
        return conn

    def _putconn(self, conn: Conn) -> None:
        direct = conn is self._direct
        if (
            self._owns_pool
            # The direct connection parks only until there is a pool (see _bootstrap).
            and (self._pool is None and not self._closed if direct else self._pool is not None)
            and conn.pgconn.transaction_status == _IDLE  # also false once it is broken
        ):
            with self._park_lock:
                if not self._waiting and len(self._idle) < self._max_size:
                    self._idle.append(conn)
                    return
        if direct:
            self._retire_direct(conn)
            return
        # After close() the connection goes back to the closed pool, which closes it.
        pool = self._pool if self._pool is not None else self._retired
        if pool is None:
            return  # a forked child holding its parent's connection: not ours to close
        try:
            pool.putconn(conn)  # the pool discards a broken connection and opens a new one
        except ValueError:
            pass  # it came from the parent's pool (we were forked meanwhile): drop it

    def _unreachable(self, exc: BaseException) -> MappingStoreError:
        """The error for a pool that gave no connection in time (it blocks: the async
        driver runs it on a thread). PoolTimeout says nothing about why: ask libpq
        directly for the reason."""
        if self._closed:  # closed by another thread meanwhile: not the server's doing
            return StoreClosedError("PostgresStore is closed")
        reason = str(exc)
        if self._owns_pool:
            try:
                psycopg.connect(self._conninfo, **self._connect_kwargs).close()
            except psycopg.Error as direct:
                reason = str(direct)
        return BackendUnavailableError(
            f"PostgreSQL at {self._url} is not reachable within {self._pool_timeout:g} s: "
            f"{redact(reason)}"
        )

    def _discard(self, conn: Conn) -> None:
        conn.close()
        self._putconn(conn)  # a closed connection goes back to the pool, which replaces it

    def _release_idle(self) -> None:
        """Hand the parked connections back to the pool (the direct one is closed)."""
        pool = self._pool if self._pool is not None else self._retired
        with self._park_lock:
            parked, self._idle = self._idle, []
        for conn in parked:
            if conn is self._direct:
                self._retire_direct(conn)
            elif pool is not None:
                with contextlib.suppress(ValueError):
                    pool.putconn(conn)

    def _retire_direct(self, conn: Conn) -> None:
        """Close the direct connection for good; a pool made one smaller while it lived
        grows to the full ``pool_max_size`` (and ``pool_min_size``)."""
        with self._pool_lock:
            if conn is not self._direct:
                return
            self._direct = None
            pool = self._pool if self._pool_short else None
            self._pool_short = 0
        conn.close()
        if pool is not None and not pool.closed:
            with contextlib.suppress(psycopg.Error):  # PoolClosed: closed meanwhile
                pool.resize(self._min_size, self._max_size)

    def _sweep(self) -> None:
        """After a lost connection: replace every dead idle connection before a retry."""
        self._release_idle()
        pool = self._pool
        if pool is not None:
            with contextlib.suppress(psycopg.Error, PoolTimeout):
                pool.check()

    def _convert(self, exc: BaseException, conn: AnyConn | None) -> MappingStoreError:
        if self._closed:  # closed by another thread meanwhile: not the server's doing
            return StoreClosedError("PostgresStore is closed")
        message = f"PostgreSQL ({self._url}): {redact(str(exc).strip())}"
        if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName)):
            return StoreNotFoundError(message)
        if _lost(exc, conn) or isinstance(exc, psycopg.errors.QueryCanceled):
            return BackendUnavailableError(message)
        return BackendError(message)

    # -- running statements -------------------------------------------------------------

    def _read(self, work: Callable[[Conn], T]) -> T:
        """Run idempotent *work*; retry it once on a fresh connection if the link drops."""
        conn = self._txn.conn
        if conn is not None:  # inside _exclusive(): use its transaction
            try:
                return work(conn)
            except psycopg.Error as exc:
                raise self._convert(exc, conn) from exc
        for attempt in (0, 1):
            conn = self._getconn()
            try:
                return work(conn)
            except psycopg.Error as exc:
                self._failed(exc, conn, attempt, None, write=False)
            finally:
                self._putconn(conn)
            self._sweep()
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(self, work: Callable[[Conn], T], *, idempotent: bool) -> T:
        """Run one autocommit statement. If the connection drops after it was sent, an
        *idempotent* statement (applying it twice is harmless) is retried once; any other
        raises ``UnknownOutcomeError``. So does an idempotent one whose retry fails too:
        the first try may have been applied, and a plain ``BackendUnavailableError``
        would say that nothing was written."""
        conn = self._txn.conn
        if conn is not None:
            try:
                return work(conn)
            except psycopg.Error as exc:
                raise self._convert(exc, conn) from exc
        sent: psycopg.Error | None = None  # a try lost after it was sent: maybe applied
        for attempt in (0, 1):
            try:
                conn = self._getconn(live=not idempotent)
            except BackendError as exc:
                if sent is None:
                    raise
                raise self._unknown_write(sent) from exc
            try:
                return work(conn)
            except psycopg.Error as exc:
                sent = self._failed(exc, conn, attempt, sent, write=True, idempotent=idempotent)
            finally:
                self._putconn(conn)
            self._sweep()
        raise AssertionError("unreachable")  # pragma: no cover

    def _failed(
        self,
        exc: psycopg.Error,
        conn: AnyConn,
        attempt: int,
        sent: psycopg.Error | None,
        *,
        write: bool,
        idempotent: bool = True,
        log: str = "PostgreSQL connection lost (%s); retrying on a fresh one",
    ) -> psycopg.Error | None:
        """The retry decision after try *attempt* (0, then 1) of one statement on *conn*
        failed with *exc*; the one copy of it, for the sync store and the async driver.

        A lost connection is retried once (a read, or a write that is *idempotent* or
        proven not sent). A *write* that reached the server before its connection was
        lost (*sent*, the first such failure, or *exc*) may have been applied: when it
        is not retried, or its retry fails too, :class:`UnknownOutcomeError` is raised,
        never a plain ``BackendUnavailableError`` (which would say nothing was written).
        Anything else is converted. Returns the *sent* for the retry (after logging it),
        or raises (chained to *exc*)."""
        lost = _lost(exc, conn)
        if write and lost and not isinstance(exc, _NotSent):
            sent = exc
        if sent is not None and (attempt or not idempotent or not lost):
            raise self._unknown_write(sent) from exc
        if attempt or not lost:
            raise self._convert(exc, conn) from exc
        self._log.warning(log, redact(str(exc)))
        return sent

    def _unknown_write(self, exc: BaseException) -> UnknownOutcomeError:
        return UnknownOutcomeError(
            f"PostgreSQL ({self._url}): connection lost before the write was "
            f"acknowledged; it may or may not have been applied: {redact(str(exc))}"
        )

    def _transact(self, body: Callable[[Conn, list[int], bool], None]) -> None:
        """Run ``body(conn, xid, nested)`` as one transaction; it may run again.

        Outside ``_exclusive()`` (``nested`` false) *body* sends ``BEGIN`` and
        ``SELECT txid_current()`` in its first round trip and ``COMMIT`` (or
        ``ROLLBACK``) in its last, appending the id to *xid* as soon as it has it: a
        COMMIT lost with the connection is then resolved with ``txid_status()``. Inside
        ``_exclusive()`` it runs in a savepoint of that transaction, without BEGIN/COMMIT.
        Lost races (unique violation, deadlock, serialization failure) are retried.
        """
        outer = self._txn.conn
        if outer is not None:
            self._transact_nested(outer, body)
            return
        races = 0
        retried_lost = False
        while True:
            conn = self._getconn(live=True)
            xid: list[int] = []
            try:
                try:
                    body(conn, xid, False)
                    return
                except BaseException:
                    # fn raised, or a statement failed: end the transaction before the
                    # connection goes back to the pool (a lost one is discarded anyway).
                    if not conn.broken and conn.info.transaction_status != _IDLE:
                        with contextlib.suppress(psycopg.Error):
                            conn.execute("ROLLBACK")
                    raise
                finally:
                    self._putconn(conn)
            except _RACES as exc:
                races += 1
                if races >= _RACE_ATTEMPTS:
                    raise self._convert(exc, conn) from exc
                time.sleep(random.uniform(0, 0.001 * min(races, 20)))
            except psycopg.Error as exc:
                if not _lost(exc, conn):
                    raise self._convert(exc, conn) from exc
                if self._committed(exc, xid):
                    return
                if retried_lost:
                    raise self._convert(exc, conn) from exc
                retried_lost = True
                self._log.warning(
                    "PostgreSQL connection lost (%s); the transaction rolled back, retrying once",
                    redact(str(exc)),
                )
                self._sweep()

    def _transact_nested(self, conn: Conn, body: Callable[[Conn, list[int], bool], None]) -> None:
        # Inside _exclusive(): a savepoint, so a lost race rolls back only this step.
        for attempt in range(_RACE_ATTEMPTS):
            try:
                with conn.transaction():
                    body(conn, [], True)
                return
            except _RACES as exc:
                if attempt == _RACE_ATTEMPTS - 1:
                    raise self._convert(exc, conn) from exc
            except psycopg.Error as exc:
                raise self._convert(exc, conn) from exc

    def _committed(self, exc: BaseException, xid: list[int]) -> bool:
        """Whether a transaction whose connection was lost (with *exc*) committed; raises
        ``UnknownOutcomeError`` when that cannot be determined."""
        committed = self._outcome(exc, xid)
        if committed is None:
            raise UnknownOutcomeError(
                f"PostgreSQL ({self._url}): connection lost during COMMIT and the "
                f"transaction's outcome cannot be determined: {redact(str(exc))}"
            ) from exc
        return committed

    def _outcome(self, exc: BaseException, xid: list[int]) -> bool | None:
        """Whether a transaction whose connection was lost committed (None: unknown)."""
        if not xid:
            return False  # the COMMIT is only sent after the id came back
        # Even a server-reported error (57P01 after pg_terminate_backend) can arrive right
        # after a COMMIT succeeded: only the transaction's recorded status is proof.
        self._sweep()
        deadline = time.monotonic() + 2.0
        while True:
            try:
                status = self._read(
                    lambda c: c.execute("SELECT txid_status(%s)", (xid[0],)).fetchone()
                )
            except (BackendError, StoreClosedError):  # closed meanwhile: still unknown
                return None
            state = status[0] if status else None
            if state == "committed":
                return True
            if state == "aborted":
                return False
            # "in progress": the old session has not noticed yet; NULL: too old to tell.
            if state is None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    # -- backend contract ---------------------------------------------------------------

    def _get(self, ns: str, key: str) -> bytes | None:
        params = (_ident(ns.encode()), _ident(key.encode()), _F8.pack(self._clock()))

        def work(conn: Conn) -> bytes | None:
            res = _run(conn, self._s_get, params)
            return res.get_value(0, 0) if res.ntuples else None

        return self._read(work)

    def _get_record(self, ns: str, key: str) -> Record | None:
        if self._txn.conn is not None:
            commit = checked_commit()
            if commit is not None:  # the check of a batch's reads: lock, then compare
                return self._locked_record(commit, ns, key)
        params = (_ident(ns.encode()), _ident(key.encode()), _F8.pack(self._clock()))

        def work(conn: Conn) -> Record | None:
            res = _run(conn, self._s_record, params)
            if not res.ntuples:
                return None
            return res.get_value(0, 0), _read_f8(res.get_value(0, 1))

        return self._read(work)

    def _contains(self, ns: str, key: str) -> bool:
        params = (_ident(ns.encode()), _ident(key.encode()), _F8.pack(self._clock()))
        return self._read(lambda conn: bool(_run(conn, self._s_contains, params).ntuples))

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        query, params, encoded = self._get_many_sql(ns, keys)

        def work(conn: Conn) -> dict[bytes, bytes]:
            return dict(conn.execute(query, params, binary=True).fetchall())

        found = self._read(work)
        return [found.get(k) for k in encoded]

    def _count(self, ns: str) -> int:
        params = (_ident(ns.encode()), _F8.pack(self._clock()))
        return self._read(
            lambda conn: int(_I8.unpack(_run(conn, self._s_count, params).get_value(0, 0))[0])
        )

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        params = _row(ns, key, data, _f8(expires))
        # An upsert applied twice leaves the same state: safe to retry when in doubt.
        self._write(lambda conn: _run(conn, self._s_put, params), idempotent=True)

    def _delete(self, ns: str, key: str) -> bool:
        params = (_ident(ns.encode()), _ident(key.encode()))
        now = self._clock()

        def work(conn: Conn) -> bool:
            res = _run(conn, self._s_delete, params)
            if not res.ntuples:
                return False
            return _live(_read_f8(res.get_value(0, 0)), now)

        # Not idempotent: a retry could report "missing" for a key the lost try deleted.
        return self._write(work, idempotent=False)

    def _clear(self, ns: str) -> None:
        params = (_ident(ns.encode()),)
        self._write(lambda conn: conn.execute(self._q_clear, params), idempotent=True)

    def _purge_expired(self, ns: str) -> int:
        params = (_ident(ns.encode()), self._clock())
        return self._write(
            lambda conn: conn.execute(self._q_purge, params).rowcount, idempotent=True
        )

    _namespaces_live = True  # they skip namespaces holding only expired records

    def _namespaces(self) -> Iterable[str]:
        now = (self._clock(),)
        idents = self._read(
            lambda conn: [row[0] for row in conn.execute(self._q_namespaces, now, binary=True)]
        )
        names = []
        for ident in idents:
            if len(ident) > _SHORT:  # a digest: read the full name from one of its rows
                row = self._read(
                    lambda conn, i=ident: conn.execute(
                        self._q_long_ns, (i,), binary=True
                    ).fetchone()  # type: ignore[misc]
                )
                if row is None or row[0] is None:
                    continue  # emptied meanwhile
                ident = row[0]
            try:
                names.append(bytes(ident).decode())
            except UnicodeDecodeError:
                continue  # not a namespace of the store (see _iter_keys)
        return names

    # A key or namespace name that is not UTF-8 (written by another program: the store
    # writes only the UTF-8 of a str) names nothing the store can read, write or delete:
    # listings skip it, as SQLite's skip a BLOB key; len() counts rows and still counts it.

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        for row in self._scan(ns, prefix.encode(), items=False):
            try:
                key = (row[0] if row[1] is None else row[1]).decode()
            except UnicodeDecodeError:
                continue  # not a key of the store (see above)
            yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        for row in self._scan(ns, prefix.encode(), items=True):
            try:
                key = (row[0] if row[1] is None else row[1]).decode()
            except UnicodeDecodeError:
                continue  # not a key of the store (see above)
            yield key, row[2]

    def _scan(self, ns: str, low: bytes, *, items: bool) -> Iterator[tuple[Any, ...]]:
        """Rows ``(key, long_key[, value])`` of *ns* whose key starts with *low*, streamed
        in the order of the indexed key.

        The first chunk is one prepared statement (small namespaces cost one round trip);
        a longer result continues through a server-side cursor in chunks of ``_CHUNK``
        rows. A connection lost midway resumes once, after the last key yielded.
        """
        if len(low) > _SHORT:
            # Only long keys can match, and their indexed form keeps _SHORT bytes of the
            # name: scan that range and compare the full names here.
            for row in self._scan(ns, low[:_SHORT], items=items):
                if row[1] is not None and row[1].startswith(low):
                    yield row
            return
        scan = self._scan_sql(ns, low, items)
        # The first page through the fast path (a statement prepared once per
        # connection): a quarter of the time of conn.execute() for a small namespace.
        stmt = self._s_first[items, len(scan.tail) == 2]
        first_params = (scan.ns, low, *scan.tail[:-1], _F8.pack(scan.tail[-1]))

        def first(conn: Conn) -> list[tuple[Any, ...]]:
            res = _run(conn, stmt, first_params)
            fields = range(res.nfields)
            return [tuple(res.get_value(i, j) for j in fields) for i in range(res.ntuples)]

        rows = self._read(first)
        yield from rows
        if len(rows) < _CHUNK:
            return
        last: bytes = rows[-1][0]
        if self._txn.conn is not None:
            # Inside _exclusive(): keyset pages on the transaction's own connection.
            while True:
                params = scan.params(last)
                rows = self._read(
                    lambda conn, p=params: conn.execute(scan.page, p, binary=True).fetchall()  # type: ignore[misc]
                )
                yield from rows
                if len(rows) < _CHUNK:
                    return
                last = rows[-1][0]
        for attempt in (0, 1):
            conn = self._getconn()
            try:
                name = f"mappingstore_scan_{id(self):x}"
                with conn.transaction(), conn.cursor(name=name, binary=True) as cur:
                    cur.itersize = _CHUNK
                    cur.execute(scan.rest, scan.params(last))
                    for row in cur:
                        yield row
                        last = row[0]
                return
            except psycopg.Error as exc:
                resuming = "PostgreSQL connection lost during a scan (%s); resuming"
                self._failed(exc, conn, attempt, None, write=False, log=resuming)
            finally:
                self._putconn(conn)
            self._sweep()

    def _scan_sql(self, ns: str, low: bytes, items: bool) -> _ScanSQL:
        """The statements of a scan of the keys of *ns* starting with *low* (at most
        ``_SHORT`` bytes), with their values when *items*."""
        high = _successor(low) if low else None
        now = self._clock()
        tail: tuple[Any, ...] = (now,) if high is None else (high, now)
        upper = high is not None
        return _ScanSQL(
            first=self._q_page[items, True, upper],
            page=self._q_page[items, False, upper],
            rest=self._q_scan[items, False, upper],
            ns=_ident(ns.encode()),
            tail=tail,
        )

    def _get_many_sql(
        self, ns: str, keys: Sequence[str]
    ) -> tuple[str, tuple[Any, ...], list[bytes]]:
        """The query that reads *keys* of *ns* (rows ``(key, value)``), its parameters,
        and the indexed form of each key, to look the values up by."""
        encoded = [_ident(k.encode()) for k in keys]
        return self._q_get_many, (_ident(ns.encode()), list(set(encoded)), self._clock()), encoded

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        nsraw, kraw = ns.encode(), key.encode()
        nsb, kb = _ident(nsraw), _ident(kraw)

        def body(conn: Conn, xid: list[int], nested: bool) -> None:
            # Two round trips, with the row locked in between: "BEGIN; txid; SELECT ...
            # FOR UPDATE", then "write; COMMIT". Client-side binding lets each trip carry
            # several statements (psycopg's pipeline mode measured slower here).
            cur = psycopg.ClientCursor(conn)
            if nested:
                cur.execute(self._q_lock, (nsb, kb))
            else:
                cur.execute(self._q_begin_lock, (nsb, kb))
                cur.nextset()
                xid.append(cur.fetchone()[0])  # type: ignore[index]
                cur.nextset()
            row = cur.fetchone()
            now = self._clock()
            live = row is not None and (row[1] is None or row[1] > now)
            state = self._txn
            if not nested:  # the function's own statements on this table join this one
                state.conn = conn
            try:
                new = fn((bytes(row[0]), row[1]) if live else None)  # type: ignore[index]
            finally:
                if not nested:
                    state.conn = None
            end = "" if nested else "; COMMIT"
            if new is KEEP or (new is None and row is None):
                if not nested:
                    cur.execute("ROLLBACK")
            elif new is None:  # also clears an expired row
                cur.execute(self._q_delete_plain + end, (nsb, kb))
            elif row is None:
                # No row to lock: a concurrent creator makes this INSERT fail with a
                # unique violation, and _transact runs the whole step again.
                params = (nsb, kb, new[0], new[1], _long(nsraw), _long(kraw))
                cur.execute(self._q_insert + end, params)
            else:
                cur.execute(self._q_update + end, (new[0], new[1], nsb, kb))

        self._transact(body)

    def _apply(self, ops: Sequence[Op]) -> None:
        puts, deletes = _batch(ops)
        if not puts and not deletes:
            return
        use_copy = len(puts) >= _COPY_THRESHOLD

        def body(conn: Conn, xid: list[int], nested: bool) -> None:
            cur = psycopg.ClientCursor(conn)
            statements: list[str] = []
            params: list[Any] = []
            if use_copy:
                # COPY into a session-local staging table, then one upsert: about twice
                # the speed of row-by-row statements for large batches.
                head = "" if nested else "BEGIN; SELECT txid_current(); "
                cur.execute(head + _STAGE_DDL)
                if not nested:
                    cur.nextset()
                    xid.append(cur.fetchone()[0])  # type: ignore[index]
                with cur.copy(_STAGE_COPY) as copy:
                    copy.set_types(["bytea", "bytea", "bytea", "float8", "bytea", "bytea"])
                    for row in puts:
                        copy.write_row(row)
                statements.append(self._q_upsert_staged)
            elif puts:
                # One statement for every row: arrays unnested server-side.
                statements.append(self._q_upsert_many)
                params.extend(list(col) for col in zip(*puts, strict=True))
            for n, keys in deletes.items():
                statements.append(self._q_delete_many)
                params.extend((n, keys))
            if nested:
                cur.execute("; ".join(statements), params)
            elif use_copy:
                cur.execute("; ".join([*statements, "COMMIT"]), params)
            else:
                # First trip: the writes and the transaction id; second trip: COMMIT.
                cur.execute("; ".join(["BEGIN", "SELECT txid_current()", *statements]), params)
                cur.nextset()
                xid.append(cur.fetchone()[0])  # type: ignore[index]
                cur.execute("COMMIT")

        self._transact(body)

    def _locked_record(self, commit: CheckedCommit, ns: str, key: str) -> Record | None:
        """The record of a key a batch read, as its commit checks it: locked in the
        commit's transaction until it ends. For a batch of this store the first call
        locks every row the batch read or writes, in one round trip; for a batch of an
        adapter around it (its keys are not this store's) each key is locked as read."""
        records: dict[tuple[str, str], Record | None] | None = commit.state.get(id(self))
        if records is None:
            if commit.store is self:
                batch = commit.batch
                records = self._lock_for_commit(list(batch.reads), list(batch.ops))
            else:
                records = {}
            commit.state[id(self)] = records
        if (ns, key) not in records:  # not one of the batch's own reads: lock it alone
            records.update(self._lock_for_commit([(ns, key)], []))
        return records[ns, key]

    def _lock_for_commit(
        self, reads: Sequence[tuple[str, str]], writes: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Record | None]:
        """Lock the rows of *reads* and *writes* in the open ``_exclusive()`` transaction
        (one round trip) and return the live record of each key of *reads* (None: missing
        or expired).

        A row that exists, expired or not, is locked as ``SELECT ... FOR UPDATE`` would;
        a missing key gets an expired placeholder row, so that another client's insert of
        it waits for this transaction (a placeholder the batch does not overwrite is
        deleted at once, and still blocks inserts until the commit). The rows are taken
        in the global (ns, key) order that ``_batch`` gives a batch's upserts, so such
        commits and batches do not deadlock each other, and the batch's own writes then
        wait for nobody. Other writers (``set``, ``del``, ``modify``, batches) wait for
        the commit, which checks values that no one can change before it writes.
        """
        conn = self._txn.conn
        assert conn is not None  # only called inside _exclusive()
        raw = {pair: (pair[0].encode(), pair[1].encode()) for pair in (*reads, *writes)}
        ident = {pair: (_ident(n), _ident(k)) for pair, (n, k) in raw.items()}
        named = {ident[pair]: names for pair, names in raw.items()}  # (ns, key) in the table
        order = sorted(named)
        lock_params = [
            [n for n, _ in order],
            [k for _, k in order],
            [_long(named[p][0]) for p in order],
            [_long(named[p][1]) for p in order],
        ]
        wanted = {ident[pair]: pair for pair in reads}
        written = {ident[pair] for pair in writes}
        orphans = [p for p in wanted if p not in written]
        statements, params = [self._q_lock_rows], [*lock_params]
        if orphans:
            statements.append(self._q_drop_placeholders)
            params += [[n for n, _ in orphans], [k for _, k in orphans]]
        statements.append(self._q_locked)
        params += [[n for n, _ in wanted], [k for _, k in wanted]]

        def work(conn: Conn) -> list[Any]:
            cur = psycopg.ClientCursor(conn)
            cur.execute("; ".join(statements), params)
            for _ in statements[1:]:
                cur.nextset()
            return cur.fetchall()

        # Inside the transaction: a failure is converted, and rolls the batch back.
        rows = self._write(work, idempotent=False)
        now = self._clock()
        found: dict[tuple[str, str], Record | None] = dict.fromkeys(wanted.values())
        for n, k, value, expires in rows:
            if _live(expires, now):
                found[wanted[bytes(n), bytes(k)]] = (bytes(value), expires)
        return found

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """A transaction holding an advisory lock on (table, namespace); re-entrant per
        thread. Every raw call of this thread inside it joins the transaction."""
        state = self._txn
        if state.conn is not None:
            state.depth += 1
            try:
                yield
            finally:
                state.depth -= 1
            return
        conn, xid = self._begin_locked(_lock_id("mappingstore:exclusive", self.table, self._ns))
        state.conn = conn
        try:
            try:
                yield
            except BaseException:
                state.conn = None
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise
            state.conn = None
            self._commit(conn, xid)
        finally:
            state.conn = None
            self._putconn(conn)

    def _begin_locked(self, lock: int) -> tuple[Conn, int]:
        """BEGIN and take the advisory lock (one round trip); retried once if the pooled
        connection turns out to be dead, since nothing has happened yet."""
        for attempt in (0, 1):
            conn = self._getconn(live=True)
            try:
                cur = psycopg.ClientCursor(conn)
                cur.execute("BEGIN; SELECT txid_current(), pg_advisory_xact_lock(%s)", (lock,))
                cur.nextset()
                row = cur.fetchone()
                assert row is not None
                return conn, int(row[0])
            except psycopg.Error as exc:
                lost = _lost(exc, conn)
                if not lost:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                self._putconn(conn)
                if attempt or not lost:
                    raise self._convert(exc, conn) from exc
            self._sweep()
        raise AssertionError("unreachable")  # pragma: no cover

    def _commit(self, conn: Conn, xid: int) -> None:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            # COMMIT would quietly roll back: a statement inside failed and was swallowed.
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise BackendError(
                f"PostgreSQL ({self._url}): the transaction failed and was rolled back"
            )
        try:
            conn.execute("COMMIT")
        except psycopg.Error as exc:
            if _lost(exc, conn) and self._committed(exc, [xid]):
                return
            raise self._convert(exc, conn) from exc

    def _close(self) -> None:
        _STORES.pop(id(self), None)
        pool, self._pool = self._pool, None
        if self._owns_pool:
            self._retired = pool
            self._release_idle()  # closes the direct connection if it is parked
            if pool is not None:
                pool.close()
