"""Redis backend: ``redis://``, ``rediss://`` and ``redis+cluster://host:port[,host:port...]``.

Key layout, scripts and the reasoning behind them: ``_redis_lua`` and
``docs/backends/redis.md``. Connection options and error handling: ``_redis_client``.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import redis
import redis.exceptions as rex
from redis.cluster import RedisCluster

from . import _redis_lua as lua
from ._redis_client import (
    URL_OPTIONS,
    ClientConfig,
    backoff_delay,
    check_db,
    check_options,
    classify,
    make_client,
    parse_redis_url,
    wrong_type,
)
from ._redis_layout import PREFIX_RE, Layout, bucket, count_of, unescape_namespace
from ._store import KEEP, Op, Record, Store, batch_conflict, checked_commit
from .errors import (
    InvalidOptionError,
    LockTimeoutError,
    MappingStoreError,
    StoreClosedError,
    UnknownOutcomeError,
)

__all__ = ["RedisStore"]


def _hiredis_packer() -> Callable[[tuple[Any, ...]], bytes] | None:
    """hiredis's command packer (redis-py's own wraps it in per-argument Python checks:
    ~0.3 us each), or ``None`` without hiredis (the ``redis`` extra installs it)."""
    try:
        import hiredis
    except ImportError:  # pragma: no cover - a redis-py installed without the extra
        return None
    packer: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
    return packer


_pack_command = _hiredis_packer()

T = TypeVar("T")
_MAX_PX = 10**15  # ~31,700 years: beyond this Redis rejects the expiry time
_FIRST_CHUNK = 128
_MAX_CHUNK = 4096  # Lua's unpack() limit is ~8,000 values
#: Lease of the exclusive-section lock: a holder that dies releases it after this long; a
#: live one renews it while its section runs (see _Renewer).
_LOCK_LEASE_MS = 10_000
_LOCK_TIMEOUT = 60.0
#: Retries (with backoff) of what is safe to retry; see docs/backends/redis.md.
_DEFAULT_RETRIES = 5
#: ``RedisStore._pool`` before its first use (decided lazily, outside open and close).
_UNDECIDED: Any = object()
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)


class _Renewer:
    """Renews the leases of the exclusive sections running in this process.

    One daemon thread, started on first need (again in a forked child), renews each held
    lease once a third of it has passed, so a section may run as long as it needs while
    a holder that dies (or loses its server) frees the lock within one lease. Sections
    shorter than a third of the lease (nearly all) cost it nothing but two dict updates.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._held: dict[int, tuple[Callable[[], Any], float, float]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def hold(self, renew: Callable[[], Any], lease_s: float) -> int:
        """Renew with *renew()* every third of *lease_s* until :meth:`drop`."""
        if self._pid != os.getpid():
            self._start()  # a forked child: the parent's thread and state are not ours
        period = lease_s / 3
        with self._cond:
            ident = next(self._ids)
            at = time.monotonic() + period
            # Wake the thread only if it sleeps past this renewal (idle, or every held
            # lease is due later): a wake-up per section would be a context switch each.
            wake = all(at < due for _, _, due in self._held.values())
            self._held[ident] = (renew, period, at)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="mappingstore-redis-lease", daemon=True
                )
                self._thread.start()
            elif wake:
                self._cond.notify()
        return ident

    def drop(self, ident: int) -> None:
        with self._cond:
            self._held.pop(ident, None)

    def _run(self) -> None:
        log = logging.getLogger("mappingstore")
        while True:
            with self._cond:
                if not self._held:
                    self._cond.wait(30)
                    if not self._held:
                        self._thread = None  # idle: the next hold() starts a new one
                        return
                    continue
                now = time.monotonic()
                due = [(i, fn, p) for i, (fn, p, at) in self._held.items() if at <= now]
                if not due:
                    self._cond.wait(min(at for _, _, at in self._held.values()) - now)
                    continue
                for i, fn, p in due:
                    self._held[i] = (fn, p, now + p)
            for i, fn, _ in due:
                try:
                    if not fn():
                        log.warning("a store lock lease ran out before its section ended")
                        self.drop(i)
                except Exception as exc:  # the next round tries again; the lease may hold
                    log.debug("renewing a store lock lease failed: %s", exc)
            del due, fn  # hold no store alive between rounds


_RENEWER = _Renewer()

#: One script call: (script, keys, args). The sync store and the async driver
#: (``aio/_redis.py``) build their calls with the functions and methods below.
Call = tuple[lua.Script, list[bytes], list[Any]]
#: The writes of a batch to one bucket: ((namespace, bucket), plain puts as (member,
#: data) pairs, deletes and puts with an expiry as (member, data, px) triples).
ApplyGroup = tuple[tuple[str, int], list[bytes], list[Any]]
#: What a batch's commit read of a record it guards: its data, ``None`` when missing.
Guard = tuple[tuple[str, str], bytes | None]


def iter_args(prefix: str, values: bool) -> list[Any]:
    """Arguments of the first ITER call over one bucket: members starting with *prefix*
    (with their data when *values*), a small first chunk (``bool()``, ``popitem()`` and
    dot-name probes stop early)."""
    if prefix:
        pb = prefix.encode("utf-8")
        # UTF-8 never contains 0xFF, so every key starting with pb sorts below pb+0xFF.
        lo, hi = b"[" + pb, b"(" + pb + b"\xff"
    else:
        lo, hi = b"-", b"+"
    return [1, b"", lo, hi, _FIRST_CHUNK, b"1" if values else b"0"]


def iter_next(args: list[Any], reply: Any) -> list[Any] | None:
    """Arguments of the ITER call after *reply* to *args* (same range, a chunk four times
    larger up to ``_MAX_CHUNK``), or ``None`` when the bucket is done."""
    start = int(reply[0])
    if start == 0:
        return None
    return [start, reply[1], args[2], args[3], min(args[4] * 4, _MAX_CHUNK), args[5]]


def iter_rows(reply: Any, values: bool) -> Iterator[tuple[bytes, bytes]]:
    """The (member, data) pairs of one ITER reply (data ``b""`` without *values*)."""
    items = reply[2:]
    if values:
        return zip(items[0::2], items[1::2], strict=True)
    return ((item, b"") for item in items)


class RedisStore(Store):
    """A store in Redis 7+ (standalone, TLS, or Redis Cluster).

    ``RedisStore("redis://[user[:pw]@]host:port/db?options")``,
    ``RedisStore("redis+cluster://h1:7000,h2:7001")`` or ``RedisStore(client=redis_client)``
    (a ready ``redis.Redis``/``RedisCluster`` built with ``decode_responses=False``; the
    store does not close a client it was given).

    Redis options (URL query or keyword; a keyword wins over the URL, for ``db`` over
    its path too; types and ranges are checked at open): ``db``, ``socket_timeout``
    (default 10 s), ``socket_connect_timeout`` (5 s), ``health_check_interval``,
    ``max_connections``, ``client_name``, ``retries`` (read retries with backoff,
    default 5), ``ssl`` and ``ssl_cert_reqs``/``ssl_ca_certs``/``ssl_certfile``/
    ``ssl_keyfile``/``ssl_check_hostname``. The server password comes from the URL (it
    is redacted from ``repr``, ``url``, logs and errors; percent-encode ``/ ? # @ %`` in
    it) or ``redis_password=``. ``prefix`` (default ``"ms"``) starts every key name:
    stores with different prefixes on one server are independent (their own namespaces
    and encryption metadata).

    Thread-safe (redis-py pools connections); shared between processes and machines;
    reconnects by itself after ``fork()``. ``modify``/``setdefault``/``pop`` are atomic
    across clients (a compare-and-set script; ``fn`` may run more than once).
    ``batch()``/``update()`` are one atomic script on a standalone server; on Redis
    Cluster they are atomic per slot only (a namespace spreads over 16 slots). Expiry is
    Redis's own (``PXAT``), on the server's clock: ``clock=`` only converts TTLs.
    Dot-name leaf/branch checks are atomic within one process only. Requires
    ``maxmemory-policy noeviction`` (any eviction silently loses records).
    """

    scheme: ClassVar[str] = "redis"
    durability: ClassVar[str] = (
        "the server's: with AOF appendfsync always no acknowledged write is lost in a crash; "
        "everysec may lose about 1 s; RDB loses writes since the last snapshot; "
        "replication and Redis Cluster failover are asynchronous"
    )
    shared_across_processes: ClassVar[bool] = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | RedisCluster | None = None,
        redis_username: str | None = None,
        redis_password: str | None = None,
        prefix: str | None = None,
        **options: Any,
    ) -> None:
        redis_opts = {k: options.pop(k) for k in list(options) if k in URL_OPTIONS}
        # A keyword given as None means "not given" (the URL's value, else the default),
        # as for every store option; it never reaches redis-py (socket_timeout=None would
        # mean "wait forever").
        redis_opts = {k: v for k, v in redis_opts.items() if v is not None}
        # Checked here, before anything is opened: the same checks as the URL's values.
        check_options(redis_opts)
        retries = redis_opts.pop("retries", None)
        config: ClientConfig | None = None
        if client is None:
            config, url_store_opts = parse_redis_url(url or "redis://127.0.0.1:6379/0")
            options = {**url_store_opts, **options}  # keyword options win over the URL's
            url_retries = config.options.pop("retries", None)
            retries = url_retries if retries is None else retries
            # db and ssl are the client config's own fields; as every other keyword
            # option, a keyword db or ssl wins over the URL's (path, ?db=, rediss://).
            if "db" in redis_opts:
                config.db = check_db(redis_opts.pop("db"))
                if config.cluster and config.db != 0:
                    raise InvalidOptionError("Redis Cluster has only database 0")
            if "ssl" in redis_opts:
                config.ssl = redis_opts.pop("ssl")
            config.options.update(redis_opts)
            if redis_username is not None:
                config.username = redis_username
            if redis_password is not None:
                config.password = redis_password
        elif url is not None or redis_opts or redis_username or redis_password:
            raise InvalidOptionError("pass either client= or a URL and Redis options, not both")
        url_prefix = options.pop("prefix", None)
        super().__init__(**options)
        # An empty ?prefix= is refused like prefix="", never read as the default "ms"
        # (that would put the data in another store's key space).
        prefix = prefix if prefix is not None else (url_prefix if url_prefix is not None else "ms")
        if not isinstance(prefix, str) or not PREFIX_RE.fullmatch(prefix):
            raise InvalidOptionError("prefix must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        self._prefix = prefix.encode("ascii")
        self._layouts: dict[str, Layout] = {}
        self._xlocal = threading.local()
        self._retries: int = _DEFAULT_RETRIES if retries is None else retries
        if config is not None:
            self._client: Any = make_client(config)
            self._owns = True
            self._cluster = config.cluster
            self._config = config
        elif client is not None:
            self._client, self._owns = client, False
            self._cluster = isinstance(client, RedisCluster)
            self._config = self._describe(client)
            if client.get_encoder().decode_responses:
                raise InvalidOptionError(
                    "RedisStore needs a client built with decode_responses=False"
                )
            self._warn_client_retries(client)
        try:
            self._start()
        except BaseException:
            self._close()  # e.g. a db the server lacks: release the pool we opened
            raise

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        """``redis://``, ``rediss://`` or ``redis+cluster://`` (see the class docstring)."""
        return cls(url, **options)

    # -- client plumbing ----------------------------------------------------------------

    def _describe(self, client: Any) -> ClientConfig:
        if isinstance(client, RedisCluster):
            hosts = [(n.host, int(n.port)) for n in client.get_primaries()]  # type: ignore[no-untyped-call]
            return ClientConfig(cluster=True, hosts=hosts)
        kw = client.connection_pool.connection_kwargs
        return ClientConfig(
            cluster=False,
            hosts=[(str(kw.get("host", "localhost")), int(kw.get("port", 6379)))],
            db=int(kw.get("db", 0) or 0),
            username=kw.get("username"),
            ssl=bool(kw.get("ssl", False))
            or "SSL" in client.connection_pool.connection_class.__name__,
        )

    def _warn_client_retries(self, client: Any) -> None:
        if isinstance(client, RedisCluster):
            retry = getattr(client, "retry", None)
        else:
            retry = client.get_retry()
        # Retry.get_retries() appeared in redis-py 5.1; older ones keep the count private.
        count = getattr(retry, "get_retries", lambda: getattr(retry, "_retries", 0))()
        if count:
            self._log.warning(
                "the redis client passed to RedisStore resends commands after a timeout "
                "(retries=%d): a write could then be applied twice; build it with "
                "retry=Retry(NoBackoff(), 0) for exactly-once writes",
                count,
            )

    def _layout(self, ns: str) -> Layout:
        lay = self._layouts.get(ns)
        if lay is None:
            lay = self._layouts[ns] = Layout(self._prefix, ns)
        return lay

    def _names(self, ns: str, key: str) -> tuple[bytes, bytes, bytes, bytes]:
        """(member, I, X, D) of *key* in *ns*."""
        kb = key.encode("utf-8")
        b = bucket(kb)
        lay = self._layout(ns)
        base = lay.bases[b]
        return kb, base + b"i", base + b"x", base + b"k:" + kb

    def _data_key(self, ns: str, key: str) -> bytes:
        kb = key.encode("utf-8")
        return self._layout(ns).bases[bucket(kb)] + b"k:" + kb

    def _run(self, what: str, write: bool, fn: Callable[[], T]) -> T:
        """Run one Redis exchange, retrying only what is safe; convert every error."""
        if self._closed:  # redis-py would reconnect a closed client: an iterator made
            self._check_open()  # before close() must not open connections after it
        attempt = 0
        while True:
            try:
                return fn()
            except MappingStoreError:
                raise
            except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
                verdict = classify(exc, write=write, what=what)
                if verdict.retry and attempt < self._retries and not self._closed:
                    # Cluster: any retriable failure (a node down, CLUSTERDOWN, TRYAGAIN,
                    # READONLY) may mean the slots moved, and the per-node pipelines of
                    # _per_node never tell redis-py so: refresh the slot map before trying
                    # again, or reads would keep going to a dead primary after its replica
                    # took over.
                    if verdict.reconnect or self._cluster:
                        self._reconnect()
                    time.sleep(backoff_delay(attempt))
                    attempt += 1
                    continue
                if self._closed and not isinstance(verdict.error, UnknownOutcomeError):
                    # Closed by another thread meanwhile, not a server fault (a write that
                    # may have been applied stays UnknownOutcomeError: that is the truth).
                    raise StoreClosedError("RedisStore is closed") from exc
                raise verdict.error from exc

    def _reconnect(self) -> None:
        try:
            if self._cluster:
                self._client.nodes_manager.initialize()
            else:
                self._client.connection_pool.disconnect()
        except (rex.RedisError, rex.RedisClusterException, OSError):
            pass  # the next attempt reports the real problem

    # The hot commands (GET, MGET, EXISTS, EVALSHA) of a store on its own standalone client
    # skip redis-py's ``execute_command``: with our retries off it only adds bookkeeping
    # (a retry wrapper, observability hooks, response-callback lookup), about 8 us a call,
    # as much as the whole server-side cost of a write. The command goes straight onto a
    # pooled connection and the reply is read back, exactly what ``execute_command`` does
    # underneath: the same packer, parser, pool (fork-safe) and exceptions, so ``_run``
    # classifies failures the same way. A client passed in keeps redis-py's own path.

    _pool: Any = _UNDECIDED

    def _direct_pool(self) -> Any:
        """The connection pool the hot commands use directly, or ``None`` (decided once)."""
        pool = None
        client = self._client
        if self._owns and not self._cluster and getattr(client, "connection", None) is None:
            pool = client.connection_pool
            get = pool.get_connection
            # redis-py 5 requires a command name (ignored); 6 and later deprecate it.
            param = inspect.signature(get).parameters.get("command_name")
            if param is not None and param.default is inspect.Parameter.empty:
                self._get_conn: Callable[[], Any] = lambda: get("_")
            else:
                self._get_conn = get
        self._pool = pool
        return pool

    def _command(self, *args: Any, packed: bytes | None = None, **options: Any) -> Any:
        """Send one command and return its raw reply (see above). *packed*: the same
        command already in wire form (for a fixed command sent often); *options* are
        redis-py's (e.g. ``keys=``), for the client path only."""
        pool = self._pool
        if pool is _UNDECIDED:
            pool = self._direct_pool()
        if pool is None:
            return self._client.execute_command(*args, **options)
        conn = self._get_conn()
        try:
            if packed is None and _pack_command is not None:
                packed = _pack_command(args)
            if packed is None:
                conn.send_command(*args)
            else:
                conn.send_packed_command((packed,))
            return conn.read_response()
        except rex.ResponseError:
            raise  # an error reply (NOSCRIPT...): read in full, the connection is in step
        except BaseException:
            # A failed send or read has already disconnected the connection (redis-py's
            # Connection does so itself), but an exception raised between the send and
            # the read (a signal handler's: KeyboardInterrupt, a timeout alarm) has not:
            # the reply would still be on its way, and the next command on this
            # connection would read it as its own. Drop the connection: the pool
            # reconnects it before reuse.
            conn.disconnect()
            raise
        finally:
            pool.release(conn)

    def _evalsha(self, script: lua.Script, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        try:
            return self._command("EVALSHA", script.sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            # A restarted or new server has an empty script cache; EVAL caches it again.
            # NOSCRIPT means nothing ran, so this is safe for writes too.
            return self._command("EVAL", script.source, len(keys), *keys, *args)

    def _eval(
        self, script: lua.Script, keys: Sequence[bytes], args: Sequence[Any], *, write: bool
    ) -> Any:
        return self._run(script.name, write, lambda: self._evalsha(script, keys, args))

    def _groups(self, ns: str) -> list[list[bytes]]:
        """Bucket key lists one script may touch at once (cluster: one slot each)."""
        lay = self._layout(ns)
        if self._cluster:
            return [list(pair) for pair in lay.pairs]
        return [lay.flat]

    def _read_all(
        self, script: lua.Script, groups: list[list[bytes]], args: Sequence[Any]
    ) -> list[Any]:
        """Run a read-only (or idempotent) script over slot groups; pipelined in cluster mode."""
        if len(groups) == 1:
            return [self._eval(script, groups[0], args, write=False)]

        def go() -> list[Any]:
            calls = [(keys[0], ("EVALSHA", script.sha, len(keys), *keys, *args)) for keys in groups]
            return self._per_node(calls, lambda i: self._evalsha(script, groups[i], args))

        return self._run(script.name, False, go)

    def _per_node(
        self, calls: list[tuple[bytes, tuple[Any, ...]]], redo: Callable[[int], Any]
    ) -> list[Any]:
        """Cluster reads: one pipeline per node (redis-py's ClusterPipeline refuses EVALSHA
        and MGET), then *redo* any call a node refused (NOSCRIPT, MOVED after resharding)
        through the cluster client, which follows redirections. Reads only: resending a
        read is harmless."""
        client = self._client
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for i, (key, _) in enumerate(calls):
            node = client.get_node_from_key(key)
            by_node.setdefault(node.name, (node, []))[1].append(i)
        results: list[Any] = [None] * len(calls)
        for node, idx in by_node.values():
            pipe = client.get_redis_connection(node).pipeline(transaction=False)
            for i in idx:
                pipe.execute_command(*calls[i][1])
            for i, res in zip(idx, pipe.execute(raise_on_error=False), strict=True):
                results[i] = res
        for i, res in enumerate(results):
            if isinstance(res, rex.ResponseError):
                results[i] = redo(i)
            elif isinstance(res, BaseException):
                raise res
        return results

    def _px(self, expires: float | None) -> int | None:
        """Milliseconds from now until *expires* (``None``: no expiry); may be <= 0."""
        if expires is None:
            return None
        ms = (expires - self._clock()) * 1000
        if ms > _MAX_PX:  # before ceil(): a huge float ttl overflows to inf (OverflowError)
            raise InvalidOptionError("ttl is too large for Redis (more than 31,000 years)")
        px = math.ceil(ms)  # ceil: never expire early
        if px > _MAX_PX:
            raise InvalidOptionError("ttl is too large for Redis (more than 31,000 years)")
        return px

    @property
    def url(self) -> str:
        url = self._config.url()
        if self._prefix != b"ms":
            url += ("&" if "?" in url else "?") + "prefix=" + self._prefix.decode("ascii")
        return url

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """The underlying redis-py client (do not close it while the store is open)."""
        self._check_open()
        return self._client  # type: ignore[no-any-return]

    @property
    def cluster(self) -> bool:
        """True when talking to a Redis Cluster."""
        return self._cluster

    # -- backend contract ---------------------------------------------------------------

    def _get(self, ns: str, key: str) -> bytes | None:
        # docstring inherited
        dkey = self._data_key(ns, key)

        def get() -> bytes | None:
            try:
                return self._command("GET", dkey, keys=[dkey])  # type: ignore[no-any-return]
            except rex.ResponseError as exc:
                return wrong_type(exc)

        return self._run("GET", False, get)

    def _contains(self, ns: str, key: str) -> bool:
        # docstring inherited
        dkey = self._data_key(ns, key)
        return bool(self._run("EXISTS", False, lambda: self._command("EXISTS", dkey, keys=[dkey])))

    def _read_rec(self, dkey: bytes) -> tuple[bytes, int, int] | None:
        raw = self._eval(lua.GETREC, [dkey], [], write=False)
        if raw is None:
            return None
        return bytes(raw[0]), int(raw[1]), int(raw[2])

    def _get_record(self, ns: str, key: str) -> Record | None:
        # docstring inherited
        raw = self._read_rec(self._data_key(ns, key))
        commit = checked_commit()
        if commit is not None:  # a batch's commit checking its reads: see _apply_guarded
            guards = commit.state.setdefault(id(self), {})
            guards[(ns, key)] = None if raw is None else raw[0]
        if raw is None:
            return None
        data, pttl, _ = raw
        return data, (None if pttl < 0 else self._clock() + pttl / 1000)

    def _put_call(self, ns: str, key: str, data: bytes, expires: float | None) -> Call:
        """The script call that writes one record (``_names`` inlined: ``_put`` is hot)."""
        kb = key.encode("utf-8")
        base = self._layout(ns).bases[bucket(kb)]
        keys = [base + b"i", base + b"x", base + b"k:" + kb]
        px = self._px(expires)
        if px is not None and px <= 0:  # already expired: the write leaves nothing visible
            return lua.DELETE, keys, [kb]
        return lua.PUT, keys, [kb, data, b"" if px is None else px]

    def _delete_call(self, ns: str, key: str) -> Call:
        """The script call that deletes one record (its reply: 1 if it was live)."""
        member, ikey, xkey, dkey = self._names(ns, key)
        return lua.DELETE, [ikey, xkey, dkey], [member]

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        # docstring inherited
        script, keys, args = self._put_call(ns, key, data, expires)
        self._eval(script, keys, args, write=True)

    def _delete(self, ns: str, key: str) -> bool:
        # docstring inherited
        return bool(self._eval(*self._delete_call(ns, key), write=True))

    def _walk(self, ns: str, prefix: str, values: bool) -> Iterator[tuple[bytes, bytes]]:
        first_args = iter_args(prefix, values)
        groups = self._groups(ns)
        # Cluster: the first chunk of every bucket in one pipelined round (one exchange
        # per node instead of 16 sequential ones), then the big buckets chunk by chunk.
        first = self._read_all(lua.ITER, groups, first_args)
        for keys, res in zip(groups, first, strict=True):
            args = first_args
            while True:
                yield from iter_rows(res, values)
                next_args = iter_next(args, res)
                if next_args is None:
                    break
                args = next_args
                res = self._eval(lua.ITER, keys, args, write=False)

    # An index member that is not UTF-8 (put there by another program: mappingstore
    # writes only the UTF-8 of a str) names no key of the store: no key can read, write or
    # delete it, so listings skip it, as they skip a namespace name that is not ours
    # (_namespaces); len() counts index entries and still counts it.

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        # docstring inherited
        for member, _ in self._walk(ns, prefix, False):
            try:
                key = member.decode("utf-8")
            except UnicodeDecodeError:
                continue  # not a key of the store (see above)
            yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        # docstring inherited
        for member, data in self._walk(ns, prefix, True):
            try:
                key = member.decode("utf-8")
            except UnicodeDecodeError:
                continue  # not a key of the store (see above)
            yield key, data

    def _count(self, ns: str) -> int:
        # docstring inherited
        if not self._cluster:
            # One MGET of the bucket counters (kept by the write scripts): O(1) and no
            # script; the COUNT script only when some key of the namespace has an expiry.
            lay = self._layouts.get(ns) or self._layout(ns)
            keys, packed = lay.counters, lay.count_command
            n = count_of(
                self._run("MGET", False, lambda: self._command("MGET", *keys, packed=packed))
            )
            if n is not None:
                return n
        return sum(int(n) for n in self._read_all(lua.COUNT, self._groups(ns), []))

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        # docstring inherited
        if not keys:
            return []
        dkeys = [self._data_key(ns, k) for k in keys]
        if not self._cluster:
            return self._run("MGET", False, lambda: list(self._command("MGET", *dkeys, keys=dkeys)))
        # Cluster: one MGET per slot (bucket), pipelined to every node at once.
        by_slot: dict[bytes, list[int]] = {}
        for i, dk in enumerate(dkeys):
            by_slot.setdefault(dk[: dk.index(b"}") + 1], []).append(i)

        def go() -> list[bytes | None]:
            groups = list(by_slot.values())
            calls = [(dkeys[idx[0]], ("MGET", *(dkeys[i] for i in idx))) for idx in groups]
            replies = self._per_node(
                calls, lambda g: self._client.mget([dkeys[i] for i in groups[g]])
            )
            out: list[bytes | None] = [None] * len(dkeys)
            for idx, vals in zip(groups, replies, strict=True):
                for i, v in zip(idx, vals, strict=True):
                    out[i] = v
            return out

        return self._run("MGET", False, go)

    def _apply_groups(self, ops: Sequence[Op]) -> list[ApplyGroup]:
        """The writes of a batch per (namespace, bucket), deduplicated: the last write of
        a key wins, as if applied in order, so the order inside a group is free."""
        latest: dict[tuple[str, str], Op] = {}
        for op in ops:
            latest[(op.ns, op.key)] = op
        plain: dict[tuple[str, int], list[bytes]] = {}
        other: dict[tuple[str, int], list[Any]] = {}
        for op in latest.values():
            kb = op.key.encode("utf-8")
            slot = (op.ns, bucket(kb))
            plain.setdefault(slot, [])
            other.setdefault(slot, [])
            if op.data is None:
                other[slot] += (kb, b"", b"D")
                continue
            px = self._px(op.expires)
            if px is None:
                plain[slot] += (kb, op.data)
            elif px <= 0:  # already expired: the write leaves nothing visible
                other[slot] += (kb, b"", b"D")
            else:
                other[slot] += (kb, op.data, px)
        return [(slot, plain[slot], other[slot]) for slot in plain]

    def _apply_call(self, groups: list[ApplyGroup]) -> Call:
        """The one APPLY script call that writes *groups* atomically (on a cluster, the
        groups of one call must share a slot)."""
        keys: list[bytes] = []
        args: list[Any] = []
        for (ns, b), puts, rest in groups:
            keys.extend(self._layout(ns).pairs[b])
            args += (len(puts) // 2, len(rest) // 3)
            args += puts
            args += rest
        return lua.APPLY, keys, args

    def _apply(self, ops: Sequence[Op]) -> None:
        # docstring inherited
        groups = self._apply_groups(ops)
        commit = checked_commit()
        guards = None if commit is None else commit.state.pop(id(self), None)
        if guards:  # the write of a batch's commit that checked its reads (one use)
            if groups:
                self._apply_guarded(groups, list(guards.items()))
            return
        if not groups:
            return
        if not self._cluster:
            self._eval(*self._apply_call(groups), write=True)
            return
        self._apply_slots([self._apply_call([group]) for group in groups], [])

    def _apply_slots(self, calls: list[Call], names: list[str]) -> None:
        """Run the per-slot write *calls* of a cluster batch in order. The first may be a
        GAPPLY call guarding the keys *names*: a failed guard raises BatchConflictError
        before anything is written."""
        for done, (script, keys, args) in enumerate(calls):
            try:
                res = self._eval(script, keys, args, write=True)
            except UnknownOutcomeError:
                raise
            except MappingStoreError as exc:
                if done:
                    raise UnknownOutcomeError(
                        f"batch partially applied: {done} of {len(calls)} slots were written "
                        f"before this failure (Redis Cluster batches are atomic per slot): {exc}"
                    ) from exc
                raise
            if script is lua.GAPPLY and int(res):
                raise batch_conflict(names[int(res) - 1])

    def _guard_call(self, guards: list[Guard], write: Call | None) -> tuple[Call, list[str]]:
        """The GAPPLY call that checks *guards* and then makes the writes of the APPLY call
        *write* (only checks without one), and the keys its guards name."""
        keys: list[bytes] = []
        args: list[Any] = [len(guards)]
        names: list[str] = []
        for (ns, key), data in guards:
            keys.append(self._data_key(ns, key))
            args += (b"0", b"") if data is None else (b"1", data)
            names.append(key)
        if write is not None:
            keys += write[1]
            args += write[2]
        return (lua.GAPPLY, keys, args), names

    def _apply_guarded(self, groups: list[ApplyGroup], guards: list[Guard]) -> None:
        """Write *groups* only if every guarded record still holds what the commit read
        (its data, or missing), atomically with the writes; else BatchConflictError, and
        nothing is written.

        Redis Cluster: one script may only touch one slot, so the slot written first
        checks its own guards atomically with its writes, and the guards of every other
        slot are checked just before, each in a read-only script (a later slot that
        failed its guard after earlier slots were written would tear a batch that would
        otherwise have been whole). The slot written first is the one with the most
        guards; those checked before stay open to a writer between their check and the
        writes, as every guard was before (see docs/backends/redis.md)."""
        if not self._cluster:
            call, names = self._guard_call(guards, self._apply_call(groups))
            failed = int(self._eval(*call, write=True))
            if failed:
                raise batch_conflict(names[failed - 1])
            return
        by_slot: dict[tuple[str, int], list[Guard]] = {}
        for guard in guards:
            (ns, key), _ = guard
            by_slot.setdefault((ns, bucket(key.encode("utf-8"))), []).append(guard)
        first = max(range(len(groups)), key=lambda i: len(by_slot.get(groups[i][0], ())))
        groups = [groups[first], *groups[:first], *groups[first + 1 :]]
        own = by_slot.pop(groups[0][0], [])
        for slot_guards in by_slot.values():
            call, names = self._guard_call(slot_guards, None)
            failed = int(self._eval(*call, write=False))  # checks only: safe to resend
            if failed:
                raise batch_conflict(names[failed - 1])
        calls = [self._apply_call([group]) for group in groups]
        names = []
        if own:
            calls[0], names = self._guard_call(own, calls[0])
        self._apply_slots(calls, names)

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        # docstring inherited
        member, ikey, xkey, dkey = self._names(ns, key)
        conflicts = 0
        raw = self._read_rec(dkey)
        while True:
            if raw is None:
                rec: Record | None = None
                expect: list[Any] = [b"0", b"", -1]
            else:
                data, pttl, at = raw
                rec = (data, None if pttl < 0 else self._clock() + pttl / 1000)
                expect = [b"1", data, at]
            new = fn(rec)
            if new is KEEP or (new is None and rec is None):
                return
            if new is None:
                token: Any = b"D"
                ndata = b""
            else:
                ndata, nexp = new
                if rec is not None and nexp is not None and nexp == rec[1]:
                    token = b"K"  # unchanged expiry: keep the server's exact PXAT
                else:
                    px = self._px(nexp)
                    token = b"" if px is None else (b"D" if px <= 0 else px)
            res = self._eval(
                lua.CAS, [ikey, xkey, dkey], [member, *expect, token, ndata], write=True
            )
            if int(res[0]) == 2:
                return
            # Lost a race: the reply carries the current record, so retry at once without
            # another read; under heavy contention back off with jitter so that one client
            # at a time wins instead of all retrying in lockstep.
            raw = None if int(res[0]) == 0 else (bytes(res[1]), int(res[2]), int(res[3]))
            conflicts += 1
            if conflicts > 1:
                time.sleep(random.random() * min(0.02, 0.0005 * 2**conflicts))

    def _clear(self, ns: str) -> None:
        # docstring inherited
        # CLEAR and PURGE are idempotent (running one twice changes nothing more), so
        # unlike other writes they may be resent, and pipelined to every node at once.
        limit = 10_000  # per script call: never block the server for long
        groups = self._groups(ns)
        while groups:
            done = self._read_all(lua.CLEAR, groups, [limit])
            groups = [keys for keys, n in zip(groups, done, strict=True) if int(n) >= limit]

    def _purge_expired(self, ns: str) -> int:
        # docstring inherited
        return sum(int(n) for n in self._read_all(lua.PURGE, self._groups(ns), []))

    _namespaces_live = True  # they skip namespaces holding only expired records

    def _namespaces(self) -> Iterable[str]:
        # docstring inherited
        def scan() -> list[str]:
            found: set[str] = set()
            head = self._prefix + b":{"
            # The prefix has no glob characters (checked at open): the pattern is exact.
            for name in self._client.scan_iter(match=head + b"*}:i", count=1000, _type="zset"):
                close = name.find(b"}", len(head))
                if not name.startswith(head) or close < 0 or name[close:] != b"}:i":
                    continue
                if name[close - 3 : close - 2] != b":":
                    continue
                try:
                    found.add(unescape_namespace(name[len(head) : close - 3]))
                except ValueError:  # not ours
                    continue
            return sorted(found)

        # An index outlives the records that expired in it (until a write prunes it or
        # purge_expired runs): list only namespaces with a live record, as len() counts
        # them (one MGET of the counters each, a script where keys expire).
        return [ns for ns in self._run("SCAN", False, scan) if self._count(ns)]

    # -- batches that read ----------------------------------------------------------------
    # A batch holding a read-modify-write (modify, pop, setdefault; series, event-log and
    # dot-name writes) commits in Store.batch(): inside _exclusive() it reads each record
    # they read again (_get_record), compares it with what they saw, then writes (_apply).
    # The store lock excludes only other exclusive sections: single-key writes (set,
    # delete, modify's compare-and-set) never take it, so one could land between that
    # check and the write, which would overwrite it (a lost update). So the check is made
    # again on the server, in the script that writes: during the commit (checked_commit(),
    # set by the batch's store, this one or an adapter around it), _get_record remembers
    # what it read ("guards": data, or None when missing or expired), and _apply hands
    # them to GAPPLY, which writes nothing if one changed (BatchConflictError, as the
    # client-side check raises). A batch without reads is no checked commit: its _apply is
    # the plain APPLY, as before.

    # -- exclusive section across clients ----------------------------------------------
    # Single-key read-modify-writes are one compare-and-set script (see _update). Writes
    # that read several records and then write several (dot-name branch writes, time
    # series, event logs) need every writer of this store excluded, in every process: a
    # lease lock in Redis (SET NX PX with a random token; released by a compare-and-delete
    # script, so an expired lease is never released by its old holder). Re-entrant per
    # thread; threads of one process queue on the store's own lock first, so only one of
    # them polls Redis. The lease is renewed while the section runs (_Renewer), so a
    # section can be long, and a holder that dies frees the lock within one lease (10 s).
    # A holder cut off from the server for a whole lease loses it (logged at release).

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        # docstring inherited
        local = self._xlocal
        if getattr(local, "depth", 0):
            local.depth += 1
            try:
                yield
            finally:
                local.depth -= 1
            return
        with self._lock:
            token = os.urandom(16)
            self._acquire_lock(token)
            key, lease_ms = self._lock_key, _LOCK_LEASE_MS
            client = self._client
            renewal = _RENEWER.hold(
                lambda: client.eval(_RENEW, 1, key, token, lease_ms), lease_ms / 1000
            )
            local.depth = 1
            try:
                yield
            finally:
                local.depth = 0
                _RENEWER.drop(renewal)
                self._release_lock(key, token)

    def _release_lock(self, key: bytes, token: bytes) -> None:
        """Release the store lock taken with *token*; never raises.

        The section's outcome is already settled when this runs: its writes either
        returned (they are applied) or raised their own error. A failed release must
        change neither (a plain ``BackendUnavailableError`` here would say "nothing was
        written" of writes that were, and would hide the section's own error), and it
        needs no handling: the lease, no longer renewed, frees the lock within
        ``_LOCK_LEASE_MS``. Closed meanwhile (by another thread): nothing to release
        it with, the lease frees it too."""
        if self._closed:
            return
        try:
            released = self._run(
                "UNLOCK", False, lambda: self._client.eval(_RELEASE, 1, key, token)
            )
        except StoreClosedError:
            return  # closed by another thread meanwhile: the lease frees it
        except MappingStoreError as exc:
            self._log.warning(
                "could not release the store lock of %s (%s); it frees itself within %g s",
                self.url,
                exc,
                _LOCK_LEASE_MS / 1000,
            )
            return
        if not released:
            self._log.warning("the store lock of %s expired before its section ended", self.url)

    @property
    def _lock_key(self) -> bytes:
        return self._prefix + b":lock"

    def _acquire_lock(self, token: bytes) -> None:
        key, lease = self._lock_key, _LOCK_LEASE_MS
        deadline = time.monotonic() + _LOCK_TIMEOUT
        delay = 0.0005
        while True:
            # Retrying SET NX is safe: if an attempt whose reply was lost did take the
            # lock, the token check below finds it ours.
            taken = self._run(
                "LOCK", False, lambda: self._client.set(key, token, nx=True, px=lease)
            )
            if taken or self._run("GET", False, lambda: self._client.get(key)) == token:
                return
            if time.monotonic() > deadline:
                raise LockTimeoutError(
                    f"could not take the store lock of {self.url!r} in {_LOCK_TIMEOUT:.0f} s"
                )
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.05)

    def _close(self) -> None:
        # docstring inherited
        if self._owns:
            try:
                self._client.close()
            except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
                self._log.debug("closing the Redis client failed: %s", exc)
