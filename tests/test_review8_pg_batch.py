"""Review 8: a PostgreSQL batch whose read-modify-writes read stored records lost other
clients' updates (real server on 127.0.0.1).

The commit of such a batch checks, in a transaction holding the store's advisory lock,
that the records it read did not change, then writes. A plain ``set``/``delete``/
``modify`` does not take that lock, and the check read without locking: another client
could change a checked key (or insert one the batch saw missing) between the check and
the batch's write, which then overwrote it. Now the commit locks every row it read or
writes (a placeholder row for a missing key) before it compares, so such a writer waits
for the commit.

The races are made deterministic: the batch's store runs the competing write, from
another thread on another store (so another connection), at the exact moment between its
check and its write, and waits until that write has either finished (the lost update of
the old code) or is seen waiting for a lock in ``pg_stat_activity``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mappingstore.errors import BatchConflictError
from tests.servers import POSTGRES_URL, unavailable

psycopg = pytest.importorskip("psycopg")

from mappingstore._postgres import PostgresStore  # noqa: E402  (needs psycopg)

pytestmark = pytest.mark.postgres

#: A fail-safe for a wait that must end (never a threshold the test depends on).
_FAILSAFE = 120.0


@pytest.fixture
def admin() -> Iterator[Any]:
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    yield conn
    conn.close()


@pytest.fixture
def stores(pg_table: str) -> Iterator[Callable[..., PostgresStore]]:
    """Open stores on this test's own table (dropped afterwards by ``pg_table``) and a
    namespace of its own; all closed at the end."""
    opened: list[PostgresStore] = []
    namespace = f"ns{uuid.uuid4().hex[:8]}"

    def make(**options: Any) -> PostgresStore:
        store = PostgresStore(POSTGRES_URL, table=pg_table, namespace=namespace, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


class _Competitor:
    """A write by another client (*store*, another connection), run on a thread of its
    own when the batch's store is about to write."""

    def __init__(self, admin: Any, store: PostgresStore, app: str, write: Callable[[], Any]):
        self.admin, self.store, self.app, self.write = admin, store, app, write
        self.thread: threading.Thread | None = None
        self.result: list[Any] = []
        self.error: list[BaseException] = []
        self.blocked = False

    def _run(self) -> None:
        try:
            self.result.append(self.write())
        except BaseException as exc:  # reported by join()
            self.error.append(exc)

    def start_and_settle(self) -> None:
        """Start the write, and return once it has finished or waits for a lock."""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + _FAILSAFE
        while self.thread.is_alive():
            row = self.admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name = %s AND wait_event_type = 'Lock'",
                (self.app,),
            ).fetchone()
            if row[0]:
                self.blocked = True
                return
            assert time.monotonic() < deadline, "the competing write neither ended nor waited"
            time.sleep(0.002)

    def join(self) -> Any:
        assert self.thread is not None, "the batch never reached its write"
        self.thread.join(_FAILSAFE)
        assert not self.thread.is_alive()
        if self.error:
            raise self.error[0]
        return self.result[0]


def _race_at_write(
    admin: Any,
    make: Callable[..., PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
    write: Callable[[PostgresStore], Any],
    **options: Any,
) -> tuple[PostgresStore, _Competitor]:
    """The batch's store, whose commit runs *write* on another store (another client)
    between its check and its write."""
    store = make(**options)
    app = f"ms8_{uuid.uuid4().hex[:10]}"
    other = make(application_name=app, **options)
    competitor = _Competitor(admin, other, app, lambda: write(other))
    real_apply = store._apply

    def apply_after_competitor(ops: Any) -> None:
        if competitor.thread is None:
            competitor.start_and_settle()
        real_apply(ops)

    monkeypatch.setattr(store, "_apply", apply_after_competitor)
    return store, competitor


@pytest.mark.parametrize("what", ["modify", "set", "delete"])
def test_a_write_between_the_check_and_the_write_of_an_existing_key_is_not_lost(
    admin: Any,
    stores: Callable[..., PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    writes: dict[str, Callable[[PostgresStore], Any]] = {
        "modify": lambda s: s.modify("n", lambda v: v + 10),
        "set": lambda s: s.set("n", 100),
        "delete": lambda s: s.pop("n"),
    }
    store, competitor = _race_at_write(admin, stores, monkeypatch, writes[what])
    store["n"] = 0
    with store.batch():
        assert store.modify("n", lambda v: v + 1) == 1
        store["other"] = "x"
    result = competitor.join()
    # The competing write waited for the commit, then applied to the batch's result.
    # Before the fix it committed first and the batch overwrote it with 1: a lost update
    # (or, for the delete, a deleted key brought back).
    if what == "modify":
        assert (result, store.get("n")) == (11, 11)
    elif what == "set":
        assert store.get("n") == 100
    else:
        assert (result, "n" in store) == (1, False)
    assert store["other"] == "x"
    assert competitor.blocked


@pytest.mark.parametrize("state", ["missing", "expired"])
@pytest.mark.parametrize("what", ["modify", "set"])
def test_an_insert_between_the_check_and_the_write_of_a_missing_key_is_not_lost(
    admin: Any,
    stores: Callable[..., PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
    state: str,
    what: str,
) -> None:
    now = [1_000_000.0]
    writes: dict[str, Callable[[PostgresStore], Any]] = {
        "modify": lambda s: s.modify("k", lambda v: v + 10, default=0),
        "set": lambda s: s.set("k", 100),
    }
    store, competitor = _race_at_write(
        admin, stores, monkeypatch, writes[what], clock=lambda: now[0]
    )
    if state == "expired":
        store.set("k", 5, ttl=10)  # an expired row reads as missing, and is locked too
        now[0] += 100
    with store.batch():
        assert store.modify("k", lambda v: v + 1, default=0) == 1
    result = competitor.join()
    # Before the fix the batch's 1 overwrote the competitor's insert.
    if what == "modify":
        assert (result, store.get("k")) == (11, 11)
    else:
        assert store.get("k") == 100
    assert competitor.blocked


def test_a_key_read_missing_and_not_written_stays_locked_and_leaves_no_row(
    admin: Any,
    stores: Callable[..., PostgresStore],
    monkeypatch: pytest.MonkeyPatch,
    pg_table: str,
) -> None:
    store, competitor = _race_at_write(admin, stores, monkeypatch, lambda s: s.set("gone", 7))
    with store.batch():
        assert store.pop("gone", None) is None
        store["w"] = 1
    competitor.join()
    assert competitor.blocked  # the missing key it read stayed missing until the commit
    assert store["gone"] == 7
    assert store["w"] == 1
    # The placeholder that locked "gone" is never committed.
    store.pop("gone")
    rows = admin.execute(
        psycopg.sql.SQL("SELECT count(*) FROM {} WHERE key = %s").format(
            psycopg.sql.Identifier(pg_table)
        ),
        (b"gone",),
    ).fetchone()
    assert rows[0] == 0


def test_a_change_before_the_commit_is_still_a_conflict(
    stores: Callable[..., PostgresStore],
) -> None:
    store, other = stores(), stores()
    store["n"] = 0

    def conflicting_batch() -> None:
        with store.batch():
            store.modify("n", lambda v: v + 1)
            store.setdefault("fresh", 1)
            other["n"] = 50  # another client, after the batch read "n"

    with pytest.raises(BatchConflictError):
        conflicting_batch()
    assert store["n"] == 50
    assert "fresh" not in store


def test_batch_and_plain_increments_of_one_counter_add_up(
    stores: Callable[..., PostgresStore],
) -> None:
    rounds = 300
    batched, plain = stores(), stores()
    batched["n"] = 0
    conflicts = [0]
    errors: list[BaseException] = []

    def in_batches() -> None:
        for _ in range(rounds):
            while True:
                try:
                    with batched.batch():
                        batched.modify("n", lambda v: v + 1)
                    break
                except BatchConflictError:  # changed after the batch read it: nothing written
                    conflicts[0] += 1

    def one_by_one() -> None:
        for _ in range(rounds):
            plain.modify("n", lambda v: v + 1)

    def run(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in (in_batches, one_by_one)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(_FAILSAFE * 5)
    assert not errors, errors
    assert plain["n"] == 2 * rounds
