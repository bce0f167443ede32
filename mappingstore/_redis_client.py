"""Connecting to Redis for :class:`~mappingstore.RedisStore`: URL options, client
construction, and the one place where redis-py exceptions become mappingstore errors.

The classification rule that keeps writes exactly-once: a failure proves that a command
was **not executed** only when the connection could not be made (``connecting to``), the
server refused it before running it (``LOADING``, ``READONLY``, ``NOSCRIPT``,
``TRYAGAIN``, ``CLUSTERDOWN``, ``MASTERDOWN``, ``OOM``), or the cluster client gave up
after nothing but redirections (``MOVED``/``ASK``: "TTL exhausted"). Any other connection
or timeout error after a write was sent means its outcome is unknown: it is reported as
:class:`~mappingstore.errors.UnknownOutcomeError` and never resent. Reads are idempotent
and are retried with exponential backoff in both cases.
"""

from __future__ import annotations

import math
import os
import random
import re
import ssl as _ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.exceptions as rex
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from ._url import ParsedURL, parse_bool, parse_float, parse_int, parse_url, redact
from .errors import (
    BackendError,
    BackendUnavailableError,
    CapacityError,
    InvalidOptionError,
    InvalidURLError,
    MappingStoreError,
    OptionTypeError,
    UnknownOutcomeError,
)

__all__ = [
    "Classified",
    "ClientConfig",
    "backoff_delay",
    "check_db",
    "check_options",
    "classify",
    "client_settings",
    "make_client",
    "parse_redis_url",
    "wrong_type",
]

SCHEMES = ("redis", "rediss", "redis+cluster")


#: Redis options accepted in the URL query (and as keyword arguments).
URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "db": parse_int,
    "socket_timeout": parse_float,
    "socket_connect_timeout": parse_float,
    "health_check_interval": parse_float,
    "max_connections": parse_int,
    "retries": parse_int,
    "client_name": str,
    "ssl": parse_bool,
    "ssl_cert_reqs": str,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_check_hostname": parse_bool,
    "prefix": str,  # the store's key prefix: a store option, not a client one
}

#: Defaults of the timeouts (seconds), shared with the docs (``docs/backends/redis.md``).
SOCKET_TIMEOUT = 10.0
SOCKET_CONNECT_TIMEOUT = 5.0
#: What Redis accepts in ``CLIENT SETNAME``: printable ASCII, no space.
_CLIENT_NAME = re.compile(r"[!-~]*")


def _seconds(name: str, value: Any, *, zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionTypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > _MAX_SECONDS:
        least = ">= 0" if zero else "> 0"
        raise InvalidOptionError(
            f"{name} must be a number of seconds {least} and at most {_MAX_SECONDS:,}, "
            f"got {value!r}"
        )
    return float(value)


#: The longest timeout a socket takes (about 31 years; the kernel's limit is near 9.2e9 s,
#: past which Python raises OverflowError).
_MAX_SECONDS = 10**9


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < least:
        raise InvalidOptionError(f"{name} must be an int >= {least}, got {value!r}")
    return value


def check_db(value: Any) -> int:
    """A database number (``db``): an int from 0 to 2**31 - 1, the server's range (it
    may have fewer)."""
    db = _count("db", value, 0)
    if db >= 2**31:
        raise InvalidOptionError(f"db must be below 2**31, got {db}")
    return db


def check_options(opts: dict[str, Any]) -> None:
    """Check the types and ranges of Redis client options (from a URL or keywords) before
    redis-py sees them: it raises builtin ``ValueError``/``TypeError`` for some bad values,
    and the server a late error for others (a negative ``health_check_interval``)."""
    for name, value in opts.items():
        if name in ("socket_timeout", "socket_connect_timeout"):
            _seconds(name, value, zero=False)
        elif name == "health_check_interval":
            _seconds(name, value, zero=True)
        elif name == "max_connections":
            _count(name, value, 1)
        elif name == "retries":
            _count(name, value, 0)
        elif name == "client_name":
            if not isinstance(value, str):
                raise OptionTypeError(f"client_name must be a str, got {type(value).__name__}")
            if not _CLIENT_NAME.fullmatch(value):
                raise InvalidOptionError(
                    "client_name may hold printable ASCII characters only, and no space"
                )
        elif name in ("ssl", "ssl_check_hostname"):
            if not isinstance(value, bool):
                raise OptionTypeError(f"{name} must be a bool, got {type(value).__name__}")
        elif name == "ssl_cert_reqs":
            if not isinstance(value, str):
                raise OptionTypeError(f"{name} must be a str, got {type(value).__name__}")
        elif name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and not isinstance(
            value, (str, os.PathLike)
        ):
            raise OptionTypeError(f"{name} must be a file path, got {type(value).__name__}")


_CERT_REQS = {
    "none": _ssl.CERT_NONE,
    "optional": _ssl.CERT_OPTIONAL,
    "required": _ssl.CERT_REQUIRED,
}


@dataclass
class ClientConfig:
    """Everything needed to build a redis-py client, without secrets in its ``repr``."""

    cluster: bool
    hosts: list[tuple[str, int]]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def url(self) -> str:
        """A URL for this server, never with the password."""
        scheme = "redis+cluster" if self.cluster else ("rediss" if self.ssl else "redis")
        user = urllib.parse.quote(self.username, safe="") + "@" if self.username else ""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        tail = "" if self.cluster else f"/{self.db}"
        query = "?ssl=true" if self.cluster and self.ssl else ""
        return f"{scheme}://{user}{hosts}{tail}{query}"


def _split_hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts: list[tuple[str, int]] = []
    for part in netloc.split(","):
        part = part.strip()
        if not part:
            raise InvalidURLError("empty host in a redis+cluster:// URL")
        if part.startswith("["):
            host, _, rest = part[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        else:
            host, _, port_text = part.partition(":")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError as exc:
            raise InvalidURLError(f"bad port in Redis URL host {part!r}") from exc
        if not host or not 0 < port < 65536:
            raise InvalidURLError(f"bad Redis host {part!r}")
        hosts.append((host, port))
    return hosts


def parse_redis_url(url: str) -> tuple[ClientConfig, dict[str, Any]]:
    """Split a redis URL into a client config and the store's own options."""
    parsed: ParsedURL = parse_url(url, SCHEMES, URL_OPTIONS)
    options = dict(parsed.options)
    cluster = parsed.scheme == "redis+cluster"
    split = urllib.parse.urlsplit(url)
    hostpart = split.netloc.rpartition("@")[2]
    hosts = _split_hosts(hostpart, 6379) if hostpart else [("127.0.0.1", 6379)]
    if len(hosts) > 1 and not cluster:
        raise InvalidURLError("several hosts need a redis+cluster:// URL")
    db = options.pop("db", None)
    if db is not None:
        check_db(db)
    path = parsed.path.strip("/")
    if path:
        # Checked, not int()-and-catch: int()'s error quotes the path, which holds the tail
        # of a password with an unescaped "/", and would stay attached as the context.
        if not (path.isascii() and path.isdigit()):
            raise InvalidURLError(
                f"the Redis URL path must be a database number, got {redact(url)!r}"
            )
        path_db = int(path)
        if db is not None and db != path_db:
            raise InvalidURLError(
                "the database is given twice (path and ?db=) with different values"
            )
        db = path_db
    if cluster and db not in (None, 0):
        raise InvalidURLError("Redis Cluster has only database 0")
    ssl = options.pop("ssl", parsed.scheme == "rediss")
    redis_opts = {k: options.pop(k) for k in list(options) if k in URL_OPTIONS and k != "prefix"}
    check_options(redis_opts)
    config = ClientConfig(
        cluster=cluster,
        hosts=hosts,
        db=db or 0,
        username=parsed.username,
        password=parsed.password,
        ssl=bool(ssl),
        options=redis_opts,
    )
    return config, options


_NO_RETRY = Retry(NoBackoff(), 0)


def make_client(config: ClientConfig) -> redis.Redis | RedisCluster:
    """Build a client that never resends a command by itself (we decide what to retry)."""
    opts = dict(config.options)
    check_options(opts)
    check_db(config.db)
    opts.pop("retries", None)
    kwargs: dict[str, Any] = {
        "socket_timeout": opts.pop("socket_timeout", SOCKET_TIMEOUT),
        "socket_connect_timeout": opts.pop("socket_connect_timeout", SOCKET_CONNECT_TIMEOUT),
        "socket_keepalive": True,
        "health_check_interval": opts.pop("health_check_interval", 0),
        "username": config.username,
        "password": config.password,
        "decode_responses": False,
    }
    if "client_name" in opts:
        kwargs["client_name"] = opts.pop("client_name")
    if "max_connections" in opts:
        kwargs["max_connections"] = opts.pop("max_connections")
    if config.ssl:
        kwargs["ssl"] = True
        reqs = str(opts.pop("ssl_cert_reqs", "required")).lower()
        if reqs not in _CERT_REQS:
            raise InvalidOptionError(
                f"ssl_cert_reqs must be one of {sorted(_CERT_REQS)}, got {reqs!r}"
            )
        kwargs["ssl_cert_reqs"] = reqs
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"):
            if name in opts:
                kwargs[name] = opts.pop(name)
    else:
        tls_only = [name for name in opts if name.startswith("ssl_")]
        if tls_only:
            raise InvalidOptionError(
                f"TLS options ({', '.join(sorted(tls_only))}) need a rediss:// URL (or ssl=true)"
            )
    if opts:
        raise InvalidOptionError(f"unknown Redis options: {', '.join(sorted(opts))}")
    if config.cluster:
        nodes = [ClusterNode(host, port) for host, port in config.hosts]  # type: ignore[no-untyped-call]
        try:  # RedisCluster connects at once to learn the slot map
            return RedisCluster(startup_nodes=nodes, retry=_NO_RETRY, **kwargs)
        except (rex.RedisError, rex.RedisClusterException) as exc:
            where = ", ".join(f"{host}:{port}" for host, port in config.hosts)
            raise BackendUnavailableError(
                f"Redis Cluster at {where} is not reachable: {type(exc).__name__}: "
                f"{redact(str(exc))}"
            ) from None
    host, port = config.hosts[0]
    return redis.Redis(host=host, port=port, db=config.db, retry=_NO_RETRY, **kwargs)


#: Connection settings a client built by ``make_client`` carries in its pool's
#: ``connection_kwargs`` (everything else there is redis-py's own bookkeeping, or the
#: retry policy, which each client chooses for itself).
_SETTINGS = (
    "host",
    "port",
    "db",
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "socket_keepalive",
    "health_check_interval",
    "client_name",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_check_hostname",
)


def client_settings(client: redis.Redis) -> dict[str, Any]:
    """The keyword arguments that build another client (e.g. a ``redis.asyncio`` one)
    on the same server as the standalone *client*, with the same credentials, timeouts,
    TLS settings and pool size: everything but ``retry`` and ``decode_responses``."""
    pool = client.connection_pool
    given = pool.connection_kwargs
    kwargs = {name: given[name] for name in _SETTINGS if name in given}
    kwargs["ssl"] = "SSL" in pool.connection_class.__name__
    kwargs["max_connections"] = pool.max_connections
    return kwargs


def wrong_type(exc: rex.ResponseError) -> bytes:
    """What a GET of a data key reads when another program stored another Redis type
    there (a hash, a list...): the empty record, which no decoder accepts, so the read
    raises ``CorruptValueError`` as for any foreign value (the ITER and GETREC scripts
    do the same). Any other error reply is raised again."""
    if str(exc).startswith("WRONGTYPE"):
        return b""
    raise exc


def backoff_delay(attempt: int, base: float = 0.05, cap: float = 1.0) -> float:
    """Exponential backoff with jitter (attempt 0 -> about *base* seconds)."""
    return float(min(cap, base * 2**attempt) * (0.5 + random.random() / 2))


@dataclass(frozen=True)
class Classified:
    """How to react to a driver error."""

    retry: bool  # safe to run again (for a write: proven not executed)
    error: MappingStoreError  # what to raise when not retrying (chained to the cause)
    reconnect: bool = False  # drop pooled connections before the next attempt


_NOT_EXECUTED_REPLIES = (
    rex.BusyLoadingError,
    rex.ReadOnlyError,
    rex.TryAgainError,
    rex.ClusterDownError,
    rex.MasterDownError,
    rex.SlotNotCoveredError,
    # The cluster client's "TTL exhausted.": every attempt was answered MOVED, ASK or
    # TRYAGAIN (slots changing hands), so the command never ran.
    rex.ClusterError,
)


#: redis-py's functions that hand out a connection, connected and checked, before any
#: byte of a command goes onto it: the pools' ``get_connection`` (which calls
#: ``ensure_connection``: connect, then the handshake HELLO/AUTH/SELECT/CLIENT SETNAME)
#: and the cluster client's ``get_connection`` helper, sync and asyncio alike.
_BEFORE_SEND = frozenset({"get_connection", "ensure_connection"})
_REDIS_MODULES = frozenset(
    {"redis.connection", "redis.cluster", "redis.asyncio.connection", "redis.asyncio.cluster"}
)


def _raised_getting_a_connection(exc: BaseException) -> bool:
    """True when *exc* was raised inside redis-py's ``get_connection``: the command it was
    getting a connection for had not been written yet (redis-py sends a command only on
    the connection ``get_connection`` returned). Its traceback says where it was raised;
    a failure of the connect handshake ("Connection closed by server." in reply to
    HELLO) has no telling message, only this place."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _BEFORE_SEND and tb.tb_frame.f_globals.get("__name__") in (
            _REDIS_MODULES
        ):
            return True
        tb = tb.tb_next
    return False


def _not_sent(exc: BaseException) -> bool:
    # redis-py raises these before any byte of the command was written: the pool could
    # not (re)connect, or a pooled socket was found dead and replaced first.
    text = str(exc)
    return (
        "connecting to" in text
        or "Timeout connecting" in text
        or "Connection has data" in text
        or "Connection not ready" in text
        or "Too many connections" in text
        or _raised_getting_a_connection(exc)
    )


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _link_errors(chain: list[BaseException]) -> list[BaseException]:
    """The connection and timeout errors of *chain* that say whether a command was sent.

    A connect failure raised by redis-py for the command itself (the top of the chain)
    proves it was not sent, whatever redis-py was handling then: with its own retries off
    (``make_client``) the only reconnect inside an error handler is the pool's check of a
    pooled socket *before* sending (``ensure_connection``: the dead socket's ``Connection
    closed by server.``, then the new socket's ``ConnectionRefusedError``). Deeper in a
    chain (a cluster client's own error raised while handling a node's), a plain
    ``OSError`` right below a not-sent redis-py error is that error's socket-level cause,
    not a second failure; every other link error counts. (Counting them all made every
    write to a killed node an ``UnknownOutcomeError`` instead of a retry.) A client passed
    in with redis-py's own retries turned on resends writes anyway (the store warns)."""
    top = chain[0]
    if isinstance(top, (rex.ConnectionError, rex.TimeoutError)) and _not_sent(top):
        return [top]
    found: list[BaseException] = []
    below_not_sent = False
    for e in chain:
        if isinstance(e, rex.RedisError):
            below_not_sent = False
        if isinstance(e, (rex.ConnectionError, rex.TimeoutError, OSError)):
            if below_not_sent:
                continue
            found.append(e)
            below_not_sent = isinstance(e, rex.RedisError) and _not_sent(e)
    return found


def classify(exc: BaseException, *, write: bool, what: str) -> Classified:
    """Decide whether *exc* may be retried and which mappingstore error it becomes."""
    text = redact(str(exc))
    where = f"Redis {what} failed: {type(exc).__name__}: {text}"
    if (
        isinstance(exc, (rex.AuthenticationError, rex.AuthorizationError))
        or "NOAUTH" in text
        or "WRONGPASS" in text
    ):
        return Classified(False, BackendError(f"Redis refused the credentials ({what}): {text}"))
    if isinstance(exc, rex.ResponseError) and "DB index is out of range" in text:
        # SELECT of the connect handshake: the server has fewer databases than asked for.
        return Classified(
            False, InvalidOptionError(f"the Redis server has no such database (db): {text}")
        )
    if isinstance(exc, rex.OutOfMemoryError) or text.startswith("OOM"):
        return Classified(
            False,
            CapacityError(
                f"Redis is out of memory (maxmemory reached); nothing was written: {text}"
            ),
        )
    if isinstance(exc, rex.ReadOnlyError) or text.startswith("READONLY"):
        return Classified(
            True,
            BackendUnavailableError(
                f"Redis {what} failed: the server is a read-only replica "
                f"(after a failover?): {text}"
            ),
            reconnect=True,
        )
    if isinstance(exc, _NOT_EXECUTED_REPLIES):
        return Classified(True, BackendUnavailableError(where))
    if isinstance(exc, (rex.AskError, rex.ClusterCrossSlotError)):
        # MOVED/ASK never get past the cluster client (it follows them), and the key
        # layout never mixes slots in one command: only a plain client on a cluster node
        # sees these.
        return Classified(
            False,
            BackendError(
                f"Redis {what} failed: the server is a Redis Cluster node; open the "
                f"cluster with a redis+cluster:// URL ({type(exc).__name__}: {text})"
            ),
        )
    link_errors = _link_errors(_chain(exc))
    if link_errors or isinstance(exc, rex.RedisClusterException):
        if not write or all(_not_sent(e) for e in link_errors):
            return Classified(True, BackendUnavailableError(where))
        return Classified(
            False,
            UnknownOutcomeError(
                f"Redis {what}: the connection failed after the write was sent, so it may or may "
                f"not have been applied; it was not retried ({type(exc).__name__}: {text})"
            ),
        )
    return Classified(False, BackendError(where))
