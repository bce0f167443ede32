"""Shared test configuration: Hypothesis profiles and assertion rewriting for the suite.

Profiles (pick one with ``MAPPINGSTORE_HYPOTHESIS_PROFILE``):

``ci`` (default)
    Small and deterministic (``derandomize=True``): the same examples on every run, so a
    red CI run is reproducible and a green one is not luck.
``torture``
    1,000 examples of up to 50 steps each, randomised: run it before a release.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# The conformance suite lives in the package; rewrite its asserts for readable failures.
# This must run before anything imports mappingstore.testing.
pytest.register_assert_rewrite("mappingstore.testing")

settings.register_profile(
    "ci",
    # Sized for CI: the state machines run for ~8 backends on 2 cores, and a write to a
    # durable server backend costs milliseconds. The torture profile goes deep.
    max_examples=15,
    stateful_step_count=20,
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "torture",
    max_examples=1_000,
    stateful_step_count=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MAPPINGSTORE_HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--torture",
        action="store_true",
        help="also run the long reliability tier (tests marked torture); -m torture runs only it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave the long tier (``torture`` marker) out unless ``--torture`` or ``-m`` asks for it."""
    if config.getoption("--torture") or "torture" in (config.getoption("markexpr") or ""):
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("torture") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# -- Redis tests on the shared server (each test under a key prefix of its own) ----------


@pytest.fixture(scope="module")
def raw() -> Iterator[Any]:
    """A plain redis-py client on the test database (ground truth, cleanup)."""
    from tests.servers import redis_client

    client = redis_client()
    yield client
    client.close()


@pytest.fixture
def prefix(raw: Any) -> Iterator[str]:
    """A key prefix of this test's own: an independent store on the shared server; its
    keys, and nothing else, are deleted afterwards."""
    from tests.servers import drop_redis_keys

    name = f"t{uuid.uuid4().hex[:12]}"
    yield name
    drop_redis_keys(raw, name)


@pytest.fixture
def pg_table() -> Iterator[str]:
    """A fresh PostgreSQL table name of this test's own; the table (or a view of that
    name, and its ``<name>_base`` table) is dropped afterwards."""
    psycopg = pytest.importorskip("psycopg")
    from tests.servers import POSTGRES_URL, unavailable

    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    table = f"t_{uuid.uuid4().hex[:12]}"
    try:
        yield table
    finally:
        try:
            admin.execute(
                psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(psycopg.sql.Identifier(table))
            )
        except psycopg.errors.WrongObjectType:  # the view case
            admin.execute(psycopg.sql.SQL("DROP VIEW {}").format(psycopg.sql.Identifier(table)))
        admin.execute(
            psycopg.sql.SQL("DROP TABLE IF EXISTS {}").format(
                psycopg.sql.Identifier(table + "_base")
            )
        )
        admin.close()
