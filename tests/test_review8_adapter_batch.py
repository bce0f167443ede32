"""Review 8: a batch opened through an adapter (``Prefixed``, ``Cached``, ``Sharded``)
around a Redis or PostgreSQL store, holding a read-modify-write, must not overwrite
another client's update of a key it read (real servers on 127.0.0.1).

The commit of such a batch runs in the adapter (``Store.batch``), which checks the reads
in the store's exclusive section and then writes through the store; single-key writes of
other clients do not take that section. The store learns that its ``_get_record`` and
``_apply`` are such a commit's (``_store.checked_commit()``): Redis re-checks the reads in
the script that writes, PostgreSQL locks each read row before comparing. The competing
write runs, from another thread and another store object (another connection), at the
exact moment between the adapter's check and its write.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mappingstore import Cached, Prefixed, Sharded, Store
from mappingstore.errors import BatchConflictError
from tests.servers import POSTGRES_URL, REDIS_URL

ADAPTERS = ["prefixed", "cached", "sharded"]


def _wrap(kind: str, store: Store) -> Store:
    if kind == "prefixed":
        return Prefixed(store, "app.")
    if kind == "cached":
        return Cached(store)
    return Sharded([store])


def _key(kind: str) -> str:
    """The key the competing client writes on the store itself."""
    return "app.n" if kind == "prefixed" else "n"


@pytest.fixture(params=["redis", "postgres"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Store, Store]]:
    """Two stores of the same data, each with its own connections."""
    open_one: Callable[[], Store]
    if request.param == "redis":
        pytest.importorskip("redis")
        from mappingstore import RedisStore

        prefix = f"t{uuid.uuid4().hex[:12]}"

        def open_one() -> Store:
            return RedisStore(REDIS_URL, prefix=prefix, namespace="review8")

    else:
        pytest.importorskip("psycopg")
        table = request.getfixturevalue("pg_table")
        from mappingstore._postgres import PostgresStore

        def open_one() -> Store:
            return PostgresStore(POSTGRES_URL, table=table, namespace="review8")

    with open_one() as a, open_one() as b:
        try:
            yield a, b
        finally:
            a.clear()


def _race(adapter: Store, competing: Callable[[], None]) -> list[str]:
    """Run *competing* (on a thread of its own, as another client would) right before the
    next ``_apply`` of *adapter*: the write of its batch's commit, after its check. The
    thread is given a moment to finish; on PostgreSQL it waits for the commit's row lock
    instead, and finishes after it. Returns the thread's outcome once joined."""
    real = adapter._apply
    outcome: list[str] = []
    threads: list[threading.Thread] = []

    def run() -> None:
        try:
            competing()
            outcome.append("done")
        except Exception as exc:  # pragma: no cover - reported by the test
            outcome.append(repr(exc))

    def apply(ops: Any) -> None:
        if not threads:
            thread = threading.Thread(target=run)
            threads.append(thread)
            thread.start()
            thread.join(2.0)  # long enough for an unblocked write; a blocked one waits
        real(ops)

    adapter._apply = apply  # type: ignore[method-assign]
    adapter._race_threads = threads  # type: ignore[attr-defined]
    return outcome


@pytest.mark.parametrize("kind", ADAPTERS)
def test_a_batch_through_an_adapter_never_overwrites_a_concurrent_update(
    pair: tuple[Store, Store], kind: str
) -> None:
    a, b = pair
    key = _key(kind)
    b[key] = 0
    adapter = _wrap(kind, a)
    outcome = _race(adapter, lambda: b.modify(key, lambda v: v + 100))
    try:
        with adapter.batch():
            adapter.modify("n", lambda v: v + 1)
        committed = True
    except BatchConflictError:
        committed = False
    for thread in adapter._race_threads:  # type: ignore[attr-defined]
        thread.join(60)
    assert outcome == ["done"]
    # Either the batch failed and wrote nothing (Redis), or the competing update waited
    # for the commit and applied on top of it (PostgreSQL): never 1 (a lost update).
    assert b[key] == (101 if committed else 100)
    if not committed:
        with adapter.batch():  # run again: it commits on top of the competing update
            adapter.modify("n", lambda v: v + 1)
        assert b[key] == 101


@pytest.mark.parametrize("kind", ADAPTERS)
def test_counter_through_an_adapter_and_plain_modify(pair: tuple[Store, Store], kind: str) -> None:
    """Two threads x 200 increments: one in batches through the adapter (again on a
    conflict), one with plain modify on the store: exactly 400."""
    a, b = pair
    key = _key(kind)
    b[key] = 0
    adapter = _wrap(kind, a)
    errors: list[BaseException] = []

    def batched() -> None:
        try:
            for _ in range(200):
                while True:
                    try:
                        with adapter.batch():
                            adapter.modify("n", lambda v: v + 1)
                        break
                    except BatchConflictError:
                        continue
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def plain() -> None:
        try:
            for _ in range(200):
                b.modify(key, lambda v: v + 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=batched), threading.Thread(target=plain)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == []
    assert b[key] == 400
