"""Time series and event logs: mappingstore beside rstore (PyPI ``rlib-store``), same run.

Usage::

    python bench/bench_series.py [--quick] [--backends sqlite,memory,postgres,redis]
                                 [--rstore-events N] [--clock wall|cpu]

rstore replays its whole history on every ``apply``, so its event rate falls as the log
grows (quadratic total time: 10,000 applies take about 14 minutes here). By default it
is measured on the first 1,000 applies, which flatters it; ``--rstore-events 10000``
measures it at the issue's full size.

Prints ops/s (or points/s) for each workload and the ratio mappingstore / rstore, next to
the targets of issue 5. Peers that are not installed or that fail are reported as such.
Every workload runs on fresh stores in a temporary directory.
"""

from __future__ import annotations

import argparse
import gc
import operator
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _verdict import verdict

import mappingstore

# time.perf_counter (wall, the default) or time.process_time (--clock cpu: this process's
# CPU time, steadier on a shared machine) for the reads. Writes and the server backends
# always use wall time: CPU time would leave out the fsync waits of a commit (rstore
# commits every apply), the server's work and the waits for it.
clock: Callable[[], float] = time.perf_counter


_TMPDIRS: list[str] = []


def median_of(repeat: int, fn: Callable[[], Any], *, wall: bool = False) -> float:
    """Median time of *repeat* back-to-back runs of *fn* (seconds). (Not the best, as
    the other scripts keep: the writes here build files whose cost varies run to run.)"""
    timer = time.perf_counter if wall else clock
    times = []
    for _ in range(repeat):
        start = timer()
        fn()
        times.append(timer() - start)
    return statistics.median(times)


def mean_of(runs: int, fn: Callable[[], Any]) -> float:
    """Mean time of *runs* back-to-back runs of *fn*, starting from a collected heap.

    For the range windows, whose results (one tuple and one value per point, 50 windows
    per run) stay alive until the run ends: CPython's full collections, which walk every
    container in the process, then come about once every one to three runs. The median
    of three runs counts that cost in every run or in none, depending on its period, and
    the first runs after a set-up also pay for the set-up's own survivors (the
    extend calls before them). So each contender starts from ``gc.collect()`` and the
    time of many runs is averaged: each pays for the collections its own runs cause.
    The collector stays on, as in a user's process.
    """
    gc.collect()
    start = clock()
    for _ in range(runs):
        fn()
    return (clock() - start) / runs


def _timed_after_commits(n: int, commit: Callable[[int], Any], call: Callable[[], Any]) -> float:
    """Seconds spent in *n* calls of *call*, each after an (untimed) ``commit(i)``."""
    spent = 0.0
    for i in range(n):
        commit(i)
        start = clock()
        call()
        spent += clock() - start
    return spent


def rstore_available() -> bool:
    try:
        import rstore  # noqa: F401
    except ImportError:
        return False
    return True


def bench_sqlite(
    points: int, events: int, repeat: int, rstore_events: int, range_runs: int
) -> list[tuple[str, float, float | None, str]]:
    rows: list[tuple[str, float, float | None, str]] = []
    data = [(i * 10, {"v": i, "q": i * 0.5}) for i in range(points)]
    tmp = tempfile.mkdtemp(prefix="ms-bench-series-")
    _TMPDIRS.append(tmp)  # removed when the run ends (main)

    def ms_store(tag: str) -> mappingstore.Store:
        return mappingstore.open(f"sqlite:///{tmp}/ms-{tag}-{time.perf_counter_ns()}.db")

    # extend
    def ms_extend() -> None:
        with ms_store("extend") as s:
            s.series("t").extend(data)

    ms_t = median_of(repeat, ms_extend, wall=True)
    r_t: float | None = None
    if rstore_available():
        from rstore import Store as RStore

        def r_extend() -> None:
            with RStore(f"sqlite://{tmp}/r-extend-{time.perf_counter_ns()}.db", frozen=False) as r:
                r.extend("t", *data)

        r_t = median_of(repeat, r_extend, wall=True)
    rows.append(("sqlite extend (points/s)", points / ms_t, points / r_t if r_t else None, ">= 4x"))

    # range over 1% windows, first/last: on one loaded store each
    ms = ms_store("read")
    series = ms.series("t")
    series.extend(data)
    width = points // 100 * 10
    starts = [(i * 7919 % 90) * width for i in range(50)]
    ms_r = mean_of(range_runs, lambda: [series.range(a, a + width) for a in starts])
    # first/last: 2,000 pairs a run (a run of 200 took ~2 ms, within one scheduler
    # hiccup), from a collected heap (the range runs before leave garbage behind).
    pairs = 2_000
    gc.collect()
    ms_fl = median_of(repeat, lambda: [(series.first(), series.last()) for _ in range(pairs)])
    r_r = r_fl = None
    if rstore_available():
        from rstore import Store as RStore

        path = f"sqlite://{tmp}/r-read.db"
        with RStore(path, frozen=False) as r:
            r.extend("t", *data)
        with RStore(path) as r:
            r_r = mean_of(range_runs, lambda: [r.range("t", a, end=a + width) for a in starts])
            gc.collect()
            r_fl = median_of(repeat, lambda: [(r.first("t"), r.last("t")) for _ in range(pairs)])
    rows.append(
        ("sqlite range 1% window (windows/s)", 50 / ms_r, 50 / r_r if r_r else None, ">= 2x")
    )
    rows.append(
        ("sqlite first+last (pairs/s)", pairs / ms_fl, pairs / r_fl if r_fl else None, ">= 2x")
    )
    # The same after a commit by another connection before each pair (ours answers a
    # repeated first()/last() without a query while nothing was committed: this is the
    # other case). Only the calls are timed; no target of its own.
    writer = mappingstore.open(ms.url, namespace="other")
    ms_cold = _timed_after_commits(
        pairs, lambda i: writer.set("k", i), lambda: (series.first(), series.last())
    )
    writer.close()
    r_cold = None
    if rstore_available():
        from rstore import Store as RStore

        raw = sqlite3.connect(f"{tmp}/r-read.db", isolation_level=None)
        raw.execute("CREATE TABLE IF NOT EXISTS bench_commits (i INTEGER)")
        with RStore(path) as r:
            r_cold = _timed_after_commits(
                pairs,
                lambda i: raw.execute("INSERT INTO bench_commits VALUES (?)", (i,)),
                lambda: (r.first("t"), r.last("t")),
            )
        raw.close()
    rows.append(
        (
            "sqlite first+last, a commit before each pair (pairs/s)",
            pairs / ms_cold,
            pairs / r_cold if r_cold else None,
            "(none)",
        )
    )
    ms.close()

    # events: N applies on one sequence, then current()
    def ms_events() -> None:
        with ms_store("events") as s:
            log = s.events("e")
            log.apply({"count": 0, "name": "x"}, 1)
            for i in range(2, events + 1):
                log.apply({"count": (operator.add, 1)}, i)

    ms_e = median_of(1, ms_events, wall=True)
    r_e: float | None = None
    r_n = min(events, rstore_events)  # rstore replays all history per apply: quadratic
    if rstore_available():
        from rstore import Store as RStore

        def r_events() -> None:
            with RStore(f"sqlite://{tmp}/r-ev-{time.perf_counter_ns()}.db", frozen=False) as r:
                r.apply("e", {"count": 0, "name": "x"}, 1)
                for i in range(2, r_n + 1):
                    r.apply("e", {"count": (operator.add, 1)}, i)

        r_e = median_of(1, r_events, wall=True)
    rows.append(
        (
            f"sqlite events apply (applies/s; rstore measured on {r_n})",
            events / ms_e,
            r_n / r_e if r_e else None,
            ">= 50x",
        )
    )
    with ms_store("current") as s:
        log = s.events("e")
        with s.batch():
            for i in range(1, events + 1):
                log.apply({"count": i, f"k{i % 50}": i}, i)
        cur = median_of(repeat, lambda: [log.current() for _ in range(20)]) / 20
    rows.append(
        (f"sqlite current() at {events} events (calls/s)", 1 / cur, None, "<= 20 ms per call")
    )
    return rows


def bench_generic(
    url: str, label: str, points: int, repeat: int
) -> list[tuple[str, float, float | None, str]]:
    data = [(i, i) for i in range(points)]
    try:
        store = mappingstore.open(url, namespace=f"bench-{os.getpid()}-{time.perf_counter_ns()}")
    except Exception as exc:  # a server that is not running: report, do not crash
        print(f"# {label}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []
    series = store.series("t")

    def run() -> None:
        series.remove()
        series.extend(data)

    t = median_of(repeat, run, wall=True)
    series.remove()
    store.close()
    peer: float | None = None
    target = {"redis": ">= 100,000 points/s", "postgres": ">= 10x"}.get(label, "")
    if label == "postgres" and rstore_available():
        # rstore's PostgreSQL store: one row per point (its Redis store cannot extend at
        # all with redis-py >= 3, see docs/benchmarks.md).
        from rstore import Store as RStore

        def r_run() -> None:
            with RStore(url, namespace=f"rbench{os.getpid()}", frozen=False) as r:
                r.extend("t", *data)
                r.discard()

        try:
            peer = points / median_of(repeat, r_run, wall=True)
        except Exception as exc:  # a peer failure is a result to report, not a crash
            print(f"# rstore postgres: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    return [(f"{label} extend (points/s)", points / t, peer, target)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one repeat")
    parser.add_argument("--backends", default="sqlite,memory,postgres,redis")
    parser.add_argument(
        "--rstore-events", type=int, default=1000, help="applies measured on rstore (default 1000)"
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="for the reads (range, first/last, current): wall, time.perf_counter "
        "(default), or cpu, time.process_time, steadier on a loaded machine; writes are "
        "always timed on the wall clock",
    )
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    points = 20_000 if args.quick else 100_000
    events = 2_000 if args.quick else 10_000
    repeat = 1 if args.quick else 3
    range_runs = 3 if args.quick else 10
    rows: list[tuple[str, float, float | None, str]] = []
    wanted = args.backends.split(",")
    if "sqlite" in wanted:
        rows += bench_sqlite(points, events, repeat, args.rstore_events, range_runs)
    if "memory" in wanted:
        rows += bench_generic("memory://", "memory", points, repeat)
    if "postgres" in wanted:
        url = os.environ.get(
            "MAPPINGSTORE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        )
        rows += bench_generic(url, "postgres", points, repeat)
    if "redis" in wanted:
        url = os.environ.get("MAPPINGSTORE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
        rows += bench_generic(url, "redis", points, repeat)
    print(f"{'workload':58} {'mappingstore':>14} {'rstore':>12} {'ratio':>8}  target")
    for name, ours, theirs, target in rows:
        ratio = f"{ours / theirs:8.1f}" if theirs else "       -"
        peer = f"{theirs:12,.0f}" if theirs else "           -"
        judged = verdict(target, ours / theirs if theirs else None, ours)
        print(f"{name:58} {ours:14,.0f} {peer} {ratio}  {target}  {judged}".rstrip())


if __name__ == "__main__":
    try:
        main()
    finally:
        for path in _TMPDIRS:
            shutil.rmtree(path, ignore_errors=True)
