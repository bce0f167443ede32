"""Issue 8, required test 3: processes that write and exit without ``close()``.

Each process opens the store, writes, acknowledges every write after it returned, and
exits *without* calling ``close()``, in one of these ways:

========================  =======================================================  ====
variant                   how the process ends                                     code
========================  =======================================================  ====
``return``                falls off the end of the script                          0
``exception``             an uncaught ``RuntimeError``                             1
``exit_in_modify``        ``sys.exit(3)`` inside a ``modify`` callback              3
``exit_in_batch``         ``sys.exit(4)`` inside a ``batch()`` block, after writes  4
``os_exit``               ``os._exit(5)`` (a forked child: no shutdown at all)      5
``daemon_threads``        returns while 4 daemon threads are still writing         0
========================  =======================================================  ====

All but ``os_exit`` are real ``python -c`` subprocesses, so interpreter shutdown really
runs: ``atexit`` hooks, finalizers, garbage collection of the open store, driver pools.
``daemon_threads`` has a test of its own; its child registers an exit hook of its own
first (a 0.2 s sleep, so it runs after the library's hooks) to model an application
whose threads keep running while the interpreter exits.

**Acknowledged** means the write call returned before the exit; the child then appends
``{"k": key, "v": value}`` to its acknowledgement file (``os.write`` on an ``O_APPEND``
descriptor, in the page cache before the next statement runs). The ``modify`` whose
callback exits never returned, so its key must keep the last acknowledged value; the
``batch()`` left by ``SystemExit`` must be all-or-nothing; each daemon thread's last
write may be cut by the shutdown, so only its acknowledged writes count.

Figures: processes, hangs (a process still alive after :data:`TIMEOUT` is killed and
counted), unexpected exit codes, noisy exits (anything on stderr but the expected
traceback: "Exception ignored", leaked-resource warnings, tracebacks in threads), and
acknowledged writes found (must be 100%).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.torture.harness import FORK, PERSISTENT, Target, reps

#: Seconds a process gets to exit before it counts as a hang (generous: start-up of a
#: Python interpreter on a loaded 2-core machine).
TIMEOUT = 60.0
#: Processes running at once (per backend).
PARALLEL = 6
#: Exit code each variant must end with.
EXIT_CODES = {
    "return": 0,
    "exception": 1,
    "exit_in_modify": 3,
    "exit_in_batch": 4,
    "os_exit": 5,
    "daemon_threads": 0,
}
#: The variants of the main test (``daemon_threads`` has a test of its own).
VARIANTS = ("return", "exception", "exit_in_modify", "exit_in_batch", "os_exit")
#: Writes every process makes (and acknowledges) before its ending.
SINGLE_WRITES = 4
BATCH_KEYS = 3
#: ``daemon_threads``: threads still writing at exit, and the size of each value they
#: write (large, so that the shutdown finds them inside the backend's write).
THREADS = 4
THREAD_PAD = 100_000

#: The child. argv: url, variant, process number, acknowledgement file. Each line of the
#: acknowledgement file is ``{"k": key, "v": value}`` (``"pad": n``: the value has
#: NUL bytes appended, too many to repeat there).
CHILD = (
    textwrap.dedent(
        """
        import atexit, json, os, sys, threading, time

        url, variant, proc, ack_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
        if variant == "daemon_threads":
            # An application's own exit hook, registered first so it runs last (atexit is
            # LIFO): the daemon threads run on while it waits, after every exit hook the
            # store's modules registered has run.
            atexit.register(time.sleep, 0.2)

        import mappingstore

        ack_fd = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

        def ack(*pairs, **extra):
            lines = (json.dumps({"k": k, "v": v, **extra}) + "\\n" for k, v in pairs)
            os.write(ack_fd, "".join(lines).encode())

        store = mappingstore.open(url)
        p = f"p{proc:03d}"
        for i in range(SINGLE_WRITES):
            store[f"{p}.s{i}"] = value = [proc, i, "x" * (i * 300)]
            ack((f"{p}.s{i}", value))
        with store.batch():
            batch = [(f"{p}.b{i}", [proc, "batch", i]) for i in range(BATCH_KEYS)]
            for key, value in batch:
                store[key] = value
        ack(*batch)
        store[f"{p}.c"] = 0
        ack((f"{p}.c", 0))
        ack((f"{p}.c", store.modify(f"{p}.c", lambda n: n + 1)))

        if variant == "return":
            store[f"{p}.last"] = "end"
            ack((f"{p}.last", "end"))
        elif variant == "exception":
            raise RuntimeError("uncaught on purpose")
        elif variant == "exit_in_modify":
            store.modify(f"{p}.c", lambda n: sys.exit(3))
        elif variant == "exit_in_batch":
            with store.batch():
                for i in range(BATCH_KEYS):
                    store[f"{p}.x{i}"] = [proc, "exit", i]
                sys.exit(4)
        elif variant == "os_exit":
            os._exit(5)
        elif variant == "daemon_threads":
            running = threading.Barrier(THREADS + 1)

            def write_forever(t):
                for i in range(10**9):
                    key = f"{p}.t{t}.{i % 20}"
                    store[key] = [proc, "thread", t, i, b"\\0" * THREAD_PAD]
                    ack((key, [proc, "thread", t, i]), pad=THREAD_PAD)
                    if i == 2:
                        running.wait()

            for t in range(THREADS):
                threading.Thread(target=write_forever, args=(t,), daemon=True).start()
            running.wait()
        """
    )
    .replace("SINGLE_WRITES", str(SINGLE_WRITES))
    .replace("BATCH_KEYS", str(BATCH_KEYS))
    .replace("THREAD_PAD", str(THREAD_PAD))
    .replace("THREADS", str(THREADS))
)


def fork_child(argv: list[str]) -> None:
    """A variant in a forked child (no interpreter start-up, and no shutdown either)."""
    sys.argv = ["-c", *argv]
    exec(CHILD, {"__name__": "__main__"})


@dataclass
class Run:
    """One process: its variant, handle, and where it acknowledges."""

    proc: int
    variant: str
    ack_path: Path
    started: float = 0.0
    popen: subprocess.Popen[bytes] | None = None
    fork: Any = None
    exitcode: int | None = None
    stderr: str = ""
    hung: bool = False

    def start(self, url: str) -> None:
        self.started = time.monotonic()
        argv = [url, self.variant, str(self.proc), str(self.ack_path)]
        if self.variant == "os_exit":
            self.fork = FORK.Process(target=fork_child, args=(argv,))
            self.fork.start()
            return
        args = [sys.executable, "-c", CHILD, *argv]
        with self.err_path.open("wb") as err:  # a file: a chatty child never blocks on a pipe
            self.popen = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)

    def poll(self) -> bool:
        """True once the process has ended (or was killed as a hang)."""
        if self.popen is not None:
            if self.popen.poll() is None and not self.overdue():
                return False
            if self.popen.returncode is None:
                self.hung = True
                self.popen.kill()
            self.exitcode = self.popen.wait()
            self.stderr = self.err_path.read_text(errors="replace")
            return True
        if self.fork.exitcode is None and not self.overdue():
            return False
        if self.fork.exitcode is None:
            self.hung = True
            os.kill(self.fork.pid, signal.SIGKILL)
        self.fork.join()
        self.exitcode = self.fork.exitcode
        return True

    @property
    def err_path(self) -> Path:
        return self.ack_path.with_suffix(".err")

    def overdue(self) -> bool:
        return time.monotonic() - self.started > TIMEOUT

    def acknowledged(self) -> list[tuple[str, Any]]:
        """The acknowledged writes in order (a torn last line is no acknowledgement)."""
        if not self.ack_path.exists():
            return []
        rows = [json.loads(line) for line in self.ack_path.read_text().split("\n")[:-1]]
        return [(r["k"], r["v"] + [b"\0" * r["pad"]] if "pad" in r else r["v"]) for r in rows]

    def noisy(self) -> bool:
        """Anything on stderr except, for ``exception``, the one expected traceback."""
        err = self.stderr.strip()
        if self.variant == "exception":
            lines = err.splitlines()
            return not (
                lines
                and lines[0] == "Traceback (most recent call last):"
                and lines[-1] == "RuntimeError: uncaught on purpose"
                and sum(line.startswith("Traceback") for line in lines) == 1
                and "Exception ignored" not in err
            )
        return bool(err)


@dataclass
class Tally:
    """The figures of one backend."""

    processes: int = 0
    hangs: int = 0
    wrong_exit_codes: int = 0
    noisy_exits: int = 0
    acknowledged: int = 0
    acknowledged_found: int = 0
    exit_batches_applied: int = 0
    problems: list[str] = field(default_factory=list)

    def record(self, figure: Callable[..., None], seconds: float, **detail: Any) -> None:
        figure("processes", self.processes, **detail, seconds=round(seconds, 1))
        figure("hangs", self.hangs, **detail)
        figure("unexpected exit codes", self.wrong_exit_codes, **detail)
        figure("noisy exits", self.noisy_exits, **detail)
        figure("acknowledged writes", self.acknowledged, **detail)
        share = 100.0 * self.acknowledged_found / max(self.acknowledged, 1)
        figure("acknowledged writes present (%)", round(share, 2), **detail)


def run_all(target: Target, variants: list[str], tmp_path: Path) -> list[Run]:
    """Run one process per variant (at most :data:`PARALLEL` at once), wait for each."""
    pending = [Run(n, variant, tmp_path / f"{n}.ack") for n, variant in enumerate(variants)]
    running: list[Run] = []
    done: list[Run] = []
    while pending or running:
        while pending and len(running) < PARALLEL:
            run = pending.pop(0)
            run.start(target.url)
            running.append(run)
        time.sleep(0.01)
        for run in [r for r in running if r.poll()]:
            running.remove(run)
            done.append(run)
    return done


def cut_writes(run: Run, writes: list[tuple[str, Any]]) -> dict[str, Any]:
    """Writes the shutdown may have cut after their last acknowledgement (key -> value).

    Only the daemon threads write past the end of the main thread: for each, the write
    after its last acknowledged one may be there or not.
    """
    if run.variant != "daemon_threads":
        return {}
    last: dict[int, int] = {}
    for _, val in writes:
        if isinstance(val, list) and val[1:2] == ["thread"]:
            last[val[2]] = max(last.get(val[2], -1), val[3])
    p = f"p{run.proc:03d}"
    return {
        f"{p}.t{t}.{(i + 1) % 20}": [run.proc, "thread", t, i + 1, b"\0" * THREAD_PAD]
        for t, i in last.items()
    }


def check(target: Target, runs: list[Run], tally: Tally) -> None:
    """Reopen the store and hold every process to what it acknowledged."""
    with target.open() as store:
        contents = dict(store.items())
        assert sorted(contents) == sorted(store) and len(store) == len(contents)
        store["fresh"] = "write"
        assert store["fresh"] == "write"
        del store["fresh"]
    for run in runs:
        tally.processes += 1
        where = f"process {run.proc} ({run.variant})"
        tally.hangs += run.hung
        if run.hung:
            tally.problems.append(f"{where}: still running after {TIMEOUT} s (killed)")
        elif run.exitcode != EXIT_CODES[run.variant]:
            tally.wrong_exit_codes += 1
            tally.problems.append(f"{where}: exit code {run.exitcode}: {run.stderr[-300:]}")
        if run.noisy():
            tally.noisy_exits += 1
            tally.problems.append(f"{where}: stderr: {run.stderr[-800:]}")
        writes = run.acknowledged()
        expected = SINGLE_WRITES + BATCH_KEYS + 2 + (run.variant == "return")
        expected += 3 * THREADS if run.variant == "daemon_threads" else 0
        if len(writes) < expected and not run.hung:
            tally.problems.append(f"{where}: only {len(writes)} acknowledgements")
        acked = dict(writes)  # the last acknowledged value of each key
        cut = cut_writes(run, writes)
        tally.acknowledged += len(writes)
        for key, val in acked.items():
            got = contents.get(key, "<missing>")
            if got == val or (key in cut and got == cut[key]):
                # Found, with every earlier acknowledged write of the key it replaced.
                tally.acknowledged_found += sum(k == key for k, _ in writes)
            else:
                tally.problems.append(f"{where}: {key} is {got!r:.80}, acked {val!r:.80}")
        p = f"p{run.proc:03d}"
        mine = {k for k in contents if k.startswith(p + ".")}
        unexpected = {k for k in mine - set(acked) if not (k in cut and contents[k] == cut[k])}
        if run.variant == "exit_in_batch":
            xs = {f"{p}.x{i}" for i in range(BATCH_KEYS)}
            if unexpected & xs and not xs <= unexpected:
                tally.problems.append(f"{where}: batch left by sys.exit half applied: {mine}")
            tally.exit_batches_applied += xs <= unexpected
            unexpected -= xs
        if unexpected:
            tally.problems.append(f"{where}: keys never acknowledged: {sorted(unexpected)}")


def run_and_check(target: Target, variants: list[str], tmp_path: Path) -> tuple[Tally, float]:
    """Run the processes against a fresh store, then check it; the tally and the time."""
    with target.open() as store:  # created up front: the children race only on writes
        store["created"] = True
    started = time.monotonic()
    runs = run_all(target, variants, tmp_path)
    elapsed = time.monotonic() - started
    tally = Tally()
    check(target, runs, tally)
    return tally, elapsed


@pytest.mark.parametrize("backend", PERSISTENT)
def test_exit_without_close_keeps_acknowledged_writes_and_never_hangs(
    backend: str, target: Target, tier: str, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """Processes that write and exit without ``close()`` (normally, by an uncaught
    exception, by ``sys.exit`` inside ``modify`` and inside ``batch()``, by ``os._exit``):
    none hangs, each ends with its expected exit code and nothing unexpected on stderr,
    every acknowledged write is on disk with its value, the interrupted ``modify``
    changed nothing, and the batch left by ``sys.exit`` is all-or-nothing."""
    count = reps(tier, fast=3, long=34)  # 18 / 204 processes over the 6 backends
    # The variants rotate from an offset per backend: the fast tier's 3 processes per
    # backend still run every variant on some backends.
    first = 3 * PERSISTENT.index(backend)
    variants = [VARIANTS[(first + n) % len(VARIANTS)] for n in range(count)]
    tally, elapsed = run_and_check(target, variants, tmp_path)
    tally.record(figure, elapsed, backend=backend, tier=tier)
    figure("batches left by sys.exit found applied", tally.exit_batches_applied, backend=backend)
    assert not tally.problems, "\n".join(tally.problems)
    assert tally.processes == count and tally.acknowledged_found == tally.acknowledged > 0


@pytest.mark.parametrize("backend", PERSISTENT)
def test_exit_while_daemon_threads_write(
    backend: str, target: Target, tier: str, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """A process whose main thread returns while daemon threads are still writing large
    values (the shutdown finds them inside the backend): it exits with code 0, prints
    nothing, never crashes or hangs, and every write its threads acknowledged is there
    (each thread's last, unacknowledged write may or may not be)."""
    count = reps(tier, fast=1, long=6)
    tally, elapsed = run_and_check(target, ["daemon_threads"] * count, tmp_path)
    tally.record(figure, elapsed, backend=backend, tier=tier, variant="daemon_threads")
    assert not tally.problems, "\n".join(tally.problems)
    assert tally.processes == count and tally.acknowledged_found == tally.acknowledged > 0
