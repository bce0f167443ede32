"""Reaching the real Redis and PostgreSQL servers the tests need.

On a developer's laptop a missing server skips its tests; in CI (``CI=true``) it fails
them, so a server that did not start can never turn the run green.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

REDIS_URL = os.environ.get("MAPPINGSTORE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "MAPPINGSTORE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


def in_ci() -> bool:
    """True when running under CI (``CI`` set to a true value)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(what: str, why: BaseException | str) -> None:
    """Skip (laptop) or fail (CI) a test whose server cannot be reached."""
    message = f"{what} is not reachable: {why}"
    if in_ci():
        pytest.fail(message + " (CI=true: a missing server fails the run)", pytrace=False)
    pytest.skip(message)


def redis_client(socket_timeout: float = 5) -> Any:
    """A plain redis-py client on the test database (:data:`REDIS_URL`), answering; a
    server that does not answer is :func:`unavailable`."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(
        REDIS_URL, socket_connect_timeout=2, socket_timeout=socket_timeout
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        unavailable(f"Redis at {REDIS_URL}", exc)
    return client


def drop_redis_keys(client: Any, prefix: str) -> None:
    """Delete every key whose name starts with *prefix* (which holds no glob characters)
    on a standalone server, 500 at a time: nothing of other tests' data."""
    names = list(client.scan_iter(match=prefix.encode() + b"*", count=1000))
    for i in range(0, len(names), 500):
        client.delete(*names[i : i + 500])
