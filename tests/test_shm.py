"""Shared-memory behaviour of :class:`~mappingstore.SharedMemoryStore` and :class:`SharedBytes`.

The dict semantics every backend shares are in the conformance suite (``TestSharedMemory``
at the end). This module checks what only shared memory has: visibility across
processes, growth, atomicity across processes, torn reads under SIGKILL, segment
permissions, unlinking, the resource tracker, and ``SharedBytes``.

Child processes are started with ``subprocess`` running ``python -c`` (a clean
interpreter that attaches by name, like an unrelated program would) or ``fork`` where
the test is about inheriting an open store. A child reports through its exit code and
stdout, so a failed assertion in a child fails the test.
"""

from __future__ import annotations

import glob
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mappingstore
from mappingstore import SharedBytes, SharedMemoryStore
from mappingstore.errors import (
    CapacityError,
    InsecureStorageError,
    InvalidKeyError,
    InvalidOptionError,
    InvalidURLError,
    LockTimeoutError,
    ReadOnlyError,
    StoreClosedError,
    StoreCorruptError,
    StoreNotFoundError,
)
from mappingstore.testing import StoreTests

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /dev/shm")

SHM = "/dev/shm"


def _files(prefix: str) -> list[str]:
    return sorted(
        glob.glob(f"{SHM}/mappingstore.{prefix}*")
        + glob.glob(f"{SHM}/mappingstore-bytes.{prefix}*")
    )


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique name prefix; every segment under it is removed (and counted) at teardown."""
    p = "t" + uuid.uuid4().hex[:12]
    yield p
    leftovers = _files(p)
    for path in leftovers:
        os.unlink(path)


@pytest.fixture
def name(prefix: str) -> str:
    return prefix + "-s"


Spawn = Callable[..., "subprocess.Popen[str]"]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """``subprocess.Popen`` (text mode) whose children are killed at teardown, so a failed
    assertion never leaves a writer running."""
    procs: list[subprocess.Popen[str]] = []

    def start(argv: list[str], **kwargs: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, text=True, **kwargs)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _child(code: str, *args: str, timeout: float = 120) -> str:
    """Run *code* in a fresh interpreter (``-W error``: any warning fails it)."""
    script = (
        "import sys\nimport mappingstore\nfrom mappingstore import SharedMemoryStore, SharedBytes\n"
    )
    script += textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    assert proc.stderr == "", f"child wrote to stderr:\n{proc.stderr}"
    return proc.stdout


# -- opening, names, URLs ------------------------------------------------------------------


def test_open_by_url_and_class(name: str) -> None:
    with mappingstore.open(f"shm://{name}?namespace=ns1") as store:
        assert isinstance(store, SharedMemoryStore)
        assert store.url == f"shm://{name}"
        assert store.namespace == "ns1"
        store["k"] = 1
    with SharedMemoryStore(name, namespace="ns1") as again:
        assert again["k"] == 1
        assert again.shared_across_processes


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "a.b", "..", "a b", "é", "x" * 129, "a\x00", "-" * 3 + "/"],
)
def test_bad_names_rejected(bad: str) -> None:
    with pytest.raises(InvalidKeyError):
        SharedMemoryStore(bad)
    with pytest.raises(InvalidKeyError):
        SharedBytes(bad)


@pytest.mark.parametrize(
    "url",
    ["shm://", "shm:///abs", "shm://a.b", "shm://a/b", "shm://x?unknown=1", "shm://x?password=p"],
)
def test_bad_urls_rejected(url: str) -> None:
    with pytest.raises(InvalidURLError):
        mappingstore.open(url)


def test_bad_options_rejected(name: str) -> None:
    with pytest.raises(InvalidOptionError):
        SharedMemoryStore(name, max_size=10)
    with pytest.raises(InvalidOptionError):
        SharedMemoryStore(name, lock_timeout=-1)
    with pytest.raises(InvalidKeyError):
        SharedMemoryStore(123)  # type: ignore[arg-type]


def test_readonly_or_create_false_on_missing_store(name: str) -> None:
    with pytest.raises(StoreNotFoundError):
        SharedMemoryStore(name, readonly=True)
    with pytest.raises(StoreNotFoundError):
        SharedMemoryStore(name, create=False)
    with pytest.raises(StoreNotFoundError):
        SharedBytes(name, create=False)
    assert _files(name) == []


def test_second_open_keeps_data_and_sees_writes_at_once(name: str) -> None:
    a = SharedMemoryStore(name)
    a["x"] = {"v": 1}
    b = SharedMemoryStore(name)  # a second open never wipes data
    assert b["x"] == {"v": 1}
    a["x"] = {"v": 2}
    assert b["x"] == {"v": 2}  # no sync step, no stale copy
    del a["x"]
    assert "x" not in b
    b.update({f"k{i}": i for i in range(50)})
    assert len(a) == 50 and a["k49"] == 49
    a.close()
    b.close()
    with SharedMemoryStore(name) as c:
        assert len(c) == 50


def test_a_set_never_trusts_a_slot_another_instance_changed(name: str) -> None:
    """A set reuses the slot its instance last saw the key in only while that slot still
    holds the very record it saw: after another instance overwrote, deleted, re-created
    or moved the key (a rebuild), the set finds the key again and never leaves two live
    copies of it."""
    with SharedMemoryStore(name) as a, SharedMemoryStore(name) as b:
        a.update({f"k{i}": i for i in range(20)})
        for i in range(20):
            assert a[f"k{i}"] == i  # every key in a's cache of locations
        b["k1"] = "b overwrote"
        a["k1"] = "a again"
        del b["k2"]
        b["k2"] = "b re-created"  # may take the same slot, with another record
        a["k2"] = "a again"
        del b["k3"]
        # Another key takes k3's freed slot (a key hashing to it, found white-box): a's
        # remembered slot for k3 now holds that key's record, which a must not overwrite.
        seg, slot = a._seg, a._hot["k3"][2]
        nsh = a._ns_entry(a._ns)[1]
        squatter = next(
            f"s{n}"
            for n in range(10**6)
            if seg.t0 + (zlib.crc32(f"s{n}".encode(), nsh) & seg.mask) == slot
        )
        b[squatter] = "in k3's old slot"
        assert b._hot[squatter][2] == slot
        a["k3"] = "a re-created"
        assert a[squatter] == b[squatter] == "in k3's old slot"
        del b[squatter]
        b.update({f"other{i}": "x" * 100 for i in range(5_000)})  # rebuilds the segment
        a["k4"] = "after rebuilds"
        for store in (a, b):
            assert store["k1"] == store["k2"] == "a again"
            assert store["k3"] == "a re-created" and store["k4"] == "after rebuilds"
            assert len(store) == 5_020
            assert sorted(k for k in store if k.startswith("k")) == sorted(
                f"k{i}" for i in range(20)
            )
            del store["k5"]
            assert "k5" not in a and "k5" not in b
            store["k5"] = 5


def test_readonly_instance_reads_while_others_write(name: str) -> None:
    with SharedMemoryStore(name) as w:
        w["a"] = 1
        with SharedMemoryStore(name, readonly=True) as r:
            assert r["a"] == 1
            for i in range(3000):  # forces several new generations
                w[f"k{i}"] = "x" * 50
            assert r["k2999"] == "x" * 50
            assert len(r) == 3001
            with pytest.raises(ReadOnlyError):
                r["b"] = 2
            with pytest.raises(ReadOnlyError):
                r.unlink()


# -- cross-process visibility ------------------------------------------------------------


def test_child_sees_parent_writes_and_parent_sees_child_writes(name: str) -> None:
    with SharedMemoryStore(name) as store:
        store["from_parent"] = ("tuple", 1, b"bytes")
        out = _child(
            """
            s = SharedMemoryStore(sys.argv[1])
            print(repr(s["from_parent"]))
            s["from_child"] = {"pid": 1, "big": "y" * 200_000}
            s.close()
            """,
            name,
        )
        assert out.strip() == repr(("tuple", 1, b"bytes"))
        assert store["from_child"] == {"pid": 1, "big": "y" * 200_000}


def test_child_attaching_and_exiting_does_not_destroy_store(name: str) -> None:
    # Python 3.11's resource_tracker would unlink a multiprocessing.shared_memory segment
    # when a process that merely attached exits, and warn about "leaked shared_memory".
    with SharedMemoryStore(name) as store:
        store["k"] = "v"
        SharedBytes(name + "b").close()
        for _ in range(2):
            _child(
                """
                s = SharedMemoryStore(sys.argv[1]); assert s["k"] == "v"
                b = SharedBytes(sys.argv[1] + "b")
                # exit without closing: nothing may be unlinked or reported
                """,
                name,
            )
        assert store["k"] == "v"
        assert len(_files(name)) == 4  # store ctl + data, bytes ctl + data
    with SharedMemoryStore(name) as again:
        assert again["k"] == "v"
        again.unlink()
    SharedBytes(name + "b").unlink()
    assert _files(name) == []


def test_fork_child_uses_inherited_store(name: str) -> None:
    import multiprocessing

    with SharedMemoryStore(name) as store:
        store["n"] = 0
        ctx = multiprocessing.get_context("fork")

        def work() -> None:
            for _ in range(200):
                store.modify("n", lambda v: v + 1)
            os._exit(0)

        procs = [ctx.Process(target=work) for _ in range(2)]
        for p in procs:
            p.start()
        for _ in range(200):
            store.modify("n", lambda v: v + 1)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert store["n"] == 600


# -- growth and capacity -------------------------------------------------------------------


def test_values_grow_to_many_megabytes(name: str) -> None:
    with SharedMemoryStore(name) as store, SharedMemoryStore(name) as other:
        small = os.urandom(100)
        store["small"] = small
        for size in (10_000, 1_000_000, 8_000_000):
            value = os.urandom(size)
            store["big"] = value
            assert other["big"] == value
            assert other["small"] == small
        assert len(store.files()) == 2  # old generations are unlinked


def test_files_left_by_crashed_writers_are_cleaned_up(name: str) -> None:
    with SharedMemoryStore(name) as store:
        store["a"] = 1
        gen = store._h.generation
        base = f"{SHM}/mappingstore.{name}"
        # a writer killed while building gen + 1, and one killed after publishing gen but
        # before unlinking gen - 1: neither file was ever published as current
        for g in (gen + 1, gen - 1):
            fd = os.open(f"{base}.{g}", os.O_CREAT | os.O_WRONLY, 0o600)
            os.write(fd, b"half-built")
            os.close(fd)
        store["big"] = b"x" * 1_000_000  # the next rebuild builds gen + 1 afresh
        assert store["a"] == 1 and len(store["big"]) == 1_000_000
        assert store.files() == [base, f"{base}.{gen + 1}"]


def test_max_size_raises_capacity_error_and_changes_nothing(name: str) -> None:
    with SharedMemoryStore(name, max_size=1 << 20) as store:
        store["keep"] = "old"
        with pytest.raises(CapacityError):
            store["keep"] = b"x" * (2 << 20)
        with pytest.raises(CapacityError):
            store.update({"keep": b"x" * (2 << 20), "other": 1})
        assert store["keep"] == "old"
        assert "other" not in store
        assert len(store) == 1
        store["keep"] = b"y" * 500_000  # below the limit: fine
        assert store["keep"] == b"y" * 500_000


def test_many_keys_and_deletes_keep_the_table_healthy(name: str) -> None:
    with SharedMemoryStore(name) as store:
        model: dict[str, int] = {}
        rng = random.Random(5)
        for i in range(6000):
            k = f"k{rng.randrange(1500)}"
            if rng.random() < 0.3:
                store.pop(k, None)
                model.pop(k, None)
            else:
                store[k] = i
                model[k] = i
        assert store.to_dict() == model
        assert len(store) == len(model)


# -- atomicity across processes ------------------------------------------------------------

_INCREMENT = """
from mappingstore import SharedMemoryStore
s = SharedMemoryStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[2])):
    s.modify("n", lambda v: v + 1)
s.close()
"""


def _race(spawn: Spawn, code: str, name: str, nprocs: int, *args: str) -> list[str]:
    """Start *nprocs* children, let them all attach, then release them at once."""
    script = "import sys\n" + textwrap.dedent(code)
    procs = [
        spawn(
            [sys.executable, "-W", "error", "-c", script, name, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(nprocs)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert err == "", err
        outs.append(out)
    return outs


def test_modify_is_atomic_across_processes_2x10000(name: str, spawn: Spawn) -> None:
    with SharedMemoryStore(name) as store:
        store["n"] = 0
        _race(spawn, _INCREMENT, name, 2, "10000")
        assert store["n"] == 20_000


def test_setdefault_race_has_exactly_one_winner_per_key(name: str, spawn: Spawn) -> None:
    code = """
    import os
    from mappingstore import SharedMemoryStore
    s = SharedMemoryStore(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    me = os.getpid()
    got = [s.setdefault(f"key{i}", me) for i in range(1000)]
    print(me, ",".join(map(str, got)))
    """
    with SharedMemoryStore(name) as store:
        outs = _race(spawn, code, name, 8)
        winners = {k: v for k, v in store.items()}
        assert len(winners) == 1000
        for out in outs:
            _me, got = out.split()
            values = [int(x) for x in got.split(",")]
            # every caller of a key received the value that won
            assert values == [winners[f"key{i}"] for i in range(1000)]
        pids = {int(out.split()[0]) for out in outs}
        assert set(winners.values()) <= pids


def test_lock_released_when_holder_is_killed(name: str, spawn: Spawn) -> None:
    with SharedMemoryStore(name, lock_timeout=30) as store:
        store["n"] = 0
        proc = spawn(
            [
                sys.executable,
                "-c",
                textwrap.dedent(
                    """
                    import sys, time
                    from mappingstore import SharedMemoryStore
                    s = SharedMemoryStore(sys.argv[1])
                    def hold(v):
                        print("holding", flush=True)
                        time.sleep(600)
                        return v
                    s.modify("n", hold)
                    """
                ),
                name,
            ],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
        with (
            SharedMemoryStore(name, lock_timeout=0.2) as impatient,
            pytest.raises(LockTimeoutError),
        ):
            impatient["n"] = 5
        proc.kill()  # the kernel drops its flock: no deadlock
        proc.wait()
        store["n"] = 1
        assert store["n"] == 1


# -- torn reads ------------------------------------------------------------------------------

_WRITER = """
import os, zlib
from mappingstore import SharedMemoryStore, SharedBytes
s = SharedMemoryStore(sys.argv[1])
b = SharedBytes(sys.argv[1] + "b")
print("ready", flush=True)
i = s.get("a", 0)  # carry on from the last writer, so "a" and "b" only grow
while True:
    i += 1
    size = (i * 7919) % 300_000 + 1
    body = bytes([i % 251]) * size
    s["v"] = {"i": i, "body": body, "crc": zlib.crc32(body)}
    for k in range(20):  # small records: __setitem__'s fast path
        s[f"s{k}"] = {"i": i, "body": body[:k * 9], "crc": zlib.crc32(body[:k * 9])}
    s.update({"a": i, "b": i})
    b.set(body + zlib.crc32(body).to_bytes(4, "little"))
"""


@pytest.mark.parametrize(
    "kills", [12, pytest.param(200, marks=pytest.mark.torture, id="torture-200")]
)
def test_sigkilled_writer_never_leaves_a_torn_value(name: str, kills: int, spawn: Spawn) -> None:
    import zlib

    rng = random.Random(kills)
    with SharedMemoryStore(name) as store, SharedBytes(name + "b") as shared:
        for _ in range(kills):
            proc = spawn(
                [sys.executable, "-c", "import sys\n" + _WRITER, name], stdout=subprocess.PIPE
            )
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            deadline = time.monotonic() + rng.uniform(0.05, 0.4)
            reads = 0
            while time.monotonic() < deadline or reads < 20:  # read while it writes
                reads += 1
                v = store.get("v")
                if v is not None:
                    assert zlib.crc32(v["body"]) == v["crc"]
                small = store.get(f"s{reads % 20}")
                if small is not None:
                    assert zlib.crc32(small["body"]) == small["crc"]
                a, b = store.get("a"), store.get("b")
                if a is not None and b is not None:
                    assert b >= a  # a batch is never half-visible in the wrong direction
                raw = shared.get()
                if raw:
                    assert zlib.crc32(raw[:-4]).to_bytes(4, "little") == raw[-4:]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # after the kill: the last value is whole, and the store still works
            v = store["v"]
            assert zlib.crc32(v["body"]) == v["crc"]
            for k in range(20):
                small = store.get(f"s{k}")
                assert small is None or zlib.crc32(small["body"]) == small["crc"]
            assert store["a"] == store["b"]
            raw = shared.get()
            assert zlib.crc32(raw[:-4]).to_bytes(4, "little") == raw[-4:]
            store["after"] = v["i"]
            assert store["after"] == v["i"]
        store.unlink()
        shared.unlink()
    assert _files(name) == []


# -- permissions -----------------------------------------------------------------------------


def test_segments_are_created_0600(name: str) -> None:
    with SharedMemoryStore(name) as store, SharedBytes(name + "b") as shared:
        store["x"] = b"x" * 300_000  # a grown generation too
        shared.set(b"y" * 300_000)
        paths = store.files() + shared.files()
        assert len(paths) == 4
        for path in paths:
            st = os.stat(path)
            assert stat.S_IMODE(st.st_mode) == 0o600, path
            assert st.st_uid == os.geteuid()


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_refuses_group_or_other_writable_segments(name: str, mode: int) -> None:
    SharedMemoryStore(name).close()
    ctl = f"{SHM}/mappingstore.{name}"
    os.chmod(ctl, mode)
    with pytest.raises(InsecureStorageError):
        SharedMemoryStore(name)
    os.chmod(ctl, 0o600)
    data = f"{ctl}.1"
    os.chmod(data, mode)
    with pytest.raises(InsecureStorageError):
        SharedMemoryStore(name)
    os.chmod(data, 0o600)
    SharedMemoryStore(name).close()


def test_refuses_a_planted_world_writable_segment(name: str) -> None:
    # An attacker pre-creates the name before the victim's first open.
    fd = os.open(f"{SHM}/mappingstore-bytes.{name}", os.O_CREAT | os.O_RDWR, 0o666)
    os.fchmod(fd, 0o666)
    os.close(fd)
    with pytest.raises(InsecureStorageError):
        SharedBytes(name)


def test_refuses_a_symlink(name: str, tmp_path: Any) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    os.symlink(target, f"{SHM}/mappingstore.{name}")
    with pytest.raises(InsecureStorageError):
        SharedMemoryStore(name)
    assert target.read_bytes() == b""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown a segment to another user")
def test_refuses_segments_of_another_user(name: str) -> None:
    SharedMemoryStore(name).close()
    os.chown(f"{SHM}/mappingstore.{name}", 12345, -1)
    with pytest.raises(InsecureStorageError):
        SharedMemoryStore(name)


def test_garbage_control_segment_is_reported(name: str) -> None:
    fd = os.open(f"{SHM}/mappingstore.{name}", os.O_CREAT | os.O_RDWR, 0o600)
    os.write(fd, b"not a store" * 400)
    os.ftruncate(fd, 4096)
    os.close(fd)
    with pytest.raises(StoreCorruptError):
        SharedMemoryStore(name)


def test_garbage_data_segment_is_reported(name: str) -> None:
    with SharedMemoryStore(name) as store:
        store["a"] = 1
    with open(f"{SHM}/mappingstore.{name}.1", "r+b") as f:
        f.write(os.urandom(64))
    with pytest.raises(StoreCorruptError):
        SharedMemoryStore(name)


def test_damaged_record_is_reported_not_decoded(name: str) -> None:
    with SharedMemoryStore(name) as store:
        store["victim"] = "UNIQUE-VALUE-1234"
        store["fine"] = 1
        path = store.files()[-1]
        with open(path, "r+b") as f:
            raw = f.read()
            at = raw.index(b"UNIQUE-VALUE-1234")
            f.seek(at)
            f.write(b"X")
        with SharedMemoryStore(name) as fresh:  # no cached location: the record is checked
            with pytest.raises(StoreCorruptError):
                fresh["victim"]
            assert fresh["fine"] == 1
        with open(path, "r+b") as f:  # a table slot pointing past the end of the segment
            f.seek(64)
            table = f.read(8 * 16)
            slot = next(i for i in range(16) if table[8 * i : 8 * i + 8] != bytes(8))
            f.seek(64 + 8 * slot)
            f.write((0xFFFFFFF0).to_bytes(4, "little") + table[8 * slot + 4 : 8 * slot + 8])
        with SharedMemoryStore(name) as fresh, pytest.raises(StoreCorruptError):
            len(fresh)


# -- removal ---------------------------------------------------------------------------------


def test_unlink_removes_every_file_and_other_instances_notice(name: str) -> None:
    a = SharedMemoryStore(name)
    b = SharedMemoryStore(name)
    a["x"] = b"y" * 500_000
    assert len(_files(name)) == 2
    a.unlink()
    assert _files(name) == []
    assert a.closed
    with pytest.raises(StoreNotFoundError):
        b["x"]
    with pytest.raises(StoreNotFoundError):
        b["z"] = 1
    b.close()
    assert _files(name) == []
    with SharedMemoryStore(name) as fresh:  # the name is free again: a new, empty store
        assert len(fresh) == 0
        fresh.unlink()


def test_control_segment_removed_by_hand_creates_no_orphans(name: str) -> None:
    with SharedMemoryStore(name) as store, SharedMemoryStore(name) as other:
        store["k"] = 1
        for path in _files(name):
            os.unlink(path)  # rm /dev/shm/mappingstore.NAME*
        assert store["k"] == 1  # the mapping itself is still valid
        with pytest.raises(StoreNotFoundError):
            store["big"] = b"x" * 1_000_000  # would need a new segment file
        assert _files(name) == []
        with pytest.raises(StoreNotFoundError):
            other["k"]  # told, rather than working on a store nobody can reach


def test_delete_on_close(name: str) -> None:
    keeper = SharedMemoryStore(name)
    keeper["k"] = 1
    with SharedMemoryStore(name, delete_on_close=True) as temp:
        assert temp["k"] == 1
    assert _files(name) == []
    with pytest.raises(StoreNotFoundError):
        keeper["k"]
    keeper.close()
    with mappingstore.open(f"shm://{name}?delete_on_close=1") as temp:
        temp["a"] = 1
    assert _files(name) == []


def test_use_after_close_raises(name: str) -> None:
    store = SharedMemoryStore(name)
    store["k"] = 1
    store["k"]  # warm the read cache
    store.close()
    with pytest.raises(StoreClosedError):
        store["k"]
    with pytest.raises(StoreClosedError):
        store["k"] = 2
    store.close()  # idempotent
    # unlink() of a closed instance used to do nothing, silently leaving the store.
    with pytest.raises(StoreClosedError):
        store.unlink()
    with SharedMemoryStore(name) as again:
        assert again["k"] == 1
    SharedMemoryStore(name).unlink()
    with SharedMemoryStore(name) as fresh:
        assert len(fresh) == 0
        fresh.unlink()


def test_threads_share_one_instance(name: str) -> None:
    with SharedMemoryStore(name) as store:
        store["n"] = 0
        errors: list[BaseException] = []

        # Keys are named by the thread's number, not threading.get_ident(): a thread that
        # finishes before the next one starts hands its ident on, and the two would write
        # the same 300 keys (901 instead of 1201: a flaky test, not a lost write).
        def work(t: int) -> None:
            try:
                for i in range(300):
                    store.modify("n", lambda v: v + 1)
                    store[f"t{t}-{i}"] = i
                    store.get("n")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store["n"] == 1200
        assert len(store) == 1201


def test_ttl_is_shared_between_instances(name: str) -> None:
    from mappingstore.testing import FakeClock

    clock = FakeClock()
    with SharedMemoryStore(name, clock=clock) as a, SharedMemoryStore(name, clock=clock) as b:
        a.set("t", 1, ttl=10)
        assert b["t"] == 1 and 9 < b.ttl("t") <= 10
        clock.advance(11)
        assert "t" not in b and b.get("t") is None and len(b) == 0
        assert a.purge_expired() == 1


# -- SharedBytes -----------------------------------------------------------------------------


def test_shared_bytes_semantics(name: str) -> None:
    with SharedBytes(name, 16) as b, SharedBytes(name) as other:
        assert b.get() == b"" and b.size == 0
        b.set(b"abc")
        assert other.get() == b"abc"  # exactly the bytes set: no zero padding
        assert b.size == 3
        b.set(bytearray(b"x" * 100_000))  # grows past the initial 16 bytes
        assert other.get() == b"x" * 100_000
        assert other.update(lambda v: v[:2] + b"!") == b"xx!"
        assert b.get() == b"xx!"
        b.set(b"")
        assert other.get() == b""
        assert repr(b) == f"<SharedBytes {name!r}>"


def test_shared_bytes_update_releases_lock_when_fn_raises(name: str) -> None:
    with SharedBytes(name, lock_timeout=5) as b:
        b.set(b"before")

        def boom(v: bytes) -> bytes:
            raise RuntimeError("fn failed")

        with pytest.raises(RuntimeError, match="fn failed"):
            b.update(boom)
        assert b.get() == b"before"
        with pytest.raises(TypeError):
            b.update(lambda v: "not bytes")  # type: ignore[arg-type, return-value]
        # the lock is free for this process and for another one
        b.set(b"after")
        out = _child(
            """
            b = SharedBytes(sys.argv[1], lock_timeout=5)
            print(b.update(lambda v: v + b"!").decode())
            b.close()
            """,
            name,
        )
        assert out.strip() == "after!"


def test_shared_bytes_update_is_atomic_across_processes(name: str, spawn: Spawn) -> None:
    code = """
    from mappingstore import SharedBytes
    b = SharedBytes(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(2000):
        b.update(lambda v: str(int(v or b"0") + 1).encode())
    b.close()
    """
    with SharedBytes(name) as b:
        _race(spawn, code, name, 2)
        assert b.get() == b"4000"


def test_shared_bytes_capacity(name: str) -> None:
    with SharedBytes(name, 10, max_size=1000) as b:
        b.set(b"keep")
        with pytest.raises(CapacityError):
            b.set(b"x" * 1001)
        with pytest.raises(CapacityError):
            b.update(lambda v: v * 1000)
        assert b.get() == b"keep"
        b.set(b"x" * 1000)
        assert b.get() == b"x" * 1000
    with pytest.raises(InvalidOptionError):
        SharedBytes(name, -1)


def test_shared_bytes_unlink_readonly_and_closed(name: str) -> None:
    b = SharedBytes(name)
    b.set(b"v")
    r = SharedBytes(name, readonly=True)
    assert r.get() == b"v"
    with pytest.raises(ReadOnlyError):
        r.set(b"w")
    with pytest.raises(ReadOnlyError):
        r.update(lambda v: v)
    with pytest.raises(ReadOnlyError):
        r.unlink()
    assert not r.closed and r.get() == b"v"
    b.unlink()
    assert _files(name) == []
    with pytest.raises(StoreNotFoundError):
        r.get()
    r.close()
    with pytest.raises(StoreClosedError):
        b.get()
    with SharedBytes(name, delete_on_close=True) as temp:
        temp.set(b"gone soon")
    assert _files(name) == []


def test_every_set_path_writes_the_same_records(name: str) -> None:
    """__setitem__'s fast path (first set, set after a read, set after a set), its
    fallbacks (non-ASCII key, big value, TTL, lock_timeout, batch) and _put all write
    records another instance reads back, checksums included."""
    from mappingstore.testing import FakeClock

    clock = FakeClock()
    big = "x" * 10_000
    with (
        SharedMemoryStore(name, clock=clock) as w,
        SharedMemoryStore(name, clock=clock) as r,
        SharedMemoryStore(name, lock_timeout=5, clock=clock) as t,
    ):
        w["new"] = 1  # no cached entry
        w["new"] = 2  # entry made by the set (same length: the cached record head)
        for size in (1, 100, 3, 3, 4000, 2):  # the value's length changes
            w["grow"] = "g" * size
        r["read"] = "v"
        assert w["read"] == "v"
        w["read"] = [1]  # entry made by a read
        w["é"] = {"a": 1}  # non-ASCII key: Store.set
        w["é"] = {"a": 2}
        w["big"] = big  # > 4096 bytes: _put
        w["big"] = big + "y"
        t["timeout"] = (1, 2)  # lock_timeout: Store.set and _put
        w.set("ttl", 1, ttl=10)
        w["ttl"] = 2  # a plain set clears the expiry
        w.set("ttl2", 1)
        w.set("ttl2", 2, ttl=10)
        with w.batch():
            w["batched"] = 1
            assert r.get("batched") is None
        for key in ("", 5, None):
            with pytest.raises((KeyError, TypeError, ValueError)):
                w[key] = 1
        clock.advance(11)
        fresh = SharedMemoryStore(name, clock=clock)
        try:
            for reader in (r, fresh):
                assert reader["new"] == 2 and reader["read"] == [1] and reader["grow"] == "gg"
                assert reader["é"] == {"a": 2} and reader["big"] == big + "y"
                assert reader["timeout"] == (1, 2) and reader["ttl"] == 2
                assert "ttl2" not in reader and reader["batched"] == 1
                assert reader.ttl("ttl") is None
            keys = ["batched", "big", "grow", "new", "read", "timeout", "ttl", "é"]
            assert sorted(fresh) == keys
        finally:
            fresh.close()


def test_sets_survive_many_rebuilds(name: str) -> None:
    """Enough sets to rebuild the segment several times (the cached slots go stale)."""
    with SharedMemoryStore(name) as w, SharedMemoryStore(name) as r:
        gen = w.files()
        for i in range(40_000):
            w[f"k{i % 500}"] = i
        assert w.files() != gen  # rebuilt at least once
        assert {k: r[k] for k in r} == {f"k{i}": 39_500 + i for i in range(500)}


def _rebuild(store: SharedMemoryStore) -> None:
    """Build and publish the next data generation of *store* now (white-box)."""
    with store._h:
        store._rebuild_with(store._wseg(), [], set())


def test_rebuild_carries_the_read_cache_over(name: str) -> None:
    """A rebuild moves the cached locations of the copied records to the new generation
    (the next set or get of those keys probes nothing), and only those: a key another
    instance overwrote or deleted, or that expired, is looked up again, never revived."""
    from mappingstore.testing import FakeClock

    clock = FakeClock()
    with (
        SharedMemoryStore(name, clock=clock) as w,
        SharedMemoryStore(name, clock=clock) as o,
    ):
        for i in range(50):
            w[f"k{i}"] = {"i": i}
        w.set("ttl", "short", ttl=5)
        o["rival"] = "o's first"
        # (the sets that grew the table rebuilt it and left no entry: read them all)
        assert [w[f"k{i}"] for i in range(50)] == [{"i": i} for i in range(50)]
        assert w["rival"] == "o's first" and w["ttl"] == "short"
        w["tup"] = (1, 2)
        assert w["tup"] == (1, 2)  # an entry holding a decoded immutable value
        o["rival"] = "o's second"  # w's entry for it is now stale
        del o["k1"]
        clock.advance(10)
        gen = w._seg.gen
        _rebuild(w)
        assert w._seg.gen == gen + 1
        hot = w._hot
        assert "rival" not in hot and "k1" not in hot and "ttl" not in hot
        for key in ["k0", "k2", "k49", "tup"]:
            e = hot[key]
            assert e[0] == gen + 1 and e[1][e[2]] == e[3]
        probes: list[str] = []
        find = w._find

        def counting_find(seg: Any, nsb: bytes, kb: bytes, h: int) -> tuple[int, int]:
            probes.append(kb.decode())
            return find(seg, nsb, kb, h)

        w._find = counting_find  # type: ignore[method-assign]
        for i in range(50):
            if i != 1:
                w[f"k{i}"] = {"i": i + 100}
        assert w["tup"] == (1, 2)
        assert probes == []
        assert w["rival"] == "o's second" and "k1" not in w and "ttl" not in w
        w["k1"] = "back"
        assert probes[-1] == "k1"
        with SharedMemoryStore(name, clock=clock) as fresh:
            for reader in (w, o, fresh):
                assert [reader[f"k{i}"] for i in (0, 2, 49)] == [
                    {"i": 100},
                    {"i": 102},
                    {"i": 149},
                ]
                assert reader["k1"] == "back" and reader["tup"] == (1, 2)
                assert len(reader) == 52


def test_rebuilds_under_concurrent_readers_keep_values_intact(name: str, spawn: Spawn) -> None:
    """Readers in another process and in another thread of the writer's process (which
    shares the writer's read cache, carried over by each rebuild) read through many
    rebuilds: every value is whole and no key ever goes back to an older value."""
    reader = """
        import zlib
        from mappingstore import SharedMemoryStore
        s = SharedMemoryStore(sys.argv[1])
        print("ready", flush=True)
        last, gens, reads = {}, set(), 0
        while s.get("done") is None:
            for k in range(64):
                v = s.get(f"k{k}")
                reads += 1
                if v is None:
                    continue
                assert v["crc"] == zlib.crc32(v["body"]) and v["k"] == k, v
                assert v["i"] >= last.get(k, -1), (k, v["i"], last[k])
                last[k] = v["i"]
            gens.add(s._seg.gen)
        print(reads, len(gens), flush=True)
    """
    script = "import sys\n" + textwrap.dedent(reader)

    def value(k: int, i: int) -> dict[str, Any]:
        body = f"{k}:{i}:".encode() * (1 + (i % 5))  # lengths vary: new record heads too
        return {"k": k, "i": i, "body": body, "crc": zlib.crc32(body)}

    failures: list[BaseException] = []
    stop = threading.Event()
    with SharedMemoryStore(name) as w:
        w.update({f"k{k}": value(k, 0) for k in range(64)})
        proc = spawn(
            [sys.executable, "-W", "error", "-c", script, name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"

        def read_in_thread() -> None:
            last: dict[int, int] = {}
            try:
                while not stop.is_set():
                    for k in range(64):
                        v = w[f"k{k}"]
                        assert v["crc"] == zlib.crc32(v["body"]) and v["k"] == k
                        assert v["i"] >= last.get(k, -1)
                        last[k] = v["i"]
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        thread = threading.Thread(target=read_in_thread)
        thread.start()
        try:
            gen = w._seg.gen
            for i in range(1, 40_000):
                w[f"k{i % 64}"] = value(i % 64, i)
                if i % 9_999 == 0:  # a multi-key write rebuilds too
                    w.update({f"k{k}": value(k, i) for k in range(0, 64, 7)})
            assert w._seg.gen >= gen + 4
        finally:
            stop.set()
            thread.join()
            w["done"] = True
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reads, gens = map(int, out.split())
        assert reads > 0 and gens > 1
        assert failures == []
        for k in range(64):
            assert w[f"k{k}"]["crc"] == zlib.crc32(w[f"k{k}"]["body"])


def test_a_value_that_fails_to_encode_changes_nothing(name: str) -> None:
    """The set fast path encodes with the codec's pooled packers: a value that cannot be
    encoded (even halfway through) raises SerializationError, changes nothing, and leaves
    no half-used packer behind for the next set."""
    from mappingstore.errors import SerializationError

    with SharedMemoryStore(name) as w, SharedMemoryStore(name) as r:
        w["k"] = {"ok": 1}
        for bad in (object(), {"a": "x" * 100, "b": object()}, [1, 2, {3}, object()]):
            with pytest.raises(SerializationError):
                w["k"] = bad
            assert w["k"] == r["k"] == {"ok": 1}
        for i in range(5):
            w["k"] = {"ok": i, "s": "y" * i}
            w[f"n{i}"] = [i]
        assert r["k"] == {"ok": 4, "s": "yyyy"}
        assert [r[f"n{i}"] for i in range(5)] == [[0], [1], [2], [3], [4]]


# -- the conformance suite -----------------------------------------------------------------


class TestSharedMemory(StoreTests):
    persistent = True
    multiprocess = True
    fake_clock = True

    @pytest.fixture
    def factory(self, prefix: str) -> Callable[..., SharedMemoryStore]:
        def open_(name: str = "a", **options: Any) -> SharedMemoryStore:
            return SharedMemoryStore(f"{prefix}-{name}", **options)

        return open_


def test_fork_inside_a_locked_section(name: str) -> None:
    """A child forked by the thread inside a locked section (a modify function calling
    fork()) leaves the section normally and then takes the lock for its own writes."""
    with SharedMemoryStore(name) as store:
        store["n"] = 0
        pids: list[int] = []

        def bump(value: Any) -> Any:
            pid = os.fork()
            if pid == 0:  # the child, still inside the parent's section
                pids.append(0)
                return value + 100
            pids.append(pid)
            time.sleep(0.3)  # the child's write must wait for this section to end
            return value + 1

        parent = os.getpid()
        try:
            store.modify("n", bump)
        except BaseException:
            if os.getpid() != parent:
                os._exit(2)  # the child failed to leave the section
            raise
        if pids == [0]:  # the child: out of the section, then a write of its own
            code = 1
            try:
                store.modify("child", lambda v: "wrote", default=None)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pids[0], 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store["child"] == "wrote"
        # The child took the lock for its write, so it wrote after the parent's section.
        assert store["n"] == 100
