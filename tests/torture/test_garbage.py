"""Issue 8, test 6: garbage planted in the backing storage never becomes a value.

Random byte strings and mutations of real records (bit flips, every truncation length,
huge msgpack length prefixes, 100,000-deep nesting, hostile extension payloads, pickles)
are written straight into each persistent backend's storage, bypassing the store, then
read through the public API (``store[key]``, ``get``, ``get_many``, ``items()``,
``to_dict``), for a plain and for an encrypted store.

What must hold, per backend and mode:

* every read of every input raises :class:`CorruptValueError` (not a record, checksum
  mismatch, undecodable payload) or :class:`IntegrityError` (an encrypted record that
  fails authentication); no value is ever returned, and no other exception escapes
  (a ``RecursionError`` or a driver error would be a defect);
* the interpreter never crashes: the reads run in a forked child whose exit code is
  checked (a segfault in a C decoder would show as a signal);
* memory stays bounded: the child's peak RSS grows by less than 512 MiB, although
  inputs claim ``2**32 - 1`` items or bytes;
* a pickle planted in storage, raw or framed as a valid record, never executes.

Inputs framed with a valid header and CRC-32 (or sealed with the store's real key) get
past the checksum (or the AEAD tag) and reach the msgpack decoder and the extension-type
hooks themselves.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import pickle
import random
import resource
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mappingstore import Store
from mappingstore._crypto import aad_for
from mappingstore.errors import CorruptValueError, IntegrityError, PasswordRequiredError
from tests.torture.harness import FORK, PERSISTENT, Target, reps
from tests.torture.rawio import NO_FSYNC, RawIO

PASSWORD = "garbage-test password"
NS = "default"
VICTIM = "victim"
PLAIN = b"\x01\x00"
SEALED = b"\x01\x01"
#: The child's peak RSS may grow by at most this much while it reads every input.
RSS_BOUND_KIB = 512 * 1024
BIG = 0xFFFFFFFF  # 2**32 - 1

#: The public reads every planted input goes through.
READS: list[tuple[str, Callable[[Store], Any]]] = [
    ("store[key]", lambda s: s[VICTIM]),
    ("get", lambda s: s.get(VICTIM)),
    ("get_many", lambda s: s.get_many([VICTIM])),
    ("items", lambda s: list(s.items())),
    ("to_dict", lambda s: s.to_dict()),
]

#: Real values of every supported type: their records are the base of the mutations.
REAL_VALUES: list[Any] = [
    {"name": "alice", "balance": 1234, "tags": ["a", "b"], "n": {"x": [1, 2.5, None, True]}},
    [1, -2, 3.25, "x" * 50, b"\x00\xff" * 20],
    (1, (2, (3, (4, "deep")))),
    {1, 2, 3, "s"},
    frozenset({"a", 1}),
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.date(2024, 1, 1),
    dt.time(8, 15, tzinfo=dt.timezone.utc),
    dt.timedelta(days=3, seconds=5),
    Decimal("3.14159265358979323846"),
    uuid.UUID(int=12345),
    complex(1.5, -2),
    2**200,
    "unicode \u2603 \u2028 \x00",
    b"\x00" * 300,
]

#: One long record (about 400 bytes) whose every truncation length is an input.
LONG_VALUE: dict[str, Any] = {
    "text": "lorem ipsum dolor sit amet " * 4,
    "list": list(range(40)),
    "tuple": (1.5, "two", b"three", None),
    "set": {10, 20, 30},
    "when": dt.datetime(2025, 1, 2, 3, 4, 5),
    "money": Decimal("-1234.5678"),
    "id": uuid.UUID(int=2**100),
    "big": -(2**90),
    "nested": {"a": {"b": {"c": [True, False, {"d": 1e300}]}}},
}


# -- building inputs ------------------------------------------------------------------------


def _crc_wrap(payload: bytes) -> bytes:
    """A plain record with a valid header and CRC: it reaches the decoder."""
    return PLAIN + zlib.crc32(payload).to_bytes(4, "big") + payload


def _ext_head(code: int, n: int) -> bytes:
    """The header of an extension value of type *code* (-128..127) with *n* data bytes."""
    c = bytes((code & 0xFF,))
    if n in (1, 2, 4, 8, 16):
        return bytes((0xD4 + (1, 2, 4, 8, 16).index(n),)) + c
    if n < 256:
        return bytes((0xC7, n)) + c
    if n < 65536:
        return b"\xc8" + n.to_bytes(2, "big") + c
    return b"\xc9" + n.to_bytes(4, "big") + c


def _ext(code: int, data: bytes) -> bytes:
    return _ext_head(code, len(data)) + data


def _p(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _nested_ext(code: int, depth: int) -> bytes:
    """``depth`` extension values of type *code*, each an array holding the next one."""
    size = 1  # the innermost nil
    heads: list[bytes] = []
    for _ in range(depth):
        head = _ext_head(code, 1 + size) + b"\x91"  # an array of one: the next level
        heads.append(head)
        size += len(head)
    return b"".join(reversed(heads)) + b"\xc0"


def _huge_prefix(payload: bytes) -> bytes:
    """*payload* (a real value's msgpack) with its first header claiming 2**32 - 1."""
    first = payload[0]
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        code, skip = 0xDF, (1 if first <= 0x8F else 3 if first == 0xDE else 5)
    elif 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        code, skip = 0xDD, (1 if first <= 0x9F else 3 if first == 0xDC else 5)
    elif 0xA0 <= first <= 0xBF or first in (0xD9, 0xDA, 0xDB):
        code, skip = 0xDB, (1 if first <= 0xBF else {0xD9: 2, 0xDA: 3, 0xDB: 5}[first])
    elif first in (0xC4, 0xC5, 0xC6):
        code, skip = 0xC6, {0xC4: 2, 0xC5: 3, 0xC6: 5}[first]
    else:
        raise ValueError(f"no length prefix to patch in {payload[:1]!r}")
    return bytes((code,)) + BIG.to_bytes(4, "big") + payload[skip:]


@functools.cache
def crafted_payloads() -> list[tuple[str, bytes]]:
    """msgpack payloads that are not valid records: each one must be rejected."""
    big4 = BIG.to_bytes(4, "big")
    out: list[tuple[str, bytes]] = []
    # Huge length prefixes (the data is far shorter than claimed).
    for name, head in (("str32", b"\xdb"), ("bin32", b"\xc6"), ("array32", b"\xdd")):
        for n in (BIG, 2**31, 10**9):
            out.append((f"{name} claiming {n}", head + n.to_bytes(4, "big") + b"abc"))
    out += [
        ("map32 claiming 2**32-1", b"\xdf" + big4 + b"\xc0\xc0"),
        ("ext32 claiming 2**32-1", b"\xc9" + big4 + b"\x01" + b"x" * 10),
        ("str16 claiming 65535", b"\xda\xff\xff" + b"a" * 10),
        ("bin16 claiming 65535", b"\xc5\xff\xff" + b"a" * 10),
        ("array16 claiming 65535", b"\xdc\xff\xff" + b"\xc0" * 3),
        ("map16 claiming 65535", b"\xde\xff\xff" + b"\xc0" * 4),
        ("str8 claiming 255", b"\xd9\xff" + b"a"),
        ("ext8 claiming 255", b"\xc7\xff\x01" + b"a"),
        ("array32 inside an array", b"\x92\x01\xdd" + big4),
        ("str32 as a map value", b"\x81\xa1k\xdb" + big4 + b"x"),
        ("array32 in a tuple payload", _ext(1, b"\xdd" + big4)),
        ("bin32 in a set payload", _ext(2, b"\x91\xc6" + big4)),
        ("array32 in a datetime payload", _ext(5, b"\xdd" + big4)),
    ]
    for value in ({"a": 1, "b": [1, 2]}, [1, 2, 3], "some text", b"some bytes"):
        out.append((f"real {type(value).__name__} claiming 2**32-1", _huge_prefix(_p(value))))
    # 100,000-deep nesting.
    out += [
        ("100,000 nested arrays", b"\x91" * 100_000 + b"\xc0"),
        ("100,000 nested maps", b"\x81\xc0" * 100_000 + b"\xc0"),
        ("100,000 nested array32", b"\xdd\x00\x00\x00\x01" * 100_000 + b"\xc0"),
        ("100,000 nested tuples (ext in ext)", _nested_ext(1, 100_000)),
        ("1,000 nested frozensets", _nested_ext(3, 1_000)),
        ("33 nested tuples (one past the cap)", _nested_ext(1, 33)),
        ("tuple of 100,000 nested arrays", _ext(1, b"\x91" * 100_000 + b"\xc0")),
    ]
    # Extension types: unknown codes and malformed payloads of the known ones.
    for code in (0, 4, 13, 42, 127, -2, -128):
        out.append((f"unknown extension type {code}", _ext(code, b"x")))
    out += [
        ("timestamp ext of 3 bytes", _ext(-1, b"\x00" * 3)),
        ("timestamp ext of 5 bytes", _ext(-1, b"\x00" * 5)),
        ("timestamp ext, nanoseconds >= 10**9", _ext(-1, b"\xff" * 8)),
        ("tuple payload is a str", _ext(1, _p("abc"))),
        ("tuple payload is bytes", _ext(1, _p(b"ab"))),
        ("tuple payload is a map", _ext(1, _p({"a": 1}))),
        ("tuple payload is an int", _ext(1, _p(5))),
        ("tuple payload is nil", _ext(1, _p(None))),
        ("tuple payload has trailing data", _ext(1, _p([1]) + b"\x01")),
        ("set of lists", _ext(2, _p([[1], [2]]))),
        ("set payload is a map", _ext(2, _p({"a": 1}))),
        ("set payload is a str", _ext(2, _p("abc"))),
        ("frozenset of maps", _ext(3, _p([{"a": 1}]))),
        ("datetime with 4 items", _ext(5, _p(["2024-01-01T00:00:00", None, None, 0]))),
        ("datetime with 6 items", _ext(5, _p(["2024-01-01T00:00:00", None, None, 0, None, 1]))),
        ("datetime with an int as text", _ext(5, _p([20240101, None, None, 0, None]))),
        ("datetime with bad text", _ext(5, _p(["2024-13-45T99:00", None, None, 0, None]))),
        ("datetime with fold 2", _ext(5, _p(["2024-01-01T00:00:00", 0, None, 2, None]))),
        (
            "datetime offset of 300 hours",
            _ext(5, _p(["2024-01-01T00:00", 300 * 3600 * 10**6, None, 0, None])),
        ),
        (
            "datetime with an int zone name",
            _ext(5, _p(["2024-01-01T00:00", 3600 * 10**6, None, 0, 7])),
        ),
        ("datetime payload is a str", _ext(5, _p("abcde"))),
        ("date payload is not UTF-8", _ext(6, b"\xff\xfe")),
        ("date of February 30", _ext(6, b"2024-02-30")),
        ("empty date", _ext(6, b"")),
        ("time with 2 items", _ext(7, _p(["08:15", None]))),
        ("time at 25:00", _ext(7, _p(["25:00", None, 0]))),
        ("time payload is bytes", _ext(7, _p(b"abc"))),
        ("timedelta with 2 items", _ext(8, _p([1, 2]))),
        ("timedelta of 10**10 days", _ext(8, _p([10**10, 0, 0]))),
        ("timedelta of strings", _ext(8, _p(["1", "2", "3"]))),
        ("timedelta payload is a str", _ext(8, _p("123"))),
        ("decimal 'abc'", _ext(9, b"abc")),
        ("decimal '1.2.3'", _ext(9, b"1.2.3")),
        ("decimal not UTF-8", _ext(9, b"\xff")),
        ("uuid of 15 bytes", _ext(10, b"u" * 15)),
        ("uuid of 17 bytes", _ext(10, b"u" * 17)),
        ("empty uuid", _ext(10, b"")),
        ("complex of strings", _ext(11, _p(["a", "b"]))),
        ("complex with 1 item", _ext(11, _p([1.0]))),
        ("complex with 3 items", _ext(11, _p([1.0, 2.0, 3.0]))),
        ("complex payload is 2 bytes", _ext(11, _p(b"\x01\x02"))),
        ("complex payload is a 2-char str", _ext(11, _p("12"))),
        ("complex payload is a map", _ext(11, _p({"a": 1, "b": 2}))),
    ]
    # Plain msgpack that no record holds.
    out += [
        ("map with a list key", b"\x81\x91\x01\x02"),
        ("map with a map key", b"\x81\x81\x01\x02\x03"),
        ("str that is not UTF-8", b"\xa2\xff\xfe"),
        ("reserved byte 0xc1", b"\xc1"),
        ("array one item short", b"\x92\x01"),
        ("two values", b"\x01\x02"),
        ("empty payload", b""),
    ]
    return out


class _Plant:
    """Unpickling this runs ``os.mkdir(path)``: the marker that a pickle executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def pickle_payloads(marker: Path) -> list[tuple[str, bytes]]:
    """Pickles (every protocol) that would create *marker* if anything unpickled them."""
    return [
        (f"pickle protocol {proto}", pickle.dumps(_Plant(str(marker)), protocol=proto))
        for proto in range(pickle.HIGHEST_PROTOCOL + 1)
    ]


@dataclass
class Inputs:
    """Labelled inputs of one run, by family."""

    random: list[tuple[str, bytes]] = field(default_factory=list)
    mutations: list[tuple[str, bytes]] = field(default_factory=list)
    pickles: list[tuple[str, bytes]] = field(default_factory=list)
    #: How many mutations of each kind (crafted payloads, truncations, bit flips).
    kinds: dict[str, int] = field(default_factory=dict)

    def all(self) -> list[tuple[str, bytes]]:
        return self.random + self.mutations + self.pickles


def _is_msgpack(payload: bytes) -> bool:
    try:
        msgpack.unpackb(payload, ext_hook=msgpack.ExtType, raw=False, strict_map_key=False)
    except Exception:
        return False
    return True


def build_inputs(
    store: Store, raw: RawIO, tier: str, encrypted: bool, marker: Path, rng: random.Random
) -> Inputs:
    """The inputs of one backend and mode; real records are written through *store*."""

    def frame(payload: bytes, i: int) -> bytes:
        # Encrypted stores also get payloads sealed with their real key and bound to the
        # victim's place: past the AEAD tag, straight into the decoder.
        if encrypted and i % 2:
            cipher = store._cipher
            assert cipher is not None
            aad = SEALED + aad_for(store._store_id, NS, VICTIM)
            return SEALED + cipher.seal(payload, aad)
        return _crc_wrap(payload)

    def real_record(value: Any) -> bytes:
        store[VICTIM] = value
        return raw.get(NS, VICTIM)

    n_random = reps(tier, 100, 1000)
    n_mutations = 1000  # long tier; the fast tier takes every crafted input and a sample
    inputs = Inputs()

    # Random byte strings: bare, behind each header, and CRC-framed (or sealed) payloads
    # that are not msgpack at all.
    for i in range(n_random):
        size = rng.choice((0, 1, 2, 5, 6, 7, 16, 64, 200, 1000))
        if i % 250 == 7:
            size = 256 * 1024
        body = rng.randbytes(size)
        kind = i % 4
        if kind == 0:
            inputs.random.append((f"random {size} bytes", body))
        elif kind == 1:
            inputs.random.append((f"plain header + random {size}", PLAIN + body))
        elif kind == 2:
            inputs.random.append((f"encrypted header + random {size}", SEALED + body))
        else:
            while _is_msgpack(body):
                body = rng.randbytes(max(size, 1))
            inputs.random.append((f"framed random payload {len(body)}", frame(body, i // 4)))

    # Mutations of real records.
    crafted = [(label, frame(p, i)) for i, (label, p) in enumerate(crafted_payloads())]
    long_record = real_record(LONG_VALUE)
    if tier == "long":
        cuts = list(range(len(long_record)))
    else:  # a subset: the header, the checksum or nonce, and a spread of the rest
        cuts = sorted(
            {0, 1, 2, 5, 6, 7, 25, 26, len(long_record) - 1} | set(range(0, len(long_record), 40))
        )
    truncations = [(f"truncated to {n} of {len(long_record)}", long_record[:n]) for n in cuts]
    records = [real_record(v) for v in REAL_VALUES] + [long_record]
    flips: list[tuple[str, bytes]] = []
    n_flips = reps(tier, 20, n_mutations - len(crafted) - len(truncations))
    while len(flips) < n_flips:
        record = rng.choice(records)
        bad = bytearray(record)
        nbits = 1 if len(flips) % 2 == 0 else rng.randint(2, 8)
        for _ in range(nbits):
            bit = rng.randrange(len(bad) * 8)
            bad[bit // 8] ^= 1 << (bit % 8)
        if bytes(bad) == record:
            continue  # two flips of the same bit
        flips.append((f"{nbits} bit(s) flipped in a {len(record)}-byte record", bytes(bad)))
    inputs.mutations = crafted + truncations + flips
    inputs.kinds = {"crafted": len(crafted), "truncations": len(truncations), "flips": len(flips)}

    pickles = pickle_payloads(marker)
    inputs.pickles = (
        pickles
        + [(f"{label}, framed", _crc_wrap(p)) for label, p in pickles]
        + [(f"{label}, behind the encrypted header", SEALED + p) for label, p in pickles]
        + ([(f"{label}, sealed", frame(p, 1)) for label, p in pickles] if encrypted else [])
    )
    return inputs


# -- the child ------------------------------------------------------------------------------


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _decode_loop(
    target: Target, encrypted: bool, inputs: list[tuple[str, bytes]], conn: Any
) -> None:
    """Child: plant each input at the victim key, read it through every public read."""
    start_rss = _maxrss_kib()
    options: dict[str, Any] = {"password": PASSWORD} if encrypted else {}
    options.update(NO_FSYNC.get(target.backend, {}))
    tallies: Counter[str] = Counter()
    failures: list[tuple[str, str, str]] = []
    password_required: list[tuple[str, str]] = []
    with target.open(**options) as store, RawIO(target) as raw:
        for label, data in inputs:
            raw.put(NS, VICTIM, data)
            for api, read in READS:
                try:
                    value = read(store)
                except (CorruptValueError, IntegrityError) as exc:
                    tallies[type(exc).__name__] += 1
                    continue
                except PasswordRequiredError as exc:  # the known defect (see the test)
                    tallies[type(exc).__name__] += 1
                    password_required.append((label, api))
                    continue
                except Exception as exc:  # any other class is a defect: report it
                    tallies["other error"] += 1
                    outcome = f"raised {type(exc).__name__}: {exc}"[:200]
                else:
                    tallies["value"] += 1
                    outcome = f"returned {value!r}"[:200]
                failures.append((label, api, outcome))
    conn.send(
        {
            "tallies": dict(tallies),
            "failures": failures,
            "password_required": password_required,
            "start_rss": start_rss,
            "peak_rss": _maxrss_kib(),
        }
    )
    conn.close()


def run_child(
    target: Target, encrypted: bool, inputs: list[tuple[str, bytes]]
) -> tuple[int | None, Any]:
    """Run the decode loop in a forked child: (exit code, its report or None)."""
    recv, send = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_decode_loop, args=(target, encrypted, inputs, send), daemon=True)
    proc.start()
    send.close()
    report = None
    try:
        if recv.poll(1200):  # a hang guard, not a timing check
            report = recv.recv()
    except EOFError:
        pass  # the child died before reporting; its exit code tells how
    proc.join(60)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        return None, report
    return proc.exitcode, report


# -- the test -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["plain", "encrypted"])
@pytest.mark.parametrize("backend", PERSISTENT)
def test_planted_garbage_never_becomes_a_value(
    backend: str, mode: str, tier: str, target: Target, tmp_path: Path, figure: Any
) -> None:
    """Every planted input is rejected by every read with CorruptValueError or
    IntegrityError: no value returned, no other exception, no crash, bounded memory, no
    pickle executed."""
    encrypted = mode == "encrypted"
    marker = tmp_path / "pickle-executed"
    # The pickles are live: unpickling one really creates the marker (so the check below
    # can fail), which is then removed.
    pickle.loads(pickle_payloads(marker)[0][1])  # noqa: S301
    assert marker.exists()
    marker.rmdir()

    rng = random.Random(f"{backend}/{mode}/{tier}")
    options: dict[str, Any] = {"password": PASSWORD} if encrypted else {}
    options.update(NO_FSYNC.get(backend, {}))  # what is read back matters, not power loss
    with target.open(**options) as store, RawIO(target) as raw:
        inputs = build_inputs(store, raw, tier, encrypted, marker, rng)
        assert list(store) == [VICTIM]  # items() and to_dict() meet only the victim
    exitcode, report = run_child(target, encrypted, inputs.all())

    n_inputs = len(inputs.all())
    figure("random byte strings", len(inputs.random), backend=backend, mode=mode)
    figure(
        "mutated real records", len(inputs.mutations), backend=backend, mode=mode, **inputs.kinds
    )
    figure("planted pickles", len(inputs.pickles), backend=backend, mode=mode)
    figure(
        "interpreter crashes",
        0 if exitcode == 0 else 1,
        backend=backend,
        mode=mode,
        exitcode=exitcode,
    )
    assert exitcode == 0, f"the decoding child died: exit code {exitcode}"
    assert report is not None
    tallies = report["tallies"]
    rejected = tallies.get("CorruptValueError", 0) + tallies.get("IntegrityError", 0)
    growth_mib = (report["peak_rss"] - report["start_rss"]) / 1024
    figure(
        "reads rejected with CorruptValueError/IntegrityError",
        rejected,
        backend=backend,
        mode=mode,
        reads=n_inputs * len(READS),
        corrupt=tallies.get("CorruptValueError", 0),
        integrity=tallies.get("IntegrityError", 0),
    )
    figure("values returned from garbage", tallies.get("value", 0), backend=backend, mode=mode)
    figure("other exceptions", tallies.get("other error", 0), backend=backend, mode=mode)
    figure(
        "reads raising PasswordRequiredError",
        tallies.get("PasswordRequiredError", 0),
        backend=backend,
        mode=mode,
    )
    figure(
        "peak RSS growth of the decoding child (MiB)",
        round(growth_mib, 1),
        backend=backend,
        mode=mode,
        peak_mib=round(report["peak_rss"] / 1024, 1),
    )
    figure("executed pickles", int(marker.exists()), backend=backend, mode=mode)

    assert not marker.exists(), "a planted pickle was executed"
    assert report["failures"] == [], (
        f"{len(report['failures'])} reads did not raise CorruptValueError/IntegrityError; "
        f"first ones: {report['failures'][:10]}"
    )
    assert report["peak_rss"] - report["start_rss"] < RSS_BOUND_KIB
    # A store without a key slot has nothing encrypted: a record claiming to be encrypted
    # is damage, not a reason to ask for a password that does not exist.
    assert report["password_required"] == [], (
        f"{len(report['password_required'])} reads raised PasswordRequiredError: "
        f"{report['password_required'][:5]}"
    )
    assert rejected == n_inputs * len(READS)
