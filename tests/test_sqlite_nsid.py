"""SQLite file layout: namespaces named by integer ids in a side table.

Rows are keyed by ``(ns_id, key)``; ``mappingstore_ns`` maps each namespace to its id. The
store caches ids, so these tests check that a cached id is always one that is committed
(a rolled-back registration must not leave a stale id behind), that reads never register
a namespace, and the read paths added with the layout (the one-column point read, the
counting shortcut for a file with one namespace, the paged ``items()``).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from mappingstore import SQLiteStore
from mappingstore._sqlite import _COUNT, NS_TABLE, TABLE
from mappingstore.errors import CorruptValueError, IntegrityError, StoreCorruptError


def _ids(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute(f"SELECT name, id FROM {NS_TABLE}").fetchall())
    finally:
        conn.close()


def _rows(path: Path) -> list[tuple[int, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT ns_id, key FROM {TABLE} ORDER BY ns_id, key").fetchall()
    finally:
        conn.close()


def _write_then_roll_back(store: SQLiteStore, key: str, ns: str | None = None) -> None:
    """Write *key* in one transaction that then fails (so it rolls back)."""

    def run() -> None:
        with store._exclusive():
            if ns is None:
                store[key] = 1
                assert store[key] == 1
            else:
                store._put(ns, key, b"junk", None)
            raise RuntimeError

    with pytest.raises(RuntimeError):
        run()


def test_rows_carry_the_namespace_id(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as a, SQLiteStore(path, namespace="b") as b:
        a["x"] = 1
        b["y"] = 2
        b["x"] = 3
    assert _ids(path) == {"default": 1, "b": 2}
    assert _rows(path) == [(1, "x"), (2, "x"), (2, "y")]


def test_reads_never_register_a_namespace(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        store["k"] = 1
    with SQLiteStore(path, namespace="ghost") as ghost:
        assert len(ghost) == 0
        assert list(ghost) == [] and list(ghost.items()) == []
        assert "k" not in ghost and ghost.get("k") is None
        with pytest.raises(KeyError):
            ghost["k"]
        with pytest.raises(KeyError):
            del ghost["k"]
        assert ghost.purge_expired() == 0
        ghost.clear()
        assert ghost.namespaces() == ["default"]
    with SQLiteStore(path, namespace="ghost", readonly=True) as ro:
        assert len(ro) == 0 and ro.get("k") is None
    assert _ids(path) == {"default": 1}


def test_deleting_from_an_unwritten_namespace_registers_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store, SQLiteStore(path, namespace="ghost") as ghost:
        store["k"] = 1
        ghost.delete_many(["k", "x"])
        with ghost.batch():
            ghost.pop("k", None)
        assert _ids(path) == {"default": 1}
        with store.batch():  # deletes and writes of several namespaces in one batch
            store["a"] = 1
            ghost["g"] = 2
            del store["k"]
        assert _ids(path) == {"default": 1, "ghost": 2}
        assert dict(store) == {"a": 1} and dict(ghost) == {"g": 2}
        with SQLiteStore(path, namespace="third") as third, store.batch():
            store["b"] = 2  # writes only, to three namespaces (one new) in one batch
            ghost["h"] = 3
            third["t"] = 4
        assert _ids(path) == {"default": 1, "ghost": 2, "third": 3}
        assert dict(store) == {"a": 1, "b": 2} and dict(ghost) == {"g": 2, "h": 3}
        assert _rows(path) == [(1, "a"), (1, "b"), (2, "g"), (2, "h"), (3, "t")]


def test_a_rolled_back_registration_leaves_no_cached_id(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path, namespace="a") as a, SQLiteStore(path, namespace="b") as b:
        _write_then_roll_back(a, "x")  # registers "a" inside a transaction that rolls back
        assert "a" not in a._ids and a._nid is None
        assert _ids(path) == {}
        b["y"] = 2  # takes the id "a" had inside the rolled-back transaction
        a["z"] = 3
        assert _ids(path) == {"b": 1, "a": 2}
        assert dict(a) == {"z": 3} and dict(b) == {"y": 2}
        assert len(a) == 1 and len(b) == 1


def test_a_committed_registration_is_cached_at_commit(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s.db", namespace="a") as a:
        with a.batch():
            a["x"] = 1
        assert a._ids == {"a": 1} and a._nid == 1
        a.modify("n", lambda v: v + 1, default=0)
        assert a["n"] == 1


def test_processes_registering_namespaces_at_once_get_distinct_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SQLiteStore(path).close()
    code = textwrap.dedent(
        """
        import sys
        from mappingstore import SQLiteStore
        path, tag = sys.argv[1], sys.argv[2]
        for i in range(20):
            with SQLiteStore(path, namespace=f"n{i}") as s:
                s[tag] = i
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), tag]) for tag in ("p", "q")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    ids = _ids(path)
    assert sorted(ids) == sorted(f"n{i}" for i in range(20))
    assert len(set(ids.values())) == 20
    for i in range(20):
        with SQLiteStore(path, namespace=f"n{i}") as s:
            assert dict(s) == {"p": i, "q": i}


def test_count_when_the_file_has_one_namespace_or_more(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "s.db"
    with SQLiteStore(path, clock=lambda: now[0]) as store:
        store.update({f"k{i}": i for i in range(50)})
        store.set("t", 1, ttl=5)
        conn = store._conn()
        assert conn.execute(f"SELECT count(*) FROM {NS_TABLE}").fetchone()[0] == 1
        assert len(store) == 51
        now[0] += 10
        assert len(store) == 50
        # A second namespace, registered but empty, then holding rows: the other plans.
        with SQLiteStore(path, namespace="other", clock=lambda: now[0]) as other:
            _write_then_roll_back(other, "x")
            other["x"] = 1
            del other["x"]
            assert conn.execute(f"SELECT count(*) FROM {NS_TABLE}").fetchone()[0] == 2
            assert len(store) == 50 and len(other) == 0
            other.update({f"o{i}": i for i in range(30)})
            assert len(store) == 50 and len(other) == 30
        nid = store._nid
        assert conn.execute(_COUNT, (nid, now[0])).fetchone()[0] == 50


def test_point_read_of_a_record_with_an_expiry(tmp_path: Path) -> None:
    now = [1000.0]
    with SQLiteStore(tmp_path / "s.db", clock=lambda: now[0]) as store:
        store["plain"] = "p"
        store.set("t", {"v": 1}, ttl=10)
        assert store._nid is not None  # the inlined read is in use
        assert store["plain"] == "p" and store["t"] == {"v": 1}
        assert store.get("t") == {"v": 1}
        now[0] += 10
        with pytest.raises(KeyError):
            store["t"]
        assert store.get("t", "gone") == "gone"
        store["t"] = 2  # overwritten without a TTL: the one-column read again
        assert store["t"] == 2 and store.ttl("t") is None


def test_encrypted_values_through_the_inlined_read(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path, password="pw", security="low") as store:
        store["a"] = {"x": 1}
        store.set("b", [1, 2], encrypt=False)
        assert store["a"] == {"x": 1} and store["b"] == [1, 2]
        assert dict(store.items()) == {"a": {"x": 1}, "b": [1, 2]}


def test_items_stream_large_values_in_small_pages(tmp_path: Path) -> None:
    big = {f"k{i:03d}": bytes([i]) * 300_000 for i in range(12)}
    small = {f"s{i:03d}": i for i in range(1500)}
    with SQLiteStore(tmp_path / "s.db") as store:
        store.update(big)
        store.update(small)
        assert dict(store.items()) == {**big, **small}
        everything = {**big, **small}
        assert list(store.values()) == [everything[k] for k in sorted(everything)]
        # Stopping early hands the reader back to the pool once the iterator is dropped.
        it = iter(store.items())
        assert next(it) == ("k000", big["k000"])
        del it
        assert len(store._readers) >= 1
        with store.batch():  # inside a batch: the general path
            store["s000"] = "changed"
            assert dict(store.items())["s000"] == "changed"


def test_items_raise_at_the_damaged_record_after_the_sound_ones(tmp_path: Path) -> None:
    # Pages of plain records are decoded at once; one damaged record makes its page decode
    # one by one, so iteration hands out every record before it and then raises.
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        store.update({f"k{i:04d}": {"n": i} for i in range(3000)})
    conn = sqlite3.connect(path)
    (blob,) = conn.execute(f"SELECT value FROM {TABLE} WHERE key = 'k1500'").fetchone()
    damaged = blob[:-1] + bytes([blob[-1] ^ 1])
    conn.execute(f"UPDATE {TABLE} SET value = ? WHERE key = 'k1500'", (damaged,))
    conn.commit()
    conn.close()
    with SQLiteStore(path) as store:
        seen: list[str] = []

        def read_all() -> None:
            for key, value in store.items():
                assert value == {"n": int(key[1:])}
                seen.append(key)

        with pytest.raises(CorruptValueError):
            read_all()
        assert seen == [f"k{i:04d}" for i in range(1500)]
        assert len(list(store.keys())) == 3000


def test_a_file_of_the_older_text_namespace_layout_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute(
        f"CREATE TABLE {TABLE} (ns TEXT NOT NULL, key TEXT NOT NULL, expires REAL, "
        "value BLOB NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID"
    )
    conn.commit()
    conn.close()
    with pytest.raises(StoreCorruptError, match="columns"):
        SQLiteStore(path)


def test_memory_store_uses_ids_too() -> None:
    with SQLiteStore(":memory:") as a:
        a["x"] = 1
        _write_then_roll_back(a, "y", "\x00other")
        assert "\x00other" not in a._ids
        assert dict(a) == {"x": 1} and len(a) == 1
        assert a.namespaces() == ["default"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_reads_through_its_own_connection(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "s.db") as store:
        store["k"] = {"v": 1}
        assert store["k"] == {"v": 1} and len(store) == 1

        def armed() -> int | None:
            return store._fastnid

        assert armed() == 1  # the inlined reads are armed
        inherited = store._local.holder.conn
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                if armed() is None:  # disarmed by the fork
                    code = 2
                    if store["k"] == {"v": 1} and len(store) == 1:
                        code = 3
                        if store._local.holder.conn is not inherited and armed() == 1:
                            store["k2"] = 2
                            code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store["k2"] == 2 and len(store) == 2


def _open_at_once(path: str, barrier: Any, out: Any) -> None:
    try:
        barrier.wait(30)
        with SQLiteStore(path, timeout=10) as store:
            store[f"k{os.getpid()}"] = 1
        out.put("ok")
    except BaseException as exc:
        out.put(repr(exc))


def test_processes_creating_one_new_file_at_once(tmp_path: Path) -> None:
    """Switching a new file to WAL needs it to itself, and SQLite reports "database is
    locked" there at once, without waiting: the open retries until its timeout."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(10):
        path = str(tmp_path / f"new{round_}.db")
        barrier, out = ctx.Barrier(3), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier, out)) for _ in range(3)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == ["ok"] * 3, (round_, results)
        with SQLiteStore(path) as store:
            assert len(store) == 3
            assert store._thread_conn().conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_get_many_decodes_plain_pages_at_once_with_the_same_errors(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        store.update({f"k{i}": [i, str(i)] for i in range(50)})
        keys = [f"k{i}" for i in range(50)]
        assert store.get_many(keys) == {k: [int(k[1:]), k[1:]] for k in keys}
        assert store.get_many(["k1", "nope", "k2"]) == {"k1": [1, "1"], "k2": [2, "2"]}
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {TABLE} SET value = CAST(value || x'00' AS BLOB) WHERE key = 'k7'")
    conn.commit()
    conn.close()
    with SQLiteStore(path) as store, pytest.raises(CorruptValueError):
        store.get_many(keys)


def test_text_that_is_not_utf8_where_a_record_or_a_name_belongs(tmp_path: Path) -> None:
    # Only another program writes text into these columns. A value is read as a BLOB and
    # is not a record (CorruptValueError); for a name sqlite3 cannot build the str
    # (StoreCorruptError). Neither message repeats the stored bytes.
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        store.update({"a": 1, "b": 2, "ok": 3})
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {TABLE} SET value = CAST(x'ff00' AS TEXT) WHERE key = 'a'")
    conn.commit()
    conn.close()
    with SQLiteStore(path) as store:
        reads: list[Any] = [
            lambda: store["a"],
            lambda: store.get("a"),
            lambda: store.get_many(["a", "ok"]),
            lambda: list(store.items()),
            lambda: list(store.values()),
        ]
        for read in reads:
            with pytest.raises(CorruptValueError) as info:
                read()
            assert "\ufffd" not in str(info.value)
        assert store["ok"] == 3
        assert sorted(store) == ["a", "b", "ok"]
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {TABLE} SET key = CAST(x'ff' AS TEXT) WHERE key = 'b'")
    conn.commit()
    conn.close()
    with SQLiteStore(path) as store, pytest.raises(StoreCorruptError, match="UTF-8"):
        list(store)


@pytest.mark.parametrize("encrypted", [False, True])
def test_keys_of_another_sqlite_type_are_not_keys(tmp_path: Path, encrypted: bool) -> None:
    # Another program may store a key as a BLOB (SQLite does not enforce the TEXT type; a
    # number becomes text by the column's affinity). A str never equals a BLOB, so reads
    # already miss it; listings skip it too (a BLOB key once came back from iteration as
    # bytes, and an encrypted store's items() then failed with AttributeError). len()
    # counts every row of the namespace.
    path = tmp_path / "s.db"
    options: dict[str, Any] = {"key": bytes(32)} if encrypted else {}
    with SQLiteStore(path, **options) as store:
        store.update({"a": 1, "b": 2, "c": 3, "d": 4})
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE {TABLE} SET key = CAST(key AS BLOB) WHERE key = 'a'")
    conn.execute(f"UPDATE {TABLE} SET key = x'ffff' WHERE key = 'd'")
    conn.execute(f"UPDATE {TABLE} SET key = 7 WHERE key = 'c'")
    conn.commit()
    conn.close()
    with SQLiteStore(path, **options) as store:
        assert list(store) == ["7", "b"]
        if encrypted:  # the value was sealed for the key "c"
            with pytest.raises(IntegrityError):
                store["7"]
        else:
            assert store["7"] == 3
        del store["7"]
        assert list(store.items()) == [("b", 2)] and list(store.values()) == [2]
        assert list(store.names("")) == ["b"] and store.to_dict() == {"b": 2}
        assert "a" not in store and store.get("a") is None
        assert store.get_many(["a", "b"]) == {"b": 2}
        assert len(store) == 3
        assert store.popitem() == ("b", 2)
        with pytest.raises(KeyError):
            store.popitem()


def test_values_and_expiries_of_the_wrong_sqlite_type(tmp_path: Path) -> None:
    # SQLite does not enforce column types: another program may store an integer, a float
    # or text as a value, or text as an expiry. Values read as CorruptValueError (never a
    # TypeError from our code); an expiry that is not a number reads as expired, the same
    # way for every read.
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        store.update({"int": 1, "float": 2, "text": 3, "ok": 4})
        store.set("soon", 5, ttl=100)
        store.set("blob", 6, ttl=100)
        store.set("later", 7, ttl=100)
    conn = sqlite3.connect(path)
    for key, sql in (("int", "5"), ("float", "2.5"), ("text", "'text'")):
        conn.execute(f"UPDATE {TABLE} SET value = {sql} WHERE key = ?", (key,))
    conn.execute(f"UPDATE {TABLE} SET expires = 'later' WHERE key = 'soon'")
    conn.execute(f"UPDATE {TABLE} SET expires = x'00' WHERE key = 'blob'")
    conn.execute(f"UPDATE {TABLE} SET expires = '9e99' WHERE key = 'later'")  # a number
    conn.commit()
    conn.close()
    with SQLiteStore(path) as store:
        for key in ("int", "float", "text"):
            with pytest.raises(CorruptValueError):
                store[key]
            with pytest.raises(CorruptValueError):
                store.get_many([key, "ok"])
            assert key in store
        with pytest.raises(CorruptValueError):
            dict(store.items())
        assert "soon" not in store
        assert store.get("soon") is None
        assert store.get_many(["soon", "ok"]) == {"ok": 4}
        assert "blob" not in store and store.get("blob") is None
        assert store["later"] == 7
        assert sorted(store) == ["float", "int", "later", "ok", "text"]
        # len() and purge_expired() see the same expiries as the reads.
        assert len(store) == 5
        assert store.purge_expired() == 2
        assert len(store) == 5
        del store["int"], store["float"], store["text"]
        assert dict(store.items()) == {"later": 7, "ok": 4}
