"""``mappingstore copy`` and ``check`` carry and verify everything a user stores.

Besides plain items a store holds time series, event logs (pruned ones included) and
blobs; ``copy`` must move each of them exactly (decoded from the source, re-encoded by
the destination, whatever the encryption of either side), and ``check`` must read every
record of them. Runs in-process with click's ``CliRunner`` on SQLite files and directory
stores (and once on Redis), tampering with SQLite rows directly.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import operator
import os
import sqlite3
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

click_testing = pytest.importorskip("click.testing")

import mappingstore  # noqa: E402
from tests.cli.support import exact, invoke, ok  # noqa: E402

PASSWORD = "Tr0ub4dor&3-correct-horse"
OTHER_PASSWORD = "n3w-Battery-Staple-42"
BIG = os.urandom((5 << 20) // 2)  # 2.5 MiB: three chunks of a chunked blob


# -- what a user stores ---------------------------------------------------------------------


def fill(s: mappingstore.Store) -> None:
    """Items, series, event logs (pruned, with events inserted in the past) and blobs."""
    s["plain"] = {"a": (1, 2), "when": dt.date(2024, 5, 1)}
    s.set("expiring", [1.5], ttl=3600)
    # Three chunks, every value type a point may hold, negative timestamps too.
    s.series("temps").extend(
        (t, [t * 0.5, Decimal("1.10"), b"\x00", (t,), None][t % 5]) for t in range(-50, 2950)
    )
    s.series("one").extend([(7, "only")])
    acct = s.events("acct")  # 90 events: chunks of 32 plus a pending tail
    acct.apply({"balance": 0, "log": "", "flag": True}, 1_000)
    for i in range(1, 80):
        acct.apply(
            {"balance": (operator.add, i), "log": (operator.concat, str(i % 10))}, 1_000 + 10 * i
        )
    acct.apply({"flag": (operator.not_,)}, 2_000)
    acct.apply({"balance": (operator.neg,)}, 2_001)
    acct.apply({"tmp": 1}, 2_002)
    acct.apply({"tmp": (operator.delitem,)}, 2_003)
    acct.apply({"late": "inserted in the past"}, 1_405)  # into a chunk already written
    acct.apply({"later": 2.5}, 1_795)  # into the pending tail
    pruned = s.events("pruned")
    for i in range(50):
        pruned.apply({f"k{i % 7}": i, "n": i}, 10 * i)
    pruned.prune(250)  # a snapshot event at 250
    pruned.apply({"after": 1}, 600)
    # Events before a snapshot (what logs of earlier releases hold: apply() now refuses
    # them): replayed, then reset by it; copies must reproduce them exactly.
    pruned._apply({"x": 1}, 100, before_snapshots=True)
    pruned.prune(100)  # a second snapshot, before the first one
    pruned._apply({"y": 2}, 50, before_snapshots=True)
    emptied = s.events("emptied")
    emptied.apply({"a": 1}, 5)
    emptied.apply({"a": (operator.delitem,)}, 6)
    emptied.prune(6)  # a snapshot of an empty state
    emptied.apply({"b": 2}, 9)
    s.put_file("big", io.BytesIO(BIG))
    s.put_file("empty", io.BytesIO(b""))
    s.put_file("small", io.BytesIO(b"hello"))


def assert_same(a: mappingstore.Store, b: mappingstore.Store) -> None:
    """Everything *a* holds, *b* holds the same (values compared with their types)."""
    assert sorted(a) == sorted(b)
    for key in a:
        assert exact(a[key], b[key]), key
    assert (a.ttl("expiring") is None) == (b.ttl("expiring") is None)
    assert a.series_names() == b.series_names()
    for name in a.series_names():
        pa, pb = a.series(name).range(), b.series(name).range()
        assert len(pa) == len(pb) and all(
            x[0] == y[0] and exact(x[1], y[1]) for x, y in zip(pa, pb, strict=True)
        ), name
        assert a.series(name).last() == b.series(name).last()
    assert a.event_names() == b.event_names()
    for name in a.event_names():
        la, lb = a.events(name), b.events(name)
        ea, eb = la.events(), lb.events()
        assert len(ea) == len(eb), name
        for x, y in zip(ea, eb, strict=True):
            assert x[:3] == y[:3] and exact(x.value, y.value), (name, x, y)
        assert la.current(with_timestamp=True) == lb.current(with_timestamp=True), name
        times = {e.timestamp for e in ea}
        for t in sorted(times | {t - 1 for t in times} | {t + 1 for t in times}):
            assert la.past(t, with_timestamp=True) == lb.past(t, with_timestamp=True), (name, t)
    assert a.blob_names() == b.blob_names()
    for name in a.blob_names():
        with a.open(name) as ra, b.open(name) as rb:
            assert ra.read() == rb.read(), name


def url_of(kind: str, tmp_path: Path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}.db" if kind == "sqlite" else f"dir:///{tmp_path / name}"


# -- copy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_kind", "dst_kind", "src_pw", "dst_pw"),
    [
        ("sqlite", "dir", None, None),
        ("dir", "sqlite", None, PASSWORD),  # plain -> encrypted
        ("sqlite", "sqlite", PASSWORD, OTHER_PASSWORD),  # key rotation
        ("dir", "dir", PASSWORD, None),  # decrypted, with --allow-plaintext
    ],
)
def test_copy_carries_items_series_event_logs_and_blobs(
    tmp_path: Path, src_kind: str, dst_kind: str, src_pw: str | None, dst_pw: str | None
) -> None:
    src, dst = url_of(src_kind, tmp_path, "src"), url_of(dst_kind, tmp_path, "dst")
    env: dict[str, str] = {}
    src_opts: dict[str, Any] = {}
    dst_opts: dict[str, Any] = {}
    if src_pw:
        env["MAPPINGSTORE_PASSWORD"] = src_pw
        src_opts = {"password": src_pw, "security": "low"}
    if dst_pw:
        env["MAPPINGSTORE_DST_PASSWORD"] = dst_pw
        dst_opts = {"password": dst_pw}
    with mappingstore.open(src, **src_opts) as s:
        fill(s)
    extra = ["--allow-plaintext"] if src_pw and not dst_pw else []
    run = ok("--security", "low", "copy", *extra, src, dst, env=env)
    assert run.stderr.startswith("copied 2 items ("), run.stderr
    assert "2 series (3,001 points), 3 event logs (" in run.stderr
    assert "3 blobs (2.6 MB)" in run.stderr
    assert "0 already present, 0 conflicting" in run.stderr
    with mappingstore.open(src, **src_opts) as a, mappingstore.open(dst, **dst_opts) as b:
        assert_same(a, b)
        assert (b.info()["encryption"] is not None) == bool(dst_pw)
    # Run again: everything is already there, nothing is written.
    again = json.loads(ok("--json", "copy", *extra, src, dst, env=env).stdout)
    assert again["items"] == 0 and again["present"] == 2
    for kind, n in (("series", 2), ("event_logs", 3), ("blobs", 3)):
        assert again[kind]["copied"] == 0 and again[kind]["present"] == n, kind
        assert again[kind]["conflicts"] == []


def test_an_encrypted_source_is_never_decrypted_silently(tmp_path: Path) -> None:
    src, dst = url_of("sqlite", tmp_path, "src"), url_of("sqlite", tmp_path, "dst")
    with mappingstore.open(src, password=PASSWORD, security="low") as s:
        s.series("temps").extend([(1, 1.0)])  # no plain item: only a series to refuse
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD}
    run = invoke("copy", src, dst, env=env)
    assert run.code == 1
    assert "series 'temps' would be stored unencrypted" in run.stderr
    assert "--allow-plaintext" in run.stderr
    with mappingstore.open(dst) as d:
        assert d.series_names() == []
    ok("copy", "--allow-plaintext", src, dst, env=env)
    with mappingstore.open(dst) as d:
        assert d.series("temps").range() == [(1, 1.0)]
        assert d.info()["encryption"] is None


@pytest.mark.parametrize("kind", ["series", "event log", "blob"])
@pytest.mark.parametrize(
    ("src_query", "dst_query"), [("?encrypt=false", ""), ("", "?encrypt=false")]
)
def test_encrypt_false_on_either_side_decrypts_nothing_silently(
    tmp_path: Path, kind: str, src_query: str, dst_query: str
) -> None:
    # encrypt=false turns the default off, not the key: the source's objects are still
    # encrypted, and a destination with encrypt=false would store them in plaintext.
    src, dst = url_of("sqlite", tmp_path, "src"), url_of("sqlite", tmp_path, "dst")
    with mappingstore.open(src, password=PASSWORD, security="low") as s:
        if kind == "series":
            s.series("x").extend([(1, "top secret")])
        elif kind == "event log":
            s.events("x").apply({"k": "top secret"}, 1)
        else:
            s.put_file("x", io.BytesIO(b"top secret"))
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_DST_PASSWORD": PASSWORD}
    if not dst_query:
        del env["MAPPINGSTORE_DST_PASSWORD"]
    run = invoke("copy", src + src_query, dst + dst_query, env=env)
    assert run.code == 1, run
    assert f"{kind} 'x' would be stored unencrypted" in run.stderr
    written = tmp_path / "dst.db"
    assert not written.exists() or b"top secret" not in written.read_bytes()


def test_copy_conflicts_are_reported_never_merged_and_overwrite_replaces(
    tmp_path: Path,
) -> None:
    src, dst = url_of("sqlite", tmp_path, "src"), url_of("dir", tmp_path, "dst")
    with mappingstore.open(src) as s:
        fill(s)
    with mappingstore.open(dst) as d:
        d.series("temps").extend([(0, "mine")])  # a point the source has, another value
        d.series("mine").extend([(1, 1)])  # not in the source: never touched
        d.events("acct").apply({"other": 1}, 5)
        d.put_file("small", io.BytesIO(b"other content"))
    run = invoke("copy", src, dst)
    assert run.code == 1
    assert "1 series, 1 event log and 1 blob" not in run.stderr  # counts are listed apart
    assert "1 series, 1 event log, 1 blob already hold other content" in run.stderr
    assert "series 'temps', event log 'acct', blob 'small'" in run.stderr
    assert "--overwrite" in run.stderr
    assert "3 conflicting" in run.stderr
    with mappingstore.open(dst) as d:  # left exactly as they were; the rest was copied
        assert d.series("temps").range() == [(0, "mine")]
        assert d.events("acct").events() == [(5, "other", "setitem", 1)]
        with d.open("small") as r:
            assert r.read() == b"other content"
        assert d.series_names() == ["mine", "one", "temps"]
        assert d.event_names() == ["acct", "emptied", "pruned"]
        assert d["plain"] == {"a": (1, 2), "when": dt.date(2024, 5, 1)}
    report = json.loads(invoke("--json", "copy", "--dry-run", "--overwrite", src, dst).stdout)
    assert report["dry_run"] is True
    assert [report[k]["copied"] for k in ("series", "event_logs", "blobs")] == [1, 1, 1]
    with mappingstore.open(dst) as d:
        assert d.series("temps").range() == [(0, "mine")]  # a dry run writes nothing
    ok("copy", "--overwrite", src, dst)
    with mappingstore.open(src) as a, mappingstore.open(dst) as b:
        assert b.series("mine").range() == [(1, 1)]
        b.series("mine").remove()
        assert_same(a, b)


def test_an_interrupted_series_copy_is_completed(tmp_path: Path) -> None:
    src, dst = url_of("sqlite", tmp_path, "src"), url_of("sqlite", tmp_path, "dst")
    points = [(t, t * 1.5) for t in range(5000)]
    with mappingstore.open(src) as s:
        s.series("S").extend(points)
    with mappingstore.open(dst) as d:
        d.series("S").extend(points[:1800])  # the first pages only, as a crash leaves it
    report = json.loads(ok("--json", "copy", src, dst).stdout)
    assert report["series"] == {"copied": 1, "points": 3200, "present": 0, "conflicts": []}
    with mappingstore.open(dst) as d:
        assert d.series("S").range() == points
    with mappingstore.open(dst) as d:
        d.series("S")[10] = "changed"  # not a prefix any more: a conflict
    assert invoke("copy", src, dst).code == 1


def test_copy_between_namespaces_and_all_namespaces(tmp_path: Path) -> None:
    src, dst = url_of("sqlite", tmp_path, "src"), url_of("dir", tmp_path, "dst")
    with mappingstore.open(src, namespace="a", password=PASSWORD, security="low") as s:
        s.series("S").extend([(1, 1)])  # a namespace holding only a series and a blob
        s.put_file("b", io.BytesIO(b"in a"))
    with mappingstore.open(src, password=PASSWORD) as s:
        s.events("E").apply({"x": 1}, 1)
        s.series("skip-me").extend([(1, 1)])
    env = {"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_DST_PASSWORD": OTHER_PASSWORD}
    ok("--security", "low", "copy", "-A", src, dst, env=env)
    with mappingstore.open(dst, namespace="a", password=OTHER_PASSWORD) as d:
        assert d.series("S").range() == [(1, 1)] and d.blob_names() == ["b"]
    with mappingstore.open(dst, password=OTHER_PASSWORD) as d:
        assert d.events("E").current() == {"x": 1}
    ok(
        "copy",
        "--src-namespace",
        "a",
        "--dst-namespace",
        "c",
        src,
        src,
        env={"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_DST_PASSWORD": PASSWORD},
    )
    with mappingstore.open(src, namespace="c", password=PASSWORD) as d:
        assert d.series("S").range() == [(1, 1)]
    ok(
        "--security",
        "low",
        "copy",
        "--prefix",
        "E",
        src,
        url_of("sqlite", tmp_path, "only"),
        env=env,
    )
    with mappingstore.open(url_of("sqlite", tmp_path, "only"), password=OTHER_PASSWORD) as d:
        assert d.event_names() == ["E"] and d.series_names() == []


def test_dry_run_into_a_missing_store_counts_everything(tmp_path: Path) -> None:
    src = url_of("sqlite", tmp_path, "src")
    with mappingstore.open(src) as s:
        fill(s)
    report = json.loads(
        ok("--json", "copy", "--dry-run", src, url_of("sqlite", tmp_path, "n")).stdout
    )
    assert not (tmp_path / "n.db").exists()
    assert report["series"]["points"] == 3001
    assert report["blobs"] == {"copied": 3, "bytes": len(BIG) + 5, "present": 0, "conflicts": []}
    assert report["event_logs"]["copied"] == 3


def test_copy_to_redis_and_back(tmp_path: Path) -> None:
    from tests import servers

    tag = f"cli{uuid.uuid4().hex[:12]}"
    redis_url = servers.REDIS_URL + ("&" if "?" in servers.REDIS_URL else "?") + f"prefix={tag}"
    try:
        mappingstore.open(redis_url).close()
    except (mappingstore.BackendUnavailableError, mappingstore.UnknownSchemeError) as exc:
        servers.unavailable("redis", exc)
    src, back = url_of("sqlite", tmp_path, "src"), url_of("dir", tmp_path, "back")
    with mappingstore.open(src) as s:
        fill(s)
    try:
        ok("copy", src, redis_url)
        ok("copy", redis_url, back)
        with mappingstore.open(src) as a, mappingstore.open(back) as b:
            assert_same(a, b)
    finally:
        client = servers.redis_client()
        try:
            servers.drop_redis_keys(client, tag)
        finally:
            client.close()


# -- check ----------------------------------------------------------------------------------


def tamper(path: Path, ns: str, key: str) -> None:
    """Flip one bit in the middle of the record (*ns*, *key*) of a SQLite store."""
    with sqlite3.connect(path) as db:
        row = db.execute(
            "SELECT value FROM mappingstore_kv WHERE key = ? AND ns_id = "
            "(SELECT id FROM mappingstore_ns WHERE name = ?)",
            (key, ns),
        ).fetchone()
        data = bytearray(row[0])
        data[len(data) // 2] ^= 1
        db.execute(
            "UPDATE mappingstore_kv SET value = ? WHERE key = ? AND ns_id = "
            "(SELECT id FROM mappingstore_ns WHERE name = ?)",
            (bytes(data), key, ns),
        )


@pytest.mark.parametrize("password", [None, PASSWORD])
def test_check_reads_every_record_of_series_event_logs_and_blobs(
    tmp_path: Path, password: str | None
) -> None:
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    opts: dict[str, Any] = {"password": password, "security": "low"} if password else {}
    env = {"MAPPINGSTORE_PASSWORD": password} if password else {}
    with mappingstore.open(url, **opts) as s:
        fill(s)
    run = ok("--url", url, "check", env=env)
    assert "checked 2 items (" in run.stderr
    assert "2 series, 3 event logs, 3 blobs, 0 bad" in run.stderr
    tamper(path, "\x00ts\x00default", "C:5:temps:1")  # the second chunk of a series
    with mappingstore.open(url, **opts) as s:
        first_chunk = s.events("acct")._head()["c"][0][1]  # type: ignore[index]
    tamper(path, "\x00ev\x00default", f"C:4:acct:{first_chunk:x}")  # an event log's chunk
    tamper(
        path,
        "\x00blob\x00default",
        next(
            k
            for (k,) in sqlite3.connect(path).execute(
                "SELECT key FROM mappingstore_kv WHERE key LIKE 'C:3:big:%'"
            )
        ),
    )
    run = invoke("--url", url, "check", env=env)
    assert run.code == 1, run
    bad = sorted(line.split(":")[0] for line in run.stdout.splitlines())
    assert bad == ["BAD blob big", "BAD event log acct", "BAD series temps"], run.stdout
    assert "3 bad" in run.stderr
    report = json.loads(invoke("--url", url, "--json", "check", env=env).stdout)
    assert report["ok"] is False
    assert report["series"] == 2 and report["event_logs"] == 3 and report["blobs"] == 3
    assert sorted((b["kind"], b["key"]) for b in report["bad"]) == [
        ("blobs", "big"),
        ("event_logs", "acct"),
        ("series", "temps"),
    ]


def test_check_all_namespaces_reads_series_of_every_namespace(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    with mappingstore.open(url, namespace="other") as s:
        s.series("S").extend([(t, t) for t in range(3000)])
        s.events("E").apply({"a": 1}, 5)
    tamper(path, "\x00ev\x00other", "H:1:E")  # the head of the event log
    assert ok("--url", url, "check").stdout == ""  # the default namespace is fine
    run = invoke("--url", url, "check", "--all-namespaces")
    assert run.code == 1
    assert run.stdout.startswith("BAD [other] event log E:"), run.stdout


def test_copy_lists_the_destination_names_of_each_kind_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Listing the destination's names per object made copy quadratic in their number.
    src, dst = f"sqlite:///{tmp_path / 'src.db'}", f"sqlite:///{tmp_path / 'dst.db'}"
    n = 12
    with mappingstore.open(src) as s:
        for i in range(n):
            s.series(f"s{i}")[1] = i
            s.events(f"e{i}").apply({"a": i}, 5)
            s.put_file(f"b{i}", io.BytesIO(b"x" * i))
    calls: dict[str, int] = {}
    for method in ("series_names", "event_names", "blob_names"):
        original = getattr(mappingstore.Store, method)

        def counted(self: mappingstore.Store, _f: Any = original, _m: str = method) -> Any:
            calls[_m] = calls.get(_m, 0) + 1
            return _f(self)

        monkeypatch.setattr(mappingstore.Store, method, counted)
    run = ok("--json", "copy", src, dst)
    report = json.loads(run.stdout)
    assert [report[k]["copied"] for k in ("series", "event_logs", "blobs")] == [n, n, n]
    # One listing of the source and one of the destination per kind, whatever n is.
    assert calls == {"series_names": 2, "event_names": 2, "blob_names": 2}
    calls.clear()
    report = json.loads(ok("--json", "copy", src, dst).stdout)  # a rerun: all present
    assert [report[k]["present"] for k in ("series", "event_logs", "blobs")] == [n, n, n]
    assert calls == {"series_names": 2, "event_names": 2, "blob_names": 2}
    with mappingstore.open(dst) as b:
        assert b.series_names() == sorted(f"s{i}" for i in range(n))
        assert [b.series(f"s{i}")[1] for i in range(n)] == list(range(n))
        assert [b.events(f"e{i}").current() for i in range(n)] == [{"a": i} for i in range(n)]
        for i in range(n):
            with b.open(f"b{i}") as f:
                assert f.read() == b"x" * i


def _stale_edges(s: mappingstore.Store, name: str, first: list[Any], last: list[Any]) -> None:
    """Rewrite the edge record of series *name* by hand: authentic, but holding *first* and
    *last* (every other field, such as a write version, is kept)."""
    ns, key = "\x00ts\x00" + s.namespace, f"E:{len(name)}:{name}"
    data = s._rget(ns, key)
    assert data is not None
    edges = s._decode(ns, key, data)
    s._rput(ns, key, s._encode(ns, key, {**edges, "f": first, "z": last}), None)


@pytest.mark.parametrize("password", [None, PASSWORD])
def test_check_reports_a_series_whose_first_or_last_point_is_not_in_its_data(
    tmp_path: Path, password: str | None
) -> None:
    # What the old code left behind: an edge record still holding deleted points.
    url = f"sqlite:///{tmp_path / 's.db'}"
    opts: dict[str, Any] = {"password": password, "security": "low"} if password else {}
    env = {"MAPPINGSTORE_PASSWORD": password} if password else {}
    with mappingstore.open(url, **opts) as s:
        s.series("fine").extend([(t, t) for t in range(10)])
        ser = s.series("stale")
        ser.extend([(t, str(t)) for t in range(3000)])
        ser.remove(None, 1023)
        _stale_edges(s, "stale", [0, "0"], [2999, "2999"])
        assert ser.first() == (0, "0") and ser[1024] == "1024"
    run = invoke("--url", url, "check", env=env)
    assert run.code == 1, run
    assert run.stdout.startswith("BAD series stale: "), run.stdout
    assert "first/last point disagree with the data" in run.stdout
    assert len(run.stdout.splitlines()) == 1, run.stdout  # "fine" is fine
    assert "2 series, 1 bad" in run.stderr
    # Only the value of the last point differs (1 is not 1.0): reported too.
    with mappingstore.open(url, **opts) as s:
        s.series("stale").remove()
        s.series("stale").extend([(1, 1), (2, 2)])
        _stale_edges(s, "stale", [1, 1], [2, 2.0])
    run = invoke("--url", url, "check", env=env)
    assert run.code == 1 and run.stdout.startswith("BAD series stale: "), run


# -- series and event logs written through a key prefix (seventh review) -------------------


def _fill_prefixed(url: str, key_prefix: str, **options: Any) -> None:
    with mappingstore.open(f"{url}?key_prefix={key_prefix}", **options) as app:
        app["setting"] = 1
        app.series("temp").extend([(1, 20.5), (2, 21.0), (-3, None)])
        app.events("acct").apply({"balance": 100}, 1000)
        app.events("acct").apply({"balance": (operator.add, 5)}, 2000)


def test_copy_carries_series_and_logs_written_through_a_key_prefix(tmp_path: Path) -> None:
    src, dst = f"sqlite:///{tmp_path}/src.db", f"sqlite:///{tmp_path}/dst.db"
    _fill_prefixed(src, "app:")
    _fill_prefixed(src, "H:odd:")  # a key prefix that itself looks like a tag
    _fill_prefixed(src, "aH:8:")  # ... and one whose keys split two ways ("a" + "H:8:...")
    with mappingstore.open(src) as base:
        base.series("own").extend([(5, "x")])
    run = ok("copy", src, dst)
    assert "4 series" in run.stderr and "3 event logs" in run.stderr, run
    for key_prefix in ("app:", "H:odd:", "aH:8:"):
        with (
            mappingstore.open(f"{src}?key_prefix={key_prefix}") as a,
            mappingstore.open(f"{dst}?key_prefix={key_prefix}") as b,
        ):
            assert b.series_names() == a.series_names() == ["temp"]
            assert b.event_names() == a.event_names() == ["acct"]
            assert list(b.series("temp").items()) == list(a.series("temp").items())
            assert b.events("acct").events() == a.events("acct").events()
            assert b.events("acct").current() == {"balance": 105}
            assert b["setting"] == 1
    with mappingstore.open(dst) as b:
        assert b.series_names() == ["own"]
    again = ok("copy", src, dst)  # everything present: nothing copied twice
    assert "0 series" in again.stderr and "0 conflicting" in again.stderr, again


def test_copy_refuses_prefixed_encrypted_series_into_plaintext(tmp_path: Path) -> None:
    src, dst = f"sqlite:///{tmp_path}/src.db", f"sqlite:///{tmp_path}/dst.db"
    _fill_prefixed(src, "app:", password=PASSWORD, security="low")
    run = invoke(
        "copy", src, dst, env={"MAPPINGSTORE_PASSWORD": PASSWORD, "MAPPINGSTORE_SECURITY": "low"}
    )
    assert run.code != 0 and "app:temp" in run.stderr + run.stdout, run


def test_check_reads_series_written_through_a_key_prefix(tmp_path: Path) -> None:
    from mappingstore._keys import internal_ns

    url = f"sqlite:///{tmp_path}/src.db"
    _fill_prefixed(url, "app:")
    run = ok("check", "--url", url)
    assert "1 series" in run.stderr and "1 event log" in run.stderr, run
    with mappingstore.open(url) as base:
        base._put(internal_ns("ts", base.namespace), "app:H:4:temp", b"junk", None)
    bad = invoke("check", "--url", url)
    assert bad.code == 1 and "app:temp" in bad.stdout, bad
