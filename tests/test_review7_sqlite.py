"""Review 7, SQLite: a database file replaced or deleted under an open store, namespace
names that are not text, and numeric options beyond what SQLite accepts."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import SQLiteStore, _sqlite
from mappingstore._sqlite import NS_TABLE, TABLE
from mappingstore.errors import BackendError, InvalidOptionError, StoreCorruptError


@pytest.fixture
def every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes check the path each time, not at most once per millisecond: a test's
    replacement follows its previous write more closely than that."""
    monkeypatch.setattr(_sqlite, "_RECHECK", 0.0, raising=False)


def _remove_sidecars(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            side.unlink()


def _in_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a new thread (so on a new connection): its result, or the exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # handed back to the test
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


WRITES: list[tuple[str, Callable[[SQLiteStore], Any]]] = [
    ("setitem", lambda s: s.__setitem__("b", 2)),
    ("set with ttl", lambda s: s.set("b", 2, ttl=60)),
    ("update", lambda s: s.update({"b": 2, "c": 3})),
    ("batch", lambda s: s.set_many([("b", 2)])),
    ("modify", lambda s: s.modify("a", lambda v: v + 1)),
    ("setdefault", lambda s: s.setdefault("b", 2)),
    ("delitem", lambda s: s.__delitem__("a")),
    ("pop", lambda s: s.pop("a")),
    ("clear", lambda s: s.clear()),
    # A namespace the file has never held: registering it is a write too.
    ("new namespace", lambda s: s._put("other", "b", b"\x01\x00", None)),
]


@pytest.mark.usefixtures("every_write")
@pytest.mark.parametrize(("label", "write"), WRITES, ids=[w[0] for w in WRITES])
def test_write_to_replaced_file_raises_and_changes_nothing(
    tmp_path: Path, label: str, write: Callable[[SQLiteStore], Any]
) -> None:
    db, restored = tmp_path / "app.db", tmp_path / "restored.db"
    with SQLiteStore(restored) as other:
        other["z"] = 26
    store = SQLiteStore(db)
    try:
        store["a"] = 1
        os.replace(restored, db)  # an admin restores a backup under the running store
        _remove_sidecars(db)
        with pytest.raises(BackendError, match="replaced") as info:
            write(store)
        assert "nothing was written" in str(info.value)
        # Still refused: never acknowledged into the file no one can open any more.
        with pytest.raises(BackendError, match="replaced"):
            store["b"] = 2
    finally:
        store.close()
    with SQLiteStore(db) as again:  # the file at the path is untouched
        assert again.to_dict() == {"z": 26}
        assert again.namespaces() == ["default"]


def test_replaced_file_is_never_mixed_with_the_old_one(tmp_path: Path) -> None:
    db, restored = tmp_path / "app.db", tmp_path / "restored.db"
    with SQLiteStore(restored) as other:
        other["z"] = 26
    with SQLiteStore(db) as store:
        store["a"] = 1
        os.replace(restored, db)
        _remove_sidecars(db)
        # Every new connection (a listing's reader, another thread's) checks the path:
        # no part of the store reads the new file while another part reads the old one.
        with pytest.raises(BackendError, match="replaced"):
            list(store)
        with pytest.raises(BackendError, match="replaced"):
            store.to_dict()
        got = _in_thread(lambda: store.get("z"))
        assert isinstance(got, BackendError)
        assert "replaced" in str(got)
        # The connection this thread already has keeps the file it opened.
        assert store.get("a") == 1
        assert store.get("z") is None


@pytest.mark.usefixtures("every_write")
def test_write_to_deleted_file_raises_and_creates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with SQLiteStore(db) as store:
        store["c"] = 3
        db.unlink()
        _remove_sidecars(db)
        with pytest.raises(BackendError, match="deleted") as info:
            store["d"] = 4
        assert "nothing was written" in str(info.value)
        with pytest.raises(BackendError, match="deleted"):
            store.update({"d": 4, "e": 5})
        # Another thread's first call would open (so create) the file again, empty.
        got = _in_thread(lambda: store.get("c"))
        assert isinstance(got, BackendError)
        assert "deleted" in str(got)
        assert not db.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.usefixtures("every_write")
def test_write_after_rename_leaves_the_moved_file_unchanged(tmp_path: Path) -> None:
    db, moved = tmp_path / "app.db", tmp_path / "moved.db"
    with SQLiteStore(db) as store:
        store["a"] = 1
        store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.rename(db, moved)
        for write in (
            lambda: store.__setitem__("b", 2),
            lambda: store.modify("a", lambda v: v + 1),
            lambda: store.set_many([("c", 3)]),
        ):
            with pytest.raises(BackendError, match="deleted"):
                write()
    _remove_sidecars(db)
    with SQLiteStore(moved) as after:
        assert after.to_dict() == {"a": 1}


def test_default_window_still_checks_every_later_write(tmp_path: Path) -> None:
    # Writes closer together than _RECHECK share one check; a write after it never does.
    db = tmp_path / "app.db"
    with SQLiteStore(db) as store:
        store["a"] = 1
        db.unlink()
        _remove_sidecars(db)
        time.sleep(2 * getattr(_sqlite, "_RECHECK", 0.001))
        with pytest.raises(BackendError, match="deleted"):
            store["b"] = 2
        with pytest.raises(BackendError, match="deleted"):
            store["b"] = 2  # refused again right after: a failed check is not remembered


@pytest.mark.usefixtures("every_write")
def test_file_left_in_place_is_not_reported(tmp_path: Path) -> None:
    # Another process rewriting the file in place (or any SQLite writer) is no move.
    db = tmp_path / "app.db"
    with SQLiteStore(db) as store, SQLiteStore(db, namespace="n") as second:
        store["a"] = 1
        conn = sqlite3.connect(db)
        conn.execute(f"UPDATE {TABLE} SET expires = NULL")
        conn.commit()
        conn.close()
        second["x"] = 1
        assert _in_thread(lambda: store.get("a")) == 1
        store.update({"b": 2})
        store.modify("a", lambda v: v + 1)
        assert store.to_dict() == {"a": 2, "b": 2}


def test_memory_store_has_no_path_to_check() -> None:
    with mappingstore.open("sqlite://:memory:") as store:
        store["a"] = 1
        store.update({"b": 2})
        assert _in_thread(lambda: store.get("a")) == 1


# -- namespace names that are not text -----------------------------------------------------


def _plant_name(path: Path, sql_value: str, old: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {NS_TABLE} SET name = {sql_value} WHERE name = ?", (old,))
    conn.commit()
    conn.close()


def test_namespace_stored_as_blob_is_skipped_like_a_blob_key(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path, namespace="t") as t, SQLiteStore(path, namespace="u") as u:
        t["k0"] = 0
        u["k"] = 1
    _plant_name(path, "x'ff'", "t")  # another program renamed it to a BLOB
    with SQLiteStore(path, namespace="u") as store:
        assert store.namespaces() == ["u"]
        assert store.to_dict() == {"k": 1}
    # The same rule as for a key stored as a BLOB: not one of the store's names.
    conn = sqlite3.connect(path)
    conn.execute(
        f"INSERT INTO {TABLE} (ns_id, key, expires, value) "
        f"SELECT ns_id, x'ff', NULL, value FROM {TABLE} WHERE key = 'k'"
    )
    conn.commit()
    conn.close()
    with SQLiteStore(path, namespace="u") as store:
        assert list(store) == ["k"]
        assert store.namespaces() == ["u"]


def test_namespace_text_not_utf8_is_store_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path, namespace="t") as t:
        t["k0"] = 0
    _plant_name(path, "CAST(x'ff' AS TEXT)", "t")
    with SQLiteStore(path, namespace="u") as store, pytest.raises(StoreCorruptError):
        store.namespaces()


# -- numeric options beyond SQLite's range -------------------------------------------------


@pytest.mark.parametrize(
    "timeout",
    [10**400, -(10**5000), float("inf"), 1e10, 2147483.648, 2**31],
    ids=["10**400", "-10**5000", "inf", "1e10", "2147483.648", "2**31"],
)
def test_timeout_beyond_sqlite_is_refused(tmp_path: Path, timeout: float) -> None:
    path = tmp_path / "t.db"
    with pytest.raises(InvalidOptionError, match="timeout"):
        SQLiteStore(path, timeout=timeout)
    with pytest.raises(InvalidOptionError, match="timeout"):
        mappingstore.open(f"sqlite:///{path}", timeout=timeout)
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("text", ["1e400", "inf", "99999999"])
def test_timeout_beyond_sqlite_is_refused_in_url(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidOptionError, match="timeout"):
        mappingstore.open(f"sqlite:///{tmp_path}/t.db?timeout={text}")
    assert list(tmp_path.iterdir()) == []


def test_longest_timeout_is_kept_and_round_trips(tmp_path: Path) -> None:
    for timeout, busy in ((2147483.647, 2147483647), (12.3456789, 12345)):
        with SQLiteStore(tmp_path / "t.db", timeout=timeout) as store:
            assert store._conn().execute("PRAGMA busy_timeout").fetchone()[0] == busy
            with mappingstore.open(store.url) as again:
                assert again._timeout == timeout  # type: ignore[attr-defined]
