"""Measure what each ``security=`` level costs when a store is opened with a password.

Opening a password-protected store derives a key-encryption key with argon2id
(``nacl.pwhash.argon2id.kdf``) at the parameters of its security level. That one
derivation is the whole cost of the password: values are then sealed with a data key
and cost microseconds. This script times the derivation on this machine and measures
the memory it really touches (peak RSS growth), each level in a fresh child process so
one level's peak does not hide the next one's.

Run it from a clone (the table in ``docs/security.md`` came from this command)::

    python bench/kdf_cost.py            # 5 derivations per level, Markdown table
    python bench/kdf_cost.py --repeat 3 --json
    python bench/kdf_cost.py --quick      # smoke run: one derivation per level

The derivation runs in ``mappingstore._crypto.derive_kek``'s underlying call, without
its in-process cache (the cache makes a second open of the same store in one process
free, which is not what a user pays at start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

LEVELS = ("low", "medium", "high")


def _child(level: str, repeat: int) -> dict[str, Any]:
    """Derive *repeat* keys at *level* in this process and report time and peak memory."""
    import nacl.pwhash.argon2id as argon
    import nacl.utils

    from mappingstore._crypto import SECURITY_LEVELS

    ops, mem = SECURITY_LEVELS[level]
    # ru_maxrss is in KiB on Linux (bytes on macOS); take the baseline after the imports.
    scale = 1 if sys.platform == "darwin" else 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    times, cpu_times = [], []
    for _ in range(repeat):
        salt = nacl.utils.random(argon.SALTBYTES)
        start, cpu_start = time.perf_counter(), time.process_time()
        argon.kdf(32, b"correct horse battery staple", salt, opslimit=ops, memlimit=mem)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {
        "level": level,
        "opslimit": ops,
        "memlimit_bytes": mem,
        "repeat": repeat,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        # libsodium's argon2id runs on one thread: CPU time is what an idle machine would
        # take, and it does not grow when other jobs share the CPUs (wall time does).
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_growth_bytes": after - before,
    }


def _run_level(level: str, repeat: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", level, "--repeat", str(repeat)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| `security=` | argon2id opslimit | memlimit | median time | min - max "
        "| median CPU time | peak RSS growth |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['level']}` | {r['opslimit']} | {_mib(r['memlimit_bytes'])} "
            f"| {r['median_s']:.2f} s | {r['min_s']:.2f} - {r['max_s']:.2f} s "
            f"| {r['median_cpu_s']:.2f} s | {_mib(r['peak_rss_growth_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="derivations per level")
    parser.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--quick", action="store_true", help="smoke run: one derivation per level")
    parser.add_argument("--child", choices=LEVELS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.child:
        print(json.dumps(_child(args.child, args.repeat)))
        return
    rows = [_run_level(level, args.repeat) for level in args.levels]
    if args.json:
        print(json.dumps({"machine": _machine(), "results": rows}, indent=2))
        return
    print(f"Machine: {_machine()}; load average {_load()}\n")
    print(_table(rows))


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"


if __name__ == "__main__":
    main()
