"""The ``series`` and ``events`` command groups of the command line.

In-process with click's ``CliRunner`` on ``memory://NAME`` stores (which keep their data
between invocations in one process); every result is checked against the library's own
view of the same store. One end-to-end case runs the real program on a SQLite file.
"""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

click_testing = pytest.importorskip("click.testing")

import mappingstore  # noqa: E402
from mappingstore.cli._app import UsageFailure  # noqa: E402
from mappingstore.cli._timeseries import parse_changes  # noqa: E402
from tests.cli.support import Run, invoke, ok  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "Tr0ub4dor&3-series-horse"  # distinctive: must never show up in any output


def as_json(run: Run) -> Any:
    return json.loads(run.stdout)


# -- series ---------------------------------------------------------------------------------


def test_append_pairs_then_range_first_last(url: str) -> None:
    ok("--url", url, "series", "append", "temp", "100", "21.5", "-160", "22", "0", '"zero"')
    # Negative and zero timestamps, any order; a later append of the same time replaces.
    ok("--url", url, "series", "append", "temp", "100", '{"$tuple": [1, 2]}')
    series = mappingstore.open(url).series("temp")
    assert series.range() == [(-160, 22), (0, "zero"), (100, (1, 2))]
    assert ok("--url", url, "series", "range", "temp").stdout == (
        '-160\t22\n0\t"zero"\n100\t{"$tuple": [1, 2]}\n'
    )
    assert as_json(ok("--url", url, "--json", "series", "range", "temp", "--start", "0")) == [
        {"t": 0, "value": "zero"},
        {"t": 100, "value": {"$tuple": [1, 2]}},
    ]
    assert ok("--url", url, "series", "first", "temp").stdout == "-160\t22\n"
    assert as_json(ok("--url", url, "series", "last", "--json", "temp")) == {
        "t": 100,
        "value": {"$tuple": [1, 2]},
    }


def test_range_bounds_count_and_freq_match_the_library(url: str) -> None:
    store = mappingstore.open(url)
    series = store.series("s")
    series.extend((t, t * 10) for t in range(0, 100, 5))
    cases: list[tuple[list[str], dict[str, Any]]] = [
        (["--start", "12", "--end", "40"], {"start": 12, "end": 40}),
        (["--end", "-1"], {"end": -1}),
        (["--count", "3"], {"n": 3}),
        (["-c", "0"], {"n": 0}),
        (["--freq", "12"], {"freq": 12}),
        (["--start", "50", "--freq", "20", "--count", "2"], {"start": 50, "freq": 20, "n": 2}),
        (["--start", "60", "--end", "10"], {"start": 60, "end": 10}),
    ]
    for args, kwargs in cases:
        got = as_json(ok("--url", url, "--json", "series", "range", "s", *args))
        assert [(p["t"], p["value"]) for p in got] == series.range(**kwargs), args


def test_unknown_series_reads_empty_and_first_last_exit_1(url: str) -> None:
    assert ok("--url", url, "series", "range", "nope").stdout == ""
    for which in ("first", "last"):
        run = invoke("--url", url, "series", which, "nope")
        assert run.code == 1
        assert run.stderr == "Error: not found: series 'nope' has no points\n"


def test_append_from_json_lines_file_and_stdin(url: str, tmp_path: Path) -> None:
    lines = [
        {"t": 3, "value": {"$bytes": "AAE="}},
        {"t": 1, "value": [1, {"a": None}]},
        {"t": 2, "value": {"$float": "nan"}},
    ]
    path = tmp_path / "points.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    run = ok("--url", url, "series", "append", "f", "--file", str(path))
    assert run.stderr == "3 point(s) written to series 'f'\n"
    got = mappingstore.open(url).series("f").range()
    assert [t for t, _ in got] == [1, 2, 3]
    assert got[0][1] == [1, {"a": None}] and got[2][1] == b"\x00\x01"
    assert got[1][1] != got[1][1]  # NaN survives
    # The --json output of range is what --file reads back: a round trip through stdin.
    exported = as_json(ok("--url", url, "--json", "series", "range", "f"))
    stdin = "".join(json.dumps(p) + "\n" for p in exported)
    ok("--url", url, "series", "append", "g", "--file", "-", input=stdin)
    assert repr(mappingstore.open(url).series("g").range()) == repr(got)


def test_append_string_values(url: str) -> None:
    ok("--url", url, "series", "append", "--string", "log", "1", "plain text", "2", "[1]")
    assert mappingstore.open(url).series("log").range() == [(1, "plain text"), (2, "[1]")]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["s"], None, "give T VALUE pairs or --file"),
        (["s", "1"], None, "odd number of arguments"),
        (["s", "x", "1"], None, "T must be an integer timestamp, got 'x'"),
        (["s", "1", "not json"], None, "the value at 1 is not valid JSON"),
        (["s", "1", "2", "--file", "-"], "", "give T VALUE pairs or --file"),
        (["s", "--file", "-"], '{"t": 1, "value": 1}\n[1, 2]\n', "line 2 of the file is not"),
        (["s", "--file", "-"], '{"t": 1.5, "value": 1}\n', "must be an integer, got 1.5"),
        (["s", "--file", "-"], "{oops\n", "line 1 of the file is not valid JSON"),
        (["s", "--file", "-"], '{"t": 1, "value": {"$bytes": 5}}\n', "bad typed-JSON tag"),
    ],
)
def test_append_usage_errors_exit_2_and_store_nothing(
    url: str, args: list[str], stdin: str | None, message: str
) -> None:
    run = invoke("--url", url, "series", "append", *args, input=stdin)
    assert run.code == 2, run
    assert message in run.stderr and "Traceback" not in run.stderr
    assert mappingstore.open(url).series_names() == []


def test_missing_with_check_and_json(url: str) -> None:
    series = mappingstore.open(url).series("m")
    series.extend([(0, 1), (10, 1), (30, 1)])
    assert ok("--url", url, "series", "missing", "m", "0", "45", "--freq", "10").stdout == (
        "20\n40\n"
    )
    assert as_json(
        ok("--url", url, "--json", "series", "missing", "m", "-20", "0", "--freq", "10")
    ) == [
        -20,
        -10,
    ]
    # END defaults to START; --check turns "something is missing" into status 1.
    assert ok("--url", url, "series", "missing", "m", "10", "--freq", "5", "--check").stdout == ""
    run = invoke("--url", url, "series", "missing", "m", "0", "30", "--freq", "10", "--check")
    assert (run.code, run.stdout) == (1, "20\n")
    no_freq = invoke("--url", url, "series", "missing", "m", "0", "30")
    assert no_freq.code == 2 and "--freq" in no_freq.stderr


def test_ls_long_and_rm(url: str) -> None:
    store = mappingstore.open(url)
    store.series("b").extend([(5, "x"), (-7, "y")])
    store.series("a").extend([(1, 1)])
    store["a"] = "a plain key of the same name is independent"
    assert ok("--url", url, "series", "ls").stdout == "a\nb\n"
    assert as_json(ok("--url", url, "--json", "series", "ls", "--long")) == [
        {"name": "a", "points": 1, "first": 1, "last": 1},
        {"name": "b", "points": 2, "first": -7, "last": 5},
    ]
    assert as_json(ok("--url", url, "--json", "series", "rm", "b", "--start", "0")) == {
        "series": "b",
        "removed": 1,
    }
    assert store.series("b").range() == [(-7, "y")]
    # A range with nothing in it is not an error; a whole unknown series is, unless -f.
    assert ok("--url", url, "series", "rm", "b", "--end", "-100").stderr == (
        "0 point(s) removed from series 'b'\n"
    )
    ok("--url", url, "series", "rm", "a")
    assert store.series_names() == ["b"] and store["a"].startswith("a plain key")
    run = invoke("--url", url, "series", "rm", "a")
    assert (run.code, run.stderr) == (1, "Error: not found: series 'a'\n")
    ok("--url", url, "-q", "series", "rm", "a", "--force")


def test_series_commands_take_the_namespace(url: str) -> None:
    ok("--url", url, "series", "append", "-n", "lab", "s", "1", "1")
    assert ok("--url", url, "series", "ls").stdout == ""
    assert ok("--url", url, "-n", "lab", "series", "ls").stdout == "s\n"
    assert mappingstore.open(url, namespace="lab").series("s").range() == [(1, 1)]


# -- events ---------------------------------------------------------------------------------


def test_parse_changes_ops_by_name_and_plain_values() -> None:
    assert parse_changes(
        {
            "set": 5,
            "add": ["add", 5],
            "del": ["delitem"],
            "del_null": ["delitem", None],
            "neg": ["neg"],
            "explicit": ["setitem", ["add", 5]],
            "list": [1, 2],
            "not_an_op": ["append", 1],
            "tuple": ("add", 5),
        }
    ) == {
        "set": 5,
        "add": (operator.add, 5),
        "del": (operator.delitem,),
        "del_null": (operator.delitem,),
        "neg": (operator.neg,),
        "explicit": (operator.setitem, ["add", 5]),
        "list": [1, 2],
        "not_an_op": ["append", 1],
        "tuple": ("add", 5),
    }
    assert parse_changes({"x": ["add", 5]}, plain=True) == {"x": ["add", 5]}
    for bad in ({"x": ["add"]}, {"x": ["add", 1, 2]}, {"x": ["neg", 1]}, [1], {1: 2}):
        with pytest.raises(UsageFailure):
            parse_changes(bad)


def test_apply_current_past_and_log(url: str) -> None:
    first = ok(
        "--url",
        url,
        "--json",
        "events",
        "apply",
        "acct",
        '{"balance": 100, "owner": "ann"}',
        "--at",
        "1000",
    )
    assert as_json(first) == {"balance": 100, "owner": "ann"}
    ok(
        "--url",
        url,
        "events",
        "apply",
        "acct",
        '{"balance": ["add", 50], "tags": ["a", "b"]}',
        "--at",
        "2000",
    )
    # An event inserted in the past (negative time) replays first.
    ok("--url", url, "events", "apply", "acct", '{"neg": 4}', "--at", "-5")
    ok(
        "--url",
        url,
        "events",
        "apply",
        "acct",
        '{"owner": ["delitem"], "neg": ["neg"]}',
        "--at",
        "3000",
    )
    log = mappingstore.open(url).events("acct")
    assert log.current() == {"balance": 150, "tags": ["a", "b"], "neg": -4}
    assert as_json(ok("--url", url, "--json", "events", "current", "acct")) == log.current()
    assert as_json(ok("--url", url, "events", "current", "acct", "--with-timestamp")) == {
        "timestamp": 3000,
        "state": {"balance": 150, "tags": ["a", "b"], "neg": -4},
    }
    assert as_json(ok("--url", url, "events", "past", "acct", "2500", "--with-timestamp")) == {
        "timestamp": 2000,
        "state": {"neg": 4, "balance": 150, "owner": "ann", "tags": ["a", "b"]},
    }
    assert as_json(ok("--url", url, "events", "past", "acct", "-1")) == {"neg": 4}
    assert as_json(ok("--url", url, "events", "past", "acct", "-6")) == {}
    assert ok("--url", url, "events", "log", "acct", "--start", "2000").stdout == (
        "2000\tbalance\tadd\t50\n"
        '2000\ttags\tsetitem\t["a", "b"]\n'
        "3000\towner\tdelitem\tnull\n"
        "3000\tneg\tneg\tnull\n"
    )
    logged = as_json(
        ok("--url", url, "--json", "events", "log", "acct", "--op", "add", "--op", "neg")
    )
    assert logged == [
        {"t": 2000, "item": "balance", "op": "add", "value": 50},
        {"t": 3000, "item": "neg", "op": "neg", "value": None},
    ]
    assert ok("--url", url, "events", "ls").stdout == "acct\n"


def test_apply_plain_default_timestamp_and_typed_values(url: str) -> None:
    ok("--url", url, "events", "apply", "e", '{"l": ["add", 5], "t": {"$tuple": [1]}}', "--plain")
    ok("--url", url, "events", "apply", "e", '{"n": 1}')
    events = mappingstore.open(url).events("e").events()
    assert [(e.item, e.op, e.value) for e in events] == [
        ("l", "setitem", ["add", 5]),
        ("t", "setitem", (1,)),
        ("n", "setitem", 1),
    ]
    # Default timestamps: now in ms, and never a collision with the previous event.
    assert events[0].timestamp < events[2].timestamp


def test_apply_failures_store_nothing(url: str) -> None:
    ok("--url", url, "events", "apply", "e", '{"n": 1}', "--at", "10")
    conflict = invoke("--url", url, "events", "apply", "e", '{"n": 2}', "--at", "10")
    assert conflict.code == 1 and "already has an event at 10" in conflict.stderr
    replay = invoke("--url", url, "events", "apply", "e", '{"n": ["add", 1], "m": ["add", 1]}')
    assert replay.code == 1 and "missing item 'm'" in replay.stderr
    for bad, message in [
        ("[1]", "CHANGES must be a JSON object"),
        ('{"n": ["add"]}', "needs exactly one value"),
        ("{nope", "CHANGES_JSON is not valid JSON"),
    ]:
        run = invoke("--url", url, "events", "apply", "e", bad)
        assert run.code == 2 and message in run.stderr, run
    assert mappingstore.open(url).events("e").current(with_timestamp=True) == (10, {"n": 1})


def test_unknown_log_prune_and_rm(url: str) -> None:
    assert as_json(ok("--url", url, "events", "current", "nope")) == {}
    assert ok("--url", url, "events", "log", "nope").stdout == ""
    log = mappingstore.open(url).events("e")
    for t in range(1, 6):
        log.apply({"n": t}, t * 100)
    before = [log.past(t) for t in (300, 350, 500)]
    assert as_json(ok("--url", url, "--json", "events", "prune", "e", "300")) == {
        "events": "e",
        "removed": 2,
    }
    assert [log.past(t) for t in (300, 350, 500)] == before
    assert [e.op for e in log.events()] == ["snapshot", "setitem", "setitem"]
    snapshots = as_json(ok("--url", url, "--json", "events", "log", "e", "--op", "snapshot"))
    assert snapshots == [{"t": 300, "item": "", "op": "snapshot", "value": {"n": 3}}]
    bad_op = invoke("--url", url, "events", "log", "e", "--op", "nope")
    assert bad_op.code == 2 and "'nope' is not one of setitem" in bad_op.stderr
    ok("--url", url, "events", "rm", "e")
    assert mappingstore.open(url).event_names() == []
    missing = invoke("--url", url, "events", "rm", "e")
    assert (missing.code, missing.stderr) == (1, "Error: not found: event log 'e'\n")
    ok("--url", url, "events", "rm", "-f", "e")


def test_encrypted_store_needs_the_password_and_never_shows_it(url: str) -> None:
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD}
    ok("--url", url, "--security", "low", "series", "append", "s", "1", '"secret"', env=env)
    ok("--url", url, "events", "apply", "e", '{"x": 1}', "--at", "1", env=env)
    # Names are not encrypted: listing needs no password.
    assert ok("--url", url, "series", "ls").stdout == "s\n"
    assert ok("--url", url, "events", "ls").stdout == "e\n"
    for args in (["series", "last", "s"], ["series", "ls", "--long"], ["events", "current", "e"]):
        run = invoke("--url", url, *args)
        assert run.code == 1 and "is encrypted: set $MAPPINGSTORE_PASSWORD" in run.stderr, run
    wrong = invoke("--url", url, "series", "last", "s", env={"MAPPINGSTORE_PASSWORD": "x" * 20})
    assert wrong.code == 1
    good = ok("--url", url, "series", "last", "s", env=env)
    assert good.stdout == '1\t"secret"\n'
    for run in (wrong, good):
        assert PASSWORD not in run.stdout + run.stderr


# -- the real program, in a subprocess, on a SQLite file -------------------------------------


def program(
    *args: str, cwd: Path, input: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAPPINGSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "mappingstore.cli", *args],
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_subprocess_series_and_events_on_sqlite(tmp_path: Path) -> None:
    url = "sqlite:///ts.db"
    points = b"".join(b'{"t": %d, "value": %d}\n' % (t, t * t) for t in range(-50, 2000))
    done = program(
        "--url", url, "series", "append", "sq", "--file", "-", cwd=tmp_path, input=points
    )
    assert (done.returncode, done.stderr) == (0, b"2050 point(s) written to series 'sq'\n")
    last = program("--url", url, "series", "last", "sq", cwd=tmp_path)
    assert (last.returncode, last.stdout) == (0, b"1999\t3996001\n")
    window = program(
        "--url", url, "--json", "series", "range", "sq", "--start", "-2", "--end", "1", cwd=tmp_path
    )
    assert json.loads(window.stdout) == [{"t": t, "value": t * t} for t in (-2, -1, 0, 1)]
    empty = program("--url", url, "series", "first", "other", cwd=tmp_path)
    assert (empty.returncode, empty.stdout) == (1, b"")
    assert empty.stderr == b"Error: not found: series 'other' has no points\n"
    usage = program("--url", url, "series", "range", "sq", "--count", "-1", cwd=tmp_path)
    assert usage.returncode == 2
    applied = program("--url", url, "events", "apply", "e", '{"n": 1}', "--at", "5", cwd=tmp_path)
    assert applied.returncode == 0
    program("--url", url, "events", "apply", "e", '{"n": ["mul", 7]}', "--at", "6", cwd=tmp_path)
    past = program("--url", url, "--json", "events", "past", "e", "5", cwd=tmp_path)
    assert json.loads(past.stdout) == {"n": 1}
    with mappingstore.open(f"sqlite:///{tmp_path / 'ts.db'}") as store:
        assert store.events("e").current() == {"n": 7}
        assert len(store.series("sq")) == 2050
