"""Defects found by the seventh review, in the core layers (the Store base, dot names, time
series, the conformance suite itself):

* ``modify()`` keeps an item's own encryption (``set(..., encrypt=...)``);
* ``setdefault(name, {})`` under dot names returns a live view of the new branch;
* dot-name ``get_many``, ``delete_many`` and ``View.values()`` read each name once, so a
  name that expires or goes between a check and a read never raises;
* a listing torn by a concurrent branch replacement (Redis, Sharded) is not reported as
  keys stored without dot names; a real conflict still is;
* ``change_password(new)`` keeps the recorded KDF level;
* a record sealed with a named memory store's in-process key reads as
  ``PasswordRequiredError`` from another instance, not as damage;
* the conformance suite passes a backend that keeps the contract's default
  ``_purge_expired``;
* ``Series.pop``/``popitem``/``setdefault`` are atomic, ``Series.values()`` is one pass,
  ``popitem()`` of an empty series raises ``MissingKeyError``, ``AsyncSeries.extend`` of a
  non-iterable raises ``OptionTypeError``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
import mappingstore.aio
from mappingstore import MemoryStore, Store
from mappingstore._codec import ENCRYPTED_HEADER, PLAIN_HEADER
from mappingstore.errors import (
    MissingKeyError,
    NameConflictError,
    OptionTypeError,
    PasswordRequiredError,
)
from mappingstore.testing import TTLTests


class TickingClock:
    """Every read moves time on by one second: a check and a later read of the same name
    fall on either side of an expiry, deterministically."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


# -- modify keeps the item's encryption ---------------------------------------------------


def _raw_header(path: Path, key: str) -> bytes:
    con = sqlite3.connect(path)
    try:
        rows = [
            bytes(v) for k, v in con.execute("SELECT key, value FROM mappingstore_kv") if k == key
        ]
    finally:
        con.close()
    assert len(rows) == 1
    return rows[0][:2]


@pytest.mark.parametrize("default_encrypt", [False, True])
def test_modify_keeps_the_items_encryption(tmp_path: Path, default_encrypt: bool) -> None:
    path = tmp_path / "m.db"
    with mappingstore.open(
        f"sqlite:///{path}", password="pw", security="low", encrypt=default_encrypt
    ) as store:
        store.set("odd", "secret", encrypt=not default_encrypt)
        store.set("usual", "x")
        assert store.modify("odd", lambda s: s + "!") == "secret!"
        assert store.modify("usual", lambda s: s + "!") == "x!"
        assert store.modify("new", lambda s: s, default=1) == 1
        assert store["odd"] == "secret!"
    odd, usual, new = (_raw_header(path, k) for k in ("odd", "usual", "new"))
    want_odd = PLAIN_HEADER if default_encrypt else ENCRYPTED_HEADER
    want_default = ENCRYPTED_HEADER if default_encrypt else PLAIN_HEADER
    assert (odd, usual, new) == (want_odd, want_default, want_default)


def test_modify_keeps_encryption_on_memory_store() -> None:
    store = MemoryStore(password="pw", security="low", encrypt=False)
    store.set("k", 1, encrypt=True)
    store.modify("k", lambda v: v + 1)
    reader = store._get(store._ns, "k")
    assert reader is not None and reader[:2] == ENCRYPTED_HEADER
    assert store["k"] == 2


# -- dot names -----------------------------------------------------------------------------


def test_setdefault_of_an_empty_mapping_returns_a_live_view() -> None:
    store = mappingstore.open("memory://", dot_names=True)
    section = store.setdefault("section", {})
    section["key"] = "value"
    assert store.to_dict() == {"section": {"key": "value"}}
    sub = store["section"].setdefault("sub", {})
    sub["k"] = 1
    assert store.to_dict() == {"section": {"key": "value", "sub": {"k": 1}}}
    # present: the existing branch, not the default
    assert store.setdefault("section", {"other": 2})["key"] == "value"
    assert "other" not in store["section"]
    # a plain default is returned as is
    assert store.setdefault("leaf", 5) == 5


def _ticking(**options: Any) -> Store:
    return mappingstore.open("memory://", dot_names=True, clock=TickingClock(), **options)


def test_dot_names_get_many_reads_each_name_once() -> None:
    store = _ticking()
    # Expires 1.5 s after the set: the next clock read still sees it, the one after not.
    store.set("k", 1, ttl=1.5)
    assert store.get_many(["k", "gone"]) in ({"k": 1}, {})
    store.set("k", 1, ttl=1.5)
    store.set("b.x", 2)
    found = store.get_many(["b", "k"])
    assert set(found) <= {"b", "k"} and found["b"].to_dict() == {"x": 2}


def test_dot_names_delete_many_deletes_each_name_once() -> None:
    store = _ticking()
    store.set("k", 1, ttl=1.5)
    assert store.delete_many(["k"]) in (0, 1)  # never MissingKeyError
    store.update({"a": {"b": 1, "c": 2}, "x": 3})
    assert store.delete_many(["a", "a.b", "x", "missing", "x"]) == 2
    assert store.to_dict() == {}


def test_dot_names_delete_many_is_all_or_nothing() -> None:
    store = mappingstore.open("memory://", dot_names=True)
    store.update({"a": {"b": 1}, "x": 3})
    with pytest.raises(mappingstore.errors.KeyTypeError):
        store.delete_many(["x", 5])  # type: ignore[list-item]
    assert store.to_dict() == {"a": {"b": 1}, "x": 3}


def test_dot_names_delete_many_never_raises_batch_conflicts() -> None:
    store = mappingstore.open("memory://", dot_names=True)
    store.update({f"k{i}": i for i in range(50)})
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            store[f"k{i % 50}"] = i
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        for _ in range(300):
            try:
                store.delete_many([f"k{i}" for i in range(0, 50, 7)])
            except Exception as exc:  # pragma: no cover - the defect
                errors.append(exc)
    finally:
        stop.set()
        t.join()
    assert errors == []


class _Phantom(MemoryStore):
    """A memory store whose listings show a leaf ``b.ghost`` that is no longer stored (a
    name deleted between a listing and a read)."""

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        keys = list(super()._iter_keys(ns, prefix))
        return iter([*keys, "b.ghost"] if "b.ghost".startswith(prefix) else keys)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        items = list(super()._iter_items(ns, prefix))
        if "b.ghost".startswith(prefix) and items:
            return iter([*items, ("b.ghost", items[0][1])])
        return iter(items)


def test_view_values_is_one_scan() -> None:
    store = _Phantom(dot_names=True)
    store["b.j"] = 2
    assert list(store.view("b").values()) == [2, 2]  # the listing's records, no reread
    view = store.view("b")
    assert 2 in view.values() and 7 not in view.values()


class _TornListing(MemoryStore):
    """A memory store whose listings also show a leaf ``a.k`` that is not stored any more
    (what a listing of Redis sees when branch ``a`` is replaced while it is read)."""

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        keys = list(super()._iter_keys(ns, prefix))
        return iter(["a.k", *keys] if "a.k".startswith(prefix) else keys)

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        items = list(super()._iter_items(ns, prefix))
        if "a.k".startswith(prefix) and items:
            return iter([("a.k", items[0][1]), *items])
        return iter(items)


def test_a_torn_listing_is_not_a_name_conflict() -> None:
    store = _TornListing(dot_names=True)
    store["a"] = {"k": {"y": 1}}
    assert store.to_dict()["a"]["k"] in ({"y": 1}, 1)
    assert list(store.view("a")) == ["k"]
    assert len(store["a"]) == 1
    assert dict(store.view("a").items()).keys() == {"k"}


def test_a_real_name_conflict_still_raises() -> None:
    plain = mappingstore.open(f"memory://{uuid.uuid4().hex}")
    plain["a.k"] = 1
    plain["a.k.y"] = 2  # written without dot names: a leaf and a branch
    dots = mappingstore.open(plain.url, dot_names=True)
    with pytest.raises(NameConflictError):
        dots.to_dict()
    with pytest.raises(NameConflictError):
        list(dots.view("a"))
    with pytest.raises(NameConflictError):
        list(dots.view("a").items())
    MemoryStore.drop(plain.url.removeprefix("memory://"))


# -- encryption ----------------------------------------------------------------------------


def test_change_password_keeps_the_recorded_level(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/p.db"
    with mappingstore.open(url, password="old", security="low") as store:
        store["k"] = 1
    # security= is ignored by later opens, and so by change_password without one
    with mappingstore.open(url, password="old", security="medium") as store:
        assert store.info()["encryption"]["security"] == "low"
        store.change_password("new")
        assert store.info()["encryption"]["security"] == "low"
    with mappingstore.open(url, password="new") as store:
        assert store["k"] == 1


def test_in_process_key_record_reads_as_password_required() -> None:
    name = "eph" + uuid.uuid4().hex
    try:
        writer = mappingstore.open(f"memory://{name}", encrypt=True)
        writer["token"] = "abc"
        for options in ({}, {"encrypt": False}):
            reader = mappingstore.open(f"memory://{name}", **options)
            with pytest.raises(PasswordRequiredError):
                reader["token"]
        assert mappingstore.open(f"memory://{name}", encrypt=True)["token"] == "abc"
        # a damaged record (not sealed with that key) is still damage
        store = mappingstore.open(f"memory://{name}")
        store._put(store._ns, "junk", ENCRYPTED_HEADER + os.urandom(60), None)
        with pytest.raises(mappingstore.errors.CorruptValueError):
            store["junk"]
    finally:
        MemoryStore.drop(name)


# -- the conformance suite and the contract's defaults --------------------------------------


class _Minimal(Store):
    """A backend with only the required methods: ``_purge_expired`` keeps the default."""

    durability = "none"
    shared_across_processes = False
    _DATA: dict[str, dict[str, dict[str, tuple[bytes, float | None]]]] = {}
    _LOCK = threading.Lock()

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(**options)
        with self._LOCK:
            self._data = self._DATA.setdefault(path, {})
        self._start()

    def _live(self, rec: tuple[bytes, float | None] | None) -> tuple[bytes, float | None] | None:
        if rec is not None and rec[1] is not None and rec[1] <= self._clock():
            return None
        return rec

    def _get_record(self, ns: str, key: str) -> tuple[bytes, float | None] | None:
        with self._LOCK:
            return self._live(self._data.get(ns, {}).get(key))

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        with self._LOCK:
            self._data.setdefault(ns, {})[key] = (bytes(data), expires)

    def _delete(self, ns: str, key: str) -> bool:
        with self._LOCK:
            return self._live(self._data.get(ns, {}).pop(key, None)) is not None

    def _iter_keys(self, ns: str, prefix: str) -> Iterator[str]:
        with self._LOCK:
            items = list(self._data.get(ns, {}).items())
        return iter(sorted(k for k, r in items if k.startswith(prefix) and self._live(r)))

    def _namespaces(self) -> list[str]:
        with self._LOCK:
            return [ns for ns, d in self._data.items() if d]

    def _close(self) -> None:
        pass


class TestMinimalBackendTTL(TTLTests):
    persistent = True
    multiprocess = False
    fake_clock = True

    @pytest.fixture
    def factory(self, tmp_path: Path) -> Any:
        def open_(name: str = "a", **options: Any) -> Store:
            return _Minimal(str(tmp_path / name), **options)

        return open_


# -- time series ---------------------------------------------------------------------------


def test_series_pop_popitem_setdefault_are_atomic() -> None:
    store = mappingstore.open("memory://")
    ts = store.series("s")
    ts.extend((t, t) for t in range(300))
    popped: list[int] = []
    raised: list[BaseException] = []
    won: list[int] = []
    lock = threading.Lock()

    def worker(me: int) -> None:
        try:
            for t in range(300):
                if ts.pop(t, None) is not None:
                    with lock:
                        popped.append(t)
            for t in range(1000, 1300):
                if ts.setdefault(t, me) == me:
                    with lock:
                        won.append(t)
        except BaseException as exc:  # pragma: no cover - the defect
            raised.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert raised == []
    assert sorted(popped) == list(range(300))
    assert sorted(won) == list(range(1000, 1300))


def test_series_popitem_values_and_errors() -> None:
    store = mappingstore.open("memory://")
    ts = store.series("s")
    with pytest.raises(MissingKeyError):
        ts.popitem()
    with pytest.raises(MissingKeyError):
        ts.pop(5)
    assert ts.pop(5, "d") == "d"
    with pytest.raises(TypeError):
        ts.pop(5, 1, 2)  # type: ignore[call-arg]
    ts.extend([(3, "c"), (1, "a"), (2, "b")])
    assert list(ts.values()) == ["a", "b", "c"]
    assert "b" in ts.values() and "z" not in ts.values()
    assert ts.popitem() == (1, "a")
    assert ts.setdefault(2, "x") == "b"
    assert ts.setdefault(9, "x") == "x" and ts[9] == "x"


def test_async_series_extend_of_a_non_iterable() -> None:
    async def main() -> None:
        async with await mappingstore.aio.open("memory://") as store:
            with pytest.raises(OptionTypeError):
                await store.series("s").extend(5)  # type: ignore[arg-type]

    asyncio.run(main())


# -- event logs: inserts before a prune's snapshot ------------------------------------------


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp}/e.db"])
def test_an_event_before_a_prunes_snapshot_is_refused(tmp_path: Path, url: str) -> None:
    import operator

    from mappingstore.errors import EventConflictError

    with mappingstore.open(url.format(tmp=tmp_path)) as store:
        log = store.events("acct")
        log.apply({"balance": 100}, 1000)
        log.apply({"balance": (operator.add, 50)}, 2000)
        log.apply({"balance": (operator.add, 1)}, 3000)
        assert log.prune(2500) == 1
        before = (log.current(), log.events())
        for ts in (500, 1999):  # the snapshot is at 2000: its history is compacted
            with pytest.raises(EventConflictError):
                log.apply({"owner": "ann"}, ts)
        with pytest.raises(EventConflictError):
            log.apply({"owner": "ann"}, 2000)  # the snapshot's own timestamp
        assert (log.current(), log.events()) == before
        # after the snapshot, inserts in the past still replay in order
        assert log.apply({"owner": "ann"}, 2500) == {"balance": 151, "owner": "ann"}
        assert log.past(2600) == {"balance": 150, "owner": "ann"}
        # an unpruned log takes events before its first one
        other = store.events("other")
        other.apply({"a": 1}, 1000)
        assert other.apply({"b": 2}, 10) == {"a": 1, "b": 2}
        # a snapshot in the middle of the log (a prune before an older snapshot's time
        # leaves the later one where it is): events before it are refused too
        mid = store.events("mid")
        for i in range(10):
            mid.apply({"n": i}, 100 * (i + 1))
        mid.prune(500)  # snapshot at 500
        # an event before it, as logs of earlier releases (and copies of them) hold
        mid._apply({"old": 1}, 200, before_snapshots=True)
        assert mid.events()[0].timestamp == 200 and mid.events()[1].op == "snapshot"
        for ts in (100, 300):
            with pytest.raises(EventConflictError):
                mid.apply({"early": 1}, ts)
        assert mid.apply({"late": 1}, 650)["late"] == 1
        # many chunks: the snapshot is the first chunk's first event
        big = store.events("big")
        for i in range(100):
            big.apply({"n": i}, 10_000 + 2 * i)
        big.prune(10_100)  # the snapshot at 10_100
        with pytest.raises(EventConflictError):
            big.apply({"x": 1}, 10_051)
        assert big.apply({"x": 1}, 10_101)["x"] == 1


def test_a_series_chunk_that_disagrees_with_its_head_is_damage() -> None:
    from mappingstore._keys import internal_ns, tagged_key
    from mappingstore.errors import CorruptValueError

    store = mappingstore.open("memory://")
    ts = store.series("s")
    ts.extend((t, t) for t in range(3000))  # three chunks
    ns, key = internal_ns("ts", store._ns), tagged_key("H", "s")
    head = store._decode(ns, key, store._get(ns, key))  # type: ignore[arg-type]
    head["c"][1][2] += 5  # a hand edit of a count (len() now says 3005)
    store._put(ns, key, store._encode(ns, key, head), None)
    assert len(ts) == 3005
    with pytest.raises(CorruptValueError):
        list(ts)
    with pytest.raises(CorruptValueError):
        ts.range(0, 2999)
    with pytest.raises(CorruptValueError):
        ts.extend([(1500, "x")])  # a write into that chunk reads it first


def test_an_event_log_head_damaged_by_another_writer_is_still_checked() -> None:
    """The check an EventLog skips for the head it encoded itself still runs for any
    other bytes (another writer's, damage), also right after its own apply."""
    from mappingstore._keys import internal_ns, tagged_key
    from mappingstore.errors import CorruptValueError

    store = mappingstore.open("memory://")
    log = store.events("acct")
    log.apply({"n": 1}, 1000)
    ns, key = internal_ns("ev", store._ns), tagged_key("H", "acct")
    head = store._decode(ns, key, store._get(ns, key))  # type: ignore[arg-type]
    head["p"] = [[1000, 5, "setitem", 1]]  # an item that is not text
    store._put(ns, key, store._encode(ns, key, head), None)
    with pytest.raises(CorruptValueError):
        log.apply({"n": 2}, 2000)
    with pytest.raises(CorruptValueError):
        log.current()
