"""Review 7 fixes in the file backends, blobs and event logs.

* Temp files are created with no permission bit their final file lacks (``get_file``
  beside a 0600 target, the rewrite of a 0600 INI file): never readable by others, even
  for a moment.
* A damaged (or hand-edited) event-log head, chunk directory or chunk raises
  ``CorruptValueError``, never a raw exception or a garbage state.
* A failed write of the directory store leaves no temp file behind.
* Non-regular entries (a subdirectory, a FIFO, a symbolic link) in a namespace directory
  of the directory store are foreign entries: skipped, never opened.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import DirectoryStore, Store
from mappingstore import _directory as directory_module
from mappingstore._events import CHUNK_SIZE
from mappingstore._keys import internal_ns, tagged_key
from mappingstore.errors import BackendError, CorruptValueError, MappingStoreError

# -- temp files are never wider than the file they become ---------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _created_modes(monkeypatch: pytest.MonkeyPatch, marker: str) -> list[int]:
    """Record the permission bits of every file whose name holds *marker*, as they are
    right when ``os.open`` created it (before anything else can change them)."""
    modes: list[int] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT and marker in os.path.basename(os.fspath(path)):
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return fd

    monkeypatch.setattr(os, "open", spy)
    return modes


@pytest.mark.usefixtures("umask_022")
def test_get_file_temp_file_is_never_wider_than_a_private_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "private.bin"
    target.write_bytes(b"")
    target.chmod(0o600)
    with mappingstore.open("memory://") as store:
        store.put_file("doc", io.BytesIO(b"secret " * 100))
        modes = _created_modes(monkeypatch, ".part")
        assert store.get_file("doc", target) == 700
        monkeypatch.undo()
    assert modes and all(m & ~0o600 == 0 for m in modes), [oct(m) for m in modes]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_bytes() == b"secret " * 100
    assert [p.name for p in tmp_path.iterdir()] == ["private.bin"]


@pytest.mark.usefixtures("umask_022")
def test_get_file_keeps_target_modes_the_umask_would_narrow(tmp_path: Path) -> None:
    shared, new = tmp_path / "shared.bin", tmp_path / "new.bin"
    shared.write_bytes(b"")
    shared.chmod(0o664)  # group-writable: more than 0666 & ~umask gives
    with mappingstore.open("memory://") as store:
        store.put_file("doc", io.BytesIO(b"x"))
        store.get_file("doc", shared)
        store.get_file("doc", new)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o664
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # what open(path, "wb") gives


@pytest.mark.usefixtures("umask_022")
def test_ini_rewrite_temp_file_is_never_wider_than_a_private_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "app.ini"
    path.write_text("")
    path.chmod(0o600)
    with mappingstore.open(f"ini:///{path}", durable=False) as store:
        modes = _created_modes(monkeypatch, ".tmp.")
        store["db_password"] = "hunter2"
        with store.batch():
            store["a"] = 1
            store["b"] = 2
        monkeypatch.undo()
        assert store["db_password"] == "hunter2"
    assert len(modes) == 2 and all(m & ~0o600 == 0 for m in modes), [oct(m) for m in modes]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.usefixtures("umask_022")
def test_ini_rewrite_keeps_modes_the_umask_would_narrow(tmp_path: Path) -> None:
    path = tmp_path / "app.ini"
    path.write_text("")
    path.chmod(0o664)
    with mappingstore.open(f"ini:///{path}", durable=False) as store:
        store["k"] = 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


# -- damaged event logs ------------------------------------------------------------------


def _log_records(store: Store, name: str) -> tuple[str, str, str]:
    return internal_ns("ev", store._ns), tagged_key("H", name), tagged_key("D", name)


def _edit(store: Store, ns: str, key: str, fn: Callable[[Any], Any]) -> None:
    data = store._rget(ns, key)
    assert data is not None
    store._rput(ns, key, store._encode(ns, key, fn(store._decode(ns, key, data))), None)


def _snapshot(store: Store, ns: str) -> dict[str, bytes | None]:
    return {k: store._rget(ns, k) for k in store._rkeys(ns, "")}


def _all_corrupt(store: Store, name: str, *, t: int) -> None:
    """Every read and write of log *name* raises CorruptValueError; nothing is written."""
    log = store.events(name)
    ns = internal_ns("ev", store._ns)
    before = _snapshot(store, ns)
    calls: list[Callable[[], Any]] = [
        log.current,
        lambda: log.current(with_timestamp=True),
        lambda: log.past(t),
        lambda: log.events(),
        lambda: len(log),
        lambda: log.apply({"x": 1}),
        lambda: log.apply({"x": 1}, t),
        lambda: log.prune(t),
    ]
    for call in calls:
        with pytest.raises(CorruptValueError):
            call()
    assert _snapshot(store, ns) == before


def _head_edits() -> dict[str, Callable[[dict[str, Any]], Any]]:
    def put(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
        return lambda head: {**head, key: value}

    def first_event(i: int, value: Any) -> Callable[[dict[str, Any]], Any]:
        def edit(head: dict[str, Any]) -> dict[str, Any]:
            head["p"][0][i] = value
            return head

        return edit

    return {
        "not a dict": lambda head: [head],
        "key missing": lambda head: {k: v for k, v in head.items() if k != "b"},
        "last timestamp a string": put("l", "x"),
        "last timestamp a float": put("l", 2000.5),
        "state a list": put("s", [{"balance": 100}]),
        "base state a string": put("b", "x"),
        "chunk count a string": put("k", "1"),
        "chunk count negative": put("k", -1),
        "next chunk id None": put("n", None),
        "version a string": put("v", "7"),
        "tail not a list": put("p", {"a": 1}),
        "tail event shortened": put("p", [[1]]),
        "tail event not a list": put("p", ["event"]),
        "event timestamp a string": first_event(0, "1000"),
        "event item an int": first_event(1, 5),
        "unknown operator": first_event(2, "bogus"),
        "operator a list": first_event(2, ["add"]),
        "snapshot of a list": lambda head: {**head, "p": [[500, "", "snapshot", [1]], *head["p"]]},
        "tail out of order": lambda head: {**head, "p": head["p"][::-1]},
        "tail after the last timestamp": put("l", 1000),
    }


@pytest.mark.parametrize("edit", list(_head_edits()))
def test_damaged_event_log_head_is_corrupt_not_raw(edit: str) -> None:
    with mappingstore.open("memory://") as store:
        log = store.events("acct")
        log.apply({"balance": 100}, 1000)
        log.apply({"owner": "ann"}, 2000)
        ns, head_key, _ = _log_records(store, "acct")
        _edit(store, ns, head_key, _head_edits()[edit])
        _all_corrupt(store, "acct", t=1500)
        # Another log of the namespace is not affected.
        assert store.events("other").apply({"a": 1}) == {"a": 1}


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: re.sub(r'"p": \[.*?\]\]', '"p": [[1]]', t),
        lambda t: re.sub(r'"l": \d+', '"l": "x"', t),
        lambda t: t.replace('"s": {', '"s": [{', 1).replace('}, "p"', '}], "p"', 1),
        lambda t: t.replace('"setitem"', '"bogus"', 1),
    ],
    ids=["tail event shortened", "last timestamp a string", "state a list", "bogus op"],
)
def test_hand_edited_ini_event_log_head_is_corrupt(
    tmp_path: Path, edit: Callable[[str], str]
) -> None:
    path = tmp_path / "app.ini"
    with mappingstore.open(f"ini:///{path}", durable=False) as store:
        log = store.events("acct")
        log.apply({"balance": 100}, 1000)
        log.apply({"owner": "ann"}, 2000)
    text = path.read_text()
    edited = edit(text)
    assert edited != text
    path.write_text(edited)
    with mappingstore.open(f"ini:///{path}", durable=False) as store:
        _all_corrupt(store, "acct", t=1500)
    assert path.read_text() == edited  # nothing was written


def _long_log(store: Store) -> None:
    log = store.events("acct")
    for i in range(CHUNK_SIZE + 5):  # one chunk and a tail
        log.apply({"n": i}, 1000 + 10 * i)


def _first_chunk_key(store: Store) -> str:
    ns, _, dir_key = _log_records(store, "acct")
    data = store._rget(ns, dir_key)
    assert data is not None
    cid = store._decode(ns, dir_key, data)["c"][0][1]
    return f"{tagged_key('C', 'acct')}:{cid:x}"


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: {**d, "c": "x"},
        lambda d: {**d, "c": [["1000", d["c"][0][1], d["c"][0][2]]]},
        lambda d: {**d, "c": [[1000, d["c"][0][1]]]},
        lambda d: {**d, "c": [[1000, d["c"][0][1], 0]]},
        lambda d: [["a", "b", "c"]],
    ],
    ids=["not a list", "timestamp a string", "entry shortened", "empty chunk", "legacy junk"],
)
def test_damaged_event_log_directory_is_corrupt(edit: Callable[[Any], Any]) -> None:
    with mappingstore.open("memory://") as store:
        _long_log(store)
        ns, _, dir_key = _log_records(store, "acct")
        _edit(store, ns, dir_key, edit)
        log = store.events("acct")
        for call in (lambda: log.past(1100), log.events, lambda: len(log)):
            with pytest.raises(CorruptValueError):
                call()
        with pytest.raises(CorruptValueError):
            log.apply({"n": -1}, 1105)  # an insert in the past reads the directory
        assert log.current() == {"n": CHUNK_SIZE + 4}  # the head alone is sound


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: [c],
        lambda c: {**c, "b": [1]},
        lambda c: {**c, "e": c["e"][:-1]},  # fewer events than the directory says
        lambda c: {**c, "e": []},
        lambda c: {**c, "e": [[1000, "n", "bogus", 1], *c["e"][1:]]},
        lambda c: {**c, "e": [[1000], *c["e"][1:]]},
        lambda c: {**c, "e": [[999, "n", "setitem", 1], *c["e"][1:]]},  # not its first time
        lambda c: {**c, "e": c["e"][::-1]},
    ],
    ids=[
        "not a dict",
        "base a list",
        "event missing",
        "no events",
        "bogus op",
        "event shortened",
        "first timestamp moved",
        "out of order",
    ],
)
def test_damaged_event_log_chunk_is_corrupt(edit: Callable[[Any], Any]) -> None:
    with mappingstore.open("memory://") as store:
        _long_log(store)
        ns = internal_ns("ev", store._ns)
        _edit(store, ns, _first_chunk_key(store), edit)
        log = store.events("acct")
        for call in (lambda: log.past(1100), log.events, lambda: log.prune(1100)):
            with pytest.raises(CorruptValueError):
                call()
        before = _snapshot(store, ns)
        with pytest.raises(CorruptValueError):
            log.apply({"n": -1}, 1105)
        assert _snapshot(store, ns) == before


def test_sound_event_log_still_reads_and_writes() -> None:
    with mappingstore.open("memory://") as store:
        _long_log(store)
        log = store.events("acct")
        log.apply({"n": -1}, 1105)  # an insert into the chunk
        log.apply({"m": ({"a": 1},)}, 9000)
        assert log.past(1105) == {"n": -1}
        assert len(log) == CHUNK_SIZE + 7
        assert log.prune(1100) == 10
        assert log.events(ops="snapshot")[0].value == {"n": 10}
        assert log.current() == {"n": CHUNK_SIZE + 4, "m": ({"a": 1},)}


# -- directory store: a failed write leaves no temp file ---------------------------------


def _tmp_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".tmp").iterdir())


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch) -> Callable[[int | None], None]:
    """``disk_full_after(n)``: writes of the directory store after the *n*-th fail as a
    full disk does (half the bytes written, then ENOSPC); ``disk_full_after(None)``: no
    longer."""

    real = directory_module._write_all

    def arm(n: int | None) -> None:
        if n is None:
            monkeypatch.setattr(directory_module, "_write_all", real)
            return
        count = [0]

        def write_all(fd: int, data: bytes) -> None:
            count[0] += 1
            if count[0] <= n:
                real(fd, data)
                return
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(directory_module, "_write_all", write_all)

    return arm


def test_dir_failed_write_removes_its_temp_file(
    tmp_path: Path, disk_full_after: Callable[[int | None], None]
) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root) as store:
        store["keep"] = 1
        disk_full_after(0)
        with pytest.raises(BackendError):
            store["big"] = os.urandom(100_000)
        with pytest.raises(BackendError):
            store["keep"] = 2
        with pytest.raises(BackendError):
            store.set("ttl", 1, ttl=60)  # the .expiring marker is written first
        with pytest.raises(BackendError):
            store.series("s").extend([(1, 1.0)])
        assert _tmp_files(root) == []
        assert dict(store.items()) == {"keep": 1}
        assert not (root / "default" / ".expiring").exists()


def _batch(store: Store, items: dict[str, Any]) -> None:
    with store.batch():
        for key, value in items.items():
            store[key] = value


def test_dir_failed_batch_removes_its_temp_files(
    tmp_path: Path, disk_full_after: Callable[[int | None], None]
) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root) as store:
        store["keep"] = 1
        disk_full_after(0)  # the journal cannot be written: nothing happened
        with pytest.raises(BackendError):
            _batch(store, {"a": 1, "b": 2})
        assert _tmp_files(root) == []
        assert dict(store.items()) == {"keep": 1}
        assert not (root / ".journal").exists()
        disk_full_after(2)  # the journal and the first record, then the disk is full
        with pytest.raises(BackendError):
            _batch(store, {"a": 1, "b": 2, "c": 3})
        assert _tmp_files(root) == []
    disk_full_after(None)
    # The journal made it: the next writer completes the batch, as after a crash.
    with DirectoryStore(root) as store:
        assert dict(store.items()) == {"keep": 1, "a": 1, "b": 2, "c": 3}
        assert _tmp_files(root) == []


def test_dir_failed_rename_removes_its_temp_file(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root) as store:
        store["keep"] = 1
        (root / "default" / "stray").mkdir()  # a record file cannot replace a directory
        with pytest.raises(BackendError):
            store["stray"] = 1
        assert _tmp_files(root) == []
        assert dict(store.items()) == {"keep": 1}


# -- directory store: non-regular entries are foreign ------------------------------------


@pytest.fixture(params=[False, True], ids=["no-ttl", "ttl"])
def ttl(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


def _stray_entries(ns_dir: Path) -> None:
    """Entries that are not regular files, named as keys (FIFOs: see the tests below)."""
    (ns_dir / "stray").mkdir()
    (ns_dir / "stray" / "inside").write_bytes(b"x")
    os.symlink(ns_dir / "stray", ns_dir / "link")
    os.symlink(ns_dir / "nowhere", ns_dir / "dangling")
    os.symlink(ns_dir / "a", ns_dir / "alias")  # even to a record file: not followed
    (ns_dir / ("~" + "0" * 64)).mkdir()  # a hashed name: always read, unless skipped


def test_dir_non_regular_entries_are_skipped(tmp_path: Path, ttl: bool) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root, namespace="t") as store:
        store["a"] = 1
        store["b"] = 2
        if ttl:
            store.set("e", 3, ttl=3600)  # listings then read every file
        expected = {"a": 1, "b": 2, **({"e": 3} if ttl else {})}
        _stray_entries(root / "t")
        assert len(store) == len(expected)
        assert sorted(store) == sorted(expected)
        assert dict(store.items()) == expected
        assert sorted(store.values()) == sorted(expected.values())
        assert bool(store)
        for name in ("stray", "link", "dangling", "alias"):
            assert store.get(name) is None
            assert name not in store
            with pytest.raises(KeyError):
                del store[name]
        assert store.get_many(["a", "stray", "link"]) == {"a": 1}
        assert store.namespaces() == ["t"]
        assert store.purge_expired() == 0
        # Nothing foreign was removed; a link is replaced like a missing file.
        assert (root / "t" / "stray" / "inside").exists()
        assert os.path.islink(root / "t" / "dangling")
        store["link"] = 4
        assert store["link"] == 4 and not os.path.islink(root / "t" / "link")
    assert (root / "t" / "stray" / "inside").exists()


def test_dir_namespace_of_foreign_entries_only_is_empty(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with DirectoryStore(root, namespace="t") as store:
        store.set("e", 1, ttl=3600)
        del store["e"]
        _stray_entries(root / "t")
        assert len(store) == 0 and list(store) == [] and not store
        assert "t" not in store.namespaces()


_FIFO_CHILD = """
import json, os, sys
import mappingstore
s = mappingstore.open("dir:///" + sys.argv[1], namespace="t")
out = [len(s), sorted(s), dict(s.items()), bool(s), s.get("pipe"), "pipe" in s,
       s.get_many(["a", "pipe"]), s.namespaces(), s.purge_expired()]
try:
    del s["pipe"]
except KeyError:
    out.append("KeyError")
out.append(os.path.exists(os.path.join(sys.argv[1], "t", "pipe")))
s["pipe"] = 5
out.append(s["pipe"])
print(json.dumps(out))
"""


def test_dir_fifo_is_skipped_and_never_blocks(tmp_path: Path, ttl: bool) -> None:
    # In a child: before the fix, opening a FIFO blocked for ever (the timeout is only a
    # safety net for that failure, not a measure).
    root = tmp_path / "s"
    with DirectoryStore(root, namespace="t") as store:
        store["a"] = 1
        if ttl:
            store.set("e", 2, ttl=3600)
    os.mkfifo(root / "t" / "pipe")
    os.mkfifo(root / "t" / ("~" + "1" * 64))  # a hashed name: always read, unless skipped
    out = subprocess.run(
        [sys.executable, "-c", _FIFO_CHILD, str(root)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    items = {"a": 1, **({"e": 2} if ttl else {})}
    assert json.loads(out.stdout) == [
        len(items),
        sorted(items),
        items,
        True,
        None,
        False,
        {"a": 1},
        ["t"],
        0,
        "KeyError",
        True,  # a foreign entry is left alone
        5,
    ]


def test_dir_unreadable_entry_is_still_an_error(tmp_path: Path) -> None:
    # Only non-regular entries are skipped: a damaged record file still raises.
    root = tmp_path / "s"
    with DirectoryStore(root) as store:
        store.set("a", 1, ttl=3600)
        (root / "default" / "b").write_bytes(b"short")
        with pytest.raises(CorruptValueError):
            store["b"]
        with pytest.raises(MappingStoreError):
            dict(store.items())


# -- a batch whose replay fails (lead's follow-up) ------------------------------------------


def test_dir_batch_over_a_foreign_directory_is_refused_before_the_journal(tmp_path: Path) -> None:
    import mappingstore
    from mappingstore.errors import BackendError

    store = mappingstore.open(f"dir:///{tmp_path}/d")
    store["a"] = 0
    path = store._path(store._ns, "a")
    os.unlink(path)
    os.mkdir(path)  # another program's directory where a's file goes
    with pytest.raises(BackendError):
        store.update({"a": 1, "b": 2})
    assert "b" not in store and not os.path.exists(os.path.join(store.path, ".journal"))
    store["c"] = 3  # no journal left to replay: later writes go on
    store.update({"c": 4, "d": 5})
    assert store.get_many(["b", "c", "d"]) == {"c": 4, "d": 5}
    store.close()


def test_dir_batch_whose_replay_fails_is_unknown_outcome_and_completed_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mappingstore
    from mappingstore._directory import DirectoryStore
    from mappingstore.errors import UnknownOutcomeError

    store = mappingstore.open(f"dir:///{tmp_path}/d")
    real = DirectoryStore._replay
    calls: list[int] = []

    def failing(self: DirectoryStore, ops: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        real(self, ops)

    monkeypatch.setattr(DirectoryStore, "_replay", failing)
    with pytest.raises(UnknownOutcomeError):
        store.update({"x": 1, "y": 2})
    store["z"] = 3  # the next write replays the journal first
    assert store.get_many(["x", "y", "z"]) == {"x": 1, "y": 2, "z": 3}
    store.close()
