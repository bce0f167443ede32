"""The command line on input at the edges: huge ints, deep nesting, non-finite expiries,
read-only stores, special export targets, NaN inside sets and dict keys.

In-process with click's ``CliRunner`` on ``memory://NAME`` stores, like most of
``test_cli.py``; export targets are real files, FIFOs, symbolic links and pipes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import pytest

click_testing = pytest.importorskip("click.testing")

import mappingstore  # noqa: E402
from mappingstore._store import Op  # noqa: E402
from mappingstore.cli import _items  # noqa: E402
from mappingstore.cli._kinds import same_value  # noqa: E402
from tests.cli.support import invoke, ok  # noqa: E402

PASSWORD = "Tr0ub4dor&3-correct-horse"
OTHER_PASSWORD = "n3w-Battery-Staple-42"
#: More digits than CPython converts between int and text by default (4,300).
DIGITS = "9" * 5000
TOO_DEEP = "[" * 100_000 + "]" * 100_000


def _big() -> int:
    from decimal import Decimal

    return int(Decimal(DIGITS))


def failed(code: int, *args: str, **kwargs: Any) -> str:
    """Run a command that must fail with *code* and one line on stderr; return the line."""
    run = invoke(*args, **kwargs)
    assert run.code == code, run
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run
    return lines[0]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


# -- import: "expires" --------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "NaN", "Infinity", "1" + "0" * 400])
def test_import_refuses_an_expiry_that_is_not_a_finite_time(url: str, literal: str) -> None:
    lines = (
        '{"key": "first", "value": 1}\n'  # same batch as the bad line: not written either
        f'{{"key": "a", "value": 1, "expires": {literal}}}\n'
    )
    line = failed(1, "--url", url, "import", input=lines)
    assert "line 2" in line and '"expires" must be a finite number' in line
    with mappingstore.open(url) as s:
        assert len(s) == 0
    # Nothing was stored that breaks a later export.
    ok("--url", url, "export")


def test_import_skips_an_expiry_in_the_past_zero_and_negative_included(url: str) -> None:
    lines = "".join(
        f'{{"key": "{k}", "value": 1, "expires": {e}}}\n'
        for k, e in [("zero", 0), ("negative", -5), ("past", 1.5), ("later", 4e9)]
    )
    run = ok("--url", url, "import", input=lines)
    assert "3 expired skipped" in run.stderr
    with mappingstore.open(url) as s:
        assert list(s) == ["later"]
        assert s.ttl("later") is not None


# -- big int literals and deep nesting ----------------------------------------------------


def test_int_literals_of_any_length_are_read_exactly(url: str, tmp_path: Path) -> None:
    big = _big()
    ok("--url", url, "set", "arg", DIGITS)
    (tmp_path / "v.json").write_text(DIGITS)
    ok("--url", url, "set", "--file", str(tmp_path / "v.json"), "file")
    ok("--url", url, "import", input=json.dumps({"key": "line", "value": 0}).replace("0", DIGITS))
    (tmp_path / "o.json").write_text('{"object": ' + DIGITS + "}")
    ok("--url", url, "import", "--json", str(tmp_path / "o.json"))
    (tmp_path / "p.jsonl").write_text('{"t": 1, "value": -' + DIGITS + "}\n")
    ok("--url", url, "series", "append", "--file", str(tmp_path / "p.jsonl"), "s")
    with mappingstore.open(url) as s:
        assert {k: s[k] for k in s} == {"arg": big, "file": big, "line": big, "object": big}
        assert s.series("s")[1] == -big
    assert json.loads(ok("--url", url, "get", "arg").stdout) == {"$int": DIGITS}
    got = ok("--url", url, "get", "--default", DIGITS, "missing").stdout
    assert json.loads(got) == {"$int": DIGITS}


def test_json_nested_too_deeply_is_a_one_line_error(url: str, tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text(TOO_DEEP)
    assert "nested too deeply" in failed(2, "--url", url, "set", "--file", str(deep), "k")
    assert "nested too deeply" in failed(2, "--url", url, "get", "--default", TOO_DEEP, "k")
    line = failed(1, "--url", url, "import", input='{"key": "k", "value": ' + TOO_DEEP + "}\n")
    assert line.startswith("Error: line 1: nested too deeply")
    obj = tmp_path / "deep-object.json"
    obj.write_text('{"k": ' + TOO_DEEP + "}")
    assert "nested too deeply" in failed(1, "--url", url, "import", "--json", str(obj))
    points = tmp_path / "deep.jsonl"
    points.write_text('{"t": 1, "value": ' + TOO_DEEP + "}\n")
    assert "nested too deeply" in failed(
        2, "--url", url, "series", "append", "--file", str(points), "s"
    )
    with mappingstore.open(url) as s:
        assert len(s) == 0 and s.series_names() == []


def test_the_deepest_value_a_store_holds_round_trips_through_the_shell(
    url: str, other_url: str
) -> None:
    deepest = {"a": nested(1022)}  # 1,023 levels: as deep as the codec stores
    with mappingstore.open(url) as s:
        s["deep"] = deepest
    text = ok("--url", url, "get", "deep").stdout
    exported = ok("--url", url, "export").stdout
    ok("--url", other_url, "import", input=exported)
    ok("--url", other_url, "set", "again", text)
    with mappingstore.open(other_url) as s:
        assert same_value(s["deep"], deepest) and same_value(s["again"], deepest)
    ok("copy", url, other_url)  # the rerun compares the two values: still the same
    assert "1 already present" in ok("copy", url, other_url).stderr


def test_data_errors_escaping_a_command_are_one_line_and_bugs_keep_their_traceback(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("--url", url, "set", "k", "1")

    def raising(exc: BaseException) -> Any:
        def typed_value(value: Any) -> Any:
            raise exc

        return typed_value

    monkeypatch.setattr(_items, "typed_value", raising(RecursionError("deep")))
    assert "nested too deeply" in failed(1, "--url", url, "get", "k")
    try:
        str(10**5000)
    except ValueError as exc:  # CPython's own message, whatever its wording
        limit = exc
    else:  # pragma: no cover - the limit was switched off in this interpreter
        pytest.skip("sys.set_int_max_str_digits(0) is in effect")
    monkeypatch.setattr(_items, "typed_value", raising(limit))
    assert "too many digits" in failed(1, "--url", url, "get", "k")
    monkeypatch.setattr(_items, "typed_value", raising(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        invoke("--url", url, "get", "k")


# -- passwd on a read-only store ----------------------------------------------------------


def test_passwd_refuses_a_read_only_url_of_a_plain_store(url: str) -> None:
    with mappingstore.open(url) as s:
        s["k"] = 1
    env = {"MAPPINGSTORE_NEW_PASSWORD": OTHER_PASSWORD}
    line = failed(1, "--url", url + "?readonly=true", "--security", "low", "passwd", env=env)
    assert "read-only" in line and "no password was set" in line
    # Refused before the new password is asked for (without one, the error would differ).
    assert "read-only" in failed(1, "--url", url + "?readonly=true", "passwd")
    with mappingstore.open(url) as s:
        assert s.info()["encryption"] is None
        s["new"] = 2
        assert s._get_record(s.namespace, "new")[0][:2] == b"\x01\x00"  # type: ignore[index]


def test_passwd_refuses_a_read_only_url_of_an_encrypted_store(url: str) -> None:
    with mappingstore.open(url, password=PASSWORD, security="low") as s:
        s["k"] = 1
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_NEW_PASSWORD": OTHER_PASSWORD}
    line = failed(1, "--url", url + "?readonly=true", "passwd", env=env)
    assert "read-only" in line and "not changed" in line
    with mappingstore.open(url, password=PASSWORD) as s:
        assert s["k"] == 1


# -- export to special files --------------------------------------------------------------


def _fill(url: str) -> str:
    with mappingstore.open(url) as s:
        s["a"] = 1
    return '{"key": "a", "value": 1}\n'


def test_export_writes_into_a_fifo(url: str, tmp_path: Path) -> None:
    expected = _fill(url)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # A reader that is already there: the export's open does not wait, and everything it
    # writes stays in the pipe's buffer until read below.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        ok("--url", url, "-q", "export", str(fifo))
        got = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert got.decode() == expected
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not replaced by a regular file


def test_export_through_a_symbolic_link_replaces_its_target(url: str, tmp_path: Path) -> None:
    expected = _fill(url)
    (tmp_path / "old.jsonl").write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to("old.jsonl")
    ok("--url", url, "-q", "export", str(link))
    assert link.is_symlink() and os.readlink(link) == "old.jsonl"
    assert (tmp_path / "old.jsonl").read_text() == expected
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to("new.jsonl")  # to a file that does not exist yet
    ok("--url", url, "-q", "export", str(dangling))
    assert dangling.is_symlink() and (tmp_path / "new.jsonl").read_text() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dangling.jsonl",
        "link.jsonl",
        "new.jsonl",
        "old.jsonl",
    ]  # no temporary file left behind
    assert stat.S_IMODE(os.stat(tmp_path / "new.jsonl").st_mode) == 0o600


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd")
def test_export_to_a_descriptor_path_writes_to_the_descriptor(url: str) -> None:
    expected = _fill(url)
    read_end, write_end = os.pipe()  # what the shell makes for `export >(...)`
    try:
        try:
            ok("--url", url, "-q", "export", f"/dev/fd/{write_end}")
        finally:
            os.close(write_end)
        got = os.read(read_end, 1 << 16)
    finally:
        os.close(read_end)
    assert got.decode() == expected


# -- copy: NaN in sets and dict keys ------------------------------------------------------


def test_copy_rerun_finds_values_holding_nan_in_sets_and_dict_keys_present(
    url: str, other_url: str
) -> None:
    nan = math.nan
    values = {
        "set": {nan, 1.0},
        "frozenset": frozenset({nan, (nan, 2)}),
        "dict": {nan: 1, "x": {float("nan"): [nan]}},
        "nested": {frozenset({nan}): {nan}},
        "tuple": (nan, {nan}),
    }
    with mappingstore.open(url) as s:
        s.update(values)
    ok("copy", url, other_url)
    run = ok("copy", url, other_url)
    assert f"{len(values)} already present, 0 conflicting" in run.stderr


def test_same_value_nan_aware_in_sets_and_keys_yet_strict() -> None:
    nan = math.nan
    assert same_value({nan, 1.0}, {float("nan"), 1.0})
    assert same_value({nan: 1}, {float("nan"): 1})
    assert same_value(frozenset({(nan,)}), frozenset({(float("nan"),)}))
    assert same_value({1: "a", 2: "b"}, {2: "b", 1: "a"})  # order of keys does not matter
    assert not same_value({nan: 1}, {float("nan"): 2})
    assert not same_value({nan, 1.0}, {nan, 2.0})
    assert not same_value({nan, float("nan")}, {nan})  # two NaN elements are not one
    assert not same_value({0.0}, {-0.0})
    assert not same_value({1}, {1.0})
    assert not same_value({1: "a"}, {1.0: "a"})
    assert not same_value({(1,)}, {(True,)})
    deep = nested(3000)  # iterative: no recursion limit
    assert same_value(deep, nested(3000)) and not same_value(deep, nested(2999))


def test_an_infinite_expiry_already_stored_reads_as_none(url: str, other_url: str) -> None:
    # What an import of "expires": 1e400 left behind before it was refused.
    with mappingstore.open(url) as s:
        s._apply([Op(s.namespace, "k", s._encode(s.namespace, "k", 1), math.inf)])
    assert json.loads(ok("--url", url, "export").stdout) == {"key": "k", "value": 1}
    assert json.loads(ok("--url", url, "--json", "ls", "--long").stdout)[0]["ttl"] is None
    assert json.loads(ok("--url", url, "--json", "ttl", "k").stdout) is None
    assert ok("--url", url, "ttl", "k").stdout == "no expiry\n"
    ok("copy", url, other_url)
    with mappingstore.open(other_url) as s:
        assert s["k"] == 1 and s.ttl("k") is None
