"""Bar charts of the benchmark results: mappingstore beside its peers, per backend family.

The benchmark scripts print tables for people. This script runs them (``--run``), parses
what they print (``bench_core.py`` also speaks JSON), keeps the numbers with the raw
output in ``bench/results.json``, and draws one PNG per backend family from that file
into ``docs/_static/bench/``. Every bar is a number from a real run: nothing is typed in.

Usage, from a clone (``pip install -e ".[bench]"``; the Redis and PostgreSQL scripts need
their servers, see each script)::

    python bench/charts.py --run          # run the scripts (--quick), refresh results.json, draw
    python bench/charts.py --run --full   # the same with the scripts' full sizes (minutes)
    python bench/charts.py                # draw again from bench/results.json

A script that fails or is skipped (``--skip redis,postgres``) keeps no numbers; the
charts of its family are then not drawn (an old PNG is left alone, and the run says so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results.json"
OUT_DIR = ROOT / "docs" / "_static" / "bench"

#: script name -> extra arguments (besides --quick).
SCRIPTS: dict[str, list[str]] = {
    "core": ["--json"],
    "series": [],
    "files": [],
    "shm": [],
    "postgres": [],
    "redis": [],
}

#: family -> chart title.
FAMILIES: dict[str, str] = {
    "memory": "In-process memory",
    "sqlite": "SQLite",
    "directory": "Files: one file per key",
    "shm": "Shared memory between processes",
    "postgresql": "PostgreSQL",
    "redis": "Redis",
    "timeseries": "Time series and event logs (SQLite)",
}

Group = dict[str, Any]  # {"family", "case", "unit", "bars": [{"label", "ours", "rate"}]}

_NUMBER = re.compile(r"^[\d,]+(?:\.\d+)?$")


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def _cells(line: str) -> list[str] | None:
    """The cells of a Markdown table row, or None for any other line and for rulers."""
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")) or set(line) <= set("|-: "):
        return None
    return [c.strip() for c in line[1:-1].split("|")]


def _add(
    groups: list[Group], family: str, case: str, unit: str, label: str, rate: float, ours: bool
) -> None:
    """Add one bar to the group (family, case), creating it; a repeated label is kept once."""
    for g in groups:
        if g["family"] == family and g["case"] == case:
            break
    else:
        g = {"family": family, "case": case, "unit": unit, "bars": []}
        groups.append(g)
    if all(b["label"] != label for b in g["bars"]):
        g["bars"].append({"label": label, "ours": ours, "rate": rate})


# -- parsers: one per script; each takes the script's stdout ---------------------------------


def parse_core(out: str) -> list[Group]:
    """``bench_core.py --json``: rows {case, ours, ours_rate, peer, peer_rate, ...}."""
    groups: list[Group] = []
    for row in json.loads(out):
        case: str = row["case"]
        if "encrypted" in case:  # the store against itself, not a peer comparison
            continue
        family = "memory" if case.startswith("memory") else "sqlite"
        match = re.search(r"\(([^)]*/s)\)$", case)
        unit = match.group(1).split()[-1] if match else "ops/s"
        _add(groups, family, case, unit, row["ours"], row["ours_rate"], True)
        _add(groups, family, case, unit, row["peer"], row["peer_rate"], False)
    return groups


def parse_files(out: str) -> list[Group]:
    """``bench_files.py``: | case | N unit | peer N/s: **r**; peer N/s: **r** |."""
    groups: list[Group] = []
    for line in out.splitlines():
        cells = _cells(line)
        if cells is None or len(cells) != 3 or cells[0] == "case":
            continue
        case, ours, peers = cells
        ours_match = re.match(r"^([\d,.]+) (\S+)$", ours)
        if not case.startswith("dir") or ours_match is None:
            continue  # the INI rows have targets, not peers
        unit = ours_match.group(2)
        found = [re.match(r"^(.+?) ([\d,.]+)/s: ", p.strip()) for p in peers.split(";")]
        if not all(found):
            continue
        _add(groups, "directory", case, unit, "DirectoryStore", _num(ours_match.group(1)), True)
        for m in found:
            assert m is not None
            peer = "jk_keyvaluestore" if m.group(1) == "jk" else m.group(1)
            _add(groups, "directory", case, unit, peer, _num(m.group(2)), False)
    return groups


def parse_series(out: str) -> list[Group]:
    """``bench_series.py``: fixed-width rows: workload, mappingstore, rstore, ratio, target."""
    groups: list[Group] = []
    row = re.compile(
        r"^(?P<case>.*\S)\s{2,}(?P<ours>[\d,]+)\s+(?P<peer>[\d,]+|-)\s+(?P<ratio>[\d.]+|-)"
    )
    for line in out.splitlines():
        m = row.match(line)
        if m is None or m.group("peer") == "-":
            continue  # no rstore number: nothing to compare with
        case = m.group("case")
        unit_match = re.search(r"\(([^;)]*/s)", case)
        unit = unit_match.group(1) if unit_match else "ops/s"
        _add(groups, "timeseries", case, unit, "mappingstore", _num(m.group("ours")), True)
        _add(groups, "timeseries", case, unit, "rstore", _num(m.group("peer")), False)
    return groups


def parse_shm(out: str) -> list[Group]:
    """``bench_shm.py``: the contender table (contender, op, ops/s, us/op, CPU us/op)."""
    groups: list[Group] = []
    row = re.compile(r"^(?P<label>\S.*?)\s{2,}(?P<op>get|set)\s{2,}(?P<rate>[\d,]+)\s")
    for line in out.splitlines():
        m = row.match(line)
        if m is None:
            continue
        label = m.group("label")
        _add(
            groups,
            "shm",
            m.group("op"),
            "ops/s",
            label,
            _num(m.group("rate")),
            label == "SharedMemoryStore",
        )
    return groups


def parse_postgres(out: str) -> list[Group]:
    """``bench_postgres.py``: | case | ours | peer | N unit | N unit | ratio | target |."""
    groups: list[Group] = []
    for line in out.splitlines():
        cells = _cells(line)
        if cells is None or len(cells) != 7:
            continue
        case, ours, peer, ours_rate, peer_rate = cells[:5]
        a = re.match(r"^([\d,.]+) (\S+/s)$", ours_rate)
        b = re.match(r"^([\d,.]+) (\S+/s)$", peer_rate)
        if a is None or b is None or ours == "encrypted":
            continue
        _add(groups, "postgresql", case, a.group(2), ours, _num(a.group(1)), True)
        _add(groups, "postgresql", case, b.group(2), peer, _num(b.group(1)), False)
    return groups


def parse_redis(out: str) -> list[Group]:
    """``bench_redis.py``: | case | versus | ours | peer | unit | ratio | target | |."""
    groups: list[Group] = []
    for line in out.splitlines():
        cells = _cells(line)
        if cells is None or len(cells) != 8 or cells[0] == "case":
            continue
        case, versus, ours, peer, unit = cells[:5]
        if versus == "target" or versus.startswith("same store") or "encrypted" in case:
            continue
        if not (_NUMBER.match(ours) and _NUMBER.match(peer)):
            continue
        _add(groups, "redis", case, unit, "RedisStore", _num(ours), True)
        _add(groups, "redis", case, unit, versus, _num(peer), False)
    return groups


PARSERS: dict[str, Callable[[str], list[Group]]] = {
    "core": parse_core,
    "series": parse_series,
    "files": parse_files,
    "shm": parse_shm,
    "postgres": parse_postgres,
    "redis": parse_redis,
}


# -- running ---------------------------------------------------------------------------------


def run_scripts(names: Iterable[str], full: bool) -> dict[str, Any]:
    """Run each benchmark script, one at a time; parse its output or record its failure."""
    runs: dict[str, Any] = {}
    for name in names:
        command = [sys.executable, f"bench/bench_{name}.py", *SCRIPTS[name]]
        if not full:
            command.append("--quick")
        shown = " ".join(["python", *command[1:]])
        print(f"running {shown} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=3600, check=False
        )
        seconds = round(time.perf_counter() - started, 1)
        run: dict[str, Any] = {"command": shown, "seconds": seconds, "output": done.stdout}
        if done.returncode != 0:
            run["error"] = f"exit status {done.returncode}: {done.stderr.strip()[-2000:]}"
        else:
            try:
                run["groups"] = PARSERS[name](done.stdout)
            except (ValueError, KeyError, TypeError) as exc:
                run["error"] = f"could not parse the output: {exc!r}"
            else:
                if not run["groups"]:
                    run["error"] = "no peer comparison found in the output"
        if "error" in run:
            print(f"  {name}: FAILED: {run['error'][:500]}", file=sys.stderr)
        else:
            print(f"  {name}: {len(run['groups'])} comparisons in {seconds} s", file=sys.stderr)
        runs[name] = run
    return runs


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_before": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


# -- drawing ---------------------------------------------------------------------------------


def _rate_text(rate: float, unit: str) -> str:
    return f"{rate:,.0f} {unit}" if rate >= 100 else f"{rate:,.1f} {unit}"


def draw(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """One PNG per family that has numbers; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: list[Group] = []
    for run in results["runs"].values():
        groups += run.get("groups", [])
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = results["generated"][:10]
    info = results["machine"]
    mode = "quick run" if results.get("quick", True) else "full run"
    written: list[Path] = []
    for family, title in FAMILIES.items():
        mine = [g for g in groups if g["family"] == family and len(g["bars"]) > 1]
        if not mine:
            continue
        labels: list[str] = []
        rates: list[float] = []
        colors: list[str] = []
        texts: list[str] = []
        headers: list[tuple[int, str]] = []
        for g in mine:
            headers.append((len(labels), g["case"]))
            labels.append("")
            rates.append(0.0)
            colors.append("none")
            texts.append("")
            # mappingstore first, then the peers in the order the script printed them.
            for bar in sorted(g["bars"], key=lambda b: not b["ours"]):
                labels.append(bar["label"])
                rates.append(bar["rate"])
                colors.append("#1565c0" if bar["ours"] else "#9e9e9e")
                texts.append(_rate_text(bar["rate"], g["unit"]))
        height = 0.9 + 0.26 * len(labels)
        fig, ax = plt.subplots(figsize=(9, height))
        ys = list(range(len(labels)))
        positive = [r for r in rates if r > 0]
        lo, hi = min(positive), max(positive)
        ax.barh(ys, [r if r > 0 else float("nan") for r in rates], color=colors, height=0.7)
        ax.set_xscale("log")
        ax.set_xlim(lo / 3, hi * 40)
        ax.set_yticks(ys, labels, fontsize=8)
        ax.invert_yaxis()
        for y, rate, text in zip(ys, rates, texts, strict=True):
            if rate > 0:
                ax.text(rate * 1.08, y, text, va="center", fontsize=7)
        for y, case in headers:
            ax.text(lo / 3, y, f" {case}", va="center", ha="left", fontsize=8.5, fontweight="bold")
        ax.set_xlabel("operations per second, log scale (higher is better)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(
            f"{title}: mappingstore (blue) beside its peers (grey)\n"
            f"{mode} {stamp}, Python {info['python']}, {info['cpus']} CPUs",
            fontsize=9,
        )
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        fig.tight_layout()
        path = out_dir / f"{family}.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", action="store_true", help="run the benchmark scripts and refresh results.json"
    )
    parser.add_argument(
        "--full", action="store_true", help="with --run: full sizes instead of --quick"
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"with --run: comma-separated scripts not to run ({', '.join(SCRIPTS)})",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON results file")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the PNG files go")
    args = parser.parse_args(argv)
    if args.run:
        skip = {s for s in args.skip.split(",") if s}
        unknown = skip - set(SCRIPTS)
        if unknown:
            parser.error(f"unknown scripts in --skip: {sorted(unknown)}")
        before = machine()
        runs = run_scripts([s for s in SCRIPTS if s not in skip], args.full)
        results: dict[str, Any] = {
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "quick": not args.full,
            "machine": before,
            "runs": runs,
        }
        args.results.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.results}", file=sys.stderr)
    else:
        results = json.loads(args.results.read_text(encoding="utf-8"))
        # The numbers must be the ones the scripts printed: parse the kept output again.
        for name, run in results["runs"].items():
            if "groups" in run and PARSERS[name](run["output"]) != run["groups"]:
                parser.error(f"{args.results}: the numbers of {name!r} differ from its output")
    failed = [name for name, run in results["runs"].items() if "error" in run]
    for path in draw(results, args.out):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if failed:
        print(
            f"no numbers from: {', '.join(failed)} (see 'error' in the results file)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
