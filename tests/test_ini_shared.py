"""IniStore instances of one file share its parsed copy: adversarial checks.

Several instances of a file in one process (other options, other threads, a symlink),
failed writes, hand edits and replacements between operations and while every instance
is closed (the cache of closed files), ``fork()`` with a thread inside a write, and the
"missing without a parse" probe on hand-written files (dots, ``%``-escapes, BOM, CRLF).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mappingstore import IniStore
from mappingstore._codec import decode_plain
from mappingstore._ini import _Doc, _Shared, record_of
from mappingstore.errors import BackendError, MappingStoreError, SerializationError

FORK = multiprocessing.get_context("fork")
JOIN = 60.0  # seconds: a hang fails the test instead of blocking the suite


def _on_disk(path: Path, ns: str = "default") -> dict[str, Any]:
    """What the bytes on disk hold in namespace *ns* (parsed from scratch)."""
    doc = _Doc.parse(path.read_bytes().decode("utf-8"))
    return {k: decode_plain(record_of(line.value)) for k, line in doc.index.get(ns, {}).items()}


@pytest.fixture(autouse=True)
def _no_recent() -> Iterator[None]:
    _Shared._recent.clear()
    yield
    _Shared._recent.clear()


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(JOIN)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"


# -- several instances, several threads ----------------------------------------------------


def _worker(store: IniStore, tag: str, model: dict[str, Any], errors: list[BaseException]) -> None:
    """Writes, reads, batch, modify, pop, iteration on keys only this thread touches;
    *model* ends as what the store must hold under *tag*."""
    d = "_" if store.dot_names else "."  # dot_names: "a.b" would be a View of "a"
    try:
        for i in range(12):
            k = f"{tag}{d}k{i % 4}"
            store[k] = [tag, i]
            model[k] = [tag, i]
            assert store[k] == [tag, i]
            with store.batch():
                store[f"{tag}{d}b{d}x{i % 3}"] = i
                store[f"{tag}{d}b{d}y"] = {"i": i}
                if i % 2:
                    del store[f"{tag}{d}b{d}x{i % 3}"]
            if i % 2:
                model.pop(f"{tag}{d}b{d}x{i % 3}", None)
            else:
                model[f"{tag}{d}b{d}x{i % 3}"] = i
            model[f"{tag}{d}b{d}y"] = {"i": i}
            store.modify(f"{tag}{d}n", lambda v: v + 1, 0)
            model[f"{tag}{d}n"] = model.get(f"{tag}{d}n", 0) + 1
            if i % 5 == 4:
                assert store.pop(f"{tag}{d}k{i % 4}") == model.pop(f"{tag}{d}k{i % 4}")
            mine = {k: v for k, v in store.items() if k.startswith(tag + d)}
            assert mine == model, (tag, i)
    except BaseException as exc:  # re-raised in the main thread
        errors.append(exc)


def _reader(store: IniStore, stop: threading.Event, errors: list[BaseException]) -> None:
    try:
        while not stop.is_set():
            list(store.items())
            len(store)
            store.get("r.missing.key")
    except BaseException as exc:
        errors.append(exc)


def test_threads_on_instances_with_other_options(tmp_path: Path) -> None:
    f = tmp_path / "s.ini"
    plain = IniStore(f)
    other_ns = IniStore(f, namespace="other", durable=False)
    dotted = IniStore(f, namespace="dots", dot_names=True)
    plain["seed"] = 1
    ro = IniStore(f, readonly=True)
    ro_other = IniStore(f, namespace="other", readonly=True)
    stores = [plain, other_ns, dotted]
    assert len({id(s._s) for s in [*stores, ro, ro_other]}) == 1
    models: list[dict[str, Any]] = [{} for _ in range(6)]
    errors: list[BaseException] = []
    stop = threading.Event()
    readers = [threading.Thread(target=_reader, args=(s, stop, errors)) for s in (ro, ro_other)]
    writers = [
        threading.Thread(target=_worker, args=(stores[i % 3], f"t{i}", models[i], errors))
        for i in range(6)
    ]
    for t in readers + writers:
        t.start()
    _join(writers)
    stop.set()
    _join(readers)
    if errors:
        raise errors[0]
    if True:  # dot_names: a dict is stored as dotted keys
        assert dotted["t2_n"] == 12 and dotted["t2_b_y"] == {"i": 11}
        dotted["view.a"] = 1
        assert dict(dotted["view"].items()) == {"a": 1}
        del dotted["view.a"]
    for i, s in enumerate(stores):
        expected: dict[str, Any] = {}
        for j in range(i, 6, 3):
            expected.update(models[j])
        if s is plain:
            expected["seed"] = 1
        assert dict(s.items()) == expected
        with IniStore(f, namespace=s.namespace) as fresh:  # raw keys, no dot_names
            assert dict(fresh.items()) == _on_disk(f, s.namespace)
            if s is not dotted:
                assert _on_disk(f, s.namespace) == expected
    assert ro.to_dict() == plain.to_dict()
    assert ro_other.to_dict() == other_ns.to_dict()
    # clear() in one namespace, from another instance than the one that wrote it
    with IniStore(f, namespace="other") as clearer:
        clearer.clear()
    assert dict(other_ns.items()) == {} and dict(ro_other.items()) == {}
    assert plain.to_dict() == _on_disk(f)
    for s in [*stores, ro, ro_other]:
        s.close()
    assert str(f) not in _Shared._all


def test_threads_on_encrypted_instances(tmp_path: Path) -> None:
    f = tmp_path / "e.ini"
    a = IniStore(f, password="pw", security="low")
    b = IniStore(f, password="pw", security="low", namespace="b", durable=False)
    models: list[dict[str, Any]] = [{} for _ in range(4)]
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_worker, args=((a, b)[i % 2], f"e{i}", models[i], errors))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    _join(threads)
    if errors:
        raise errors[0]
    assert a.to_dict() == {**models[0], **models[2]}
    assert b.to_dict() == {**models[1], **models[3]}
    text = f.read_text()
    assert "[e0]" in text and '"e0"' not in text  # names readable, values sealed
    for bad in ({"password": "wrong"}, {}):  # a failed open must not keep a share
        with pytest.raises(MappingStoreError):
            IniStore(f, security="low", **bad)
    assert _Shared._all[str(f)].users == 2
    a.close()
    b.close()
    with IniStore(f, password="pw", security="low", namespace="b", readonly=True) as c:
        assert c.to_dict() == {**models[1], **models[3]}
    assert str(f) not in _Shared._all


# -- failed writes -----------------------------------------------------------------------


def test_failed_replace_leaves_no_half_edit_for_the_other_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "f.ini"
    a = IniStore(f)
    b = IniStore(f, namespace="nb")
    a.update({"x": 1, "sec.y": 2})
    b["z"] = 3
    real = os.replace
    calls: list[int] = []

    def flaky(src: Any, dst: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)

    def batch() -> None:
        with a.batch():
            a["x"] = 10
            a["sec.new"] = "n"
            del a["sec.y"]
            a["nb_only"] = 1

    with pytest.raises(BackendError):
        batch()
    monkeypatch.setattr(os, "replace", real)
    for s, ns in ((a, "default"), (b, "nb")):
        assert s.to_dict() == _on_disk(f, ns)
    assert a.get("sec.new") is None and b.get("sec.new") is None
    assert a["x"] == 1 and a["sec.y"] == 2 and b["z"] == 3
    # the other instance's single-key lookups, whose tails are (not) in the file
    b2 = IniStore(f)
    assert b2.get("sec.new") is None and b2["sec.y"] == 2 and b2.get("nb_only") is None
    # and the next write of either starts from the file, not the half edit
    b2["w"] = 5
    assert a.to_dict() == {"x": 1, "sec.y": 2, "w": 5} == _on_disk(f)
    for s in (a, b, b2):
        s.close()


def test_failure_inside_the_edit_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "g.ini"
    a = IniStore(f)
    b = IniStore(f, namespace="o", dot_names=True)
    a.update({"p.q": 1, "r": 2})
    # an edit that fails half way (the second put of a batch raises)
    real_put = _Doc.put
    n = [0]

    def put(self: _Doc, *args: Any) -> None:
        n[0] += 1
        if n[0] == 2:
            raise OSError(5, "simulated")
        real_put(self, *args)

    monkeypatch.setattr(_Doc, "put", put)
    with pytest.raises(BackendError):
        a.set_many({"p.q": 100, "r": 200, "s": 300})
    monkeypatch.setattr(_Doc, "put", real_put)
    assert b.get("q") is None
    assert IniStore(f)["p.q"] == 1
    assert a.to_dict() == {"p.q": 1, "r": 2} == _on_disk(f)
    # the directory fsync fails after the rename: the file holds the new bytes
    real_fsync = os.fsync
    seen = [0]

    def fsync(fd: int) -> None:
        seen[0] += 1
        if seen[0] == 2:
            raise OSError(5, "simulated")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(BackendError):
        a["r"] = 20
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert a.to_dict() == _on_disk(f) == {"p.q": 1, "r": 20}
    b["k"] = 1
    assert a.to_dict() == {"p.q": 1, "r": 20}
    assert b.to_dict() == {"k": 1} == _on_disk(f, "o")
    a.close()
    b.close()


def test_value_that_cannot_be_encoded_mid_batch(tmp_path: Path) -> None:
    f = tmp_path / "h.ini"
    a = IniStore(f)
    b = IniStore(f, namespace="x")
    a["k"] = 1
    before = f.read_bytes()

    def batch() -> None:
        with a.batch():
            a["k"] = 2
            a["bad"] = object()

    with pytest.raises(SerializationError):
        batch()
    assert f.read_bytes() == before
    assert a.to_dict() == {"k": 1} and b.to_dict() == {}
    a.close()
    b.close()


# -- the file changed behind the instances' back ---------------------------------------------


def _same_size_edit(f: Path, old: bytes, new: bytes, *, in_place: bool) -> None:
    """Swap *old* for *new* (same length) in the file and put its mtime back."""
    assert len(old) == len(new)
    st = f.stat()
    data = f.read_bytes()
    assert data.count(old) == 1
    data = data.replace(old, new)
    if in_place:
        with open(f, "r+b") as fp:
            fp.write(data)
    else:
        tmp = f.with_name("hand.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size


@pytest.mark.parametrize("in_place", [False, True], ids=["replaced", "in-place"])
def test_hand_edit_while_every_instance_is_closed(tmp_path: Path, in_place: bool) -> None:
    """The cache of closed files never serves bytes that are no longer on disk, whatever
    the size and mtime say (in place: same inode; replaced: same path)."""
    f = tmp_path / "c.ini"
    with IniStore(f) as a, IniStore(f, namespace="n") as b:
        a.update({"port": 1111, "srv.host": "aaaa"})
        b["v"] = 1
    assert str(f) in _Shared._recent
    _same_size_edit(f, b"1111", b"2222", in_place=in_place)
    with IniStore(f, readonly=True) as a:
        assert a["port"] == 2222  # the probe path (a single key) ...
    _same_size_edit(f, b'"aaaa"', b'"bbbb"', in_place=in_place)
    with IniStore(f) as a:
        assert dict(a.items()) == {"port": 2222, "srv.host": "bbbb"}  # ... and a full read
    _same_size_edit(f, b"v = 1", b"w = 1", in_place=in_place)
    with IniStore(f, namespace="n") as b:
        assert b.get("v") is None and b["w"] == 1
        b["x"] = 2
    # the same bytes again: the kept copy is good, and still right
    with IniStore(f, namespace="n") as b:
        assert dict(b.items()) == {"w": 1, "x": 2} == _on_disk(f, "n")
    f.unlink()
    with IniStore(f) as a:  # created afresh: nothing of the kept copy
        assert dict(a.items()) == {}
    with IniStore(f, namespace="n") as b:
        assert dict(b.items()) == {}


def test_recent_cache_is_bounded_and_by_content(tmp_path: Path) -> None:
    files = [tmp_path / f"r{i}.ini" for i in range(6)]
    for i, f in enumerate(files):
        with IniStore(f) as s:
            s["i"] = i
    assert len(_Shared._recent) <= 4
    for i, f in enumerate(files):
        f.write_text(f"i = {i + 10}\n")
        with IniStore(f, readonly=True) as s:
            assert s["i"] == i + 10
            assert dict(s.items()) == {"i": i + 10}


def test_hand_edits_between_operations_of_two_instances(tmp_path: Path) -> None:
    f = tmp_path / "d.ini"
    a = IniStore(f)
    b = IniStore(f, namespace="nb", readonly=False)
    a.update({"k1": 1000, "sec.k2": "xx"})
    b["k3"] = True
    # replaced with a file of the same size and mtime: a new inode, the old one unlinked
    _same_size_edit(f, b"1000", b"2000", in_place=False)
    assert a["k1"] == 2000 and b.get("k1") is None
    assert dict(a.items()) == _on_disk(f)
    # deleted: both see an empty store; a write of either recreates it
    f.unlink()
    assert a.get("k1") is None and dict(a.items()) == {} and dict(b.items()) == {}
    b["k4"] = 4
    assert dict(a.items()) == {} and dict(b.items()) == {"k4": 4} == _on_disk(f, "nb")
    a["k1"] = 1
    assert dict(b.items()) == {"k4": 4} and a["k1"] == 1
    # written by hand with other content (other size)
    f.write_text("k1 = 7\n[nb::]\nk4 = 8\n[sec]\nk2 = 9\n")
    assert a["k1"] == 7 and b["k4"] == 8 and a["sec.k2"] == 9
    a["k1"] = 70
    assert f.read_text().startswith("k1 = 70\n") and b["k4"] == 8
    a.close()
    b.close()


def test_symlink_and_target_share_one_state(tmp_path: Path) -> None:
    f = tmp_path / "real.ini"
    link = tmp_path / "link.ini"
    a = IniStore(f)
    link.symlink_to(f)
    b = IniStore(link, namespace="other")
    c = IniStore(link)
    assert a._s is b._s is c._s and c.path == str(f)
    a["x"] = 1
    b["y"] = 2
    assert c["x"] == 1 and dict(c.items()) == {"x": 1}
    c["z"] = 3
    assert link.is_symlink() and dict(a.items()) == {"x": 1, "z": 3} == _on_disk(f)
    del c["x"]
    assert a.get("x") is None and b["y"] == 2
    for s in (a, b, c):
        s.close()
    assert str(f) not in _Shared._all


# -- fork ----------------------------------------------------------------------------------


def _fork_child(a: IniStore, path: str, out: Any) -> None:
    try:
        got_a = dict(a.items())
        a["child.a"] = 1
        fresh = IniStore(path, namespace="nb")
        fresh["child.b"] = 2
        fresh.modify("n", lambda v: v + 1, 0)
        other = IniStore(path)
        result = {
            "before": got_a,
            "a": dict(a.items()),
            "fresh": dict(fresh.items()),
            "other": dict(other.items()),
        }
        fresh.close()
        other.close()
        a.close()
        out.put(result)
    except BaseException as exc:
        out.put(repr(exc))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads (3.12+)
def test_fork_while_a_thread_writes(tmp_path: Path) -> None:
    f = tmp_path / "fork.ini"
    a = IniStore(f)
    b = IniStore(f, namespace="nb", durable=False)
    a["seed"] = 1
    b["n"] = 10
    inside, release = threading.Event(), threading.Event()

    def slow(v: int) -> int:
        inside.set()
        release.wait(JOIN)
        return v + 1

    t = threading.Thread(target=lambda: b.modify("n", slow))
    t.start()
    assert inside.wait(JOIN)
    assert b._s.mem._is_owned() is False  # another thread holds it (RLock)
    out = FORK.Queue()
    p = FORK.Process(target=_fork_child, args=(a, str(f), out))
    p.start()
    release.set()  # the child can take the file lock once the parent's write is done
    _join([t])
    p.join(JOIN)
    if p.is_alive():
        p.kill()
        pytest.fail("the child hung")
    result = out.get(timeout=JOIN)
    assert isinstance(result, dict), result
    assert result["before"] == {"seed": 1}
    assert result["a"] == {"seed": 1, "child.a": 1} == result["other"]
    assert result["fresh"] == {"n": 12, "child.b": 2}
    assert dict(a.items()) == {"seed": 1, "child.a": 1} == _on_disk(f)
    assert dict(b.items()) == {"n": 12, "child.b": 2} == _on_disk(f, "nb")
    a.close()
    b.close()


# -- the "missing without a parse" probe ---------------------------------------------------


def _rewrite(f: Path, text: str, *, bom: bool = False, crlf: bool = False) -> None:
    """Another process's write: a new file put in place (the open copy is out of date)."""
    if crlf:
        text = text.replace("\n", "\r\n")
    tmp = f.with_name("other.tmp")
    tmp.write_bytes((("\ufeff" if bom else "") + text).encode("utf-8"))
    os.replace(tmp, f)


@pytest.mark.parametrize(
    ("bom", "crlf"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_probe_on_hand_written_files(tmp_path: Path, bom: bool, crlf: bool) -> None:
    f = tmp_path / "p.ini"
    a = IniStore(f)
    b = IniStore(f, namespace="N", readonly=True)
    a.update({"a.b.c": 0, "port": 0, "café": 0})
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        # (file text, expected in default, expected in N)
        ("[a]\nb.c = 1\n", {"a.b.c": 1}, {}),
        ("a.b.c = 2\n", {"a.b.c": 2}, {}),
        ("[a.b]\nc = 3\n", {"a.b.c": 3}, {}),
        # the tail only in a value or a comment: missing
        ('# port is gone\nx = port\n[a.b]\nd = "c"\n', {"x": "port", "a.b.d": "c"}, {}),
        # escaped names: "%" anywhere turns the probe off
        ("caf%C3%A9 = 4\n", {"café": 4}, {}),
        ("[a%2Eb]\nc = 5\n", {"a.b.c": 5}, {}),
        ("[N::a.b]\nc = 6\n[N::]\nport = 7\n", {}, {"a.b.c": 6, "port": 7}),
        ("[ N :: a ]\nb.c=8\n", {}, {"a.b.c": 8}),
        ("x = 100%\nport = 9\n", {"x": "100%", "port": 9}, {}),
        ("  port   :   10  \n", {"port": 10}, {}),
        ("[a.b]\nc = 11\n    continued\n", {"a.b.c": "11\ncontinued"}, {}),
        ("", {}, {}),
    ]
    for text, in_default, in_n in cases:
        _rewrite(f, text, bom=bom, crlf=crlf)
        for key in ("a.b.c", "port", "café", "x", "a.b.d", "c", "b.c"):
            assert a.get(key) == in_default.get(key), (text, key)
            assert b.get(key) == in_n.get(key), (text, "N", key)
        assert dict(a.items()) == in_default, text
        assert dict(b.items()) == in_n, text
        for key in ("a.b.c", "port", "café"):  # the same lookups once parsed
            assert a.get(key) == in_default.get(key), (text, key)
    # after a probe said "missing", the next write starts from the file
    _rewrite(f, "keep = 1\n", bom=bom, crlf=crlf)
    assert a.get("gone") is None
    a["new"] = 2
    raw = f.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") == bom and (b"\r\n" in raw) == crlf
    assert dict(a.items()) == {"keep": 1, "new": 2}
    a.close()
    b.close()


def test_probe_after_a_failed_write_of_the_other_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "q.ini"
    a = IniStore(f)
    b = IniStore(f)
    a["old"] = 1
    monkeypatch.setattr(os, "replace", _raise_oserror)
    with pytest.raises(BackendError):
        a["fresh"] = 2
    monkeypatch.undo()
    assert b.get("fresh") is None  # "fresh" is in no line of the file
    _rewrite(f, "other = 3\n")
    assert b.get("fresh") is None and b.get("old") is None and b["other"] == 3
    assert dict(a.items()) == {"other": 3}
    a.close()
    b.close()


def _raise_oserror(*_: Any) -> None:
    raise OSError(28, "No space left on device")


# -- lock order -------------------------------------------------------------------------


def test_close_while_another_thread_writes_and_opens_a_store(tmp_path: Path) -> None:
    """Thread 1 is inside a write of file X (a modify function runs) and opens a store of
    file Y; thread 2 closes an instance of X meanwhile. Neither may wait for the other."""
    x, y = tmp_path / "x.ini", tmp_path / "y.ini"
    a, b = IniStore(x), IniStore(x, namespace="b")
    closing = threading.Event()
    opened: list[dict[str, Any]] = []

    def fn(v: int) -> int:
        closing.set()
        # Let thread 2 get into close(): before the fix it then held the registry lock
        # while it waited for this file's lock (a bounded wait, not a timing assertion:
        # after the fix it waits for this file's lock first and never takes the other).
        for _ in range(200):
            if b.closed and not _Shared._guard.acquire(blocking=False):
                break
            if not b.closed:
                threading.Event().wait(0.001)
                continue
            _Shared._guard.release()
            threading.Event().wait(0.001)
        with IniStore(y) as other:
            other["v"] = v
            opened.append(dict(other.items()))
        return v + 1

    t1 = threading.Thread(target=lambda: a.modify("n", fn, 0), daemon=True)
    t2 = threading.Thread(target=lambda: (closing.wait(JOIN), b.close()), daemon=True)
    t1.start()
    t2.start()
    _join([t1, t2])
    assert opened == [{"v": 0}] and a["n"] == 1 and b.closed
    a.close()
