"""Encryption: argon2id key derivation, a wrapped data key, XChaCha20-Poly1305 values.

Layer 2 of the architecture. The design (see ``docs/security.md``):

* A random 32-byte **data key** encrypts every value of the store.
* The data key is stored *wrapped* (encrypted) under a **key-encryption key** (KEK): either
  a raw 32-byte ``key=`` or one derived from the password with argon2id and a random
  per-store salt. Changing the password re-wraps one data key and rewrites no value.
* Each value is sealed with XChaCha20-Poly1305 (``nacl.secret.Aead``), a random 24-byte
  nonce, and associated data that binds it to its store id, namespace and key name, so a
  ciphertext moved anywhere else fails authentication.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from .errors import IntegrityError, InvalidOptionError, WrongPasswordError

__all__ = ["SECURITY_LEVELS", "Cipher", "KeySlot", "aad_for", "derive_kek"]

_ARGON = nacl.pwhash.argon2id
SECURITY_LEVELS: dict[str, tuple[int, int]] = {
    "low": (_ARGON.OPSLIMIT_INTERACTIVE, _ARGON.MEMLIMIT_INTERACTIVE),
    "medium": (_ARGON.OPSLIMIT_MODERATE, _ARGON.MEMLIMIT_MODERATE),
    "high": (_ARGON.OPSLIMIT_SENSITIVE, _ARGON.MEMLIMIT_SENSITIVE),
}
SALT_SIZE = _ARGON.SALTBYTES  # 16
KEY_SIZE = nacl.secret.Aead.KEY_SIZE  # 32
_WRAP_AAD = b"mappingstore/key-wrap/v1\x00"


# The raw AEAD calls: nacl.secret.Aead wraps each in encoder and EncryptedMessage layers
# that cost about 0.5 us a value (bench/bench_core.py); the result is byte-identical.
_NONCE_SIZE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES  # 24
_TAG_SIZE = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16

try:
    # PyNaCl's own cffi module: the same libsodium functions nacl.bindings calls, without
    # the binding layer's per-call argument checks (they format their messages eagerly:
    # about 7 µs of a 9 µs decrypt, measured). Our arguments are checked once, here.
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib
except ImportError:  # pragma: no cover - a PyNaCl that moved its cffi module
    _ffi = _lib = None


def _aead_encrypt(plaintext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    """``nonce || ciphertext || tag``, built in one buffer."""
    if _lib is None:  # pragma: no cover
        return nonce + bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)
        )
    size = len(plaintext) + _TAG_SIZE
    out = _ffi.new("unsigned char[]", _NONCE_SIZE + size)
    _ffi.memmove(out, nonce, _NONCE_SIZE)
    # The ciphertext length is always the plaintext's + the tag's: no length out-parameter.
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        out + _NONCE_SIZE, _ffi.NULL, plaintext, len(plaintext), aad, len(aad), _ffi.NULL,
        nonce, key,
    )  # fmt: skip
    if rc != 0:  # pragma: no cover - libsodium does not fail here for valid sizes
        raise nacl.exceptions.CryptoError("encryption failed")
    return bytes(_ffi.buffer(out, _NONCE_SIZE + size))


def _aead_decrypt(ciphertext: bytes, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    if _lib is None:  # pragma: no cover
        return bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
        )
    size = len(ciphertext) - _TAG_SIZE  # the caller checked it is >= 0
    out = _ffi.new("unsigned char[]", max(size, 1))
    rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        out, _ffi.NULL, _ffi.NULL, ciphertext, len(ciphertext), aad, len(aad), nonce, key
    )
    if rc != 0:
        raise nacl.exceptions.CryptoError("authentication failed")
    return bytes(_ffi.buffer(out, size))


class Cipher:
    """Seals and opens values with one data key. Thread-safe (stateless per call)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        nacl.secret.Aead(key)  # validates the key's type and length
        self._key = bytes(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Return ``nonce || ciphertext || tag``; a fresh random nonce every call."""
        return _aead_encrypt(plaintext, aad, os.urandom(_NONCE_SIZE), self._key)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt; any failure raises :class:`IntegrityError`."""
        try:
            if len(sealed) < _NONCE_SIZE + _TAG_SIZE:
                raise ValueError("sealed value too short")
            return _aead_decrypt(sealed[_NONCE_SIZE:], aad, sealed[:_NONCE_SIZE], self._key)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
            raise IntegrityError(
                "encrypted value failed authentication (tampered, truncated, moved "
                "to another key/namespace/store, or sealed with another key)"
            ) from exc


def aad_for(store_id: bytes, namespace: str, key: str, context: bytes = b"") -> bytes:
    """Associated data binding a value to (store, namespace, key, extra context).

    Length prefixes make the encoding injective: no (namespace, key) pair can be
    rearranged into another one.
    """
    ns = namespace.encode("utf-8", "surrogatepass")
    k = key.encode("utf-8", "surrogatepass")
    return b"".join(
        (store_id, struct.pack(">I", len(ns)), ns, struct.pack(">I", len(k)), k, context)
    )


# A KEK costs up to seconds and 1 GiB to derive at "high"; reopening the same store in one
# process (memory://NAME, tests, the CLI's copy) should not pay that again. The cache key
# is a keyed hash of the password, never the password itself.
_KDF_CACHE: dict[tuple[bytes, bytes, int, int], bytes] = {}
_KDF_LOCK = threading.Lock()
_KDF_PEPPER = os.urandom(32)


def derive_kek(password: str | bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    """argon2id(password, salt) -> 32-byte key-encryption key."""
    pw = password.encode("utf-8") if isinstance(password, str) else bytes(password)
    tag = hashlib.blake2b(pw, key=_KDF_PEPPER, digest_size=32).digest()
    cache_key = (tag, salt, opslimit, memlimit)
    with _KDF_LOCK:
        cached = _KDF_CACHE.get(cache_key)
    if cached is not None:
        return cached
    kek = bytes(_ARGON.kdf(KEY_SIZE, pw, salt, opslimit=opslimit, memlimit=memlimit))
    with _KDF_LOCK:
        if len(_KDF_CACHE) >= 32:
            _KDF_CACHE.pop(next(iter(_KDF_CACHE)))
        _KDF_CACHE[cache_key] = kek
    return kek


@dataclass(frozen=True)
class KeySlot:
    """The stored, public part of a store's encryption: how to rebuild the KEK, and the
    wrapped data key. Serialised with msgpack into the store's metadata."""

    kdf: str  # "argon2id" or "raw"
    salt: bytes
    opslimit: int
    memlimit: int
    wrapped: bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": 1,
            "kdf": self.kdf,
            "salt": self.salt,
            "ops": self.opslimit,
            "mem": self.memlimit,
            "wrapped": self.wrapped,
        }

    @classmethod
    def from_dict(cls, data: Any) -> KeySlot:
        try:
            if data["v"] != 1:
                raise ValueError("unsupported key slot version")
            return cls(data["kdf"], data["salt"], data["ops"], data["mem"], data["wrapped"])
        except (KeyError, TypeError, ValueError) as exc:
            from .errors import StoreCorruptError

            raise StoreCorruptError("the store's encryption metadata is damaged") from exc

    @property
    def security(self) -> str | None:
        for name, (ops, mem) in SECURITY_LEVELS.items():
            if (ops, mem) == (self.opslimit, self.memlimit):
                return name
        return None


def _kek_for(
    password: str | bytes | None, raw_key: bytes | None, salt: bytes, ops: int, mem: int
) -> tuple[str, bytes]:
    if raw_key is not None:
        if not isinstance(raw_key, (bytes, bytearray)) or len(raw_key) != KEY_SIZE:
            raise InvalidOptionError(f"key= must be {KEY_SIZE} raw bytes")
        return "raw", bytes(raw_key)
    if password is None:
        raise InvalidOptionError("a password or a key is needed")
    if isinstance(password, (bytes, bytearray)):
        pw: str | bytes = bytes(password)
    elif isinstance(password, str):
        pw = password
    else:
        raise InvalidOptionError("password= must be str or bytes")
    if not pw:
        raise InvalidOptionError("the password must not be empty")
    return "argon2id", derive_kek(pw, salt, ops, mem)


def new_slot(
    data_key: bytes,
    store_id: bytes,
    *,
    password: str | bytes | None,
    raw_key: bytes | None,
    salt: bytes | None,
    security: str,
) -> KeySlot:
    """Wrap *data_key* under a KEK made from *password* (or *raw_key*)."""
    if security not in SECURITY_LEVELS:
        raise InvalidOptionError(f"security must be one of {sorted(SECURITY_LEVELS)}")
    ops, mem = SECURITY_LEVELS[security]
    if salt is None:
        salt = nacl.utils.random(SALT_SIZE)
    elif not isinstance(salt, (bytes, bytearray)) or len(salt) != SALT_SIZE:
        raise InvalidOptionError(f"salt= must be {SALT_SIZE} bytes")
    kind, kek = _kek_for(password, raw_key, bytes(salt), ops, mem)
    wrapped = bytes(nacl.secret.Aead(kek).encrypt(data_key, _WRAP_AAD + store_id))
    return KeySlot(kind, bytes(salt), ops, mem, wrapped)


def unwrap(
    slot: KeySlot, store_id: bytes, *, password: str | bytes | None, raw_key: bytes | None
) -> bytes:
    """Recover the data key; a wrong password or key raises :class:`WrongPasswordError`."""
    if slot.kdf == "raw" and raw_key is None:
        raise WrongPasswordError("this store is locked with a raw key; pass key=")
    if slot.kdf == "argon2id" and password is None:
        raise WrongPasswordError("this store is locked with a password; pass password=")
    _, kek = _kek_for(password, raw_key, slot.salt, slot.opslimit, slot.memlimit)
    try:
        return bytes(nacl.secret.Aead(kek).decrypt(slot.wrapped, _WRAP_AAD + store_id))
    except nacl.exceptions.CryptoError as exc:
        raise WrongPasswordError("wrong password or key for this store") from exc


def random_key() -> bytes:
    """A fresh random 32-byte key."""
    return bytes(nacl.utils.random(KEY_SIZE))
