"""Reaching the real Redis and PostgreSQL servers the tests need.

On a developer's laptop a missing server skips its tests; in CI (``CI=true``) it fails
them, so a server that did not start can never turn the run green.
"""

from __future__ import annotations

import os

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
