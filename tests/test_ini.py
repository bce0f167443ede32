"""IniStore: the file people read and edit, key fidelity, reloads, several processes.

The dict semantics every backend shares are in the conformance suite
(``TestIniConformance`` at the end); this module checks what only an INI file has:
hand-written files load and keep their comments, values are readable JSON, any key
round-trips, the file is parsed once and re-read when it changes, writers in several
processes never lose each other's writes, and a killed writer never leaves a torn file.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import random
import signal
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mappingstore
from mappingstore import IniStore, Store
from mappingstore._codec import pack, wrap_plain
from mappingstore._ini import TAG, _Doc, record_of, value_text
from mappingstore.errors import (
    InvalidURLError,
    ReadOnlyError,
    StoreCorruptError,
    StoreNotFoundError,
    WrongPasswordError,
)
from mappingstore.testing import VALUE_SAMPLES, StoreTests

FORK = multiprocessing.get_context("fork")

HAND_WRITTEN = """\
# Settings for the web service.
; edited by hand
Title = My Service
debug = true

[server.http]
; the port to listen on
port = 8080
Host: example.com
ratio = 100%
motd = first line
    second line
name = "web"

[Unknown Section]
weird line without delimiter
x = 1
"""


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    path = tmp_path / "conf.ini"
    path.write_text(HAND_WRITTEN)
    return path


# -- the file people edit ---------------------------------------------------------------------


def test_hand_written_file_loads(ini: Path) -> None:
    with IniStore(ini) as store:
        assert store.to_dict() == {
            "Title": "My Service",  # not JSON: a plain string
            "debug": True,
            "server.http.port": 8080,
            "server.http.Host": "example.com",  # ":" delimiter, case kept
            "server.http.ratio": "100%",  # no interpolation
            "server.http.motd": "first line\nsecond line",  # continuation line
            "server.http.name": "web",
            "Unknown Section.x": 1,
        }
    with IniStore(ini, dot_names=True) as store:
        assert store["server"]["http"]["port"] == 8080
        assert store.view("server.http").to_dict()["Host"] == "example.com"


def test_a_write_keeps_comments_unknown_lines_and_layout(ini: Path) -> None:
    with IniStore(ini) as store:
        store["server.http.port"] = 9090
        store["server.http.tls"] = False
        del store["server.http.Host"]
        store["Top"] = "t"
        store["db.url"] = "sqlite:///x.db"
        store["server.http.motd"] = "one line"
    assert (
        ini.read_text()
        == """\
# Settings for the web service.
; edited by hand
Title = My Service
debug = true
Top = "t"

[server.http]
; the port to listen on
port = 9090
ratio = 100%
motd = "one line"
name = "web"
tls = false

[Unknown Section]
weird line without delimiter
x = 1

[db]
url = "sqlite:///x.db"
"""
    )


def test_values_are_json_literals_or_tagged(tmp_path: Path) -> None:
    path = tmp_path / "v.ini"
    with IniStore(path) as store:
        store.update(
            {
                "int": 8080,
                "str": "web",
                "float": 0.1,
                "none": None,
                "list": [1, "a", {"b": None}],
                "tag": "!ms1:not a tag",
                "sep": "a\u2028b\x7f",
                "tuple": (1, 2),
                "bytes": b"\x00\xff",
                "date": datetime.date(2024, 2, 29),
                "nan": float("nan"),
                "intkeys": {1: "x"},
            }
        )
        store.set("secret", "s", encrypt=False)
    lines = dict(line.split(" = ", 1) for line in path.read_text().splitlines() if " = " in line)
    assert lines["int"] == "8080"
    assert lines["str"] == '"web"'
    assert lines["float"] == "0.1"
    assert lines["none"] == "null"
    assert lines["list"] == '[1, "a", {"b": null}]'
    assert lines["tag"] == '"!ms1:not a tag"'
    assert lines["sep"] == '"a\\u2028b\\u007f"'
    for name in ("tuple", "bytes", "date", "nan", "intkeys"):
        assert lines[name].startswith(TAG), name
    assert len(path.read_text().splitlines()) == 13  # one line per value
    with IniStore(path) as again:
        assert again["tuple"] == (1, 2) and again["bytes"] == b"\x00\xff"
        assert again["sep"] == "a\u2028b\x7f" and again["tag"] == "!ms1:not a tag"
        assert again["intkeys"] == {1: "x"}


HAND_LINES = [
    "",
    "# comment",
    "; comment = with delimiter",
    "[section]",
    "[Other Section]",
    "[x.y]",
    "[ns::s]",
    "[broken",
    "[]",
    "key = 1",
    "Key: two words",
    "x.y = [1, 2]",
    "a = ",
    "    indented continuation",
    "junk without delimiter",
    "= no name",
    "u = \u00e9\u2028",
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(HAND_LINES), max_size=25))
def test_any_hand_written_file_keeps_every_line_on_write(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.ini"
        path.write_text("".join(line + "\n" for line in lines))
        with IniStore(path, durable=False) as store:
            before = store.to_dict()
            store["zz new.k"] = 1
            assert store.to_dict() == {**before, "zz new.k": 1}
        after = path.read_text().split("\n")
        # Every original line is still there, in order (the new key only adds lines).
        it = iter(after)
        assert all(any(line == other for other in it) for line in lines)
        with IniStore(path, readonly=True) as again:
            assert again.to_dict() == {**before, "zz new.k": 1}


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8080", 8080),
        ("-1.5e3", -1500.0),
        ('"quoted"', "quoted"),
        ("true", True),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ("bare words", "bare words"),
        ("NaN", "NaN"),  # Python's json extension, not JSON: a string
        ("Infinity", "Infinity"),
        ("08", "08"),
        ("", ""),
        ("'single'", "'single'"),
        ('{"a": 1', '{"a": 1'),
        # JSON literals no stored value can hold (a lone surrogate): the text as written
        # (they raised SerializationError, from every read and listing of the store).
        ('"\\ud800"', '"\\ud800"'),
        ('["\\udc80x"]', '["\\udc80x"]'),
    ],
)
def test_hand_written_values(tmp_path: Path, text: str, value: Any) -> None:
    path = tmp_path / "h.ini"
    path.write_text(f"k = {text}\n")
    with IniStore(path) as store:
        assert store["k"] == value
        assert type(store["k"]) is type(value)


@given(
    st.sampled_from(VALUE_SAMPLES)
    | st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_value_text_round_trips_every_record(value: Any) -> None:
    data = wrap_plain(pack(value))
    text = value_text(data)
    assert "\n" not in text and "\r" not in text and text == text.strip()
    assert record_of(text) == data


def test_encrypted_values_and_metadata_persist(tmp_path: Path) -> None:
    path = tmp_path / "e.ini"
    with IniStore(path, password="pw", security="low") as store:
        store["server.token"] = "s3cret"
    text = path.read_text()
    assert "s3cret" not in text
    assert "[%00meta%00::]" in text and "crypto = " + TAG in text
    assert "[server]\ntoken = " + TAG in text
    with IniStore(path, password="pw", security="low") as store:
        assert store["server.token"] == "s3cret"
    with pytest.raises(WrongPasswordError):
        IniStore(path, password="nope", security="low")


# -- keys ------------------------------------------------------------------------------------


def test_keys_map_to_sections_and_case_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "k.ini"
    with IniStore(path, dot_names=True) as store:
        store["server"] = {"http": {"Port": 1, "port": 2}}
        store["Server.x"] = 3
        store["plain"] = 4
    text = path.read_text()
    assert text == "plain = 4\n\n[server.http]\nPort = 1\nport = 2\n\n[Server]\nx = 3\n"
    with IniStore(path) as store:  # the same file without dot names: the same keys
        assert sorted(store) == ["Server.x", "plain", "server.http.Port", "server.http.port"]


@pytest.mark.parametrize(
    ("key", "line"),
    [
        ("a=b", "a%3Db = 1"),
        ("a:b", "a%3Ab = 1"),
        ("#x", "%23x = 1"),
        (";x", "%3Bx = 1"),
        ("[x]", "%5Bx%5D = 1"),
        (" lead", "%20lead = 1"),
        ("trail ", "trail%20 = 1"),
        ("in side", "in side = 1"),
        ("new\nline", "new%0Aline = 1"),
        ("nul\x00", "nul%00 = 1"),
        ("100%", "100%25 = 1"),
        ("a.", "a. = 1"),
        (".a", ".a = 1"),
        ("ünï", "ünï = 1"),
    ],
)
def test_keys_ini_cannot_hold_are_escaped(tmp_path: Path, key: str, line: str) -> None:
    path = tmp_path / "k.ini"
    with IniStore(path) as store:
        store[key] = 1
    assert path.read_text() == line + "\n"
    with IniStore(path) as store:
        assert list(store) == [key]


def hostile_keys(n: int, seed: int = 5) -> list[str]:
    pieces = [
        "=", ":", "::", "#", ";", "[", "]", " ", "\t", "\n", "\r", "\x00", "%", "%3D", ".",
        "..", "A", "a", "é", "e\u0301", "\u2028", "\x85", "\ufeff", "\x7f", "!ms1:", '"',
        "x", "y", "0", "/", "\\", "default", "::x", "\U0010ffff",
    ]  # fmt: skip
    rng = random.Random(seed)
    keys: set[str] = set()
    while len(keys) < n:
        key = "".join(rng.choices(pieces, k=rng.randint(1, 8)))
        if rng.random() < 0.02:
            key *= 50
        keys.add(key)
    return sorted(keys)


def test_ten_thousand_hostile_keys_round_trip_in_one_write(tmp_path: Path) -> None:
    path = tmp_path / "h.ini"
    keys = hostile_keys(10_000)
    expected = {k: i for i, k in enumerate(keys)}
    with IniStore(path, durable=False) as store:
        writes = count_writes(store)
        store.update(expected)
        assert writes == [1]
        assert store.to_dict() == expected
    text = path.read_text()
    assert all(ch == "\n" or ch.isprintable() for ch in set(text))
    with IniStore(path, readonly=True) as again:  # a fresh parse of the file
        assert again.to_dict() == expected
        assert sorted(again) == keys


# -- namespaces and TTL -----------------------------------------------------------------------


def test_namespaces_are_prefixed_sections(tmp_path: Path) -> None:
    path = tmp_path / "n.ini"
    with IniStore(path) as a, IniStore(path, namespace="other ns:x") as b:
        a["k.x"] = 1
        b["k.x"] = 2
        b["top"] = 3
        assert a.to_dict() == {"k.x": 1} and b.to_dict() == {"k.x": 2, "top": 3}
        assert a.namespaces() == ["default", "other ns:x"]
    assert (
        path.read_text() == "[k]\nx = 1\n\n[other ns%3Ax::k]\nx = 2\n\n[other ns%3Ax::]\ntop = 3\n"
    )


def test_expiry_is_in_the_file_for_every_instance(tmp_path: Path) -> None:
    path = tmp_path / "t.ini"
    now = [1_700_000_000.0]
    with IniStore(path, clock=lambda: now[0]) as a, IniStore(path, clock=lambda: now[0]) as b:
        a.set("session.token", "x", ttl=10)
        assert "[%00ttl%00default::]\nsession.token = 1700000010.0" in path.read_text()
        assert b.ttl("session.token") == 10
        now[0] += 11
        assert "session.token" not in b and len(b) == 0
        a.set("session.token", "y")  # no TTL: the expiry goes
        assert "%00ttl" not in path.read_text()
        a.set("k", 1, ttl=5)
        now[0] += 6
        assert b.purge_expired() == 1
        assert path.read_text() == '[session]\ntoken = "y"\n'


# -- reloading and writing --------------------------------------------------------------------


def count_writes(store: IniStore) -> list[int]:
    calls = [0]
    real = store._write

    def counting(doc: Any) -> None:
        calls[0] += 1
        real(doc)

    store._write = counting  # type: ignore[method-assign]
    return calls


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``[n]``: how many times an INI file has been parsed since the test started."""
    count = [0]
    real = _Doc.parse.__func__  # type: ignore[attr-defined]

    def counting(cls: type[_Doc], text: str) -> _Doc:
        count[0] += 1
        return real(cls, text)  # type: ignore[no-any-return]

    monkeypatch.setattr(_Doc, "parse", classmethod(counting))
    return count


def test_parsed_once_and_reloaded_only_when_the_file_changes(
    tmp_path: Path, parses: list[int]
) -> None:
    path = tmp_path / "r.ini"
    with IniStore(path) as a, IniStore(path, namespace="other") as b:
        a.update({f"k{i}": i for i in range(1000)})
        parses[0] = 0
        for i in range(1000):
            assert a[f"k{i}"] == i
        assert parses[0] == 0  # a's own write is not re-read
        # Instances of one file in a process share the parsed file: b parses nothing.
        assert b.get("k5") is None and a["k5"] == 5
        with IniStore(path) as c:
            assert c["k6"] == 6
        assert parses[0] == 0
        a["k5"] = "changed"
        assert parses[0] == 0
        # Another process's write replaces the file: parsed again, once.
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_set_in_child, args=(str(path), "k7", "from child"))
        proc.start()
        proc.join(60)
        assert proc.exitcode == 0
        assert a["k7"] == "from child" and a["k5"] == "changed"
        assert parses[0] == 1
        assert a["k8"] == 8 and b.get("k8") is None
        assert parses[0] == 1
        with open(path, "r+") as f:  # an in-place edit: same inode
            text = f.read()
            f.seek(0)
            f.write(text.replace("k6 = 6", "k6 = 7"))
        assert a["k6"] == 7
        assert parses[0] == 2


def _set_in_child(path: str, key: str, value: Any) -> None:
    with IniStore(path) as store:
        store[key] = value


def test_deleted_file_is_not_resurrected_by_a_new_instance(tmp_path: Path) -> None:
    """The shared parsed file of a deleted file never reappears in a file created anew."""
    path = tmp_path / "gone.ini"
    with IniStore(path) as a:
        a["old"] = 1
        path.unlink()
        with IniStore(path) as b:
            assert path.read_text() == ""
            assert "old" not in b and "old" not in a
            b["new"] = 2
        assert dict(a) == {"new": 2}


def test_last_close_releases_the_parsed_file(tmp_path: Path) -> None:
    from mappingstore._ini import _Shared

    path = tmp_path / "shared.ini"
    a = IniStore(path)
    b = IniStore(path)
    a["k"] = 1
    assert b["k"] == 1
    shared = _Shared._all[os.path.realpath(path)]
    pin = shared.pin
    assert pin >= 0 and shared.users == 2
    a.close()
    a.close()  # a second close releases nothing more
    assert shared.users == 1 and shared.pin == pin
    b.close()
    assert os.path.realpath(path) not in _Shared._all
    with pytest.raises(OSError):
        os.fstat(pin)
    with IniStore(path) as c:  # the document was kept: the file's bytes are the same
        assert c["k"] == 1
        c["k"] = 2
    path.write_text(path.read_text().replace("k = 2", "k = 3"))  # changed while closed
    with IniStore(path) as d:
        assert d["k"] == 3


def test_reopening_an_unchanged_file_parses_nothing(tmp_path: Path, parses: list[int]) -> None:
    paths = [tmp_path / f"f{i}.ini" for i in range(6)]
    for i, path in enumerate(paths):
        with IniStore(path, durable=False) as store:
            store.update({f"k{j}": j for j in range(100)}, sec=i)
    assert parses[0] == 0
    for path in paths[-4:]:  # the last four closed files are kept
        with IniStore(path, readonly=True) as store:
            assert store["k7"] == 7
    assert parses[0] == 0
    with IniStore(paths[0], readonly=True) as store:  # forgotten: parsed
        assert store["sec"] == 0
    assert parses[0] == 1
    # Same size, same inode, rewritten in place within the timestamp granularity: the
    # digest of the bytes still tells.
    path = paths[-1]
    text = path.read_text()
    assert "k1 = 1\n" in text
    with open(path, "r+") as f:
        f.write(text.replace("k1 = 1\n", "k1 = 9\n"))
    with IniStore(path, readonly=True) as store:
        assert store["k1"] == 9
    assert parses[0] == 2


def test_batch_writes_the_file_once(tmp_path: Path) -> None:
    with IniStore(tmp_path / "b.ini") as store:
        writes = count_writes(store)
        with store.batch():
            for i in range(1000):
                store[f"sec{i % 7}.k{i}"] = i
        assert writes == [1]
        assert len(store) == 1000


def test_readonly_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "ro.ini"
    with pytest.raises(StoreNotFoundError):
        IniStore(path, readonly=True)
    assert not path.exists()
    with IniStore(path) as writer, IniStore(path, readonly=True) as reader:
        assert path.read_text() == ""
        writer["a"] = 1
        assert reader["a"] == 1
        with writer.batch():
            writer["b"] = 2
            del writer["a"]
        assert reader.to_dict() == {"b": 2}
        with pytest.raises(ReadOnlyError):
            reader["x"] = 1


def test_file_details_survive(tmp_path: Path) -> None:
    path = tmp_path / "d.ini"
    path.write_bytes("\ufeff; comment\r\nk = 1\r\n".encode())
    os.chmod(path, 0o600)
    with IniStore(path) as store:
        store["j"] = 2
    assert path.read_bytes() == "\ufeff; comment\r\nk = 1\r\nj = 2\r\n".encode()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    link = tmp_path / "link.ini"
    link.symlink_to(path)
    with IniStore(link) as store:
        store["l"] = 3
    assert link.is_symlink() and IniStore(path, readonly=True).get("l") == 3


def test_not_an_ini_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.ini"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(StoreCorruptError):
        IniStore(path)


def test_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with mappingstore.open("ini:///conf/app.ini?durable=0") as store:
        assert isinstance(store, IniStore)
        assert store.path == str(tmp_path / "conf" / "app.ini")
        store["a.b"] = 1
        url = store.url
    assert url == f"ini:///{tmp_path}/conf/app.ini?durable=false"
    with mappingstore.open(url) as again:
        assert again["a.b"] == 1
    with pytest.raises(InvalidURLError):
        mappingstore.open("ini://conf.ini")
    odd = tmp_path / "odd ?#%25.ini"
    with IniStore(odd) as store, mappingstore.open(store.url) as again:
        assert isinstance(again, IniStore) and again.path == str(odd)


# -- several processes ------------------------------------------------------------------------


def _increment(path: str, n: int) -> None:
    with IniStore(path, durable=False) as store:
        for _ in range(n):
            store.modify("counter", lambda v: v + 1, default=0)


def _set_own_keys(path: str, tag: str, n: int) -> None:
    with IniStore(path, durable=False) as store:
        for i in range(n):
            store[f"{tag}.k{i}"] = i


def _run(target: Callable[..., None], *argss: tuple[Any, ...]) -> None:
    procs = [FORK.Process(target=target, args=args) for args in argss]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)


def test_two_processes_modify_exact_count(tmp_path: Path) -> None:
    path = str(tmp_path / "c.ini")
    _run(_increment, (path, 1000), (path, 1000))
    with IniStore(path) as store:
        assert store["counter"] == 2000


def test_two_processes_never_lose_each_others_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "w.ini")
    _run(_set_own_keys, (path, "one", 300), (path, "two", 300))
    with IniStore(path) as store:
        assert len(store) == 600


def _rewrite_forever(path: str) -> None:
    store = IniStore(path)
    gen = 0
    while True:
        gen += 1
        store.update({f"s{i % 10}.k{i}": gen for i in range(2000)})


def test_kill_9_mid_write_leaves_a_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "k.ini"
    rng = random.Random(3)
    for _ in range(4):
        proc = FORK.Process(target=_rewrite_forever, args=(str(path),))
        proc.start()
        time.sleep(rng.uniform(0.1, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        with IniStore(path) as store:
            values = set(store.values())
            assert len(store) in (0, 2000) and len(values) <= 1
        assert [n for n in os.listdir(tmp_path) if ".tmp." in n] == []


# -- conformance ------------------------------------------------------------------------------


class TestIniConformance(StoreTests):
    persistent = True
    multiprocess = True
    fake_clock = True

    @pytest.fixture
    def factory(self, tmp_path: Path) -> Callable[..., Store]:
        # durable=False only skips the fsync calls (power-loss safety no test can
        # observe) and keeps the suite fast on a real disk; the tests above use the
        # default.
        def open_(name: str = "a", **options: Any) -> Store:
            return IniStore(tmp_path / f"{name}.ini", **{"durable": False, **options})

        return open_


def test_a_key_the_changed_file_cannot_hold_is_missing_without_a_parse(
    tmp_path: Path, parses: list[int]
) -> None:
    """After another process's write, looking up a key whose last name part is nowhere
    in the file (and with no ``%`` escape in it) needs no parse; every other lookup
    parses, so a key spelled by hand in any form INI allows is still found."""
    path = tmp_path / "probe.ini"
    with IniStore(path) as store:
        store.update({f"key{i}": i for i in range(10)})
        parses[0] = 0

        def rewrite(text: str) -> None:  # as another process would: a new file
            tmp = tmp_path / "new.ini"
            tmp.write_text(text)
            os.replace(tmp, path)

        rewrite(path.read_text().replace("key3 = 3\n", ""))
        assert "key3" not in store and store.get("missing") is None
        with pytest.raises(KeyError):
            store.pop("key3")
        assert parses[0] == 0
        assert store["key4"] == 4  # present: parsed
        assert parses[0] == 1
        # Spellings the substring test must not miss: a section, spaces, an escape.
        rewrite("[a.b]\nc=1\n[x]\n  y.z :  2\n[%00meta%00::]\n\n[q]\nk%65y = 3\n")
        assert store["a.b.c"] == 1 and store["x.y.z"] == 2
        assert store["q.key"] == 3
        assert "key4" not in store


_LINE_PARTS = st.sampled_from(
    ["a", "k", "b.c", " ", "  ", "\t", "=", " = ", ":", " : ", "#", ";", "[", "]", "[s]",
     "%", "%41", "%2", "x", "é", "\u3000", "\u2028", "\x85", "1", '"v"', "\\"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_LINE_PARTS, max_size=6).map("".join), max_size=12))
def test_the_parse_fast_path_reads_every_line_as_the_general_path_does(
    lines: list[str],
) -> None:
    import mappingstore._ini as ini

    text = "\n".join(lines) + "\n"

    def shape(doc: _Doc) -> Any:
        return (
            [(s.ns, s.name, s.header, [(x.text, x.head, x.value, x.key) for x in s.lines])
             for s in doc.sections],
            {ns: {k: v.value for k, v in b.items()} for ns, b in doc.index.items()},
            doc.render(),
        )  # fmt: skip

    fast = shape(_Doc.parse(text))
    ini._FAST_PATH = False
    try:
        general = shape(_Doc.parse(text))
    finally:
        ini._FAST_PATH = True
    assert fast == general
