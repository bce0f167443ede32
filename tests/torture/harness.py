"""Shared pieces of the torture suite: one private location per backend, children, checks.

A :class:`Target` is a fresh location on one persistent backend (a file in ``tmp_path``, a
shared memory name, a Redis key prefix, a PostgreSQL table) with a URL any process can
open, so a forked or spawned child reaches exactly the same store as the parent.
"""

from __future__ import annotations

import glob
import multiprocessing
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mappingstore
from mappingstore import Store
from tests.servers import POSTGRES_URL, REDIS_URL, drop_redis_keys, unavailable

#: Every persistent backend (the issue's list). Redis Cluster is a Redis deployment and is
#: covered where a test says so.
PERSISTENT: tuple[str, ...] = ("sqlite", "dir", "ini", "shm", "postgres", "redis")
#: Backends whose storage is a local file or segment this process can damage directly.
FILE_BACKENDS: tuple[str, ...] = ("sqlite", "dir", "ini", "shm")
#: Backends several processes can use at once (all the persistent ones).
MULTIPROCESS: tuple[str, ...] = PERSISTENT
#: Server backends.
SERVERS: tuple[str, ...] = ("postgres", "redis")

#: Figures recorded by the ``figure`` fixture during this run.
FIGURES: list[dict[str, Any]] = []

#: ``fork`` is the fast way to start hundreds of children that already imported everything.
FORK = multiprocessing.get_context("fork")
SHM_DIR = "/dev/shm"


def reps(tier: str, fast: int, long: int) -> int:
    """The repetition count for *tier* (``"fast"`` in CI, ``"long"`` under ``-m torture``)."""
    return long if tier == "long" else fast


@dataclass
class Target:
    """A private location on one backend: ``open()`` it in any process, ``cleanup()`` after."""

    backend: str
    url: str
    #: The backing file or directory (file backends) or segment name (shm), else None.
    path: Path | None = None
    name: str = ""
    opened: list[Store] = field(default_factory=list)

    def open(self, **options: Any) -> Store:
        """Open the store (``security="low"`` by default, so passwords are cheap to test)."""
        if "password" in options:
            options.setdefault("security", "low")
        store = mappingstore.open(self.url, **options)
        self.opened.append(store)
        return store

    def cleanup(self) -> None:
        for store in self.opened:
            try:
                store.close()
            except Exception:  # best effort: a test may have broken it on purpose
                pass
        if self.backend == "shm":
            for path in glob.glob(f"{SHM_DIR}/mappingstore*.{self.name}*"):
                os.unlink(path)
        elif self.backend == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            try:
                drop_redis_keys(client, self.name)
            finally:
                client.close()
        elif self.backend == "postgres":
            import psycopg
            import psycopg.sql

            with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
                conn.execute(
                    psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(
                        psycopg.sql.Identifier(self.name)
                    )
                )


def _abs_url(scheme: str, path: Path) -> str:
    # sqlite:////absolute/path (the SQLAlchemy convention every file backend follows)
    return f"{scheme}:///{path}" if str(path).startswith("/") else f"{scheme}:////{path}"


def make_target(backend: str, tmp_path: Path) -> Target:
    """A fresh location on *backend*; server backends skip (laptop) or fail (CI) if down."""
    unique = uuid.uuid4().hex[:12]
    if backend == "sqlite":
        path = tmp_path / f"t{unique}.db"
        return Target(backend, _abs_url("sqlite", path), path=path)
    if backend == "dir":
        path = tmp_path / f"t{unique}"
        return Target(backend, _abs_url("dir", path), path=path)
    if backend == "ini":
        path = tmp_path / f"t{unique}.ini"
        return Target(backend, _abs_url("ini", path), path=path)
    if backend == "shm":
        name = f"tt{unique}"
        return Target(backend, f"shm://{name}", name=name)
    if backend == "redis":
        _check_redis()
        name = f"tt{unique}"
        return Target(backend, f"{REDIS_URL}?prefix={name}", name=name)
    if backend == "postgres":
        _check_postgres()
        name = f"mstt_{unique}"
        sep = "&" if "?" in POSTGRES_URL else "?"
        return Target(backend, f"{POSTGRES_URL}{sep}table={name}&pool_min_size=0", name=name)
    raise ValueError(f"unknown backend {backend!r}")


def _check_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        client.close()


def _check_postgres() -> None:
    import psycopg

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=5).close()
    except psycopg.Error as exc:
        unavailable("PostgreSQL", exc)


def listed_temp_files(keys: list[str]) -> list[str]:
    """Keys that look like a backend's temporary files leaking into the listing."""
    return [k for k in keys if re.search(r"\.(tmp|temp|journal|lock)$|^\.|~$", k)]
