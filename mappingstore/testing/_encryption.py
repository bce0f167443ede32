"""Encryption: round trip, tampering, moved ciphertexts, wrong or missing passwords."""

from __future__ import annotations

import functools
import random
import zlib
from typing import Any

import pytest

from .._codec import ENCRYPTED_HEADER, PLAIN_HEADER, pack, unpack, wrap_plain
from .._keys import internal_ns
from .._store import Store
from ..errors import (
    CorruptValueError,
    IntegrityError,
    InvalidOptionError,
    PasswordRequiredError,
    WrongPasswordError,
)
from ._base import ENCRYPTION, OpenStore, SuiteBase
from ._fixtures import VALUE_SAMPLES, assert_same

__all__ = ["EncryptionTests"]

_SECRET = "top secret plaintext marker"


def _reads(store: Store, key: str) -> list[Any]:
    """Every public way of reading *key*'s value."""
    return [
        lambda: store[key],
        lambda: store.get(key),
        lambda: store.get_many([key]),
        lambda: dict(store.items()),
        lambda: list(store.values()),
        lambda: store.to_dict(),
        lambda: store.export_json(),
        lambda: store.pop(key),
        lambda: store.modify(key, lambda v: v),
    ]


class EncryptionTests(SuiteBase):
    """Values sealed with XChaCha20-Poly1305, bound to store, namespace and key."""

    def _salt(self, store: Store) -> bytes:
        rec = self.raw_record(store, "crypto", internal_ns("meta"))
        assert rec is not None, "an encrypted store keeps its key slot in its metadata"
        return bytes(unpack(rec[0])["salt"])

    def assert_rejects(self, store: Store, key: str, error: type[Exception]) -> None:
        for read in _reads(store, key):
            with pytest.raises(error):
                read()

    def test_round_trip_and_reopen(self, open_store: OpenStore) -> None:
        store = open_store("enc", **ENCRYPTION)
        assert store.encrypted
        store.update(VALUE_SAMPLES)
        for name, value in VALUE_SAMPLES:
            assert_same(store[name], value, name)
        other = self.second(open_store, "enc", **ENCRYPTION)
        for name, value in VALUE_SAMPLES:
            assert_same(other[name], value, name)
        reader = self.second(open_store, "enc", readonly=True, **ENCRYPTION)
        assert_same(reader["nested"], dict(VALUE_SAMPLES)["nested"])
        if self.persistent:
            store.close()
            other.close()
            again = open_store("enc", **ENCRYPTION)
            for name, value in VALUE_SAMPLES:
                assert_same(again[name], value, name)

    def test_ciphertext_hides_plaintext(self, open_store: OpenStore) -> None:
        store = open_store("hide", **ENCRYPTION)
        store["a"] = _SECRET
        store["b"] = _SECRET
        raw_a, raw_b = self.raw_data(store, "a"), self.raw_data(store, "b")
        assert raw_a.startswith(ENCRYPTED_HEADER)
        assert _SECRET.encode() not in raw_a
        assert pack(_SECRET) not in raw_a
        assert raw_a != raw_b  # a fresh nonce each time
        store["a"] = _SECRET
        assert self.raw_data(store, "a") != raw_a
        assert self.raw_keys(store) == {"a", "b"}  # names are not encrypted (documented)

    def test_wrong_password_fails_at_open(self, open_store: OpenStore) -> None:
        store = open_store("wrong", **ENCRYPTION)
        store["k"] = 1
        if self.persistent:
            store.close()
            again = open_store
        else:
            again = functools.partial(self.second, open_store)
        with pytest.raises(WrongPasswordError):
            again("wrong", password="not it", security="low")
        with pytest.raises(WrongPasswordError):
            again("wrong", key=bytes(32))
        assert isinstance(WrongPasswordError("x"), ValueError)

    def test_no_password_on_encrypted_store(self, open_store: OpenStore) -> None:
        store = open_store("nopw", **ENCRYPTION)
        store["secret"] = 1
        store.set("public", 2, encrypt=False)
        with pytest.raises(PasswordRequiredError):
            self.second(open_store, "nopw")
        # encrypt=False opens it for its plain items only; encrypted ones never leak.
        plain = self.second(open_store, "nopw", encrypt=False)
        assert plain["public"] == 2
        assert "secret" in plain
        for read in _reads(plain, "secret")[:2]:
            with pytest.raises(PasswordRequiredError):
                read()
        assert plain.get_many(["public"]) == {"public": 2}

    def test_moved_ciphertext_fails(self, open_store: OpenStore) -> None:
        store = open_store("swap", **ENCRYPTION)
        store["a"] = "value of a"
        store["b"] = "value of b"
        raw_a = self.raw_data(store, "a")
        # to another key
        self.raw_put(store, "b", raw_a)
        self.assert_rejects(store, "b", IntegrityError)
        # to another namespace of the same store
        other_ns = self.second(open_store, "swap", namespace="other", **ENCRYPTION)
        self.raw_put(other_ns, "a", raw_a)
        self.assert_rejects(other_ns, "a", IntegrityError)
        # to another store with the same password
        other_store = open_store("swap-other", **ENCRYPTION)
        self.raw_put(other_store, "a", raw_a)
        self.assert_rejects(other_store, "a", IntegrityError)
        assert store["a"] == "value of a"

    def test_every_bit_flip_fails(self, open_store: OpenStore) -> None:
        store = open_store("flip", **ENCRYPTION)
        store["k"] = "some value"
        good = self.raw_data(store, "k")
        # Every header bit, then one bit of every byte (cycling through bit positions):
        # every byte of nonce, ciphertext and tag, without a thousand round trips.
        for bit in [*range(16), *(8 * i + i % 8 for i in range(2, len(good)))]:
            bad = bytearray(good)
            bad[bit // 8] ^= 1 << (bit % 8)
            self.raw_put(store, "k", bytes(bad))
            # A flipped header may look like a plain record: its CRC then fails.
            expected = IntegrityError if bit >= 16 else (IntegrityError, CorruptValueError)
            with pytest.raises(expected):
                store["k"]
        for cut in (0, 1, 2, 3, 25, len(good) // 2, len(good) - 16, len(good) - 1):
            self.raw_put(store, "k", good[:cut])
            with pytest.raises((IntegrityError, CorruptValueError)):
                store["k"]
        self.raw_put(store, "k", good + b"\x00")
        with pytest.raises(IntegrityError):
            store["k"]
        self.raw_put(store, "k", good)
        assert store["k"] == "some value"

    def test_plain_garbage_is_corrupt(self, store: Store) -> None:
        rng = random.Random(1234)
        store["good"] = {"a": [1, 2, 3], "b": "text"}
        good = self.raw_data(store, "good")
        garbage = [b"", b"\x01", PLAIN_HEADER, PLAIN_HEADER + b"\x00" * 4, b"\x00" * 50]
        garbage += [good[:cut] for cut in range(len(good))]
        garbage += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) for _ in range(30)]
        garbage += [wrap_plain(payload) for payload in (b"\xc1", b"\x92\x01", pack(1) + b"\x00")]
        garbage.append(wrap_plain(b"\xd4\x7f\x00"))  # unknown extension type 127
        garbage.append(b"\x02\x00" + zlib.crc32(pack(1)).to_bytes(4, "big") + pack(1))  # version 2
        for i in range(len(good)):  # one bit of every byte, cycling through positions
            bad = bytearray(good)
            bad[i] ^= 1 << (i % 8)
            garbage.append(bytes(bad))
        for data in garbage:
            if data[:2] == ENCRYPTED_HEADER:
                continue  # not a plain record: covered by the encryption tests
            self.raw_put(store, "bad", data)
            with pytest.raises(CorruptValueError):
                store["bad"]
        assert self.raw_data(store, "good") == good
        for read in _reads(store, "bad"):
            with pytest.raises(CorruptValueError):
                read()

    def test_per_item_encryption(self, open_store: OpenStore) -> None:
        plain = open_store("item")
        plain["p"] = "plain before"
        store = self.reopen(open_store, plain, "item", encrypt=False, **ENCRYPTION)
        assert not store.encrypted
        store["q"] = "plain"
        store.set("s", _SECRET, encrypt=True)
        assert store["s"] == _SECRET and store["q"] == "plain" and store["p"] == "plain before"
        assert self.raw_data(store, "s").startswith(ENCRYPTED_HEADER)
        assert self.raw_data(store, "q").startswith(PLAIN_HEADER)
        enc = self.second(open_store, "item", **ENCRYPTION)
        assert enc["s"] == _SECRET
        enc.set("open", 1, encrypt=False)
        assert self.raw_data(enc, "open").startswith(PLAIN_HEADER)
        enc["closed"] = 1
        assert self.raw_data(enc, "closed").startswith(ENCRYPTED_HEADER)
        reader = self.second(open_store, "item", encrypt=False)
        assert reader["q"] == "plain"
        with pytest.raises(PasswordRequiredError):
            reader["s"]
        with pytest.raises(PasswordRequiredError):
            reader.set("x", 1, encrypt=True)

    def test_encrypt_true_without_password(self, open_store: OpenStore) -> None:
        if not self.supports_encryption_without_password:
            with pytest.raises(PasswordRequiredError):
                open_store("eph", encrypt=True)
            return
        store = open_store("eph", encrypt=True)
        store["k"] = _SECRET
        assert store["k"] == _SECRET
        assert self.raw_data(store, "k").startswith(ENCRYPTED_HEADER)
        assert _SECRET.encode() not in self.raw_data(store, "k")

    def test_change_password(self, open_store: OpenStore) -> None:
        store = open_store("chpw", **ENCRYPTION)
        store["k"] = "v"
        before = self.raw_data(store, "k")
        store.change_password("brand new", security="low")
        assert self.raw_data(store, "k") == before  # O(1): no value rewritten
        assert store["k"] == "v"
        store["k2"] = "v2"
        if not self.persistent:
            return
        store.close()
        with pytest.raises(WrongPasswordError):
            open_store("chpw", **ENCRYPTION)
        again = open_store("chpw", password="brand new", security="low")
        assert again == {"k": "v", "k2": "v2"}
        again.change_password(key=b"k" * 32)
        again.close()
        assert open_store("chpw", key=b"k" * 32) == {"k": "v", "k2": "v2"}
        with pytest.raises(WrongPasswordError):
            open_store("chpw", password="brand new", security="low")

    def test_change_password_needs_one_secret(self, open_store: OpenStore) -> None:
        store = open_store("chpw2", **ENCRYPTION)
        with pytest.raises(InvalidOptionError):
            store.change_password()
        with pytest.raises(InvalidOptionError):
            store.change_password("a", key=b"k" * 32)
        plain = open_store("chpw3")
        with pytest.raises(PasswordRequiredError):
            plain.change_password("new", security="low")

    def test_salts_differ_per_store(self, open_store: OpenStore) -> None:
        one = open_store("salt1", **ENCRYPTION)
        two = open_store("salt2", **ENCRYPTION)
        one["k"] = two["k"] = 1
        assert self._salt(one) != self._salt(two)
        assert len(self._salt(one)) == 16

    def test_explicit_salt(self, open_store: OpenStore) -> None:
        salt = bytes(range(16))
        store = open_store("salted", salt=salt, **ENCRYPTION)
        store["k"] = _SECRET
        assert self._salt(store) == salt
        again = self.second(open_store, "salted", salt=salt, **ENCRYPTION)
        assert again["k"] == _SECRET
        with pytest.raises(InvalidOptionError):
            self.second(open_store, "salted", salt=bytes(16), **ENCRYPTION)
        with pytest.raises(InvalidOptionError):
            open_store("bad-salt", salt=b"short", **ENCRYPTION)

    def test_raw_key(self, open_store: OpenStore) -> None:
        key = bytes(range(32))
        store = open_store("rawkey", key=key)
        store["k"] = _SECRET
        assert self.raw_data(store, "k").startswith(ENCRYPTED_HEADER)
        assert self.second(open_store, "rawkey", key=key)["k"] == _SECRET
        with pytest.raises(WrongPasswordError):
            self.second(open_store, "rawkey", key=bytes(32))
        with pytest.raises(InvalidOptionError):
            open_store("rawkey2", key=b"short")

    def test_empty_password_rejected(self, open_store: OpenStore) -> None:
        with pytest.raises(InvalidOptionError):
            open_store("empty-pw", password="", security="low")
