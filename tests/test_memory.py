"""MemoryStore: the conformance suite, plus what only the memory backend promises."""

from __future__ import annotations

import random
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import mappingstore
from mappingstore import MemoryStore, Store
from mappingstore._codec import ENCRYPTED_HEADER
from mappingstore.errors import PasswordRequiredError
from mappingstore.testing import StoreFactory, StoreTests


class TestMemory(StoreTests):
    """``memory://NAME``: shared by every open of NAME in the process, kept across close."""

    persistent = True
    multiprocess = False
    fake_clock = True
    supports_encryption_without_password = True

    @pytest.fixture
    def factory(self) -> Iterator[StoreFactory]:
        # Named memory stores live as long as the process: give each test its own names
        # and free them afterwards.
        prefix = f"t{uuid.uuid4().hex}-"
        used: set[str] = set()

        def open_(name: str = "a", **options: Any) -> Store:
            used.add(prefix + name)
            return mappingstore.open(f"memory://{prefix}{name}", **options)

        yield open_
        for name in used:
            MemoryStore.drop(name)


def test_private_memory_stores_are_isolated() -> None:
    with mappingstore.open("memory://") as one, mappingstore.open("memory://") as two:
        one["k"] = 1
        assert "k" not in two
        assert one.url == "memory://"
        assert isinstance(one, MemoryStore)
    with MemoryStore() as three:
        assert len(three) == 0


def test_private_store_data_goes_with_close() -> None:
    store = MemoryStore()
    store["k"] = 1
    store.close()
    with MemoryStore() as again:
        assert "k" not in again


def test_named_store_shared_and_kept() -> None:
    name = f"shared-{uuid.uuid4().hex}"
    try:
        with MemoryStore(name) as one:
            one["k"] = [1]
            with mappingstore.open(f"memory://{name}") as two:
                assert two["k"] == [1]
                assert two.url == f"memory://{name}"
        with MemoryStore(name) as again:  # reopening never wipes data
            assert again["k"] == [1]
    finally:
        MemoryStore.drop(name)


def test_drop() -> None:
    name = f"drop-{uuid.uuid4().hex}"
    with MemoryStore(name) as store:
        store["k"] = 1
    assert MemoryStore.drop(name) is True
    assert MemoryStore.drop(name) is False
    with MemoryStore(name) as fresh:
        assert len(fresh) == 0
    MemoryStore.drop(name)


def test_encrypt_without_password_uses_a_process_key() -> None:
    name = f"eph-{uuid.uuid4().hex}"
    try:
        with MemoryStore(name, encrypt=True) as store:
            store["k"] = "secret"
            rec = store._get_record("default", "k")
            assert rec is not None and rec[0].startswith(ENCRYPTED_HEADER)
            assert b"secret" not in rec[0]
            assert store.encrypted
            with pytest.raises(PasswordRequiredError):
                store.change_password("x", security="low")
        with MemoryStore(name, encrypt=True) as again:  # same name, same in-process key
            assert again["k"] == "secret"
    finally:
        MemoryStore.drop(name)


def test_threads_modify_exact_count() -> None:
    n_threads, n_each = 8, 500
    with MemoryStore() as store:
        barrier = threading.Barrier(n_threads)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                barrier.wait()
                for _ in range(n_each):
                    store.modify("n", lambda v: v + 1, default=0)
                    store.modify(f"own-{threading.get_ident()}", lambda v: v + 1, default=0)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store["n"] == n_threads * n_each
        assert len(store) == n_threads + 1
        assert all(v == n_each for k, v in store.items() if k != "n")


def test_threads_mixed_writers_and_iterators() -> None:
    with MemoryStore() as store:
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer(tag: int) -> None:
            try:
                for i in range(300):
                    store[f"{tag}-{i % 20}"] = i
                    store.pop(f"{tag}-{(i + 7) % 20}", None)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        def reader() -> None:
            try:
                while not stop.is_set():
                    for key, value in store.items():
                        assert isinstance(key, str) and isinstance(value, int)
                    len(store)
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)

        readers = [threading.Thread(target=reader) for _ in range(2)]
        writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in readers + writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert errors == []


def test_memory_url_options() -> None:
    with mappingstore.open("memory://?namespace=x&dot_names=true&ttl=60") as store:
        assert store.namespace == "x"
        assert store.dot_names
        assert store.info()["default_ttl"] == 60.0


# -- the stored form: plain values kept bare, records framed when they leave ---------------


def test_records_leaving_the_store_are_checked_records() -> None:
    from mappingstore._codec import PLAIN_HEADER, decode_plain, unwrap_plain

    s = MemoryStore()
    s["plain"] = {"a": [1, 2]}
    s.set("ttl", (1, 2), ttl=60)
    s.set("sealed", "secret", encrypt=True)
    raw = dict(s._iter_items(s.namespace))
    assert set(raw) == {"plain", "ttl", "sealed"}
    for key in ("plain", "ttl"):
        assert raw[key][:2] == PLAIN_HEADER and unwrap_plain(raw[key]) is not None
        assert s._get(s.namespace, key) == raw[key]
        rec = s._get_record(s.namespace, key)
        assert rec is not None and rec[0] == raw[key]
    assert decode_plain(raw["plain"]) == {"a": [1, 2]}
    assert raw["sealed"][:2] == ENCRYPTED_HEADER
    rec = s._get_record(s.namespace, "ttl")
    assert rec is not None and rec[1] is not None
    # Copied raw into another store, every record reads back the same.
    other = MemoryStore()
    for key, data in raw.items():
        other._put(other.namespace, key, data, None)
    assert other["plain"] == {"a": [1, 2]} and other["ttl"] == (1, 2)


def test_a_damaged_record_put_raw_reads_as_damaged_and_changes_nothing_else() -> None:
    s = MemoryStore()
    s["good"] = 1
    good = s._get(s.namespace, "good")
    assert good is not None
    bad = bytearray(good)
    bad[-1] ^= 0x01
    s._put(s.namespace, "bad", bytes(bad), None)
    with pytest.raises(mappingstore.CorruptValueError):
        s["bad"]
    assert s._get(s.namespace, "bad") == bytes(bad)  # kept as it came, never "repaired"
    assert s["good"] == 1


def test_fast_paths_honour_ttl_and_per_item_encryption() -> None:
    now = [1000.0]
    s = MemoryStore(clock=lambda: now[0])
    s.set("t", {"v": 1}, ttl=10)
    s.set("e", [1, 2], encrypt=True)
    s["p"] = "x"
    assert (s["t"], s["e"], s["p"]) == ({"v": 1}, [1, 2], "x")
    now[0] += 11
    with pytest.raises(KeyError):
        s["t"]
    assert sorted(s) == ["e", "p"] and len(s) == 2
    s["t"] = 5  # an overwrite without TTL clears the expiry
    now[0] += 100
    assert s["t"] == 5


def test_clear_empties_every_instance_of_a_named_store() -> None:
    name = f"clear-{uuid.uuid4().hex}"
    a, b = MemoryStore(name), MemoryStore(name)
    try:
        a["k"] = 1
        assert b["k"] == 1
        b.clear()
        assert "k" not in a and len(a) == 0
        with pytest.raises(KeyError):
            a["k"]
        a["k"] = 2  # the instance's own bucket is still the shared one
        assert b["k"] == 2
        del b["k"]
        assert a.namespaces() == [] and b.namespaces() == []
        a["j"] = 3
        assert b["j"] == 3
    finally:
        MemoryStore.drop(name)


def test_the_packer_pool_holds_one_per_concurrent_pack() -> None:
    from mappingstore import _codec

    def work() -> None:
        for j in range(500):
            _codec.pack({"j": j})

    before = len(_codec._PACKERS)
    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= len(_codec._PACKERS) <= before + 6  # reused, not one per call
    assert len({id(p) for p in _codec._PACKERS}) == len(_codec._PACKERS)


def test_bulk_reads_decode_every_kind_of_entry() -> None:
    now = [50.0]
    s = MemoryStore(clock=lambda: now[0])
    s["plain"] = {"a": 1}
    s.set("ttl", [1], ttl=5)
    s.set("gone", 2, ttl=1)
    s.set("sealed", (3,), encrypt=True)
    now[0] += 2
    expected = {"plain": {"a": 1}, "ttl": [1], "sealed": (3,)}
    assert dict(s.items()) == expected
    assert sorted(map(repr, s.values())) == sorted(map(repr, expected.values()))
    assert s.get_many(["plain", "ttl", "gone", "sealed", "missing"]) == expected
    with pytest.raises(mappingstore.InvalidKeyError):
        s.get_many(["plain", ""])
    with s.batch():  # inside a batch the batch's own writes are seen
        s["plain"] = "new"
        del s["ttl"]
        assert s.get_many(["plain", "ttl"]) == {"plain": "new"}
        assert dict(s.items()) == {"plain": "new", "sealed": (3,)}
    s.close()
    with pytest.raises(mappingstore.StoreClosedError):
        s.get_many(["plain"])


# -- the sorted key index behind dot names' branch check ------------------------------------


def test_a_leaf_write_under_dot_names_scans_no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every leaf written asks whether its name is a branch; on a memory store that was a
    # scan of every key (20,000 keys: 2.5 ms a set, an update of 2,000 leaves 4.7 s).
    store = MemoryStore(dot_names=True)
    store.update({f"a{i}.b.c": i for i in range(2000)})
    scans: list[str] = []
    original = MemoryStore._iter_keys

    def counting(self: MemoryStore, ns: str, prefix: str = "") -> Iterator[str]:
        scans.append(prefix)
        return original(self, ns, prefix)

    monkeypatch.setattr(MemoryStore, "_iter_keys", counting)
    for i in range(50):
        store[f"z{i}.q"] = i
    store.update({f"y{i}.q": i for i in range(50)})
    assert scans == []
    assert store["z3"] == {"q": 3} and store.to_dict()["a7"] == {"b": {"c": 7}}


def test_the_branch_check_agrees_with_a_scan_under_random_writes() -> None:
    rng = random.Random(7)
    now = [1000.0]
    name = f"idx-{uuid.uuid4().hex}"
    try:
        plain = MemoryStore(name, clock=lambda: now[0])  # the fast path writes here
        other = MemoryStore(name, clock=lambda: now[0])
        names = [f"{a}.{b}" for a in "pqrs" for b in "xyz"] + list("pqrs") + ["p.x.deep"]
        for step in range(3000):
            key = rng.choice(names)
            roll = rng.random()
            if roll < 0.35:
                plain[key] = step
            elif roll < 0.5:
                other.set(key, step, ttl=rng.choice([0.5, 5.0]))
            elif roll < 0.75:
                plain.pop(key, None)
            elif roll < 0.78:
                other.clear()
            elif roll < 0.8:
                now[0] += 1.0
            elif roll < 0.82:
                with other.batch():
                    other[key] = step
                    other.pop(rng.choice(names), None)
            for prefix in ("p.", "q.", "p.x.", "s.", "", "pq"):
                scanned = Store._has_prefix(other, other._ns, prefix)  # the generic scan
                assert other._has_prefix(other._ns, prefix) is scanned, (step, prefix)
    finally:
        MemoryStore.drop(name)
