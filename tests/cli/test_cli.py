"""The ``mappingstore`` command line.

Most cases run in-process with click's ``CliRunner`` on ``memory://NAME`` stores (which
keep their data between invocations in one process). The cases that matter end to end
(exit codes, pipes, copies between files, tampering, secrets, shell completion, the
progress bar on a terminal) drive the real program in a subprocess on SQLite files.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shlex
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

click_testing = pytest.importorskip("click.testing")

import mappingstore  # noqa: E402
from mappingstore import MemoryStore  # noqa: E402
from mappingstore._jsonio import from_typed, to_typed  # noqa: E402
from mappingstore.cli import _app, cli  # noqa: E402
from mappingstore.cli._transfer import same_value  # noqa: E402
from tests.cli.support import exact, invoke, ok  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Tr0ub4dor&3-correct-horse"  # distinctive: must never show up in any output
OTHER_PASSWORD = "n3w-Battery-Staple-42"

try:
    from zoneinfo import ZoneInfo

    PARIS: dt.tzinfo | None = ZoneInfo("Europe/Paris")
except Exception:  # no tz database on this machine
    PARIS = None

#: One value of every type the codec stores; each must survive every CLI path exactly.
VALUES: dict[str, Any] = {
    "none": None,
    "true": True,
    "zero": 0,
    "negative": -17,
    "bigint": 2**100 + 1,
    "float": 1.5,
    "negzero": -0.0,
    "nan": math.nan,
    "inf": -math.inf,
    "text": "héllo ✓ \n tab\t",
    "empty": "",
    "list": [1, [2, None], {"a": "b"}],
    "dict": {"name": "Ada", "nested": {"x": [1.25, False]}},
    "dollar": {"$not_a_tag": 1},
    "nonstr": {1: "one", (1, 2): "pair"},
    "bytes": b"\x00\xffbinary",
    "tuple": (1, "two", (3,)),
    "set": {1, 2, 3},
    "frozenset": frozenset({4, 5}),
    "naive": dt.datetime(2024, 2, 29, 12, 30, 45, 123456),
    "offset": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    "date": dt.date(1999, 12, 31),
    "time": dt.time(23, 59, 58, 1),
    "delta": dt.timedelta(days=-2, seconds=5, microseconds=7),
    "decimal": Decimal("1.10"),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "complex": complex(1.5, -2),
}
if PARIS is not None:
    VALUES["zoned"] = dt.datetime(2024, 7, 1, 9, 0, tzinfo=PARIS)


# -- in-process helpers ---------------------------------------------------------------------


def store(url: str, **options: Any) -> mappingstore.Store:
    return mappingstore.open(url, **options)


# -- get / set / del ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUES))
def test_set_typed_json_then_get_round_trips(url: str, name: str) -> None:
    value = VALUES[name]
    ok("--url", url, "set", name, json.dumps(to_typed(value)))
    with store(url) as s:
        assert exact(s[name], value)
    out = ok("--url", url, "get", name).stdout
    assert exact(from_typed(json.loads(out)), value)
    compact = ok("--url", url, "get", "--json", name).stdout
    assert compact.count("\n") == 1
    assert exact(from_typed(json.loads(compact)), value)


def test_set_string_file_bytes_and_raw_get(url: str, tmp_path: Path) -> None:
    ok("--url", url, "set", "--string", "motd", "not JSON: {")
    blob = bytes(range(256))
    (tmp_path / "blob").write_bytes(blob)
    (tmp_path / "doc.json").write_text('{"$tuple": [1, 2]}', encoding="utf-8")
    ok("--url", url, "set", "--file", str(tmp_path / "blob"), "--bytes", "blob")
    ok("--url", url, "set", "--file", str(tmp_path / "doc.json"), "doc")
    ok("--url", url, "set", "--file", "-", "--string", "piped", input="from stdin\n")
    with store(url) as s:
        assert s["motd"] == "not JSON: {"
        assert s["blob"] == blob
        assert s["doc"] == (1, 2)
        assert s["piped"] == "from stdin\n"
    assert ok("--url", url, "get", "--raw", "blob").stdout_bytes == blob
    assert ok("--url", url, "get", "--raw", "motd").stdout == "not JSON: {"
    # --raw only changes str and bytes; other values stay JSON.
    assert ok("--url", url, "get", "--raw", "doc").stdout.split() == [
        "{",
        '"$tuple":',
        "[",
        "1,",
        "2",
        "]",
        "}",
    ]


def test_get_several_keys_and_default(url: str) -> None:
    ok("--url", url, "set", "a", "1")
    ok("--url", url, "set", "b", '"x"')
    assert json.loads(ok("--url", url, "--json", "get", "a", "b").stdout) == {"a": 1, "b": "x"}
    assert json.loads(ok("--url", url, "get", "--default", '{"$tuple": []}', "nope").stdout) == {
        "$tuple": []
    }
    run = invoke("--url", url, "get", "a", "nope", "gone")
    assert run.code == 1
    assert run.stdout == ""
    assert run.stderr.strip() == "Error: not found: 'nope', 'gone'"


def test_set_ttl_and_ttl_expire_commands(url: str) -> None:
    ok("--url", url, "set", "--ttl", "100", "session", '"abc"')
    left = float(ok("--url", url, "ttl", "session").stdout)
    assert 0 < left <= 100
    ok("--url", url, "set", "forever", "1")
    assert ok("--url", url, "ttl", "forever").stdout.strip() == "no expiry"
    assert ok("--url", url, "--json", "ttl", "forever").stdout.strip() == "null"
    ok("--url", url, "expire", "forever", "50")
    assert 0 < json.loads(ok("--url", url, "ttl", "--json", "forever").stdout) <= 50
    ok("--url", url, "expire", "forever", "never")
    with store(url) as s:
        assert s.ttl("forever") is None
        assert 0 < (s.ttl("session") or 0) <= 100
    assert invoke("--url", url, "ttl", "missing").code == 1
    assert invoke("--url", url, "expire", "missing", "5").code == 1
    assert invoke("--url", url, "expire", "forever", "-5").code == 2
    assert invoke("--url", url, "expire", "forever", "soon").code == 2
    assert invoke("--url", url, "set", "--ttl", "0", "k", "1").code == 2


def test_del_reports_missing_but_deletes_the_rest(url: str) -> None:
    for key in ("a", "b", "c"):
        ok("--url", url, "set", key, "1")
    run = invoke("--url", url, "del", "a", "missing", "b")
    assert run.code == 1
    assert "missing" in run.stderr
    with store(url) as s:
        assert list(s) == ["c"]
    assert json.loads(ok("--url", url, "--json", "del", "-f", "c", "zzz").stdout) == {
        "deleted": ["c"],
        "missing": ["zzz"],
    }
    with store(url) as s:
        assert len(s) == 0


def test_options_work_before_and_after_the_command(url: str, other_url: str) -> None:
    ok("--url", url, "set", "--namespace", "ns1", "k", "1")
    ok("set", "--url", other_url, "k", "2")
    with store(url, namespace="ns1") as s:
        assert s["k"] == 1
    with store(url) as s:
        assert "k" not in s
    # The command-level option wins over the group-level one.
    assert ok("--url", url, "get", "--url", other_url, "k").stdout.strip() == "2"
    assert ok("-n", "ns1", "--url", url, "get", "k").stdout.strip() == "1"


def test_url_from_environment(url: str) -> None:
    ok("set", "k", '"env"', env={"MAPPINGSTORE_URL": url})
    assert ok("get", "k", env={"MAPPINGSTORE_URL": url}).stdout.strip() == '"env"'


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "bogus://x", "get", "k"], "unknown store scheme 'bogus'"),
        (["--url", "not-a-url", "get", "k"], "not a store URL"),
        (["--url", "memory://x?nope=1", "get", "k"], "unknown URL option"),
        (["--url", "memory://x", "set", "k", "hello"], "not valid JSON"),
        (["--url", "memory://x", "set", "k", '{"$nope": 1}'], "unknown type tag"),
        (["--url", "memory://x", "set", "", "1"], "keys must not be empty"),
        (["--url", "memory://x", "--dot-names", "set", "a..b", "1"], "empty segment"),
        (["--url", "memory://x", "set", "k"], "exactly one of VALUE or --file"),
        (["--url", "memory://x", "get", "--raw", "a", "b"], "--raw takes exactly one KEY"),
        (["--url", "memory://x", "--security", "absurd", "get", "k"], "Invalid value"),
        (["--url", "memory://x", "frobnicate"], "No such command"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    run = invoke(*args)
    assert run.code == 2, run
    assert message in run.stderr
    assert "Traceback" not in run.stderr
    if "No such command" not in message and "Invalid value" not in message:
        assert run.stderr.count("\n") == 1, run.stderr  # one line, no usage dump


def test_store_errors_exit_1_with_one_line(url: str) -> None:
    ok("--url", url, "--dot-names", "set", "a.b", "1")
    run = invoke("--url", url, "--dot-names", "set", "a.b.c", "2")  # a.b is a leaf
    assert run.code == 1
    assert run.stderr.startswith("Error: cannot set 'a.b.c'")
    assert run.stderr.count("\n") == 1


def test_version() -> None:
    assert ok("--version").stdout.strip() == f"mappingstore, version {mappingstore.__version__}"


# -- listing --------------------------------------------------------------------------------


def test_ls_sorted_prefix_long_and_json(url: str) -> None:
    with store(url, key=b"k" * 32, encrypt=False) as s:
        s["b"] = 1
        s["a"] = "x" * 100
        s.set("a2", [1], ttl=500)
        s.set("secret", "hidden", encrypt=True)
        s["line\nbreak"] = 0
        records = {k: s._get_record(s.namespace, k) for k in s}
    assert ok("--url", url, "ls").stdout.splitlines() == [
        "a",
        "a2",
        "b",
        '"line\\nbreak"',
        "secret",
    ]
    assert ok("--url", url, "ls", "a").stdout.splitlines() == ["a", "a2"]
    rows = json.loads(ok("--url", url, "--json", "ls", "--long").stdout)
    assert [r["key"] for r in rows] == ["a", "a2", "b", "line\nbreak", "secret"]
    for row in rows:
        data, expires = records[row["key"]]  # type: ignore[misc]
        assert row["size"] == len(data)
        assert row["encrypted"] == (row["key"] == "secret")
        assert (row["ttl"] is None) == (expires is None)
    assert 0 < next(r["ttl"] for r in rows if r["key"] == "a2") <= 500
    lines = ok("--url", url, "ls", "-l").stdout.splitlines()
    secret_line = next(line for line in lines if line.endswith(" secret"))
    assert secret_line.split() == [str(len(records["secret"][0])), "-", "enc", "secret"]  # type: ignore[index]
    a2_line = next(line for line in lines if line.endswith(" a2")).split()
    assert a2_line[1].endswith("s") and a2_line[2] == "-"


def test_ls_and_len_under_dot_names_never_confuse_branch_2_with_20(url: str) -> None:
    with store(url) as s:
        s.update({"2": 0, "2.x": 1, "20": 2, "2.y.z": 3, "3": 4})
    assert ok("--url", url, "--dot-names", "ls", "2").stdout.splitlines() == ["2", "2.x", "2.y.z"]
    assert ok("--url", url, "ls", "2").stdout.splitlines() == ["2", "2.x", "2.y.z", "20"]
    assert ok("--url", url, "len").stdout.strip() == "5"
    assert ok("--url", url, "len", "2").stdout.strip() == "4"
    with store(url) as s:
        del s["2"]
    assert ok("--url", url, "--dot-names", "len").stdout.strip() == "3"  # 2, 20, 3
    assert ok("--url", url, "--dot-names", "len", "2").stdout.strip() == "2"  # x, y


def test_tree_draws_the_hierarchy(url: str) -> None:
    with store(url) as s:
        s.update({"app.db.host": "localhost", "app.db.port": 5432, "app.debug": True, "z": None})
    assert ok("--url", url, "tree").stdout == (
        ".\n├── app\n│   ├── db\n│   │   ├── host\n│   │   └── port\n│   └── debug\n└── z\n"
    )
    assert ok("--url", url, "tree", "app.db", "--values").stdout == (
        'app.db\n├── host = "localhost"\n└── port = 5432\n'
    )
    assert ok("--url", url, "tree", "-L", "1").stdout == ".\n├── app ...\n└── z\n"
    assert json.loads(ok("--url", url, "--json", "tree").stdout) == {
        "app": {"db": {"host": None, "port": None}, "debug": None},
        "z": None,
    }
    assert json.loads(ok("--url", url, "--json", "tree", "--values", "app").stdout) == {
        "db": {"host": "localhost", "port": 5432},
        "debug": True,
    }
    assert invoke("--url", url, "tree", "nope").code == 1


def test_get_branch_and_set_mapping_under_dot_names(url: str) -> None:
    ok("--url", url, "--dot-names", "set", "cfg", '{"a": 1, "b": {"c": {"$tuple": [1]}}}')
    with store(url) as s:
        assert dict(s) == {"cfg.a": 1, "cfg.b.c": (1,)}
    out = json.loads(ok("--url", url, "--dot-names", "get", "cfg").stdout)
    assert out == {"a": 1, "b": {"c": {"$tuple": [1]}}}
    ok("--url", url, "--dot-names", "del", "cfg.b")
    with store(url) as s:
        assert dict(s) == {"cfg.a": 1}


def test_url_options_are_not_overridden_by_absent_flags(url: str) -> None:
    # No --dot-names flag, no read-only command: the URL's own options still hold.
    ok("--url", f"{url}?dot_names=true", "set", "cfg", '{"a": 1}')
    with store(url) as s:
        assert dict(s) == {"cfg.a": 1}
    assert json.loads(ok("--url", f"{url}?dot_names=true", "get", "cfg").stdout) == {"a": 1}
    run = invoke("--url", f"{url}?readonly=true", "set", "x", "1")
    assert run.code == 1 and "read-only" in run.stderr, run
    with store(url) as s:
        assert "x" not in s


def test_info_and_namespaces(url: str) -> None:
    with store(url) as s:
        s.update({"a": 1, "b": 2})
    with store(url, namespace="other") as s:
        s["c"] = 3
    info = json.loads(ok("--url", url, "--json", "info").stdout)
    assert info["backend"] == "MemoryStore"
    assert info["url"] == url
    assert info["items"] == 2
    assert info["namespaces"] == {"default": 2, "other": 1}
    assert info["encrypted"] is False and info["encryption"] is None
    assert "durability" in info
    text = ok("--url", url, "info").stdout
    assert "backend:" in text and "default (2), other (1)" in text
    assert ok("--url", url, "namespaces").stdout.splitlines() == ["default", "other"]
    assert json.loads(ok("--url", url, "-n", "other", "--json", "info").stdout)["items"] == 1


def test_info_of_encrypted_store_shows_parameters_and_needs_no_password(url: str) -> None:
    with store(url, password=PASSWORD, security="low") as s:
        s["k"] = 1
    run = ok("--url", url, "--json", "info")
    info = json.loads(run.stdout)
    assert info["encrypted"] is True
    assert info["encryption"]["kdf"] == "argon2id"
    assert info["encryption"]["security"] == "low"
    assert "salt" not in run.stdout and "wrapped" not in run.stdout
    assert PASSWORD not in run.stdout


# -- check ----------------------------------------------------------------------------------


def test_check_reports_damaged_and_tampered_records(url: str) -> None:
    with store(url, password=PASSWORD, security="low", encrypt=False) as s:
        s.update({"good": 1, "bad": 2, "moved": 3})
        s.set("sealed", "x", encrypt=True)
        s.set("sealed2", "y", encrypt=True)
        ns = s.namespace
        data, _ = s._get_record(ns, "bad")  # type: ignore[misc]
        s._put(ns, "bad", data[:-1] + bytes([data[-1] ^ 1]), None)  # flip a bit
        sealed, _ = s._get_record(ns, "sealed")  # type: ignore[misc]
        s._put(ns, "moved", sealed, None)  # a ciphertext moved to another key
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD}
    run = invoke("--url", url, "check", env=env)
    assert run.code == 1
    assert sorted(line.split(":")[0] for line in run.stdout.splitlines()) == [
        "BAD bad",
        "BAD moved",
    ]
    assert "checked 5 items" in run.stderr and "2 bad" in run.stderr
    report = json.loads(invoke("--url", url, "--json", "check", env=env).stdout)
    assert report["ok"] is False
    assert report["items"] == 5
    assert sorted(b["key"] for b in report["bad"]) == ["bad", "moved"]
    with store(url, password=PASSWORD) as s:
        del s["bad"], s["moved"]
    run = invoke("--url", url, "check", env=env)
    assert run.code == 0, run
    assert run.stdout == ""


def test_check_all_namespaces(url: str) -> None:
    with store(url, namespace="n2") as s:
        s["k"] = 1
        s._put("n2", "broken", b"\x01\x00garbage", None)
    with store(url) as s:
        s["fine"] = 1
    assert invoke("--url", url, "check").code == 0
    run = invoke("--url", url, "check", "--all-namespaces")
    assert run.code == 1
    assert run.stdout.startswith("BAD [n2] broken:")


# -- export / import ------------------------------------------------------------------------


def test_export_import_json_lines_round_trips_every_type_and_expiry(
    url: str, other_url: str
) -> None:
    with store(url) as s:
        s.update(VALUES)
        s.set("expiring", "soon", ttl=300)
    exported = ok("--url", url, "export").stdout_bytes
    lines = [json.loads(line) for line in exported.splitlines()]
    assert [line["key"] for line in lines] == sorted([*VALUES, "expiring"])
    assert "expires" in next(line for line in lines if line["key"] == "expiring")
    run = ok("--url", other_url, "import", input=exported)
    assert f"imported {len(VALUES) + 1} items" in run.stderr
    with store(other_url) as s:
        assert sorted(s) == sorted([*VALUES, "expiring"])
        for key, value in VALUES.items():
            assert exact(s[key], value), key
        assert s.ttl("expiring") is not None


def test_export_json_object_matches_store_import_json(
    url: str, other_url: str, tmp_path: Path
) -> None:
    with store(url) as s:
        s.update(VALUES)
    target = tmp_path / "dump.json"
    ok("--url", url, "--json", "export", str(target))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mappingstore-export")]
    if os.name == "posix":  # decrypted values: readable by the owner only
        assert target.stat().st_mode & 0o777 == 0o600
    with store(other_url) as s:
        assert s.import_json(target.read_text(encoding="utf-8")) == len(VALUES)
        for key, value in VALUES.items():
            assert exact(s[key], value), key
        s.clear()
    ok("--url", other_url, "import", "--json", str(target))
    with store(other_url) as s:
        for key, value in VALUES.items():
            assert exact(s[key], value), key


def test_export_plain_is_lossy_json(url: str) -> None:
    with store(url) as s:
        s.update({"b": b"hi", "t": (1, 2)})
    lines = [json.loads(line) for line in ok("--url", url, "export", "--plain").stdout.splitlines()]
    assert lines == [{"key": "b", "value": "aGk="}, {"key": "t", "value": [1, 2]}]


def test_export_import_all_namespaces_and_prefix(url: str, other_url: str) -> None:
    with store(url) as s:
        s.update({"a1": 1, "a2": 2, "b": 3})
    with store(url, namespace="n2") as s:
        s["a3"] = 4
    dump = ok("--url", url, "export", "-A").stdout
    ok("--url", other_url, "import", input=dump)
    with store(other_url) as s, store(other_url, namespace="n2") as s2:
        assert dict(s) == {"a1": 1, "a2": 2, "b": 3}
        assert dict(s2) == {"a3": 4}
    only = ok("--url", url, "export", "--prefix", "a").stdout
    assert [json.loads(line)["key"] for line in only.splitlines()] == ["a1", "a2"]
    assert invoke("--url", url, "--json", "export", "-A").code == 2


def test_import_skips_expired_and_names_a_bad_line(url: str) -> None:
    good = json.dumps({"key": "ok", "value": 1})
    expired = json.dumps({"key": "old", "value": 1, "expires": 1.0})
    run = ok("--url", url, "import", "--batch-size", "1", input=f"{good}\n\n{expired}\n")
    assert "1 expired skipped" in run.stderr
    with store(url) as s:
        assert dict(s) == {"ok": 1}
    run = invoke("--url", url, "import", "--batch-size", "1", input=f'{good}\n{{"key": "x"}}\n')
    assert run.code == 1
    assert "line 2" in run.stderr and "1 items imported before it" in run.stderr
    assert invoke("--url", url, "import", input="not json\n").code == 1
    assert invoke("--url", url, "import", input='{"key": "", "value": 1}\n').code == 1


# -- copy -----------------------------------------------------------------------------------


def test_copy_is_resumable_and_refuses_to_overwrite(url: str, other_url: str) -> None:
    with store(url) as s:
        s.update(VALUES)
        s.set("ttl", 1, ttl=300)
    run = ok("copy", url, other_url)
    assert f"copied {len(VALUES) + 1} items" in run.stderr
    with store(other_url) as d:
        for key, value in VALUES.items():
            assert exact(d[key], value), key
        assert d.ttl("ttl") is not None
    again = json.loads(ok("--json", "copy", url, other_url).stdout)
    assert again["items"] == 0
    assert again["present"] == len(VALUES) + 1
    with store(other_url) as d:
        d["zero"] = 0.0  # == 0 but not the same value
        d["text"] = "changed"
    run = invoke("copy", url, other_url)
    assert run.code == 1
    assert "2 item(s) already hold a different value" in run.stderr
    with store(other_url) as d:
        assert exact(d["zero"], 0.0) and d["text"] == "changed"
    dry = json.loads(ok("--json", "copy", "--dry-run", "--overwrite", url, other_url).stdout)
    assert dry["items"] == 2 and dry["dry_run"] is True
    with store(other_url) as d:
        assert d["text"] == "changed"
    ok("copy", "--overwrite", url, other_url)
    with store(other_url) as d:
        assert exact(d["zero"], 0) and d["text"] == VALUES["text"]


def test_copy_between_namespaces_and_all_namespaces(url: str, other_url: str) -> None:
    with store(url, namespace="src") as s:
        s.update({"a": 1, "b": 2})
    ok("copy", "--src-namespace", "src", "--dst-namespace", "dst", url, url)
    with store(url, namespace="dst") as d:
        assert dict(d) == {"a": 1, "b": 2}
    run = invoke("copy", "--src-namespace", "src", "--dst-namespace", "src", url, url)
    assert run.code == 2
    ok("copy", "-A", url, other_url)
    with store(other_url, namespace="src") as a, store(other_url, namespace="dst") as b:
        assert dict(a) == dict(b) == {"a": 1, "b": 2}
    ok("copy", "--src-namespace", "src", "--dst-namespace", "only-a", "--prefix", "a", url, url)
    with store(url, namespace="only-a") as d:
        assert dict(d) == {"a": 1}


def test_copy_dry_run_creates_nothing(url: str, tmp_path: Path) -> None:
    with store(url) as s:
        s.update({"a": 1, "b": 2})
    target = tmp_path / "new.db"
    report = json.loads(ok("--json", "copy", "--dry-run", url, f"sqlite:///{target}").stdout)
    assert (report["items"], report["present"], report["dry_run"]) == (2, 0, True)
    assert not target.exists()


def test_copy_plain_to_encrypted_rekey_and_never_to_plaintext(
    url: str, other_url: str, tmp_path: Path
) -> None:
    with store(url) as s:
        s.update(VALUES)
    third = f"memory://cli-{uuid.uuid4().hex}"
    try:
        env = {"MAPPINGSTORE_DST_PASSWORD": PASSWORD}
        ok("--security", "low", "copy", url, other_url, env=env)
        with store(other_url, password=PASSWORD) as d:
            assert all(exact(d[k], v) for k, v in VALUES.items())
            assert all(d._get_record(d.namespace, k)[0][:2] == b"\x01\x01" for k in VALUES)  # type: ignore[index]
        # Re-key: source password in, another password out.
        env = {"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_DST_PASSWORD": OTHER_PASSWORD}
        ok("--security", "low", "copy", other_url, third, env=env)
        with store(third, password=OTHER_PASSWORD) as d:
            assert all(exact(d[k], v) for k, v in VALUES.items())
        # Encrypted items are never silently decrypted into a plain destination.
        plain = f"sqlite:///{tmp_path / 'plain.db'}"
        env = {"MAPPINGSTORE_PASSWORD": OTHER_PASSWORD}
        run = invoke("copy", third, plain, env=env)
        assert run.code == 1
        assert "--allow-plaintext" in run.stderr
        ok("copy", "--allow-plaintext", third, plain, env=env)
        with store(plain) as d:
            assert all(exact(d[k], v) for k, v in VALUES.items())
            assert d.info()["encryption"] is None
    finally:
        MemoryStore.drop(third[len("memory://") :])


def test_copy_needs_source_password(url: str, other_url: str) -> None:
    with store(url, password=PASSWORD, security="low") as s:
        s["k"] = 1
    run = invoke("copy", url, other_url)
    assert run.code == 1
    assert "is encrypted: set $MAPPINGSTORE_PASSWORD" in run.stderr
    run = invoke("copy", url, other_url, env={"MAPPINGSTORE_PASSWORD": "wrong-password-here"})
    assert run.code == 1
    assert "wrong password" in run.stderr


# -- secrets and passwords ------------------------------------------------------------------


def test_password_from_file_env_and_prompt(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD + "\n", encoding="utf-8")
    ok("--url", url, "--security", "low", "--password-file", str(pwfile), "set", "k", '"v"')
    with store(url, password=PASSWORD) as s:
        assert s.encrypted and s["k"] == "v"
    assert (
        ok("--url", url, "get", "k", env={"MAPPINGSTORE_PASSWORD": PASSWORD}).stdout.strip()
        == '"v"'
    )
    # No password and no terminal: a clear error, never ciphertext.
    run = invoke("--url", url, "get", "k")
    assert run.code == 1 and "is encrypted" in run.stderr
    # On a terminal the CLI asks (hidden), and gives three tries.
    monkeypatch.setattr(_app, "_interactive", lambda: True)
    run = invoke("--url", url, "get", "k", input=f"nope\n{PASSWORD}\n")
    assert run.code == 0, run
    assert run.stdout.strip() == '"v"'
    assert "Wrong password, try again." in run.stderr
    assert PASSWORD not in run.stdout + run.stderr
    run = invoke("--url", url, "get", "k", input="a\nb\nc\n")
    assert run.code == 1 and "wrong password" in run.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    assert invoke("--url", url, "--password-file", str(empty), "get", "k").code == 2
    assert invoke("--url", url, "--password-file", str(tmp_path / "none"), "get", "k").code == 2


def test_set_encrypt_per_item(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    run = invoke("--url", url, "set", "--encrypt", "k", "1")
    assert run.code == 1
    assert "--encrypt needs the store's password" in run.stderr
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD}
    ok("--url", url, "--security", "low", "set", "--no-encrypt", "plain", "1", env=env)
    ok("--url", url, "set", "sealed", "2", env=env)
    rows = {r["key"]: r for r in json.loads(ok("--url", url, "--json", "ls", "-l").stdout)}
    assert (rows["plain"]["encrypted"], rows["sealed"]["encrypted"]) == (False, True)


def test_name_only_commands_need_no_password_and_never_enable_encryption(url: str) -> None:
    with store(url, password=PASSWORD, security="low") as s:
        s.update({"a": 1, "b": 2})
    assert ok("--url", url, "ls").stdout.splitlines() == ["a", "b"]
    assert ok("--url", url, "len").stdout.strip() == "2"
    ok("--url", url, "expire", "a", "100")
    ok("--url", url, "del", "b")
    with store(url, password=PASSWORD) as s:
        assert dict(s) == {"a": 1}
    plain = f"memory://cli-{uuid.uuid4().hex}"
    try:
        with store(plain) as s:
            s["x"] = 1
        env = {"MAPPINGSTORE_PASSWORD": PASSWORD}
        for args in (["ls"], ["len"], ["info"], ["del", "-f", "y"], ["ttl", "x"]):
            ok("--url", plain, *args, env=env)
        with store(plain) as s:
            assert s.info()["encryption"] is None
    finally:
        MemoryStore.drop(plain[len("memory://") :])


def test_passwd_changes_password_and_keeps_values(url: str) -> None:
    with store(url, password=PASSWORD, security="low") as s:
        s["k"] = b"data"
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_NEW_PASSWORD": OTHER_PASSWORD}
    run = ok("--url", url, "passwd", env=env)
    assert "password changed" in run.stderr
    with store(url, password=OTHER_PASSWORD) as s:
        assert s["k"] == b"data"
        assert s.info()["encryption"]["security"] == "low"  # kept unless --security says otherwise
    with pytest.raises(mappingstore.WrongPasswordError):
        store(url, password=PASSWORD)
    assert invoke("--url", url, "passwd", env={"MAPPINGSTORE_PASSWORD": OTHER_PASSWORD}).code == 2


def test_passwd_on_plain_store_turns_encryption_on(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with store(url) as s:
        s["old"] = 1
    monkeypatch.setattr(_app, "_interactive", lambda: True)
    run = invoke("--url", url, "--security", "low", "passwd", input=f"{PASSWORD}\n{PASSWORD}\n")
    assert run.code == 0, run
    assert "encryption enabled" in run.stderr
    with store(url, password=PASSWORD) as s:
        s["new"] = 2
        assert s["old"] == 1
        assert s._get_record(s.namespace, "new")[0][:2] == b"\x01\x01"  # type: ignore[index]


def test_purge_counts_expired(url: str) -> None:
    now = [1000.0]
    with store(url, clock=lambda: now[0]) as s:
        s.set("gone", 1, ttl=10)
        s["kept"] = 2
    # The real clock is far past 1010: the item is expired for the CLI.
    assert json.loads(ok("--url", url, "--json", "purge").stdout)["items"] == 1
    assert json.loads(ok("--url", url, "--json", "purge").stdout)["items"] == 0


def test_record_reader_reads_the_same_records_one_by_one_or_concurrently() -> None:
    from mappingstore.cli._raw import RecordReader

    class RoundTripStore(MemoryStore):
        """Each record read waits like a request to a server."""

        def _get_record(self, ns: str, key: str) -> Any:
            time.sleep(0.001)
            return super()._get_record(ns, key)

    names = [f"k{i}" for i in range(100)] + ["missing"]
    for cls in (MemoryStore, RoundTripStore):
        with cls() as s:
            s.update({f"k{i}": i for i in range(100)})
            s.set("k7", "expiring", ttl=60)
            with RecordReader(s) as reader:
                got = reader.read(s.namespace, names[:50]) + reader.read(s.namespace, names[50:])
                if cls is RoundTripStore:
                    assert reader._pool is not None  # switched to concurrent reads
            assert got == [s._get_record(s.namespace, n) for n in names]
            assert got[-1] is None and got[7] is not None and got[7][1] is not None


def test_same_value_is_strict() -> None:
    assert same_value({"a": [1, (2,)]}, {"a": [1, (2,)]})
    assert same_value(math.nan, math.nan)
    assert not same_value(1, 1.0)
    assert not same_value(1, True)
    assert not same_value(0.0, -0.0)
    assert not same_value([1], (1,))
    assert not same_value({1}, frozenset({1}))
    assert not same_value({1: "a"}, {True: "a"})
    assert not same_value(Decimal("1.0"), Decimal("1.00"))
    utc = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc)
    assert not same_value(utc, utc.astimezone(dt.timezone(dt.timedelta(hours=2))))
    assert same_value(utc, utc.replace())


# -- the real program, in a subprocess, on SQLite files ------------------------------------


def _program_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a real run: no MAPPINGSTORE_* leaking in, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPPINGSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def program(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    module: str = "mappingstore.cli",
    timeout: float = 60,
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_program_env(env),
        input=input,
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def test_subprocess_set_get_del_and_exit_codes_with_default_url(tmp_path: Path) -> None:
    assert program("set", "greeting", '"hello"', cwd=tmp_path).returncode == 0
    assert (tmp_path / "mappingstore.db").exists()  # the default URL: a file here, no server
    got = program("get", "greeting", cwd=tmp_path)
    assert (got.returncode, got.stdout) == (0, b'"hello"\n')
    missing = program("get", "nope", cwd=tmp_path)
    assert missing.returncode == 1
    assert missing.stderr == b"Error: not found: 'nope'\n"
    usage = program("--url", "sqlite://relative.db", "get", "x", cwd=tmp_path)
    assert usage.returncode == 2
    assert b"has a host part" in usage.stderr and b"Traceback" not in usage.stderr
    assert program("nosuchcommand", cwd=tmp_path).returncode == 2
    assert program("del", "greeting", cwd=tmp_path).returncode == 0
    assert program("get", "greeting", cwd=tmp_path).returncode == 1
    # `python -m mappingstore` is the same program.
    assert program("--version", cwd=tmp_path, module="mappingstore").stdout.startswith(
        b"mappingstore, version"
    )


def test_console_script_is_installed(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("mappingstore")
    if not script.exists():
        pytest.skip("the package is not installed in this environment (no console script)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPPINGSTORE_")}
    url = f"sqlite:///{tmp_path.name}.db"
    done = subprocess.run(
        [str(script), "--url", url, "set", "k", "[1, 2]"], cwd=tmp_path.parent, env=env, check=False
    )
    assert done.returncode == 0
    out = subprocess.run(
        [str(script), "--url", url, "get", "--json", "k"],
        cwd=tmp_path.parent,
        env=env,
        capture_output=True,
        check=False,
    )
    assert out.stdout == b"[1, 2]\n"


def test_subprocess_export_import_through_a_pipe(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.db", tmp_path / "dst.db"
    with store(f"sqlite:///{src}") as s:
        s.update(VALUES)
        s.set("expiring", [1], ttl=3600)
    env = _program_env()
    cmd = [sys.executable, "-m", "mappingstore.cli"]
    exporter = subprocess.Popen(
        [*cmd, "--url", f"sqlite:///{src}", "export", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    importer = subprocess.run(
        [*cmd, "--url", f"sqlite:///{dst}", "import", "-"],
        stdin=exporter.stdout,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert exporter.stdout is not None and exporter.stderr is not None
    exporter.stdout.close()
    export_err = exporter.stderr.read()
    exporter.stderr.close()
    assert exporter.wait(timeout=60) == 0, export_err
    assert importer.returncode == 0, importer.stderr
    # Not a terminal: no progress bar, only the one-line summary.
    assert export_err.decode().splitlines() == [export_err.decode().strip()]
    assert export_err.startswith(f"exported {len(VALUES) + 1} items (".encode())
    assert b"\r" not in importer.stderr
    with store(f"sqlite:///{dst}") as d:
        assert sorted(d) == sorted([*VALUES, "expiring"])
        for key, value in VALUES.items():
            assert exact(d[key], value), key
        assert 0 < (d.ttl("expiring") or 0) <= 3600


def test_subprocess_copy_between_namespaces_and_to_encrypted(tmp_path: Path) -> None:
    src = f"sqlite:///{tmp_path / 'src.db'}"
    enc = f"sqlite:///{tmp_path / 'enc.db'}"
    with store(src, namespace="a") as s:
        s.update({f"k{i}": {"i": i, "t": (i,)} for i in range(250)})
    run = program(
        "copy",
        "--batch-size",
        "100",
        "--src-namespace",
        "a",
        "--dst-namespace",
        "b",
        src,
        src,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith(b"copied 250 items")
    with store(src, namespace="a") as a, store(src, namespace="b") as b:
        assert dict(a) == dict(b)
    env = {"MAPPINGSTORE_DST_PASSWORD": PASSWORD}
    run = program("--security", "low", "copy", "-n", "b", src, enc, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    # Resumed: nothing left to copy.
    again = program(
        "--security", "low", "--json", "copy", "-n", "b", src, enc, cwd=tmp_path, env=env
    )
    assert json.loads(again.stdout)["present"] == 250
    with store(enc, password=PASSWORD, namespace="b") as e:
        assert e.encrypted
        assert e == {f"k{i}": {"i": i, "t": (i,)} for i in range(250)}
        assert all(e._get_record("b", k)[0][:2] == b"\x01\x01" for k in e)  # type: ignore[index]
    no_pw = program("get", "-n", "b", "--url", enc, "k1", cwd=tmp_path)
    assert no_pw.returncode == 1 and b"is encrypted" in no_pw.stderr


def test_subprocess_check_on_tampered_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with store(url) as s:
        s.update({"a": 1, "b": "two", "c": [3]})
        data, expires = s._get_record(s.namespace, "b")  # type: ignore[misc]
        s._put(s.namespace, "b", data[:6] + b"\x00" + data[7:], expires)  # a damaged byte
    run = program("--url", url, "check", cwd=tmp_path)
    assert run.returncode == 1
    assert run.stdout.decode().splitlines() == ["BAD b: stored value is damaged: checksum mismatch"]
    assert b"checked 3 items" in run.stderr


def _secret_scenarios(url: str, tmp_path: Path) -> list[tuple[list[str], dict[str, str]]]:
    """Commands (and their environment) that touch a password, on success and error paths."""
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSWORD, encoding="utf-8")
    good = {"MAPPINGSTORE_PASSWORD": PASSWORD}
    wrong = {"MAPPINGSTORE_PASSWORD": PASSWORD[::-1]}
    return [
        (["--url", url, "--security", "low", "set", "k", '"v"'], good),  # 0: creates the store
        (["--url", url, "--password-file", str(pwfile), "get", "k"], {}),  # 1
        (["--url", url, "get", "k"], wrong),  # 2: wrong password
        (["--url", url, "get", "k"], {}),  # 3: no password
        (["--url", url, "--json", "info"], good),
        (["--url", url, "check"], wrong),
        (["--url", url, "set", "k", "not json"], good),
        (["--url", url, "passwd"], good),  # no new password given
        (["--url", url, "passwd"], {**wrong, "MAPPINGSTORE_NEW_PASSWORD": "x" * 12}),
        (["copy", url, f"sqlite:///{tmp_path / 'c.db'}"], wrong),
        # A password inside a URL is redacted in every message about that URL.
        (["--url", f"postgresql://user:{PASSWORD}@127.0.0.1:9/db", "get", "k"], {}),
        (["--url", f"redis://user:{PASSWORD}@127.0.0.1:9/0", "get", "k"], {}),
    ]


def _check_secret_runs(runs: list[tuple[int, bytes, bytes]]) -> None:
    assert [code for code, _, _ in runs[:2]] == [0, 0]
    assert runs[2][0] == 1 and b"wrong password" in runs[2][2]
    assert runs[3][0] == 1 and b"is encrypted" in runs[3][2]
    assert all(code != 0 for code, _, _ in runs[5:])  # every error path
    for code, out, err in runs:
        for stream in (out, err):
            assert PASSWORD.encode() not in stream, (code, stream)
            assert b"Traceback" not in stream, (code, stream)


def test_secrets_never_appear_in_any_output(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    runs = []
    extra = [
        (["--url", url, "info"], {"MAPPINGSTORE_PASSWORD": PASSWORD}),
        (["--url", url, "ls", "-l"], {"MAPPINGSTORE_PASSWORD": PASSWORD}),
        (["--url", url, "export"], {"MAPPINGSTORE_PASSWORD": PASSWORD}),
        (["--url", url, "check"], {"MAPPINGSTORE_PASSWORD": PASSWORD}),
    ]
    scenarios = _secret_scenarios(url, tmp_path)
    for args, env in [*scenarios, *extra]:
        run = invoke(*args, env=env)
        runs.append((run.code, run.stdout_bytes, run.stderr.encode()))
    _check_secret_runs(runs[: len(scenarios)])
    assert [code for code, _, _ in runs[len(scenarios) :]] == [0] * len(extra)
    assert all(PASSWORD.encode() not in out + err for _, out, err in runs)


def test_subprocess_secrets_never_appear_in_any_output(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    runs = []
    for args, env in _secret_scenarios(url, tmp_path):
        done = program(*args, cwd=tmp_path, env=env)
        runs.append((done.returncode, done.stdout, done.stderr))
    _check_secret_runs(runs)


def test_subprocess_shell_completion(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with store(url) as s:
        s.update({"greeting": 1, "green": 2, "other": 3})
    script = program(cwd=tmp_path, env={"_MAPPINGSTORE_COMPLETE": "bash_source"})
    assert script.returncode == 0
    assert b"_mappingstore_completion" in script.stdout
    words = f"mappingstore --url {url} get gre"
    done = program(
        cwd=tmp_path,
        env={"_MAPPINGSTORE_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": "4"},
    )
    assert done.returncode == 0
    assert sorted(line.split(",", 1)[1] for line in done.stdout.decode().splitlines()) == [
        "green",
        "greeting",
    ]


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_only_on_a_terminal_and_not_with_quiet(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    termios = pytest.importorskip("termios")
    url = f"sqlite:///{tmp_path / 'p.db'}"
    with store(url) as s:
        s.update({f"k{i}": i for i in range(2000)})

    def stderr_on_tty(*args: str) -> str:
        master, slave = os.openpty()
        # A fresh pseudo-terminal is 0 columns wide; give it the size of a real one.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        try:
            env = _program_env()
            done = subprocess.run(
                [sys.executable, "-m", "mappingstore.cli", "--url", url, *args],
                stdout=subprocess.DEVNULL,
                stderr=slave,
                env=env,
                timeout=60,
                check=False,
            )
            assert done.returncode == 0
            os.close(slave)
            slave = -1
            chunks = []
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the terminal has no writer left
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode("utf-8", "replace")
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)

    shown = stderr_on_tty("export", str(tmp_path / "out.jsonl"))
    assert "export:" in shown and "\r" in shown  # tqdm's bar, redrawn in place
    assert "exported 2,000 items" in shown
    assert stderr_on_tty("--quiet", "export", str(tmp_path / "out2.jsonl")) == ""
    assert (tmp_path / "out2.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


# -- docs/cli.md: every console example runs, and prints what the page shows -------------

DOCS_PAGE = ROOT / "docs" / "cli.md"


def console_examples(page: Path) -> list[tuple[int, str, str]]:
    """``(line, command, expected output)`` of each ``$ `` line in the page's console blocks.

    A block preceded by ``<!-- no-test -->`` is skipped (installation, shell set-up).
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    examples: list[tuple[int, str, str]] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        skip = i > 0 and lines[i - 1].strip() == "<!-- no-test -->"
        i += 1
        current: list[Any] | None = None
        while lines[i].strip() != "```":
            if lines[i].startswith("$ "):
                current = [i + 1, lines[i][2:], []]
                if not skip:
                    examples.append(current)  # type: ignore[arg-type]
            elif current is not None:
                current[2].append(lines[i])
            i += 1
        i += 1
    return [(n, cmd, "".join(f"{line}\n" for line in out)) for n, cmd, out in examples]


def _in_process(command: str) -> tuple[dict[str, str], list[str]] | None:
    """``(env, args)`` when *command* is a plain ``[VAR=value ...] mappingstore ARGS``."""
    import shlex

    if any(c in command for c in "|&;<>$`()"):
        return None  # pipes, redirections, substitutions: a real shell runs those
    words = shlex.split(command)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words or words[0] != "mappingstore":
        return None
    return env, words[1:]


@pytest.mark.skipif(not DOCS_PAGE.exists(), reason="docs/cli.md is not in this checkout")
def test_docs_cli_page_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plain commands run in-process (fast); shell pipelines run in bash with the real program."""
    import doctest
    import shlex

    examples = console_examples(DOCS_PAGE)
    assert len(examples) >= 10
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "mappingstore"
    shim.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m mappingstore.cli "$@"\n',
        encoding="utf-8",
    )
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    env = _program_env()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    checker = doctest.OutputChecker()
    in_shell = 0
    for line, command, want in examples:
        simple = _in_process(command)
        if simple is not None:
            result = click_testing.CliRunner().invoke(
                cli, simple[1], env=simple[0], prog_name="mappingstore"
            )
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise result.exception
            got = result.stdout + result.stderr
        else:
            in_shell += 1
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=work,
                env=env,
                capture_output=True,
                timeout=60,
                check=False,
            )
            got = (done.stdout + done.stderr).decode("utf-8")
        assert checker.check_output(want, got, doctest.ELLIPSIS), (
            f"docs/cli.md line {line}: $ {command}\n--- shown:\n{want}--- printed:\n{got}"
        )
    assert in_shell >= 2  # the pipe and the command substitution really ran in a shell


# -- every backend, through the real program ----------------------------------------------

BACKENDS = ["sqlite", "dir", "ini", "shm", "redis", "postgres"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``(url, namespace)`` of an empty namespace on each backend (servers: 127.0.0.1)."""
    from tests import servers

    kind: str = request.param
    tag = f"cli{uuid.uuid4().hex[:12]}"
    ns = f"ns-{tag}"

    def query(url: str, option: str) -> str:
        return url + ("&" if "?" in url else "?") + option

    # Servers are shared with other tests (which may leave an encrypted store behind):
    # a private key prefix / table makes each run a store of its own.
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'backend.db'}",
        "dir": f"dir:///{tmp_path / 'backend-dir'}",
        "ini": f"ini:///{tmp_path / 'backend.ini'}",
        "shm": f"shm://{tag}",
        "redis": query(servers.REDIS_URL, f"prefix={tag}"),
        "postgres": query(servers.POSTGRES_URL, f"table={tag}"),
    }[kind]
    try:
        mappingstore.open(url, namespace=ns).close()
    except (mappingstore.BackendUnavailableError, mappingstore.UnknownSchemeError) as exc:
        servers.unavailable(kind, exc)
        raise  # unreachable: unavailable() skips or fails
    try:
        yield url, ns
    finally:
        with mappingstore.open(url, namespace=ns) as handle:
            handle.clear()
            if kind == "shm":
                handle.unlink()  # type: ignore[attr-defined]
        if kind == "postgres":
            import psycopg
            from psycopg import sql

            with psycopg.connect(servers.POSTGRES_URL, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(tag)))


def test_every_backend_set_get_import_copy_back_check(
    backend: tuple[str, str], tmp_path: Path
) -> None:
    """In-process for the small commands; the real program, in a pipe, for the data moves."""
    url, ns = backend
    ok("--url", url, "-n", ns, "set", "k", '{"$tuple": [1, {"$bytes": "AA=="}]}')
    assert (
        ok("--url", url, "-n", ns, "get", "--json", "k").stdout
        == '{"$tuple": [1, {"$bytes": "AA=="}]}\n'
    )
    # Every value type in through `export | import`, out again through `copy` to SQLite.
    seed = f"sqlite:///{tmp_path / 'seed.db'}"
    with store(seed) as s:
        s.update(VALUES)
        s.set("expiring", "soon", ttl=3600)
    cmd = f"{shlex.quote(sys.executable)} -m mappingstore.cli"
    target = f"--url {shlex.quote(url)} -n {shlex.quote(ns)}"
    pipeline = f"{cmd} --url {shlex.quote(seed)} -q export | {cmd} {target} -q import"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline],
        cwd=tmp_path,
        env=_program_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    back = f"sqlite:///{tmp_path / 'back.db'}"
    done = program("copy", "--src-namespace", ns, url, back, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with store(back) as b:
        assert sorted(b) == sorted([*VALUES, "expiring", "k"])
        for key, value in VALUES.items():
            assert exact(b[key], value), key
        assert 0 < (b.ttl("expiring") or 0) <= 3600
    ok("--url", url, "-n", ns, "check")
    assert (
        len(json.loads(ok("--url", url, "-n", ns, "--json", "ls", "-l").stdout)) == len(VALUES) + 2
    )
    ok("--url", url, "-n", ns, "del", "k", "expiring")
    assert ok("--url", url, "-n", ns, "len").stdout == f"{len(VALUES)}\n"


@pytest.mark.slow
def test_copy_100k_items_sqlite_to_redis_and_back(tmp_path: Path) -> None:
    """The issue's migration check: 100,000 items out to Redis and back, item by item."""
    from tests import servers

    tag = f"cli{uuid.uuid4().hex[:12]}"
    redis_url = servers.REDIS_URL + ("&" if "?" in servers.REDIS_URL else "?") + f"prefix={tag}"
    try:
        mappingstore.open(redis_url, namespace="big").close()
    except (mappingstore.BackendUnavailableError, mappingstore.UnknownSchemeError) as exc:
        servers.unavailable("redis", exc)
    src, back = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'back.db'}"
    with store(src) as s, s.batch():
        for i in range(100_000):
            s[f"item:{i}"] = {"i": i, "pair": (i, str(i)), "blob": i.to_bytes(4, "big")}
        s.set("item:expiring", [1.5], ttl=3600)
    try:
        # A generous limit: a loaded CI machine, and one round trip per record read.
        there = program("copy", "--dst-namespace", "big", src, redis_url, cwd=tmp_path, timeout=600)
        assert there.returncode == 0, there.stderr
        assert there.stderr.startswith(b"copied 100,001 items"), there.stderr
        home = program("copy", "--src-namespace", "big", redis_url, back, cwd=tmp_path, timeout=600)
        assert home.returncode == 0, home.stderr
        with store(src) as a, store(back) as b:
            assert len(b) == len(a) == 100_001
            for key, value in a.items():
                assert exact(b[key], value), key
            assert 0 < (b.ttl("item:expiring") or 0) <= 3600
    finally:
        with mappingstore.open(redis_url, namespace="big") as r:
            r.clear()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs pty.fork")
def test_password_prompt_on_a_real_terminal_is_hidden(tmp_path: Path) -> None:
    """On a terminal the program asks for the password, and the typed text is not echoed."""
    import pty
    import select

    url = f"sqlite:///{tmp_path / 'tty.db'}"
    with store(url, password=PASSWORD, security="low") as s:
        s["k"] = "opened"
    pid, fd = pty.fork()
    if pid == 0:  # the child: the real program, with the pseudo-terminal as its terminal
        try:
            os.execve(
                sys.executable,
                [sys.executable, "-m", "mappingstore.cli", "--url", url, "get", "k"],
                _program_env(),
            )
        finally:
            os._exit(127)
    transcript = b""
    try:
        while b"Password for" not in transcript:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, transcript
            transcript += os.read(fd, 4096)
        os.write(fd, PASSWORD.encode() + b"\n")
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, transcript
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the program exited and closed the terminal
                break
            if not chunk:
                break
            transcript += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert b'"opened"' in transcript
    assert PASSWORD.encode() not in transcript  # not echoed, not printed
