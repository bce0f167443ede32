"""DirectoryStore: file names, the record format, crashes, several processes.

The dict semantics every backend shares are in the conformance suite
(``TestDirectoryConformance`` at the end); this module checks what only a directory of
files has: the name encoding (no escape, no collision), the documented file format, stray
temp files, ``kill -9`` of a writer mid-write and mid-batch, and processes sharing it.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mappingstore
from mappingstore import DirectoryStore, Store
from mappingstore._codec import decode_plain
from mappingstore._directory import MAX_NAME, decode_name, encode_name
from mappingstore._filelock import FileLock
from mappingstore._keys import internal_ns
from mappingstore.errors import (
    CorruptValueError,
    InvalidOptionError,
    InvalidURLError,
    LockTimeoutError,
    ReadOnlyError,
    StoreCorruptError,
    StoreNotFoundError,
)
from mappingstore.testing import HOSTILE_KEYS, StoreTests

FORK = multiprocessing.get_context("fork")
RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(10)}


def hostile_keys(n: int, seed: int = 4) -> list[str]:
    """*n* distinct keys built from pieces that break naive file (and INI) names."""
    pieces = [
        "/", "\\", "..", ".", "\x00", "%", "%2f", "%2F", "^", "^a", "~", "A", "a", "Z", "z",
        "CON", "con", "nul", "Com1", "lpt9", " ", "\t", "\n", "\r", "=", ":", "::", "#",
        ";", "[", "]", "é", "e\u0301", "\u2028", "\x85", "\x7f", "\ud7ff", "\U0010ffff",
        "*", "?", "<", ">", "|", '"', "!ms1:", "-", "_", "0", "9", "x", "Ω", "\u2126",
    ]  # fmt: skip
    rng = random.Random(seed)
    keys = set(HOSTILE_KEYS)
    while len(keys) < n:
        key = "".join(rng.choices(pieces, k=rng.randint(1, 8)))
        if rng.random() < 0.05:
            key *= rng.randint(20, 80)  # long: hashed file names
        keys.add(key)
    return sorted(keys)


def record_files(root: Path, ns: str = "default") -> list[str]:
    return [n for n in os.listdir(root / encode_name(ns)) if not n.startswith(".")]


# -- names ----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.text(min_size=1))
def test_encode_name_is_portable_and_reversible(text: str) -> None:
    name = encode_name(text)
    assert 0 < len(name.encode()) <= MAX_NAME < 143
    assert name.isascii() and name == name.lower()  # no case-insensitive collisions
    assert "/" not in name and "\\" not in name and "\x00" not in name
    assert not name.startswith(".") and not name.endswith(".")
    assert name.split(".", 1)[0] not in RESERVED
    if name.startswith("~"):
        assert decode_name(name) is None  # hashed: the full key is inside the file
    else:
        assert decode_name(name) == text


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("plain-key_1.txt", "plain-key_1.txt"),
        ("Hello World", "^hello%20^world"),
        (".", "%2e"),
        ("..", "%2e%2e"),
        (".hidden", "%2ehidden"),
        ("trailing.", "trailing%2e"),
        ("con", "%63on"),
        ("nul.txt", "%6eul.txt"),
        ("a/b", "a%2fb"),
        ("é", "%c3%a9"),
        ("~", "%7e"),
    ],
)
def test_encode_name_examples(text: str, name: str) -> None:
    assert encode_name(text) == name
    assert decode_name(name) == text


@pytest.mark.parametrize(
    "name", ["A", "%41", "%2E", "^", "^A", "a%2", "con", "x.", ".x", "", "a b"]
)
def test_decode_name_rejects_what_encode_never_writes(name: str) -> None:
    assert decode_name(name) is None


def test_ten_thousand_hostile_keys_no_escape_no_collision(tmp_path: Path) -> None:
    keys = hostile_keys(10_000)
    root = tmp_path / "store"
    with DirectoryStore(root, durable=False) as store:
        store.update({k: i for i, k in enumerate(keys)})
        assert sorted(store) == keys
        assert store.to_dict() == {k: i for i, k in enumerate(keys)}
    # Nothing was written outside the store's directory...
    assert os.listdir(tmp_path) == ["store"]
    for dirpath, _, files in os.walk(root):
        for f in files:
            assert os.path.realpath(os.path.join(dirpath, f)).startswith(str(root) + os.sep)
    # ...and every key has a file of its own, even on a case-insensitive file system.
    names = record_files(root)
    assert len(names) == len({n.lower() for n in names}) == 10_000
    assert all(len(n.encode()) <= MAX_NAME for n in names)
    with DirectoryStore(root, readonly=True) as again:
        assert again.get_many(keys) == {k: i for i, k in enumerate(keys)}


def test_namespaces_are_directories_with_encoded_names(tmp_path: Path) -> None:
    long_ns = "N" * 300
    for ns in ("default", "Other/../ns", long_ns):
        with DirectoryStore(tmp_path / "s", namespace=ns, durable=False) as store:
            store["k"] = ns
    with DirectoryStore(tmp_path / "s", password="pw", security="low") as store:
        assert store.namespaces() == sorted(["default", "Other/../ns", long_ns])
        assert internal_ns("meta") in list(store._namespaces())
    entries = sorted(os.listdir(tmp_path / "s"))
    assert "%00meta%00" in entries and "^other%2f..%2fns" in entries
    hashed = encode_name(long_ns)
    assert hashed.startswith("~") and hashed in entries
    assert (tmp_path / "s" / hashed / ".namespace").read_bytes() == long_ns.encode()
    with DirectoryStore(tmp_path / "s", namespace=long_ns, password="pw", security="low") as store:
        assert store["k"] == long_ns


# -- the file format ------------------------------------------------------------------------


def test_record_file_follows_the_documented_format(tmp_path: Path) -> None:
    """Read a record file the way another language would, from the documented layout."""
    with DirectoryStore(tmp_path / "s", clock=lambda: 1_700_000_000.0) as store:
        store.set("Key/é", {"v": [1, 2]}, ttl=60)
        store["plain"] = "x"
    raw = (tmp_path / "s" / "default" / encode_name("Key/é")).read_bytes()
    magic, version, flags, reserved, expires, klen, crc = struct.unpack(">4sBBHdII", raw[:24])
    assert (magic, version, flags, reserved) == (b"\x93MSD", 1, 1, 0)
    assert expires == 1_700_000_060.0
    key = raw[24 : 24 + klen]
    assert key.decode() == "Key/é"
    assert crc == zlib.crc32(raw[:20] + key)
    assert decode_plain(raw[24 + klen :]) == {"v": [1, 2]}
    plain = (tmp_path / "s" / "default" / "plain").read_bytes()
    assert plain[5] == 0 and struct.unpack(">d", plain[8:16])[0] == 0.0
    assert (tmp_path / "s" / ".mappingstore").read_bytes() == b"mappingstore-directory 1\n"


def test_long_keys_get_hashed_names_and_keep_the_full_key_inside(tmp_path: Path) -> None:
    key = "Ü" * 3000
    with DirectoryStore(tmp_path / "s") as store:
        store[key] = 1
        store[key + "!"] = 2
        (name1,) = [n for n in record_files(tmp_path / "s") if n == encode_name(key)]
        assert name1.startswith("~") and len(name1) == 65
        assert key.encode() in (tmp_path / "s" / "default" / name1).read_bytes()
        assert sorted(store) == [key, key + "!"]
        assert store.pop(key) == 1 and list(store) == [key + "!"]


def test_damaged_record_is_an_error_not_a_value(tmp_path: Path, caplog: Any) -> None:
    with DirectoryStore(tmp_path / "s") as store:
        store["a"] = 1
        store["b"] = 2
        path = tmp_path / "s" / "default" / "a"
        raw = bytearray(path.read_bytes())
        raw[24] ^= 0x01  # the key: the header checksum catches it
        path.write_bytes(bytes(raw))
        with pytest.raises(CorruptValueError):
            store["a"]
        # Listings of values raise as the read does (they used to skip it with a log
        # warning, so an export or a copy left the item out and succeeded); a listing of
        # keys names it by its file name.
        for read in (store.to_dict, lambda: list(store.values()), store.export_json):
            with pytest.raises(CorruptValueError):
                read()
        assert sorted(store) == ["a", "b"] and len(store) == 2
        long_key = "k" * 300  # a hashed file name: the key is inside the damaged file
        store[long_key] = 3
        (hashed,) = [p for p in path.parent.iterdir() if p.name.startswith("~")]
        hashed.write_bytes(hashed.read_bytes()[:-1] + b"\x00")
        assert sorted(store) == ["a", "b", long_key]  # the header, with the key, is intact
        raw = bytearray(hashed.read_bytes())
        raw[30] ^= 0x01  # inside the key
        hashed.write_bytes(bytes(raw))
        with pytest.raises(CorruptValueError):
            list(store)
        hashed.unlink()
        del store["a"]  # a damaged record can still be deleted
        assert not path.exists()
        (tmp_path / "s" / "default" / "b").write_bytes(b"short")
        with pytest.raises(CorruptValueError):
            store["b"]


def test_foreign_and_temp_files_are_never_keys(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root) as store:
        store["k"] = 1
    for name in ("README.md", ".DS_Store", "%41", ".tmp-123"):
        (root / "default" / name).write_bytes(b"not a record")
    stray = root / ".tmp" / "999-0-deadbeef"
    stray.write_bytes(b"half a record")
    (root / "Foreign").mkdir()
    with DirectoryStore(root) as store:
        assert list(store) == ["k"] and len(store) == 1
        assert store.namespaces() == ["default"]
        assert not stray.exists()  # cleaned up by the opener (under the lock)


def test_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(StoreCorruptError, match="not empty"):
        DirectoryStore(tmp_path / "home")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".mappingstore").write_text("something else 9\n")
    with pytest.raises(StoreCorruptError):
        DirectoryStore(tmp_path / "other")
    (tmp_path / "dotted").mkdir()
    (tmp_path / "dotted" / ".gitkeep").write_text("")
    DirectoryStore(tmp_path / "dotted").close()  # hidden files alone are fine


# -- URLs, options, read-only -----------------------------------------------------------------


def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with mappingstore.open("dir:///rel/data?durable=false&namespace=n") as store:
        assert isinstance(store, DirectoryStore)
        assert store.path == str(tmp_path / "rel" / "data")
        assert store.namespace == "n" and store._durable is False
        store["k"] = 1
        url = store.url
    assert url == f"dir:///{tmp_path}/rel/data?durable=false"
    with mappingstore.open(url, namespace="n") as again:
        assert again["k"] == 1 and again._durable is False
    with mappingstore.open(f"dir:///{tmp_path}/abs") as store:
        assert store.path == str(tmp_path / "abs")
    with pytest.raises(InvalidURLError):
        mappingstore.open("dir://host/data")
    odd = tmp_path / "odd ?#%25 name"
    with DirectoryStore(odd) as store, mappingstore.open(store.url) as again:
        assert isinstance(again, DirectoryStore) and again.path == str(odd)


def test_readonly(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        DirectoryStore(tmp_path / "missing", readonly=True)
    assert not (tmp_path / "missing").exists()
    with (
        DirectoryStore(tmp_path / "s") as writer,
        DirectoryStore(tmp_path / "s", readonly=True) as reader,
    ):
        writer["a"] = 1
        assert reader["a"] == 1  # no cache, no synchronize(): seen at once
        writer["a"] = 2
        with writer.batch():
            writer["b"] = 3
            writer["c"] = 4
        assert reader.to_dict() == {"a": 2, "b": 3, "c": 4}
        del writer["a"]
        assert "a" not in reader
        with pytest.raises(ReadOnlyError):
            reader["x"] = 1
        with pytest.raises(ReadOnlyError):
            reader.clear()


def test_lock_timeout(tmp_path: Path) -> None:
    with DirectoryStore(tmp_path / "s", lock_timeout=0.2) as store:
        holder = FileLock(str(tmp_path / "s" / ".lock"))
        with holder.exclusive():
            start = time.monotonic()
            with pytest.raises(LockTimeoutError):
                store["k"] = 1
            assert time.monotonic() - start >= 0.2
            assert store.get("k") is None  # readers do not need the lock
        store["k"] = 1
        holder.close()
    for bad in (-1, "soon", True):
        with pytest.raises(InvalidOptionError):
            DirectoryStore(tmp_path / "s", lock_timeout=bad)
    with pytest.raises(InvalidOptionError):
        mappingstore.open(f"dir:///{tmp_path}/s?lock_timeout=abc")
    with mappingstore.open(f"dir:///{tmp_path}/s?lock_timeout=2.5") as store:
        assert store.url.endswith("?lock_timeout=2.5")


def test_clear_and_purge_remove_files(tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    with DirectoryStore(tmp_path / "s", clock=lambda: now[0]) as store:
        store.update({f"k{i}": i for i in range(20)})
        store.set("t1", 1, ttl=10)
        store.set("t2", 2, ttl=100)
        assert (tmp_path / "s" / "default" / ".expiring").exists()
        now[0] += 50
        assert "t1" not in store and len(store) == 21
        assert store.purge_expired() == 1
        assert "t1" not in record_files(tmp_path / "s")
        now[0] += 100
        assert store.purge_expired() == 1
        assert not (tmp_path / "s" / "default" / ".expiring").exists()
        store.clear()
        assert not (tmp_path / "s" / "default").exists()
        assert os.listdir(tmp_path / "s" / ".tmp") == []
        store["again"] = 1
        assert list(store) == ["again"]


# -- crashes ----------------------------------------------------------------------------------


def _write_forever(root: str, size: int) -> None:
    store = DirectoryStore(root)
    gen = 0
    while True:
        gen += 1
        store["big"] = bytes([gen % 256]) * size


def _batches_forever(root: str, n: int) -> None:
    store = DirectoryStore(root)
    gen = 0
    while True:
        gen += 1
        store.update({f"k{i}": gen for i in range(n)})


def _kill_after(proc: Any, delay: float) -> None:
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def test_kill_9_mid_write_leaves_old_or_new(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    size = 4 << 20
    with DirectoryStore(root) as store:
        store["big"] = b"\x00" * size
    rng = random.Random(1)
    for _ in range(4):
        proc = FORK.Process(target=_write_forever, args=(root, size))
        proc.start()
        _kill_after(proc, rng.uniform(0.05, 0.4))
        with DirectoryStore(root) as store:
            value = store["big"]
            assert len(value) == size and value == value[:1] * size  # one whole version
            assert list(store) == ["big"]
            assert os.listdir(os.path.join(root, ".tmp")) == []  # the torn temp is gone


def test_kill_9_mid_batch_at_random_times_is_all_or_nothing(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    n = 40
    rng = random.Random(2)
    for _ in range(4):
        proc = FORK.Process(target=_batches_forever, args=(root, n))
        proc.start()
        _kill_after(proc, rng.uniform(0.1, 0.4))
        with DirectoryStore(root) as store:
            values = set(store.values())
            assert len(store) in (0, n)
            assert len(values) <= 1, f"a torn batch: {sorted(values)}"


def _batch_then_die(root: str, n: int, die_after: int) -> None:
    store = DirectoryStore(root)
    original = store._store_file
    done = [0]

    def dying(*args: Any) -> str:
        if done[0] == die_after:
            os.kill(os.getpid(), signal.SIGKILL)
        done[0] += 1
        return original(*args)

    store._store_file = dying  # type: ignore[method-assign]
    with store.batch():
        for i in range(n):
            store[f"k{i}"] = "new"
        del store["gone"]


def test_kill_9_mid_batch_is_replayed_by_the_next_reader(tmp_path: Path) -> None:
    root = tmp_path / "s"
    n = 10
    with DirectoryStore(root) as store:
        store.update({f"k{i}": "old" for i in range(n)} | {"gone": "old"})
    reader = DirectoryStore(root, readonly=True)  # opened before the crash
    proc = FORK.Process(target=_batch_then_die, args=(str(root), n, 4))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    # The crash really happened mid-batch: half applied on disk, the journal still there.
    assert (root / ".journal").exists()
    on_disk = {n: (root / "default" / n).read_bytes()[-3:] for n in record_files(root)}
    assert sorted(on_disk.values()).count(b"new") == 4
    # The next reader waits for the lock, sees the journal and replays the whole batch.
    assert reader.to_dict() == {f"k{i}": "new" for i in range(n)}
    assert not (root / ".journal").exists()
    reader.close()


def _die_before_journal_lands(root: str) -> None:
    store = DirectoryStore(root)
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".journal"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace  # type: ignore[assignment]  # only in this forked child
    store.update({"a": "new", "b": "new"})


def test_kill_9_before_the_journal_is_complete_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root) as store:
        store.update({"a": "old", "b": "old"})
    proc = FORK.Process(target=_die_before_journal_lands, args=(str(root),))
    proc.start()
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL
    assert len(os.listdir(root / ".tmp")) == 1  # the finished journal, never renamed
    with DirectoryStore(root) as store:
        assert store.to_dict() == {"a": "old", "b": "old"}
    assert os.listdir(root / ".tmp") == []


def _read_pairs(root: str, stop: Any, out: Any) -> None:
    bad, reads = [], 0
    with DirectoryStore(root, readonly=True) as reader:
        while not stop.is_set():
            a, b = reader["a"], reader["b"]
            reads += 1
            if b < a:
                bad.append((a, b))
    out.put((reads, bad))


def test_readers_never_see_half_a_batch(tmp_path: Path) -> None:
    """The batch writes "a" first and "b" last; a reader reading "a" then "b" must never
    find "b" older than "a" (it would, if it read files while a batch is applied)."""
    root = tmp_path / "s"
    filler = {f"f{i}": 0 for i in range(20)}
    with DirectoryStore(root, durable=False) as store:
        store.update({"a": 0, **filler, "b": 0})
    stop, out = FORK.Event(), FORK.Queue()
    readers = [FORK.Process(target=_read_pairs, args=(str(root), stop, out)) for _ in range(2)]
    for p in readers:
        p.start()
    with DirectoryStore(root, durable=False) as writer:
        for gen in range(1, 60):
            writer.update({"a": gen, **filler, "b": gen})
    stop.set()
    results = [out.get(timeout=60) for _ in readers]
    for p in readers:
        p.join(30)
    assert all(reads > 0 for reads, _ in results)
    assert [bad for _, bad in results] == [[], []]


# -- several processes and instances ----------------------------------------------------------


def _increment(root: str, n: int) -> None:
    with DirectoryStore(root, durable=False) as store:
        for _ in range(n):
            store.modify("counter", lambda v: v + 1, default=0)


def test_two_processes_modify_exact_count(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    DirectoryStore(root).close()
    procs = [FORK.Process(target=_increment, args=(root, 1000)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with DirectoryStore(root) as store:
        assert store["counter"] == 2000


def _setdefault_race(root: str, keys: list[str], out: Any) -> None:
    won = 0
    with DirectoryStore(root, durable=False) as store:
        for k in keys:
            if store.setdefault(k, os.getpid()) == os.getpid():
                won += 1
    out.put(won)


def test_setdefault_race_has_one_winner_per_key(tmp_path: Path) -> None:
    root = str(tmp_path / "s")
    DirectoryStore(root).close()
    keys = [f"k{i}" for i in range(200)]
    out = FORK.Queue()
    procs = [FORK.Process(target=_setdefault_race, args=(root, keys, out)) for _ in range(4)]
    for p in procs:
        p.start()
    wins = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(60)
    assert wins == len(keys)


def test_instances_and_a_forked_child_see_each_others_writes(tmp_path: Path) -> None:
    with DirectoryStore(tmp_path / "s") as one, DirectoryStore(tmp_path / "s") as two:
        one["x"] = 1
        assert two["x"] == 1
        two.modify("x", lambda v: v + 1)
        assert one["x"] == 2
        # The parent holds the lock *before* forking: a child that reused the inherited
        # open file description would share that lock and not wait; it must take its own.
        with one._flock.exclusive():
            pid = os.fork()
            if pid == 0:
                try:
                    one.modify("x", lambda v: v * 10)
                    os._exit(0)
                except BaseException:
                    os._exit(1)
            time.sleep(0.2)
            assert two["x"] == 2  # the child is still waiting for the lock
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert one["x"] == two["x"] == 20


# -- conformance ------------------------------------------------------------------------------


class TestDirectoryConformance(StoreTests):
    persistent = True
    multiprocess = True
    fake_clock = True

    @pytest.fixture
    def factory(self, tmp_path: Path) -> Callable[..., Store]:
        # durable=False only skips the fsync calls (their effect is power-loss safety,
        # which no test can observe); it keeps this suite fast on a real disk. The
        # durable path runs in every test above.
        def open_(name: str = "a", **options: Any) -> Store:
            return DirectoryStore(tmp_path / name, **{"durable": False, **options})

        return open_


def test_file_lock_is_reentrant_per_thread_and_exclusive_between_instances(tmp_path: Path) -> None:
    path = str(tmp_path / "lock")
    one, two = FileLock(path), FileLock(path, timeout=0.05)
    assert one.acquire() is True and one.acquire() is False  # nested: already held
    assert one.held
    with pytest.raises(LockTimeoutError):
        two.acquire()
    with pytest.raises(LockTimeoutError), two.shared():
        pass  # never reached: no shared lock while another instance holds it
    one.release()
    assert one.held  # one level left
    one.release()
    assert not one.held
    with two.shared(), pytest.raises(RuntimeError, match="upgrade"):
        two.acquire(True)  # shared -> exclusive would not be atomic: refused
    one.close()
    two.close()


def test_namespaces_lists_a_namespace_holding_a_damaged_long_key_file(tmp_path: Path) -> None:
    # namespaces() probes each namespace for a live record; a damaged file there counts
    # as data (it raised CorruptValueError and hid every namespace, CLI info included).
    with (
        DirectoryStore(tmp_path / "s") as store,
        DirectoryStore(tmp_path / "s", namespace="other") as other,
    ):
        store["x"] = 1
        other.set("k" * 300, 2, ttl=1000)  # a hashed file name, in a namespace with TTLs
        (hashed,) = [p for p in (tmp_path / "s" / "other").iterdir() if p.name.startswith("~")]
        raw = bytearray(hashed.read_bytes())
        raw[30] ^= 0x01
        hashed.write_bytes(bytes(raw))
        assert store.namespaces() == ["default", "other"]
