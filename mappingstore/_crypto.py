"""Encryption: argon2id key derivation, a wrapped data key, XChaCha20-Poly1305 values.

Layer 2 of the architecture. The design (see ``docs/security.md``):

* A random 32-byte **data key** encrypts every value of the store.
* The data key is stored *wrapped* (encrypted) under a **key-encryption key** (KEK): either
  a raw 32-byte ``key=`` or one derived from the password with argon2id and a random
  per-store salt. Changing the password re-wraps one data key and rewrites no value.
* Each value is sealed with XChaCha20-Poly1305 (``nacl.secret.Aead``), a random 24-byte
  nonce, and associated data that binds it to its store id, namespace and key name, so a
  ciphertext moved anywhere else fails authentication.
* ``Cipher.seal_records``/``open_records`` do the same for a whole batch of one namespace
  (``set_many``/``get_many``), sharing the Python-side work; the bytes are the same.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from .errors import IntegrityError, InvalidOptionError, StoreCorruptError, WrongPasswordError

__all__ = ["SECURITY_LEVELS", "Cipher", "KeySlot", "aad_for", "aad_prefix", "derive_kek"]

_ARGON = nacl.pwhash.argon2id
SECURITY_LEVELS: dict[str, tuple[int, int]] = {
    "low": (_ARGON.OPSLIMIT_INTERACTIVE, _ARGON.MEMLIMIT_INTERACTIVE),
    "medium": (_ARGON.OPSLIMIT_MODERATE, _ARGON.MEMLIMIT_MODERATE),
    "high": (_ARGON.OPSLIMIT_SENSITIVE, _ARGON.MEMLIMIT_SENSITIVE),
}
SALT_SIZE = _ARGON.SALTBYTES  # 16
KEY_SIZE = nacl.secret.Aead.KEY_SIZE  # 32
_WRAP_AAD = b"mappingstore/key-wrap/v1\x00"
# nonce || the sealed 32-byte data key || tag (nacl.secret.Aead.encrypt)
_WRAPPED_SIZE = nacl.secret.Aead.NONCE_SIZE + KEY_SIZE + nacl.secret.Aead.MACBYTES


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


_ENCRYPT: Any = None
_DECRYPT: Any = None
if _lib is not None:
    _ENCRYPT = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt
    _DECRYPT = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt
_U32 = struct.Struct(">I").pack
_LENS = tuple(_U32(n) for n in range(256))  # the length fields of the usual key sizes
_FAILED = (
    "encrypted value failed authentication (tampered, truncated, moved "
    "to another key/namespace/store, or sealed with another key)"
)


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
    rc = _ENCRYPT(
        out + _NONCE_SIZE, _ffi.NULL, plaintext, len(plaintext), aad, len(aad), _ffi.NULL,
        nonce, key,
    )  # fmt: skip
    if rc != 0:  # pragma: no cover - libsodium does not fail here for valid sizes
        raise nacl.exceptions.CryptoError("encryption failed")
    return _ffi.buffer(out)[:]  # type: ignore[no-any-return]


class Cipher:
    """Seals and opens values with one data key. Thread-safe (stateless per call: the bulk
    methods' scratch buffers belong to one call)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        nacl.secret.Aead(key)  # validates the key's type and length
        self._key = bytes(key)

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """Return ``nonce || ciphertext || tag``; a fresh random nonce every call."""
        return _aead_encrypt(plaintext, aad, os.urandom(_NONCE_SIZE), self._key)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """Authenticate and decrypt; any failure raises :class:`IntegrityError`."""
        return self._open(sealed, 0, aad)

    def seal_record(
        self,
        head: bytes,
        store_id: bytes,
        namespace: str,
        key: str,
        payload: bytes,
        context: bytes = b"",
    ) -> bytes:
        """``head + self.seal(payload, head + aad_for(store_id, namespace, key, context))``,
        built in one buffer."""
        # Every set of an encrypted store runs this: aad_prefix() and _aad() are inlined.
        try:
            prefix = _PREFIXES[head, store_id, namespace]
        except KeyError:
            prefix = aad_prefix(store_id, namespace, head)
        kb = key.encode("utf-8", "surrogatepass")
        n = len(kb)
        aad = prefix + (_LENS[n] if n < 256 else _U32(n)) + kb
        if context:
            aad += context
        if _lib is None:  # pragma: no cover
            return head + self.seal(payload, aad)
        hl, size = len(head), len(payload)
        body = hl + _NONCE_SIZE
        out = _ffi.new("unsigned char[]", body + size + _TAG_SIZE)
        buf = _ffi.buffer(out)
        buf[:body] = head + os.urandom(_NONCE_SIZE)
        null, key_ = _ffi.NULL, self._key
        if _ENCRYPT(out + body, null, payload, size, aad, len(aad), null, out + hl, key_):
            raise nacl.exceptions.CryptoError("encryption failed")  # pragma: no cover
        return buf[:]  # type: ignore[no-any-return]

    def open_record(
        self,
        head: bytes,
        store_id: bytes,
        namespace: str,
        key: str,
        record: bytes,
        context: bytes = b"",
    ) -> bytes:
        """``self.open(record[len(head):], head + aad_for(store_id, namespace, key, context))``
        without the intermediate copies (the caller has checked that *record* starts with
        *head*)."""
        # Every get of an encrypted store runs this: aad_prefix(), _aad() and _open() are
        # inlined (each Python call costs about 0.06 µs; a decrypt in all about 1 µs).
        try:
            prefix = _PREFIXES[head, store_id, namespace]
        except KeyError:
            prefix = aad_prefix(store_id, namespace, head)
        kb = key.encode("utf-8", "surrogatepass")
        n = len(kb)
        aad = prefix + (_LENS[n] if n < 256 else _U32(n)) + kb
        if context:
            aad += context
        hl = len(head)
        body = hl + _NONCE_SIZE
        size = len(record) - body - _TAG_SIZE
        if size < 0 or _lib is None:
            return self._open(record, hl, aad)  # the error, or no cffi module
        out = _ffi.new("unsigned char[]", size or 1)
        if _DECRYPT(
            out, _ffi.NULL, _ffi.NULL, record[body:], size + _TAG_SIZE, aad, len(aad),
            record[hl:body], self._key,
        ):  # fmt: skip
            raise IntegrityError(_FAILED) from nacl.exceptions.CryptoError("authentication failed")
        return _ffi.buffer(out, size)[:]  # type: ignore[no-any-return]

    def _open(self, sealed: bytes, at: int, aad: bytes) -> bytes:
        """Open the ``nonce || ciphertext || tag`` that starts at offset *at* of *sealed*."""
        if _lib is None:  # pragma: no cover
            return self._open_slow(sealed[at:], aad)
        body = at + _NONCE_SIZE
        size = len(sealed) - body - _TAG_SIZE
        if size < 0:
            raise IntegrityError(_FAILED) from ValueError("sealed value too short")
        out = _ffi.new("unsigned char[]", size or 1)
        # One libsodium call, no binding layer: nacl.bindings checks every argument and
        # formats its messages eagerly (about 7 µs of a 9 µs decrypt, measured); ours were
        # checked above (lengths) and at construction (the key).
        if _DECRYPT(
            out, _ffi.NULL, _ffi.NULL, sealed[body:], size + _TAG_SIZE, aad, len(aad),
            sealed[at:body], self._key,
        ):  # fmt: skip
            raise IntegrityError(_FAILED) from nacl.exceptions.CryptoError("authentication failed")
        return _ffi.buffer(out, size)[:]  # type: ignore[no-any-return]

    def _open_slow(self, sealed: bytes, aad: bytes) -> bytes:  # pragma: no cover
        try:
            if len(sealed) < _NONCE_SIZE + _TAG_SIZE:
                raise ValueError("sealed value too short")
            return bytes(
                nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
                    sealed[_NONCE_SIZE:], aad, sealed[:_NONCE_SIZE], self._key
                )
            )
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
            raise IntegrityError(_FAILED) from exc

    # -- bulk -------------------------------------------------------------------------------
    # A value costs about 0.55 µs inside libsodium (HChaCha20, two ChaCha20 blocks and
    # Poly1305 for a small value, measured on the bench machine): one seal()/open() call
    # through the Store adds 1.7 to 3 µs of Python around it (its own nonce syscall, the
    # associated data built from scratch, a fresh output buffer, slices and the record
    # header). The bulk methods below share all of that across a batch: one os.urandom()
    # for every nonce, the associated data's (head, store, namespace) prefix built once,
    # one scratch buffer, and the record assembled in that buffer. Same bytes, same
    # checks: each value still has its own random nonce and its own full associated data.

    def seal_records(
        self,
        head: bytes,
        store_id: bytes,
        namespace: str,
        keys: Collection[str],
        payloads: Iterable[bytes],
        context: bytes = b"",
    ) -> list[bytes]:
        """Seal the values of *keys* (one namespace) into records ``head || nonce || ct || tag``.

        Each record equals ``head + self.seal(payload, head + aad_for(store_id, namespace,
        key, context))`` (with another random nonce).
        """
        prefix = aad_prefix(store_id, namespace, head)
        if _lib is None:  # pragma: no cover
            return [
                head + self.seal(p, _aad(prefix, k, context))
                for k, p in zip(keys, payloads, strict=True)
            ]
        # One getrandom() for the whole batch instead of one per value (0.5 µs each): the
        # bytes are cut into disjoint 24-byte nonces, each as random as its own call's.
        # Nothing is kept between calls, so no nonce can be handed out twice (fork, threads).
        nonces = os.urandom(_NONCE_SIZE * len(keys))
        hl = len(head)
        body = hl + _NONCE_SIZE  # where the ciphertext starts
        over = body + _TAG_SIZE  # record size - payload size
        cap = 512
        out = _ffi.new("unsigned char[]", cap + over)
        buf = _ffi.buffer(out)
        buf[:hl] = head
        npub, ct = out + hl, out + body
        key, null, encrypt, u32, lens = self._key, _ffi.NULL, _ENCRYPT, _U32, _LENS
        records: list[bytes] = []
        append = records.append
        at = 0
        for k, payload in zip(keys, payloads, strict=True):
            size = len(payload)
            if size > cap:  # (re)allocate the scratch buffer: records are copies of it
                cap = max(size, 2 * cap)
                out = _ffi.new("unsigned char[]", cap + over)
                buf = _ffi.buffer(out)
                buf[:hl] = head
                npub, ct = out + hl, out + body
            kb = k.encode("utf-8", "surrogatepass")
            n = len(kb)
            aad = prefix + (lens[n] if n < 256 else u32(n)) + kb
            if context:
                aad += context
            buf[hl:body] = nonces[at : at + _NONCE_SIZE]
            at += _NONCE_SIZE
            if encrypt(ct, null, payload, size, aad, len(aad), null, npub, key):
                raise nacl.exceptions.CryptoError("encryption failed")  # pragma: no cover
            append(buf[: size + over])
        return records

    def open_records(
        self,
        head: bytes,
        store_id: bytes,
        namespace: str,
        keys: Iterable[str],
        records: Iterable[bytes | None],
        context: bytes = b"",
    ) -> list[bytes | None]:
        """The plaintexts of the records of *keys* (one namespace) that start with *head*.

        Each is ``self.open(record[len(head):], head + aad_for(store_id, namespace, key,
        context))``; ``None`` stands for a record that is ``None`` or does not start with
        *head* (the caller decodes those). The first failure raises :class:`IntegrityError`.
        """
        prefix = aad_prefix(store_id, namespace, head)
        hl = len(head)
        if _lib is None:  # pragma: no cover
            return [
                None if r is None or r[:hl] != head else self.open(r[hl:], _aad(prefix, k, context))
                for k, r in zip(keys, records, strict=True)
            ]
        body = hl + _NONCE_SIZE  # where the ciphertext starts
        over = body + _TAG_SIZE  # record size - plaintext size
        cap = 512
        out = _ffi.new("unsigned char[]", cap)
        buf = _ffi.buffer(out)
        key, null, decrypt, u32, lens = self._key, _ffi.NULL, _DECRYPT, _U32, _LENS
        plain: list[bytes | None] = []
        append = plain.append
        for k, record in zip(keys, records, strict=True):
            if record is None or record[:hl] != head:
                append(None)
                continue
            size = len(record) - over
            if size > cap:
                cap = max(size, 2 * cap)
                out = _ffi.new("unsigned char[]", cap)
                buf = _ffi.buffer(out)
            kb = k.encode("utf-8", "surrogatepass")
            n = len(kb)
            aad = prefix + (lens[n] if n < 256 else u32(n)) + kb
            if context:
                aad += context
            if size < 0 or decrypt(
                out, null, null, record[body:], size + _TAG_SIZE, aad, len(aad),
                record[hl:body], key,
            ):  # fmt: skip
                raise IntegrityError(_FAILED)
            append(buf[:size])
        return plain


# The associated data's prefix is the same for every key of a namespace: built once per
# (head, store, namespace) and kept (bounded) so single operations reuse it too.
_PREFIXES: dict[tuple[bytes, bytes, str], bytes] = {}


def aad_prefix(store_id: bytes, namespace: str, head: bytes = b"") -> bytes:
    """``head + aad_for(store_id, namespace, key)`` up to the key's part."""
    try:
        return _PREFIXES[head, store_id, namespace]
    except KeyError:
        pass
    ns = namespace.encode("utf-8", "surrogatepass")
    prefix = b"".join((head, store_id, _U32(len(ns)), ns))
    if len(_PREFIXES) >= 256:
        _PREFIXES.clear()
    _PREFIXES[head, store_id, namespace] = prefix
    return prefix


def _aad(prefix: bytes, key: str, context: bytes) -> bytes:
    kb = key.encode("utf-8", "surrogatepass")
    n = len(kb)
    return b"".join((prefix, _LENS[n] if n < 256 else _U32(n), kb, context))


def aad_for(store_id: bytes, namespace: str, key: str, context: bytes = b"") -> bytes:
    """Associated data binding a value to (store, namespace, key, extra context).

    Length prefixes make the encoding injective: no (namespace, key) pair can be
    rearranged into another one: ``store_id || u32 len(ns) || ns || u32 len(key) || key
    || context``, names in UTF-8 (lone surrogates kept).
    """
    return _aad(aad_prefix(store_id, namespace), key, context)


# A KEK costs up to seconds and 1 GiB to derive at "high"; reopening the same store in one
# process (memory://NAME, tests, the CLI's copy) should not pay that again. The cache key
# is a keyed hash of the password, never the password itself.
_KDF_CACHE: dict[tuple[bytes, bytes, int, int], bytes] = {}
_KDF_LOCK = threading.Lock()
_KDF_PEPPER = os.urandom(32)


def _password_bytes(password: str | bytes) -> bytes:
    """The UTF-8 bytes of a str password (bytes pass through).

    A str holding a lone surrogate has no UTF-8 form: ``os.environ`` and ``sys.argv`` give
    one for each byte that is not UTF-8 (PEP 383). ``UnicodeEncodeError`` would carry the
    whole password in its ``args``, so it is replaced, without chaining, by an error that
    holds no part of it (not chained either: no ``__cause__``, no ``__context__``).
    """
    if not isinstance(password, str):
        return bytes(password)
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        pass  # raised below, outside the handler: not even __context__ keeps the password
    raise InvalidOptionError(
        "the password is not valid text: it holds a lone surrogate (what os.environ "
        "gives for bytes that are not UTF-8); pass it as bytes (os.environb) or fix "
        "its encoding"
    )


def derive_kek(password: str | bytes, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    """argon2id(password, salt) -> 32-byte key-encryption key."""
    pw = _password_bytes(password)
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
        """The slot stored as *data*; every field is checked here, before PyNaCl sees it
        (the slot has no checksum: a damaged one must raise StoreCorruptError, never one
        of PyNaCl's own exceptions)."""
        try:
            if type(data) is not dict or type(data["v"]) is not int or data["v"] != 1:
                raise ValueError("unsupported key slot version")
            slot = cls(data["kdf"], data["salt"], data["ops"], data["mem"], data["wrapped"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptError("the store's encryption metadata is damaged") from exc
        problem = slot._problem()
        if problem:
            raise StoreCorruptError(f"the store's encryption metadata is damaged: {problem}")
        return slot

    def _problem(self) -> str:
        """What is wrong with this slot's fields, or ``""``."""
        if self.kdf not in ("argon2id", "raw"):
            return "unknown key derivation"
        if type(self.salt) is not bytes or len(self.salt) != SALT_SIZE:
            return f"the salt is not {SALT_SIZE} bytes"
        if type(self.opslimit) is not int or not (
            _ARGON.OPSLIMIT_MIN <= self.opslimit <= _ARGON.OPSLIMIT_MAX
        ):
            return "the argon2id operations limit is out of range"
        if type(self.memlimit) is not int or not (
            _ARGON.MEMLIMIT_MIN <= self.memlimit <= _ARGON.MEMLIMIT_MAX
        ):
            return "the argon2id memory limit is out of range"
        if type(self.wrapped) is not bytes or len(self.wrapped) != _WRAPPED_SIZE:
            return f"the wrapped key is not {_WRAPPED_SIZE} bytes"
        return ""

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
    return "argon2id", derive_kek(_password_bytes(pw), salt, ops, mem)


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
    problem = slot._problem()  # a slot built in code rather than read by from_dict
    if problem:
        raise StoreCorruptError(f"the store's encryption metadata is damaged: {problem}")
    try:
        _, kek = _kek_for(password, raw_key, slot.salt, slot.opslimit, slot.memlimit)
    except nacl.exceptions.CryptoError as exc:  # the checked parameters still failed
        raise StoreCorruptError(
            f"the store's key cannot be derived with its recorded argon2id parameters "
            f"(operations {slot.opslimit}, memory {slot.memlimit} bytes): not enough "
            f"memory, or damaged metadata ({type(exc).__name__})"
        ) from exc
    try:
        return bytes(nacl.secret.Aead(kek).decrypt(slot.wrapped, _WRAP_AAD + store_id))
    except (nacl.exceptions.ValueError, nacl.exceptions.TypeError) as exc:
        raise StoreCorruptError("the store's encryption metadata is damaged") from exc
    except nacl.exceptions.CryptoError as exc:
        raise WrongPasswordError("wrong password or key for this store") from exc


def random_key() -> bytes:
    """A fresh random 32-byte key."""
    return bytes(nacl.utils.random(KEY_SIZE))
