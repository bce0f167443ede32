"""Issue 8, test 7: attacks on encrypted stores through their backing storage.

An attacker who can write the storage (but does not know the password) copies
ciphertexts between keys, namespaces and stores that share one password, and flips bits
in them; every such record must be rejected (``IntegrityError``; ``CorruptValueError``
when the flip hits the 2-byte record header) and no value may ever come back. Wrong
passwords are rejected when the store is opened (``WrongPasswordError``); two processes
sealing values with one data key never repeat a nonce; and two stores created with the
same password get different salts (so one password never yields one key twice).

The swaps and flips are written straight into each persistent backend's storage
(``tests/torture/rawio.py``) and read back through the public API.
"""

from __future__ import annotations

import math
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from mappingstore import Store
from mappingstore._crypto import KeySlot, unwrap
from mappingstore.errors import CorruptValueError, IntegrityError, WrongPasswordError
from tests.torture.harness import FORK, PERSISTENT, Target, make_target, reps
from tests.torture.rawio import META_NS, NO_FSYNC, RawIO

PASSWORD = "correct horse battery staple"
NONCE = slice(2, 26)  # an encrypted record: header (2) | nonce (24) | ciphertext | tag (16)


def _value(tag: str, i: int) -> dict[str, Any]:
    return {"owner": f"{tag}{i}", "balance": i * 100, "note": "x" * (i % 7)}


def _stride(nbits: int) -> int:
    """A step coprime with *nbits*: ``i * step % nbits`` visits every bit once per cycle."""
    step = 37
    while math.gcd(step, nbits) != 1:
        step += 2
    return step


def _read(store: Store, key: str) -> tuple[str, Any]:
    """("value", v) or ("<error class>", None) for ``store[key]``."""
    try:
        return "value", store[key]
    except (IntegrityError, CorruptValueError) as exc:
        return type(exc).__name__, None
    except Exception as exc:  # any other class is a defect: reported by the caller
        return f"other: {type(exc).__name__}: {exc}", None


def _read_get(store: Store, key: str) -> tuple[str, Any]:
    try:
        return "value", store.get(key, "<missing>")
    except (IntegrityError, CorruptValueError) as exc:
        return type(exc).__name__, None
    except Exception as exc:
        return f"other: {type(exc).__name__}: {exc}", None


@pytest.fixture
def second_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """Another private location on the same backend: a second store."""
    made = make_target(request.getfixturevalue("backend"), tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.mark.parametrize("backend", PERSISTENT)
def test_moved_and_flipped_ciphertexts_are_rejected(
    backend: str, tier: str, target: Target, second_target: Target, figure: Any
) -> None:
    """Two stores created with one password have different salts (read from the key slot
    in the storage; each slot's salt is the one that unlocks its store). Ciphertexts
    copied to another key, another namespace (including names whose concatenations
    collide) or the other store, and records with one flipped bit, are all rejected by
    ``store[key]`` and ``get`` (and make ``get_many`` and ``items()`` raise); untouched
    records still read back, so the reads do work. No stored nonce repeats."""
    n = reps(tier, 30, 334)  # per kind of move: 3 kinds -> 1,002 moves in the long tier
    m = reps(tier, 100, 1000)  # bit flips
    # No fsync per file: this test is about what is read back, not about power loss.
    fast = NO_FSYNC.get(backend, {})
    a1 = target.open(password=PASSWORD, namespace="n1", **fast)
    a2 = target.open(password=PASSWORD, namespace="n2", **fast)
    a3 = target.open(password=PASSWORD, namespace="n3", **fast)
    b1 = second_target.open(password=PASSWORD, namespace="n1", **fast)
    # Namespace/key pairs whose concatenations are equal: only an injective AAD tells them
    # apart.
    confusable = [("a", "bc", "ab", "c"), ("ab", "c", "a", "bc"), ("x1", "2y", "x12", "y")]
    handles: dict[tuple[str, str], Store] = {("A", "n1"): a1, ("A", "n2"): a2, ("A", "n3"): a3}
    handles[("B", "n1")] = b1
    for src_ns, _, dst_ns, _ in confusable:
        for ns in (src_ns, dst_ns):
            if ("A", ns) not in handles:
                handles[("A", ns)] = target.open(password=PASSWORD, namespace=ns, **fast)

    keys = [f"k{i}" for i in range(n)]
    flips = [f"f{i}" for i in range(m)]
    controls = [f"ctl{i}" for i in range(5)]
    for (who, ns), store in handles.items():
        batch: dict[str, Any] = {k: _value(f"{who}/{ns}/", i) for i, k in enumerate(keys)}
        batch.update({k: _value(f"{who}/{ns}/ctl", i) for i, k in enumerate(controls)})
        if ns == "n3":
            batch.update({k: _value("flip", i) for i, k in enumerate(flips)})
        for src_ns, src_key, dst_ns, dst_key in confusable:
            if ns in (src_ns, dst_ns):
                batch.update({src_key: "secret " + src_key, dst_key: "secret " + dst_key})
        store.update(batch)

    raw_a, raw_b = RawIO(target), RawIO(second_target)
    try:
        slots = []
        for raw in (raw_a, raw_b):
            slot = KeySlot.from_dict(msgpack.unpackb(raw.get(META_NS, "crypto")))
            store_id = raw.get(META_NS, "id")
            unwrap(slot, store_id, password=PASSWORD, raw_key=None)  # the salt that unlocks
            slots.append((slot, store_id))
        originals: dict[tuple[str, str, str], bytes] = {}
        for who, raw, places in (
            ("A", raw_a, [(ns, k) for (w, ns), s in handles.items() if w == "A" for k in s]),
            ("B", raw_b, [("n1", k) for k in b1]),
        ):
            for (ns, key), rec in zip(places, raw.get_many(places), strict=True):
                originals[(who, ns, key)] = rec
        assert all(rec[:2] == b"\x01\x01" for rec in originals.values())
        nonces = Counter(rec[NONCE] for rec in originals.values())

        # (kind, store, namespace, key) <- record
        trials: list[tuple[str, str, str, str, bytes]] = []
        for i, key in enumerate(keys):
            other = keys[(i + 1) % n]
            trials.append(("key", "A", "n1", key, originals[("A", "n1", other)]))
            trials.append(("namespace", "A", "n2", key, originals[("A", "n1", key)]))
            trials.append(("store", "B", "n1", key, originals[("A", "n1", key)]))
        for src_ns, src_key, dst_ns, dst_key in confusable:
            trials.append(("namespace", "A", dst_ns, dst_key, originals[("A", src_ns, src_key)]))
        flip_bits: dict[str, int] = {}
        for i, key in enumerate(flips):
            flipped = bytearray(originals[("A", "n3", key)])
            nbits = len(flipped) * 8
            bit = i * _stride(nbits) % nbits
            flipped[bit // 8] ^= 1 << (bit % 8)
            flip_bits[key] = bit
            trials.append(("flip", "A", "n3", key, bytes(flipped)))

        raw_a.put_many([(ns, k, rec) for _, who, ns, k, rec in trials if who == "A"])
        raw_b.put_many([(ns, k, rec) for _, who, ns, k, rec in trials if who == "B"])
    finally:
        raw_a.close()
        raw_b.close()

    outcomes: Counter[tuple[str, str]] = Counter()
    wrong: list[tuple[str, str, str, str]] = []
    for kind, who, ns, key, _ in trials:
        store = handles[(who, ns)]
        expected = "IntegrityError"
        if kind == "flip" and flip_bits[key] < 16:
            expected = "CorruptValueError"  # the header: no longer an encrypted record
        for outcome, _value_read in (_read(store, key), _read_get(store, key)):
            outcomes[(kind, outcome)] += 1
            if outcome != expected:
                wrong.append((kind, f"{who}/{ns}/{key}", expected, outcome))
    bulk_rejected = 0
    tampered: dict[tuple[str, str], list[str]] = {}
    for _, who, ns, key, _ in trials:
        tampered.setdefault((who, ns), []).append(key)
    for place, tampered_keys in tampered.items():
        with pytest.raises((IntegrityError, CorruptValueError)):
            handles[place].get_many(tampered_keys)
        with pytest.raises((IntegrityError, CorruptValueError)):
            list(handles[place].items())
        bulk_rejected += 2
    for (who, ns), store in handles.items():
        for i, key in enumerate(controls):
            assert store[key] == _value(f"{who}/{ns}/ctl", i)

    moves = sum(1 for t in trials if t[0] != "flip")
    values = sum(v for (_, outcome), v in outcomes.items() if outcome == "value")
    by_kind = {
        kind: sum(1 for t in trials if t[0] == kind) for kind in ("key", "namespace", "store")
    }
    figure("ciphertexts moved", moves, backend=backend, **by_kind)
    figure(
        "single-bit flips", m, backend=backend, header_bits=sum(b < 16 for b in flip_bits.values())
    )
    figure(
        "reads rejected",
        sum(v for (_, o), v in outcomes.items() if o in ("IntegrityError", "CorruptValueError")),
        backend=backend,
        reads=2 * len(trials),
        integrity=sum(v for (_, o), v in outcomes.items() if o == "IntegrityError"),
        corrupt=sum(v for (_, o), v in outcomes.items() if o == "CorruptValueError"),
        bulk_reads_rejected=bulk_rejected,
    )
    figure("values returned", values, backend=backend)
    figure(
        "repeated nonces among stored records",
        sum(c - 1 for c in nonces.values()),
        backend=backend,
        records=len(originals),
    )
    (slot_a, id_a), (slot_b, id_b) = slots
    figure(
        "distinct salts of 2 stores with one password",
        len({slot_a.salt, slot_b.salt}),
        backend=backend,
        distinct_store_ids=len({id_a, id_b}),
    )
    assert slot_a.kdf == slot_b.kdf == "argon2id"
    assert len(slot_a.salt) == len(slot_b.salt) == 16
    assert slot_a.salt != slot_b.salt
    assert id_a != id_b
    assert wrong == [], f"{len(wrong)} reads were not rejected as expected: {wrong[:10]}"
    assert values == 0
    assert all(c == 1 for c in nonces.values())


def _wrong_passwords(count: int) -> list[str | bytes]:
    """Near misses first (case, spaces, a dropped or extra character, look-alikes,
    normalisation, encodings), then distinct guesses."""
    near: list[str | bytes] = [
        PASSWORD.upper(),
        PASSWORD.capitalize(),
        PASSWORD + " ",
        " " + PASSWORD,
        PASSWORD[:-1],
        PASSWORD + "\x00",
        PASSWORD.replace("a", "\u0430"),  # Cyrillic a
        unicodedata.normalize("NFD", PASSWORD + "\u00e9"),
        PASSWORD.encode("utf-16"),
        PASSWORD.encode("utf-8") + b"\xff",
        PASSWORD * 400,
        "\u00e9",
    ]
    guesses: list[str | bytes] = [f"{PASSWORD}-{i}" for i in range(max(0, count - len(near)))]
    return (near + guesses)[:count]


@pytest.mark.parametrize("backend", PERSISTENT)
def test_wrong_passwords_are_rejected_at_open(
    backend: str, tier: str, target: Target, figure: Any
) -> None:
    """Every wrong password (near misses included) fails at open with WrongPasswordError,
    each after a full argon2id derivation (``security="low"``); the right one still opens
    the store and reads its value."""
    # Each open derives a key (about 0.1 s at "low"), so the fast tier tries one.
    count = reps(tier, 1, 100)
    with target.open(password=PASSWORD) as store:
        store["secret"] = "value"
    rejected = 0
    durations: list[float] = []
    cpu: list[float] = []
    for wrong in _wrong_passwords(count):
        start, start_cpu = time.perf_counter(), time.process_time()
        with pytest.raises(WrongPasswordError):
            target.open(password=wrong)
        durations.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        rejected += 1
    with target.open(password=PASSWORD) as store:
        assert store["secret"] == "value"
    durations.sort()
    cpu.sort()
    figure(
        "wrong passwords rejected at open",
        rejected,
        backend=backend,
        tried=count,
        median_open_s=round(durations[len(durations) // 2], 3),
        max_open_s=round(durations[-1], 3),
        median_open_cpu_s=round(cpu[len(cpu) // 2], 3),
    )
    assert rejected == count


def _seal_many(target: Target, count: int, tag: str, start: Any, conn: Any) -> None:
    """Child: seal *count* values through the store's own encrypt path; send the nonces."""
    with target.open(password=PASSWORD) as store:
        start.wait(60)
        nonces = bytearray()
        for i in range(count):
            record = store._encode("default", f"{tag}{i}", i)
            if i < 3:  # real ciphertexts: they open again under the same place
                assert store._decode("default", f"{tag}{i}", record) == i
            nonces += record[NONCE]
    conn.send_bytes(bytes(nonces))
    conn.close()


def test_nonces_never_repeat_across_two_processes(tier: str, tmp_path: Path, figure: Any) -> None:
    """Two forked processes sealing values under one store's data key (the store's own
    ``_encode`` path, started together) draw no nonce twice, within or across processes."""
    count = reps(tier, 5_000, 100_000)
    target = make_target("sqlite", tmp_path)
    try:
        with target.open(password=PASSWORD) as store:
            store["created"] = True  # the key slot exists before the children fork
        start = FORK.Event()
        pipes, procs = [], []
        for tag in ("p", "q"):
            recv, send = FORK.Pipe(duplex=False)
            proc = FORK.Process(
                target=_seal_many, args=(target, count, tag, start, send), daemon=True
            )
            proc.start()
            send.close()
            pipes.append(recv)
            procs.append(proc)
        start.set()
        blobs = [recv.recv_bytes() for recv in pipes]
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
    finally:
        target.cleanup()
    nonces = Counter(blob[i : i + 24] for blob in blobs for i in range(0, len(blob), 24))
    total = sum(len(blob) // 24 for blob in blobs)
    repeated = total - len(nonces)
    figure("encryptions", total, processes=2)
    figure("repeated nonces", repeated, processes=2)
    assert total == 2 * count
    assert repeated == 0
