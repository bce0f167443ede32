"""Value codec: msgpack with extension types, wrapped in a small checked record.

Layer 2 of the architecture (see ``docs/architecture.md``). Nothing here does I/O.

Record layout (every value a backend stores is one record)::

    plain:      0x01 0x00 | crc32(payload) as 4 bytes big-endian | payload
    encrypted:  0x01 0x01 | nonce (24 bytes) | XChaCha20-Poly1305 ciphertext + tag (16 bytes)

``payload`` is msgpack. The checksum exists because msgpack alone decodes about 1% of
random byte strings "successfully"; with the header and CRC, garbage is rejected with
:class:`~mappingstore.errors.CorruptValueError` instead of turning into a wrong value.
Encrypted records need no CRC: the AEAD tag authenticates them.

Extension types (codes are part of the on-disk format; never renumber):

=====  ==========================================================================
code   type and payload
=====  ==========================================================================
1      ``tuple``: msgpack array
2      ``set``: msgpack array
3      ``frozenset``: msgpack array
4      reserved (``bytearray`` is packed as msgpack ``bin`` and reads back as ``bytes``)
5      ``datetime``: ``[naive ISO text, utcoffset µs | nil, zone key | nil, fold, tzname | nil]``
6      ``date``: ISO text
7      ``time``: ``[naive ISO text, utcoffset µs | nil, fold, tzname | nil]`` (the
       4th item is optional: records written before it existed have 3)
8      ``timedelta``: ``[days, seconds, microseconds]``
9      ``Decimal``: text
10     ``UUID``: 16 bytes
11     ``complex``: ``[real, imag]``
12     ``int`` outside 64 bits: signed big-endian two's complement bytes
=====  ==========================================================================
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from itertools import repeat
from typing import Any

import msgpack

from .errors import CorruptValueError, SerializationError

__all__ = [
    "ENCRYPTED_HEADER",
    "PLAIN_HEADER",
    "ZoneInfo",
    "decode_plain",
    "decode_plain_many",
    "is_encrypted",
    "pack",
    "unpack",
    "unpack_many",
    "unpack_slice",
    "wrap_plain",
]

FORMAT_VERSION = 1
PLAIN_HEADER = bytes((FORMAT_VERSION, 0x00))
ENCRYPTED_HEADER = bytes((FORMAT_VERSION, 0x01))

_TUPLE, _SET, _FROZENSET = 1, 2, 3
_DATETIME, _DATE, _TIME, _TIMEDELTA = 5, 6, 7, 8
_DECIMAL, _UUID, _COMPLEX, _BIGINT = 9, 10, 11, 12

try:  # zoneinfo needs tz data; without it aware datetimes still round-trip by offset.
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
except ImportError:  # pragma: no cover - Python < 3.9 is not supported anyway
    ZoneInfo = None  # type: ignore[assignment,misc]


def _offset_us(value: _dt.timedelta | None) -> int | None:
    if value is None:
        return None
    return (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds


def _fixed_offset_name(tz: _dt.tzinfo | None) -> str | None:
    """The explicit name of ``timezone(offset, name)``, or None when it has the default one."""
    if not isinstance(tz, _dt.timezone) or tz is _dt.timezone.utc:
        return None
    name = tz.tzname(None)
    return None if name == _dt.timezone(tz.utcoffset(None)).tzname(None) else name


def _default(obj: Any) -> Any:
    """Turn a non-msgpack value into an extension type (called by msgpack)."""
    t = type(obj)
    if t is tuple:
        return msgpack.ExtType(_TUPLE, _packb_nested(list(obj)))
    if t is set:
        return msgpack.ExtType(_SET, _packb_nested(list(obj)))
    if t is frozenset:
        return msgpack.ExtType(_FROZENSET, _packb_nested(list(obj)))
    if t is int:  # msgpack only calls us for ints outside [-2**63, 2**64).
        return _bigint(obj)
    if t is _dt.datetime:
        tz = obj.tzinfo
        # Only a ZoneInfo's key names its rules: another tzinfo with a "key" attribute
        # (a look-alike) keeps its offset, or its instant would read back shifted.
        zone = tz.key if ZoneInfo is not None and isinstance(tz, ZoneInfo) else None
        offset = _offset_us(obj.utcoffset())
        name = _fixed_offset_name(tz) if zone is None else None
        naive = obj.replace(tzinfo=None, fold=0).isoformat()
        return msgpack.ExtType(_DATETIME, _packb_nested([naive, offset, zone, obj.fold, name]))
    if t is _dt.date:
        return msgpack.ExtType(_DATE, obj.isoformat().encode())
    if t is _dt.time:
        if obj.tzinfo is not None and obj.utcoffset() is None:
            # A ZoneInfo has no offset without a date: refuse rather than drop the zone.
            raise TypeError(f"a time with the zone {obj.tzinfo!r} has no UTC offset to store")
        offset = _offset_us(obj.utcoffset())
        naive = obj.replace(tzinfo=None, fold=0).isoformat()
        name = _fixed_offset_name(obj.tzinfo)
        return msgpack.ExtType(_TIME, _packb_nested([naive, offset, obj.fold, name]))
    if t is _dt.timedelta:
        return msgpack.ExtType(_TIMEDELTA, _packb_nested([obj.days, obj.seconds, obj.microseconds]))
    if t is Decimal:
        return msgpack.ExtType(_DECIMAL, str(obj).encode())
    if t is uuid.UUID:
        return msgpack.ExtType(_UUID, obj.bytes)
    if t is complex:
        return msgpack.ExtType(_COMPLEX, _packb_nested([obj.real, obj.imag]))
    # Subclasses of the builtin containers and scalars (OrderedDict, defaultdict, IntEnum,
    # str subclasses...) are stored as their base type: the value survives, the subclass
    # does not. Documented in docs/concepts.md.
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, dict):
        return dict(obj)
    if isinstance(obj, list):
        return list(obj)
    if isinstance(obj, str):
        return str.__str__(obj)
    if isinstance(obj, int):
        # msgpack calls default once per value: an int it cannot pack must come back
        # as the extension type, not as an int it would then refuse.
        value = int(obj)
        return value if -(2**63) <= value < 2**64 else _bigint(value)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, bytes):
        return bytes(obj)
    if isinstance(obj, tuple):  # namedtuple and friends: a plain tuple
        return msgpack.ExtType(_TUPLE, _packb_nested(list(obj)))
    raise TypeError(f"values of type {t.__qualname__} cannot be stored")


def _bigint(value: int) -> msgpack.ExtType:
    length = (value.bit_length() + 8) // 8
    return msgpack.ExtType(_BIGINT, value.to_bytes(length, "big", signed=True))


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)  # type: ignore[no-any-return]


# Each extension type holding other values (tuple, set, datetime...) packs and unpacks its
# payload with a nested msgpack call, and msgpack's C unpacker keeps ~40 KB of state on the
# C stack per call: about 180 nested tuples overflow an 8 MB stack and kill the process
# (a segfault, not an exception) before Python's recursion limit is reached. So nesting is
# capped, on write (SerializationError) and on read (CorruptValueError for a crafted record).
MAX_EXT_DEPTH = 32
_DEPTH = threading.local()


def _nest(fn: Callable[[Any], Any], arg: Any) -> Any:
    depth = getattr(_DEPTH, "n", 0)
    if depth >= MAX_EXT_DEPTH:
        raise ValueError(
            f"tuples, sets and other extension types nest more than {MAX_EXT_DEPTH} deep"
        )
    _DEPTH.n = depth + 1
    try:
        return fn(arg)
    finally:
        _DEPTH.n = depth


def _packb_nested(obj: Any) -> bytes:
    return _nest(_packb, obj)  # type: ignore[no-any-return]


def _unpackb_nested(data: bytes) -> Any:
    return _nest(_unpackb, data)


# Idle Packers. msgpack.packb() builds a new Packer per call, which costs about as much as
# packing a small value, so pack() reuses them (bench/bench_core.py). A pack takes one out
# of the pool (list.pop and list.append are atomic) and puts it back when done: a call
# that runs while another pack is busy (another thread, a finalizer or a value's own method
# running during packing) gets another Packer, never the busy buffer. The pool holds at
# most one Packer per concurrent pack. A Packer that raised is dropped.
# SharedMemoryStore.__setitem__ inlines pack() and wrap_plain() with this pool and
# _HEADER_CRC: a change to either must be made there too.
_PACKERS: list[msgpack.Packer] = []


def pack(value: Any) -> bytes:
    """msgpack-encode *value*; unsupported types raise :class:`SerializationError`."""
    try:
        try:
            packer = _PACKERS.pop()
        except IndexError:
            packer = msgpack.Packer(default=_default, strict_types=True, use_bin_type=True)
        data: bytes = packer.pack(value)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise SerializationError(f"cannot serialize value: {exc}") from exc
    _PACKERS.append(packer)
    return data


def _tz(offset: int | None, zone: str | None, name: str | None) -> _dt.tzinfo | None:
    if zone is not None and ZoneInfo is not None:
        try:
            return ZoneInfo(zone)
        # OSError: with the tzdata package, a key naming a directory ("Europe") raises
        # IsADirectoryError. Any unusable key falls back to the stored offset.
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    if offset is None:
        return None
    delta = _dt.timedelta(microseconds=offset)
    return _dt.timezone(delta, name) if name else _dt.timezone(delta)


def _items(data: bytes, *sizes: int) -> list[Any]:
    """The msgpack array an extension payload holds (of one of *sizes* items, if given).

    Every writer packs these payloads as arrays: anything else (a string, bytes or a map,
    which ``tuple()`` or unpacking would happily iterate) is a forged or damaged record.
    """
    items = _unpackb_nested(data)
    if type(items) is not list or (sizes and len(items) not in sizes):
        raise ValueError("malformed extension payload")
    return items


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _TUPLE:
        return tuple(_items(data))
    if code == _SET:
        return set(_items(data))
    if code == _FROZENSET:
        return frozenset(_items(data))
    if code == _BIGINT:
        return int.from_bytes(data, "big", signed=True)
    if code == _DATETIME:
        naive, offset, zone, fold, name = _items(data, 5)
        value = _dt.datetime.fromisoformat(naive)
        tz = _tz(offset, zone, name)
        return value.replace(tzinfo=tz, fold=fold) if tz is not None else value
    if code == _DATE:
        return _dt.date.fromisoformat(data.decode())
    if code == _TIME:
        naive, offset, fold, *rest = _items(data, 3, 4)
        tvalue = _dt.time.fromisoformat(naive)
        tz = _tz(offset, None, rest[0] if rest else None)
        return tvalue.replace(tzinfo=tz, fold=fold)
    if code == _TIMEDELTA:
        days, seconds, micro = _items(data, 3)
        return _dt.timedelta(days=days, seconds=seconds, microseconds=micro)
    if code == _DECIMAL:
        return Decimal(data.decode())
    if code == _UUID:
        return uuid.UUID(bytes=data)
    if code == _COMPLEX:
        real, imag = _items(data, 2)
        return complex(real, imag)
    raise ValueError(f"unknown extension type {code}")


def _unpackb(data: bytes) -> Any:
    # raw=False and use_list=True are msgpack's defaults (>= 1.0); spelling them out costs
    # keyword parsing on every read.
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, strict_map_key=False)
    except msgpack.StackError:
        return _unpack_outer(data)


_ARRAY_HEADS = frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))
_MAP_HEADS = frozenset((*range(0x80, 0x90), 0xDE, 0xDF))


def _unpack_outer(data: bytes) -> Any:
    """Decode a payload one level too deep for msgpack's unpacker.

    msgpack's packer accepts one level of nesting more than its unpacker (1,025 against
    1,024 containers), so a value it wrote can fail to read back with ``StackError``. The
    outermost container is read here by its header and each of its items by the unpacker,
    which then has one level less to go. A deeper payload (only a forged one: the packer
    refuses it) still raises ``StackError``.
    """
    unpacker = msgpack.Unpacker(
        None, ext_hook=_ext_hook, raw=False, strict_map_key=False, max_buffer_size=len(data)
    )
    unpacker.feed(data)
    head = data[0]
    value: Any
    if head in _ARRAY_HEADS:
        value = [unpacker.unpack() for _ in range(unpacker.read_array_header())]
    elif head in _MAP_HEADS:
        value = {}
        for _ in range(unpacker.read_map_header()):
            name = unpacker.unpack()
            value[name] = unpacker.unpack()
    else:  # pragma: no cover - only a container can be too deep
        raise msgpack.StackError("unpack stack overflow")
    if unpacker.tell() != len(data):
        raise msgpack.ExtraData(value, data[unpacker.tell() :])
    return value


_DECODE_ERRORS = (
    ValueError,  # msgpack's ExtraData, FormatError, StackError; UnicodeDecodeError
    TypeError,  # unhashable map key, wrong arity in an ext payload
    OverflowError,
    RecursionError,
    InvalidOperation,
    IndexError,
    KeyError,
    AttributeError,
    MemoryError,
)


def unpack(payload: bytes) -> Any:
    """Decode a msgpack payload; anything malformed raises :class:`CorruptValueError`."""
    try:
        return _unpackb(payload)
    except _DECODE_ERRORS as exc:
        raise CorruptValueError(f"stored value cannot be decoded: {type(exc).__name__}") from exc


_ARRAY32 = struct.Struct(">BI").pack  # msgpack "array 32" header: 0xdd, item count


# The fence unpack_many puts after each payload it cannot trust to be exactly one msgpack
# value: a msgpack bin of 16 random bytes, drawn once per process. It never leaves the
# process, so a stored record cannot be made to match it (but by a 2**-128 chance).
_FENCE_VALUE = os.urandom(16)
_FENCE = b"\xc4\x10" + _FENCE_VALUE


def unpack_many(payloads: Sequence[bytes], *, whole: bool = False) -> list[Any] | None:
    """Decode many msgpack payloads in one call: ``[unpack(p) for p in payloads]``, or
    ``None`` if any of them fails (the caller then decodes them one by one to raise the
    right error).

    The payloads are joined behind an array header and decoded as one array, which saves
    the Python calls of :func:`unpack` per value (about 0.15 µs of a small value's 0.7 µs,
    measured). A payload that is not exactly one msgpack value (none, part of one, or two)
    must not shift its neighbours into other values: ``[0x92]`` (an array missing its two
    items) followed by ``[1, 2, 3]`` would read as ``[1, 2]`` and ``3``, the count still
    right. So each payload is followed by a fence only this process knows (:data:`_FENCE`),
    and every other item of the array must read back as the fence: a payload that ends
    early or late moves a fence off its place, and the batch returns ``None``. With
    *whole*, the caller vouches that every payload is one value as :func:`pack` wrote it
    (authenticated plaintexts), and the fences are left out.
    """
    if whole:
        try:
            return msgpack.unpackb(  # type: ignore[no-any-return]
                b"".join((_ARRAY32(0xDD, len(payloads)), *payloads)),
                ext_hook=_ext_hook,
                strict_map_key=False,
            )
        except (*_DECODE_ERRORS, msgpack.UnpackException):
            return None
    n = len(payloads)
    if not n:
        return []
    try:
        values = msgpack.unpackb(
            b"".join((_ARRAY32(0xDD, 2 * n), _FENCE.join(payloads), _FENCE)),
            ext_hook=_ext_hook,
            strict_map_key=False,
        )
    except (*_DECODE_ERRORS, msgpack.UnpackException):
        return None
    if values[1::2] != [_FENCE_VALUE] * n:
        return None
    return values[::2]  # type: ignore[no-any-return]


def unpack_slice(payload: bytes, start: int, stop: int) -> list[Any]:
    """Decode items ``start:stop`` of a msgpack array without building the others.

    The items before *start* are skipped, never built, in one C call: they are presented to
    an unpacker as one array under a made-up header, which ``skip()`` passes over whole.
    The window is then decoded by one ``unpack()`` of the same kind, which stops after its
    last item. (One ``skip()`` or ``unpack()`` call per item costs a Python call each,
    about a third of the cost of decoding an item.) Asking for items past the end of
    the array returns the ones that exist.
    """
    try:
        unpacker = msgpack.Unpacker(None, max_buffer_size=len(payload) + 5)
        unpacker.feed(payload)
        size = unpacker.read_array_header()
        stop = min(stop, size)
        if start >= stop:
            return []
        if start == 0 and stop == size:
            items = _unpackb(payload)
        else:
            items = _unpack_window(payload, unpacker.tell(), start, stop)
    except (*_DECODE_ERRORS, msgpack.UnpackException) as exc:
        raise CorruptValueError(f"stored value cannot be decoded: {type(exc).__name__}") from exc
    if type(items) is not list:  # pragma: no cover - the header said array
        raise CorruptValueError("stored value cannot be decoded: not an array")
    return items


def _unpack_window(payload: bytes, pos: int, start: int, stop: int) -> Any:
    """Items ``start:stop`` of the array whose items begin at *pos* (see unpack_slice)."""
    try:
        view = memoryview(payload)
        if start:
            skipper = msgpack.Unpacker(None, max_buffer_size=len(payload) - pos + 5)
            skipper.feed(_ARRAY32(0xDD, start))
            skipper.feed(view[pos:])
            skipper.skip()
            pos += skipper.tell() - 5
        window = msgpack.Unpacker(
            None,
            ext_hook=_ext_hook,
            raw=False,
            strict_map_key=False,
            max_buffer_size=len(payload) - pos + 5,
        )
        window.feed(_ARRAY32(0xDD, stop - start))
        window.feed(view[pos:])
        return window.unpack()
    except msgpack.StackError:  # an item one level short of too deep: decode it all
        return _unpackb(payload)[start:stop]


_CRC_AT_2 = struct.Struct(">I").unpack_from


_HEADER_CRC = struct.Struct(">2sI").pack


def wrap_plain(payload: bytes) -> bytes:
    """Frame a plain msgpack payload as a checked record."""
    return _HEADER_CRC(PLAIN_HEADER, zlib.crc32(payload)) + payload


def unwrap_plain(record: bytes) -> bytes | None:
    """The payload of a plain record whose checksum holds, else ``None``."""
    if record[:2] != PLAIN_HEADER or len(record) < 7:
        return None
    payload = record[6:]
    return payload if zlib.crc32(payload) == _CRC_AT_2(record, 2)[0] else None


def decode_plain(record: bytes) -> Any:
    """Check and decode a plain record (the caller has already seen its header)."""
    payload = record[6:]
    # One slice and an int compare: this is every plain read's path.
    if len(record) < 7 or zlib.crc32(payload) != _CRC_AT_2(record, 2)[0]:
        raise CorruptValueError("stored value is damaged: checksum mismatch")
    try:  # unpack() and _unpackb() inlined: this is every plain read's path
        return msgpack.unpackb(payload, ext_hook=_ext_hook, strict_map_key=False)
    except _DECODE_ERRORS:
        return unpack(payload)  # a value one level too deep, or the error to raise


def decode_plain_many(records: Sequence[bytes]) -> list[Any] | None:
    """``[decode_plain(r) for r in records]`` in a few C loops, or ``None`` if any record is
    not a sound plain record (the caller then decodes them one by one, to raise the right
    error at the right record).

    The check is the same as :func:`decode_plain`'s: each record's first six bytes must be
    exactly the header and checksum :func:`wrap_plain` would write for the rest, which must
    not be empty. The checked payloads are then decoded with one :func:`unpack_many` call.
    About 0.74 µs a small value against 0.99 one by one (measured on 1,000-record pages).
    """
    payloads = [r[6:] for r in records]
    if b"" in payloads or [r[:6] for r in records] != list(
        map(_HEADER_CRC, repeat(PLAIN_HEADER), map(zlib.crc32, payloads))
    ):
        return None
    return unpack_many(payloads)


def is_encrypted(record: bytes) -> bool:
    """True if *record* carries the encrypted header."""
    return record[:2] == ENCRYPTED_HEADER
