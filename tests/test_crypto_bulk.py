"""Bulk sealing and opening (Cipher.seal_records / open_records) and the single-record
helpers: the same bytes and the same checks as one Cipher.seal / Cipher.open per value."""

from __future__ import annotations

import sqlite3
import struct
import threading
from pathlib import Path
from typing import Any

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mappingstore import MemoryStore, SQLiteStore
from mappingstore._adapters import Prefixed
from mappingstore._codec import ENCRYPTED_HEADER, pack, unpack, wrap_plain
from mappingstore._crypto import Cipher, aad_for, aad_prefix, random_key
from mappingstore.errors import (
    CorruptValueError,
    IntegrityError,
    PasswordRequiredError,
    SerializationError,
)

H = ENCRYPTED_HEADER
SID = b"store-id-16bytes"
KEY = bytes(range(32))

# Keys that exercise the associated data's encoding: non-ASCII, a lone surrogate, the
# empty key, and lengths around the 1-byte/4-byte boundary of the length table.
KEYS = ["a", "", "ключ", "\ud800x", "k" * 255, "k" * 256, "é" * 200, "x\x00y"]


def _manual_aad(store_id: bytes, ns: str, key: str, context: bytes = b"") -> bytes:
    """The documented layout, written out independently of _crypto."""
    nsb = ns.encode("utf-8", "surrogatepass")
    kb = key.encode("utf-8", "surrogatepass")
    return store_id + struct.pack(">I", len(nsb)) + nsb + struct.pack(">I", len(kb)) + kb + context


def _reference_open(record: bytes, aad: bytes) -> bytes:
    """Decrypt with PyNaCl's own checked binding (not our cffi path)."""
    body = record[len(H) :]
    return bytes(
        nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(body[24:], aad, body[:24], KEY)
    )


# -- associated data ---------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("context", [b"", b"ctx"])
def test_aad_for_matches_the_documented_layout(key: str, context: bytes) -> None:
    assert aad_for(SID, "ns", key, context) == _manual_aad(SID, "ns", key, context)
    kb = key.encode("utf-8", "surrogatepass")
    tail = struct.pack(">I", len(kb)) + kb + context
    assert aad_prefix(SID, "ns", H) + tail == H + aad_for(SID, "ns", key, context)


def test_aad_prefix_cache_keeps_inputs_apart() -> None:
    seen = {
        aad_prefix(sid, ns, head)
        for sid in (b"s1", b"s2", b"")
        for ns in ("ns", "ns\x00", "", "\ud800")
        for head in (b"", H)
    }
    assert len(seen) == 3 * 4 * 2
    for _ in range(300):  # more entries than the cache keeps: still the right bytes
        aad_prefix(random_key(), "x")
    assert aad_prefix(SID, "ns", H) == H + _manual_aad(SID, "ns", "")[:-4]


# -- seal_records / open_records ------------------------------------------------------------


def _payloads(n: int) -> list[bytes]:
    sizes = [0, 1, 50, 511, 512, 513, 4000, 70_000]
    return [bytes([i % 251]) * sizes[i % len(sizes)] for i in range(n)]


@pytest.mark.parametrize("context", [b"", b"ctx"])
def test_seal_records_is_seal_per_value(context: bytes) -> None:
    cipher = Cipher(KEY)
    payloads = _payloads(len(KEYS))
    records = cipher.seal_records(H, SID, "ns", KEYS, payloads, context)
    assert len(records) == len(KEYS)
    for key, payload, record in zip(KEYS, payloads, records, strict=True):
        assert type(record) is bytes
        assert record[:2] == H
        assert len(record) == 2 + 24 + len(payload) + 16
        aad = H + _manual_aad(SID, "ns", key, context)
        assert _reference_open(record, aad) == payload
        assert cipher.open(record[2:], aad) == payload
        assert cipher.open_record(H, SID, "ns", key, record, context) == payload
    assert len({r[2:26] for r in records}) == len(records)  # a fresh nonce per value


def test_nonces_are_fresh_across_calls() -> None:
    cipher = Cipher(KEY)
    keys = [f"k{i}" for i in range(2000)]
    nonces = [
        r[2:26]
        for _ in range(5)
        for r in cipher.seal_records(H, SID, "ns", keys, [b"same"] * len(keys))
    ]
    assert len(set(nonces)) == len(nonces)


@pytest.mark.parametrize("context", [b"", b"ctx"])
def test_open_records_reads_records_sealed_one_by_one(context: bytes) -> None:
    cipher = Cipher(KEY)
    payloads = _payloads(len(KEYS))
    # The format of every record written so far: head + Cipher.seal(payload, head + aad).
    records = [
        H + cipher.seal(p, H + aad_for(SID, "ns", k, context))
        for k, p in zip(KEYS, payloads, strict=True)
    ]
    assert cipher.open_records(H, SID, "ns", KEYS, records, context) == payloads


def test_a_fixed_record_still_opens() -> None:
    """A record built with PyNaCl's binding and a fixed nonce: the stored format."""
    nonce = bytes(range(100, 124))
    aad = H + _manual_aad(SID, "ns", "key")
    sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"payload", aad, nonce, KEY)
    record = H + nonce + bytes(sealed)
    cipher = Cipher(KEY)
    assert cipher.open_records(H, SID, "ns", ["key"], [record]) == [b"payload"]
    assert cipher.open_record(H, SID, "ns", "key", record) == b"payload"
    assert cipher.open(record[2:], aad) == b"payload"


def test_open_records_skips_missing_and_other_records() -> None:
    cipher = Cipher(KEY)
    sealed = cipher.seal_records(H, SID, "ns", ["a", "c"], [b"A", b"C"])
    plain = wrap_plain(pack("b"))
    got = cipher.open_records(
        H, SID, "ns", ["a", "b", "x", "c"], [sealed[0], plain, None, sealed[1]]
    )
    assert got == [b"A", None, None, b"C"]
    assert cipher.open_records(H, SID, "ns", [], []) == []
    assert cipher.seal_records(H, SID, "ns", [], []) == []


def _tampered(record: bytes) -> list[bytes]:
    out = [record[:-1], record[:41], record[:2], record + b"\x00"]
    for i in range(2, len(record)):  # every byte after the head (nonce, ciphertext, tag)
        out.append(record[:i] + bytes([record[i] ^ 0x01]) + record[i + 1 :])
    return out


def test_open_records_rejects_any_damage() -> None:
    cipher = Cipher(KEY)
    good = cipher.seal_records(H, SID, "ns", ["a", "b"], [b"value a", b"value b"])
    for bad in _tampered(good[1]):
        with pytest.raises(IntegrityError, match="failed authentication"):
            cipher.open_records(H, SID, "ns", ["a", "b"], [good[0], bad])
        with pytest.raises(IntegrityError):
            cipher.open_record(H, SID, "ns", "b", bad)


@pytest.mark.parametrize(
    "where",
    [
        ("ns", ["b", "a"], b"", KEY),  # swapped between keys
        ("other", ["a", "b"], b"", KEY),  # another namespace
        ("ns", ["a", "b"], b"ctx", KEY),  # another context
        ("ns", ["a", "b"], b"", bytes(32)),  # another data key
    ],
)
def test_open_records_binds_key_namespace_context_and_data_key(where: Any) -> None:
    ns, keys, context, data_key = where
    records = Cipher(KEY).seal_records(H, SID, "ns", ["a", "b"], [b"A", b"B"])
    with pytest.raises(IntegrityError):
        Cipher(data_key).open_records(H, SID, ns, keys, records, context)
    with pytest.raises(IntegrityError):
        Cipher(KEY).open_records(H, b"another-store-id", "ns", ["a", "b"], records)


def test_lengths_must_match() -> None:
    cipher = Cipher(KEY)
    with pytest.raises(ValueError):
        cipher.seal_records(H, SID, "ns", ["a", "b"], [b"A"])
    with pytest.raises(ValueError):
        cipher.open_records(H, SID, "ns", ["a"], [])


def test_bulk_calls_from_many_threads() -> None:
    cipher = Cipher(KEY)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for r in range(20):
                keys = [f"t{t}-{r}-{i}" for i in range(200)]
                payloads = [bytes([t, r, i % 256]) * (i % 700) for i in range(200)]
                records = cipher.seal_records(H, SID, f"ns{t}", keys, payloads)
                assert cipher.open_records(H, SID, f"ns{t}", keys, records) == payloads
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.text(max_size=300), st.binary(max_size=1200), max_size=12),
    st.text(max_size=20),
    st.binary(max_size=8),
)
def test_round_trip_property(items: dict[str, bytes], ns: str, context: bytes) -> None:
    cipher = Cipher(KEY)
    keys, payloads = list(items), list(items.values())
    records = cipher.seal_records(H, SID, ns, keys, payloads, context)
    assert cipher.open_records(H, SID, ns, keys, records, context) == payloads
    for k, p, r in zip(keys, payloads, records, strict=True):
        assert _reference_open(r, H + _manual_aad(SID, ns, k, context)) == p


# -- through a store: set_many / get_many keep every behaviour ------------------------------


def _store(**options: Any) -> MemoryStore:
    return MemoryStore(password="pw", security="low", **options)


def test_store_bulk_round_trip_and_single_reads() -> None:
    with _store() as store:
        keys = [k for k in KEYS if k and "\ud800" not in k]  # not valid store keys
        values = {k: {"n": i, "k": k, "blob": b"x" * (i * 300)} for i, k in enumerate(keys)}
        store.set_many(values)
        for k, v in values.items():
            record = store._get(store.namespace, k)
            assert record is not None and record[:2] == H
            assert store[k] == v
        assert store.get_many([*keys, "missing"]) == values
        store.update({"a": 1}, b=2)
        assert store.get_many(["a", "b"]) == {"a": 1, "b": 2}


def test_store_set_many_keeps_the_last_of_repeated_keys() -> None:
    with _store() as store:
        store.set_many([("a", 1), ("b", 2), ("a", 3)])
        assert store.get_many(["a", "b", "a"]) == {"a": 3, "b": 2}


def test_store_get_many_mixes_plain_and_encrypted_records() -> None:
    with _store() as store:
        store.set_many({"e1": 1, "e2": 2})
        store.set_many({"p1": "plain"}, encrypt=False)
        assert store._get(store.namespace, "p1")[:2] != H  # type: ignore[index]
        assert store.get_many(["e1", "p1", "gone", "e2"]) == {"e1": 1, "p1": "plain", "e2": 2}


def test_store_get_many_raises_what_single_reads_raise() -> None:
    with _store() as store:
        store.set_many({"a": 1, "b": 2, "c": 3})
        ns = store.namespace
        rec_b = store._get(ns, "b")
        assert rec_b is not None
        store._put(ns, "c", rec_b, None)  # b's ciphertext moved under c
        with pytest.raises(IntegrityError):
            store["c"]
        with pytest.raises(IntegrityError):
            store.get_many(["a", "b", "c"])
        assert store.get_many(["a", "b"]) == {"a": 1, "b": 2}
        # A damaged plain record before it: its error comes first, as one by one.
        store._put(ns, "a", wrap_plain(pack(1))[:-1] + b"\xff", None)
        with pytest.raises(CorruptValueError):
            store.get_many(["a", "c"])
        with pytest.raises(IntegrityError):
            store.get_many(["c", "a"])


def test_store_set_many_refuses_before_writing() -> None:
    with _store() as store:
        with pytest.raises(SerializationError):
            store.set_many({"a": 1, "b": object(), "c": 3})
        assert len(store) == 0


def test_store_encrypt_true_without_a_key(tmp_path: Path) -> None:
    with SQLiteStore(str(tmp_path / "s.db")) as store:
        with pytest.raises(PasswordRequiredError):
            store.set_many({"a": 1, "b": 2}, encrypt=True)
        assert len(store) == 0
    with MemoryStore() as memory:  # an in-process key: encrypt=True works
        memory.set_many({"a": 1, "b": 2}, encrypt=True)
        assert memory._get(memory.namespace, "a")[:2] == H  # type: ignore[index]
        assert memory.get_many(["a", "b"]) == {"a": 1, "b": 2}


def test_store_values_that_decode_alike_one_by_one() -> None:
    with _store() as store:
        values: dict[str, Any] = {
            "tuple": (1, (2, 3)),
            "set": {1, 2},
            "big": 2**100,
            "nested": [[[[[]]]]],
            "none": None,
            "bytes": b"\x00" * 600,
        }
        store.set_many(values)
        assert store.get_many(list(values)) == values
        one_by_one = {k: unpack(store._cipher.open_record(  # type: ignore[union-attr]
            H, store._store_id, store.namespace, k, store._get(store.namespace, k) or b""
        )) for k in values}  # fmt: skip
        assert one_by_one == values


def test_store_prefixed_adapter_binds_the_full_key() -> None:
    with _store() as inner:
        view = Prefixed(inner, "pre:")
        view.set_many({"a": 1, "b": 2})
        assert view.get_many(["a", "b"]) == {"a": 1, "b": 2}
        assert view["a"] == 1
        # The adapter stores under (and binds to) the full key.
        assert inner["pre:a"] == 1
        assert inner.get_many(["pre:a", "pre:b"]) == {"pre:a": 1, "pre:b": 2}


def test_unpack_many() -> None:
    """The batch decoder of Store.get_many's encrypted path."""
    from mappingstore._codec import unpack_many
    from mappingstore.testing import VALUE_SAMPLES, assert_same

    samples = [value for _, value in VALUE_SAMPLES]
    payloads = [pack(v) for v in samples]
    for got, want in zip(unpack_many(payloads), samples, strict=True):
        assert_same(got, want)
    assert unpack_many([]) == []
    assert unpack_many([pack(1), b"\xc1"]) is None  # 0xc1: never valid msgpack
    assert unpack_many([pack(1), pack(2)[:0]]) is None  # an empty payload: one value short
    assert unpack_many([pack(1) + pack(2)]) is None  # two values in one: one left over


def test_sqlite_items_open_a_page_of_encrypted_records_at_once(tmp_path: Path) -> None:
    # items()/values() of an encrypted SQLite store open each page with open_records and
    # one unpack_many; a tampered record makes its page decode one by one, so every
    # record before it is handed out and the error comes at that record.
    path = tmp_path / "s.db"
    values = {f"k{i:04d}": {"n": i, "t": (i, "x")} for i in range(2000)}
    with SQLiteStore(path, key=KEY) as store:
        store.update(values)
        store.set("plain", [1, 2], encrypt=False)  # a page of mixed kinds still reads
        assert dict(store.items()) == {**values, "plain": [1, 2]}
        assert store.get_many(["k0001", "plain"]) == {"k0001": values["k0001"], "plain": [1, 2]}
    conn = sqlite3.connect(path)
    (blob,) = conn.execute("SELECT value FROM mappingstore_kv WHERE key = 'k1234'").fetchone()
    conn.execute(
        "UPDATE mappingstore_kv SET value = ? WHERE key = 'k1234'",
        (blob[:-1] + bytes([blob[-1] ^ 1]),),
    )
    conn.commit()
    conn.close()
    seen: list[str] = []

    def read_all(store: SQLiteStore) -> None:
        for key, value in store.items():
            assert value == values[key]
            seen.append(key)

    with SQLiteStore(path, key=KEY) as store:
        with pytest.raises(IntegrityError):
            read_all(store)
        assert seen == [f"k{i:04d}" for i in range(1234)]
        with pytest.raises(IntegrityError):
            store.get_many(["k0001", "k1234"])
    with SQLiteStore(path, encrypt=False) as store:
        assert store["plain"] == [1, 2]
        with pytest.raises(PasswordRequiredError):
            list(store.values())
