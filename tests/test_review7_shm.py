"""Review 7, shm: damaged records in listings and rebuilds; option types.

1. A record of the data segment damaged by one flipped bit (key name, length, expiry,
   or the table slot pointing at it) was trusted by every path that does not decode the
   value by key: ``list(store)`` and ``items()`` listed a key nobody wrote (with another
   key's value) or raised a raw ``UnicodeDecodeError``, and the next rebuild (a multi-key
   write) raised a raw ``IndexError``. Listings now check the record checksum of what
   they hand out (``StoreCorruptError``, as a read by key), a read by key reports a
   damaged record in its key's slot instead of missing it, and a rebuild leaves damaged
   records out (logging it) instead of copying them or failing.
2. ``create="no"`` (a truthy str) created the store that ``create=False`` refuses to
   create; the other options of the shm store now have their types checked too, before
   anything is created.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import pathlib
import struct
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest

import mappingstore
from mappingstore import SharedBytes, SharedMemoryStore
from mappingstore.errors import (
    InvalidOptionError,
    MappingStoreError,
    OptionTypeError,
    StoreCorruptError,
    StoreNotFoundError,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /dev/shm")

SHM = "/dev/shm"
KEYS = {f"k{i}": i for i in range(5)}


def _files(prefix: str) -> list[str]:
    return sorted(
        glob.glob(f"{SHM}/mappingstore.{prefix}*")
        + glob.glob(f"{SHM}/mappingstore-bytes.{prefix}*")
    )


@pytest.fixture
def name() -> Iterator[str]:
    """A unique store name; every segment under it is removed at teardown."""
    prefix = "r7" + uuid.uuid4().hex[:12]
    yield prefix + "-s"
    for path in _files(prefix):
        os.unlink(path)


# -- damaged records ---------------------------------------------------------------------

Patch = Callable[[bytearray, int, int, int], None]  # (segment, record offset, key offset, slot)


def _records(d: bytearray) -> Iterator[tuple[int, int, bytes]]:
    """(record offset, key offset, key) of every record of a data segment (the format of
    docs/backends/shm.md: a 64-byte header, the table, then the records)."""
    heap, end = struct.unpack_from("<QQ", d, 32)
    off = heap
    while off < end:
        _crc, _flags, dl, _exp, nl, kl = struct.unpack_from("<IIQdII", d, off)
        yield off, off + 32 + nl, bytes(d[off + 32 + nl : off + 32 + nl + kl])
        off = (off + 32 + nl + kl + dl + 7) & ~7


def _slot_of(d: bytearray, off: int) -> int:
    """The byte offset of the table slot that points at the record at *off*."""
    cap = struct.unpack_from("<Q", d, 24)[0]
    for i in range(cap):
        v = struct.unpack_from("<Q", d, 64 + 8 * i)[0]
        if v > 1 and (v & 0xFFFFFFFF) << 3 == off:
            return 64 + 8 * i
    raise AssertionError("no slot points at the record")


def _damage(name: str, patch: Patch, victim: bytes = b"k3") -> SharedMemoryStore:
    """Write KEYS, patch the record of *victim* in the data segment, and return a fresh
    instance (no cached locations: every record is read from the segment)."""
    with SharedMemoryStore(name) as store:
        store.clear()
        store.update(KEYS)
    ctl = f"{SHM}/mappingstore.{name}"
    with open(ctl, "rb") as f:
        gen = struct.unpack_from("<Q", f.read(), 16)[0]
    path = f"{ctl}.{gen}"
    with open(path, "rb") as f:
        d = bytearray(f.read())
    off, koff = next((o, ko) for o, ko, k in _records(d) if k == victim)
    patch(d, off, koff, _slot_of(d, off))
    with open(path, "r+b") as f:
        f.write(d)
    return SharedMemoryStore(name)


def _set_byte(at: str, value: int) -> Patch:
    def patch(d: bytearray, off: int, koff: int, slot: int) -> None:
        d[{"key": koff, "length": off + 10, "expiry": off + 16}[at]] = value

    return patch


def _flip(at: str, bit: int) -> Patch:
    def patch(d: bytearray, off: int, koff: int, slot: int) -> None:
        i = {"key": koff, "length": off + 10, "expiry": off + 16}[at]
        d[i] ^= bit

    return patch


def test_a_flipped_key_byte_is_reported_not_listed_under_a_new_name(name: str) -> None:
    with _damage(name, _set_byte("key", ord("c"))) as store:  # 'k3' -> 'c3'
        with pytest.raises(StoreCorruptError):
            list(store)
        with pytest.raises(StoreCorruptError):
            list(store.items())
        with pytest.raises(StoreCorruptError):
            list(store.values())
        # A read by key agrees: the key's slot holds a damaged record.
        with pytest.raises(StoreCorruptError):
            store["k3"]
        with pytest.raises(StoreCorruptError):
            store.get_many(["k0", "k3"])
        assert store.get("c3") is None
        assert store["k0"] == 0
        assert store.get_many(["k0", "k4"]) == {"k0": 0, "k4": 4}
        # Writing the key replaces the damaged record: everything lists again.
        store["k3"] = 33
        assert sorted(store) == sorted(KEYS)
        assert dict(store.items()) == {**KEYS, "k3": 33}


def test_invalid_utf8_in_a_key_is_a_store_error(name: str) -> None:
    with _damage(name, _set_byte("key", 0xEB)) as store:
        with pytest.raises(StoreCorruptError):
            list(store)
        with pytest.raises(StoreCorruptError):
            list(store.items())
        with pytest.raises(StoreCorruptError):
            store["k3"]
        del store["k3"]  # deleting the key removes the damaged record
        assert dict(store.items()) == {k: v for k, v in KEYS.items() if k != "k3"}


def test_a_damaged_expiry_is_not_listed_while_a_read_reports_it(name: str) -> None:
    # inf with one mantissa bit set is a NaN: the record looked live to listings
    with _damage(name, _flip("expiry", 0x01)) as store:
        with pytest.raises(StoreCorruptError):
            store["k3"]
        with pytest.raises(StoreCorruptError):
            list(store.items())
        with pytest.raises(StoreCorruptError):
            list(store)


def test_a_slot_pointing_at_another_record_is_not_listed_twice(name: str) -> None:
    def patch(d: bytearray, off: int, koff: int, slot: int) -> None:
        other = next(o for o, _ko, k in _records(d) if k == b"k1")
        v = struct.unpack_from("<Q", d, slot)[0]
        struct.pack_into("<Q", d, slot, (v >> 32 << 32) | (other >> 3))

    with _damage(name, patch) as store:
        with pytest.raises(StoreCorruptError):
            list(store)  # 'k1' twice before
        assert store.get("k3") is None  # never another key's value
        assert store["k1"] == 1
        store.update({"a": 1, "b": 2})  # the rebuild leaves the damaged slot out
        assert sorted(store.items()) == sorted({**KEYS, "a": 1, "b": 2}.items() - {("k3", 3)})


def test_a_rebuild_leaves_a_damaged_record_out_and_logs_it(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # len(data) grows by 4 MiB: beyond the segment (a raw IndexError in the rebuild before)
    with _damage(name, _flip("length", 0x40)) as store:
        assert store["k0"] == 0
        with pytest.raises(StoreCorruptError):
            store["k3"]
        with caplog.at_level(logging.WARNING, logger="mappingstore"):
            store.update({"a": 1, "b": 2})
        assert "1 damaged record" in caplog.text
        expected = {**{k: v for k, v in KEYS.items() if k != "k3"}, "a": 1, "b": 2}
        assert dict(store.items()) == expected
        assert store.get("k3") is None
        assert len(store) == len(expected)


def test_a_slot_outside_the_segment_no_longer_blocks_every_rebuild(name: str) -> None:
    def patch(d: bytearray, off: int, koff: int, slot: int) -> None:
        v = struct.unpack_from("<Q", d, slot)[0]
        struct.pack_into("<Q", d, slot, (v >> 32 << 32) | 0xFFFFFFF0)

    with _damage(name, patch) as store:
        with pytest.raises(StoreCorruptError):
            store["k3"]
        with pytest.raises(StoreCorruptError):
            list(store)
        store.update({"a": 1, "b": 2})  # raised StoreCorruptError: no rebuild was possible
        assert sorted(store) == ["a", "b", "k0", "k1", "k2", "k4"]
    with _damage(name, patch) as store:
        store.clear()
        assert list(store) == []


def test_a_damaged_namespace_name_is_not_listed(name: str) -> None:
    def patch(d: bytearray, off: int, koff: int, slot: int) -> None:
        d[off + 32] ^= 0x01  # first byte of the namespace name

    with _damage(name, patch) as store:
        with pytest.raises(StoreCorruptError):
            store.namespaces()
        with pytest.raises(StoreCorruptError):
            store["k3"]


@pytest.mark.parametrize("bit", [0x01, 0x10, 0x80])
def test_any_flipped_bit_of_a_record_or_its_slot_gives_no_raw_error_and_no_wrong_item(
    name: str, bit: int
) -> None:
    """Each byte of k3's record and of its slot, one flip at a time: listings, reads and
    a rebuild raise mappingstore errors only, and whatever is listed reads back the same
    by key and was written under that key."""
    with _damage(name, lambda d, off, koff, slot: None) as store:
        path = store.files()[-1]
    with open(path, "rb") as f:
        d = bytes(f.read())
    off = next(o for o, _ko, k in _records(bytearray(d)) if k == b"k3")
    _crc, _flags, dl, _exp, nl, kl = struct.unpack_from("<IIQdII", d, off)
    size = 32 + nl + kl + dl  # the whole record
    slot = _slot_of(bytearray(d), off)
    targets = [*range(off, off + size), *range(slot, slot + 8)]
    for i in targets:

        def patch(seg: bytearray, o: int, ko: int, s: int, i: int = i) -> None:
            seg[i] ^= bit

        with _damage(name, patch) as store:
            try:
                items = dict(store.items())
            except MappingStoreError:
                items = None
            if items is not None:
                for key, value in items.items():
                    assert KEYS.get(key) == value, (i, key, value)
                    assert store[key] == value, (i, key)
            for op in (
                lambda: list(store),
                lambda: len(store),
                lambda: store.namespaces(),
                lambda: store.get_many(list(KEYS)),
                lambda: [store.get(k) for k in KEYS],
            ):
                try:
                    op()
                except MappingStoreError:
                    pass
            store.update({"a": 1, "b": 2})  # a rebuild: no error at all
            after = dict(store.items())
            assert after.items() <= {**KEYS, "a": 1, "b": 2}.items(), (i, after)
            assert {k: v for k, v in after.items() if k != "k3"} == {
                **{k: v for k, v in KEYS.items() if k != "k3"},
                "a": 1,
                "b": 2,
            }, i


# -- option types ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"create": "no"}, OptionTypeError),
        ({"create": "false"}, OptionTypeError),
        ({"create": None}, OptionTypeError),
        ({"delete_on_close": "yes"}, OptionTypeError),
        ({"max_size": "1000000"}, OptionTypeError),
        ({"max_size": 1e6}, OptionTypeError),
        ({"max_size": 10}, InvalidOptionError),
        ({"lock_timeout": "5"}, OptionTypeError),
        ({"lock_timeout": -1}, InvalidOptionError),
        ({"lock_timeout": math.nan}, InvalidOptionError),
        ({"lock_timeout": -(10**400)}, InvalidOptionError),
    ],
)
def test_bad_option_types_create_nothing(
    name: str, options: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        SharedMemoryStore(name, **options)
    with pytest.raises(error):
        mappingstore.open(f"shm://{name}", **options)
    assert _files(name) == []


def test_create_false_as_0_and_from_a_url(name: str) -> None:
    with pytest.raises(StoreNotFoundError):
        SharedMemoryStore(name, create=0)
    with pytest.raises(StoreNotFoundError):
        mappingstore.open(f"shm://{name}?create=no")
    assert _files(name) == []
    with SharedMemoryStore(name, create=1, delete_on_close=1) as store:
        store["a"] = 1
    assert _files(name) == []


@pytest.mark.parametrize("timeout", [math.inf, 1e12, 10**400])
def test_an_endless_lock_timeout_waits(name: str, timeout: float) -> None:
    # raw OverflowError at the first write before (the thread lock cannot time that long)
    with SharedMemoryStore(name, lock_timeout=timeout, delete_on_close=True) as store:
        store["a"] = 1
        store.modify("a", lambda v: v + 1)
        assert store["a"] == 2


def test_shared_bytes_options_are_checked_before_creating(name: str) -> None:
    with pytest.raises(OptionTypeError):
        SharedBytes(name, create="no")
    with pytest.raises(OptionTypeError):
        SharedBytes(name, lock_timeout="5")
    for bad in ({"delete_on_close": "no"}, {"readonly": "no"}, {"size": "10"}, {"max_size": 1.5}):
        with pytest.raises(OptionTypeError):
            SharedBytes(name, **bad)  # type: ignore[arg-type]
    assert _files(name) == []
    b = SharedBytes(name, lock_timeout=math.inf)
    try:
        b.set(b"x")
        assert b.get() == b"x"
    finally:
        b.unlink()


# -- SharedBytes input types and unlink after close (INI/shm review) -----------------------


def test_shared_bytes_set_takes_only_bytes(name: str) -> None:
    from mappingstore.errors import SerializationError

    b = SharedBytes(name)
    try:
        b.set(b"keep")
        for bad in (5, [104, 105], "text", None):
            with pytest.raises(SerializationError):
                b.set(bad)  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            b.update(lambda old: "text")  # type: ignore[arg-type,return-value]
        assert b.get() == b"keep"
        b.set(bytearray(b"ab"))
        assert b.update(lambda old: memoryview(old + b"c")) == b"abc"
    finally:
        b.unlink()


def test_shared_bytes_unlink_after_close_raises(name: str) -> None:
    from mappingstore.errors import StoreClosedError

    b = SharedBytes(name)
    b.close()
    with pytest.raises(StoreClosedError):
        b.unlink()
    SharedBytes(name).unlink()  # an open instance removes it
    assert _files(name) == []


def test_ini_out_of_range_number_reads_as_text(tmp_path: pathlib.Path) -> None:
    import mappingstore

    path = tmp_path / "h.ini"
    path.write_text("big = 1e400\nneg = -1e400\nok = 1.5e300\n")
    with mappingstore.open(f"ini:///{path}") as store:
        assert store["big"] == "1e400" and store["neg"] == "-1e400"
        assert store["ok"] == 1.5e300
