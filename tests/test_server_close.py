"""close() of a Redis or PostgreSQL store while other threads use it: the other threads
get ``StoreClosedError`` (or, for a Redis write already sent, ``UnknownOutcomeError``),
never a raw driver error or a report of a server fault."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

import mappingstore
from mappingstore.errors import MappingStoreError, StoreClosedError, UnknownOutcomeError
from tests import servers


def _open(kind: str, name: str) -> mappingstore.Store:
    url = servers.REDIS_URL if kind == "redis" else servers.POSTGRES_URL
    option = "prefix" if kind == "redis" else "table"
    try:
        return mappingstore.open(f"{url}?{option}={name}")
    except MappingStoreError as exc:
        servers.unavailable(kind, exc)
        raise


def _use_until_closed(
    store: mappingstore.Store,
    kind: str,
    seed: int,
    go: threading.Event,
    errors: list[BaseException],
) -> None:
    rnd = random.Random(seed)
    go.wait()
    try:
        while True:
            op = rnd.randrange(4)
            if op == 0:
                store["k1"] = 1
            elif op == 1:
                store.get_many(["k1", "k2"])
            elif op == 2:
                store.modify("k3", lambda v: v + 1, default=0)
            else:
                len(store)
    except StoreClosedError:
        pass
    except UnknownOutcomeError:  # a Redis write already sent: its outcome is unknown
        if kind != "redis":
            errors.append(AssertionError("UnknownOutcomeError from PostgreSQL"))
    except BaseException as exc:  # reported below
        errors.append(exc)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_close_while_other_threads_read_and_write(kind: str) -> None:
    rnd = random.Random(5)
    errors: list[BaseException] = []
    names: list[str] = []
    try:
        for round_ in range(30):
            name = f"close_{uuid.uuid4().hex[:12]}"
            names.append(name)
            store = _open(kind, name)
            store.update({f"k{i}": i for i in range(20)})
            go = threading.Event()
            threads = [
                threading.Thread(
                    target=_use_until_closed, args=(store, kind, round_ * 10 + n, go, errors)
                )
                for n in range(3)
            ]
            for t in threads:
                t.start()
            go.set()
            time.sleep(rnd.random() * 0.03)
            store.close()
            for t in threads:
                t.join(30)
                assert not t.is_alive()
        assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]
    finally:
        if kind == "redis":
            client = servers.redis_client()
            for name in names:
                servers.drop_redis_keys(client, name)
            client.close()
        else:
            psycopg = pytest.importorskip("psycopg")
            with psycopg.connect(servers.POSTGRES_URL, autocommit=True) as admin:
                for name in names:
                    admin.execute(f'DROP TABLE IF EXISTS "{name}"')
