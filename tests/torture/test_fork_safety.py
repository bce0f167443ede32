"""Issue 8, test 5: ``fork()`` while another thread is in the middle of a transaction.

Each round, a thread of the parent is stopped inside a transaction on the store:

- ``batch``: inside ``with store.batch():``, having written some keys, not yet committed;
- ``modify``: inside the callback of ``store.modify()`` (blocked on an event), so the
  store's internal locks, its cross-process lock or its connection are held.

The main thread then forks. The child uses the store object it inherited *and* a store
it opens itself: reads, single writes, a ``modify`` of the counter the parent's thread is
modifying, a ``batch``, ``close``; it reports every step through a pipe. Once the child
has started, the parent lets its thread finish the transaction, waits for the child, and
checks: the child never hangs (no progress for :data:`HANG_TIMEOUT` seconds counts as a
hang; the child is killed); the parent's transaction lands completely; every write the
child acknowledged lands; the parent's own store object still works; and at the end the
store reopens with exactly the expected contents, every value decoding.

The inherited object may refuse to work in the child by design, but only with a clear
:class:`~mappingstore.errors.MappingStoreError` (recorded as a figure); a store the child
opens itself must simply work, as in any other process.
"""

from __future__ import annotations

import json
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import mappingstore
from mappingstore import Store
from mappingstore.errors import MappingStoreError
from tests.torture.harness import PERSISTENT, Target, reps

VARIANTS = ("batch", "modify")

#: Seconds without progress after which a child is hung (then killed), per tier. A
#: correct child step takes milliseconds; a step waiting on a lock the parent holds ends
#: as soon as the parent's thread commits, right after the child has started.
HANG_TIMEOUT = {"fast": 5.0, "long": 10.0}

#: Seconds after which the parent's thread is released even if fork() has not returned.
FORK_GATE_RELEASE = 1.0

#: Options per backend. SQLite waits 30 s for a locked database by default; 2 s turns a
#: lock nobody will ever release into a prompt ``LockTimeoutError`` (the parent holds
#: its write lock only until the child has started).
OPTIONS: dict[str, dict[str, Any]] = {"sqlite": {"timeout": 2}}


def _cases() -> list[Any]:
    cases = []
    for backend in PERSISTENT:
        for variant in VARIANTS:
            cases.append(pytest.param(backend, variant, id=f"{backend}-{variant}"))
    return cases


# -- the child ------------------------------------------------------------------------------


def _child_steps(
    inherited: Store, url: str, options: dict[str, Any], round_: int
) -> list[tuple[str, str, Callable[[dict[str, Any]], Any]]]:
    """``(object, step, action)`` in the order the child runs them; *action* gets a dict
    holding the freshly opened store under ``"fresh"`` once the open step ran."""

    def store_of(which: str, ctx: dict[str, Any]) -> Store:
        if which == "inherited":
            return inherited
        fresh: Store = ctx["fresh"]
        return fresh

    def ops(which: str) -> list[tuple[str, str, Callable[[dict[str, Any]], Any]]]:
        tag = f"c{round_}.{which}"

        def batch(ctx: dict[str, Any]) -> None:
            s = store_of(which, ctx)
            with s.batch():
                for j in range(3):
                    s[f"{tag}.b{j}"] = [round_, which, j]

        return [
            (which, "read", lambda ctx: store_of(which, ctx)["seed"]),
            (which, "write", lambda ctx: store_of(which, ctx).__setitem__(tag, round_)),
            (which, "read back", lambda ctx: store_of(which, ctx)[tag]),
            (which, "modify", lambda ctx: store_of(which, ctx).modify("counter", _inc, 0)),
            (which, "batch", batch),
            (which, "close", lambda ctx: store_of(which, ctx).close()),
        ]

    inherited_ops = ops("inherited")
    return [
        inherited_ops[0],  # a read at once, while the parent's transaction may be open
        ("fresh", "open", lambda ctx: ctx.__setitem__("fresh", mappingstore.open(url, **options))),
        *ops("fresh"),
        *inherited_ops[1:],
    ]


def _inc(value: int) -> int:
    return value + 1


def _child(write_fd: int, inherited: Store, url: str, options: dict[str, Any], round_: int) -> None:
    """Run in the forked child: never returns (``os._exit``)."""
    code = 70
    try:

        def say(**message: Any) -> None:
            data = (json.dumps(message, default=repr) + "\n").encode()
            while data:
                data = data[os.write(write_fd, data) :]

        say(step="started")
        ctx: dict[str, Any] = {}
        failed: set[str] = set()
        for which, step, action in _child_steps(inherited, url, options, round_):
            if which in failed:
                continue  # one error per object: the later steps would only repeat it
            try:
                value = action(ctx)
            except BaseException as exc:
                failed.add(which)
                say(
                    which=which,
                    step=step,
                    error=f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}",
                    type=type(exc).__qualname__,
                    clear=isinstance(exc, MappingStoreError),
                )
            else:
                say(which=which, step=step, value=value)
        say(step="done")
        code = 0
    finally:
        os._exit(code)


# -- the parent -----------------------------------------------------------------------------


class _Round:
    """One fork: the parent's thread, the child, and what the child reported."""

    def __init__(self, store: Store, variant: str, round_: int, hang_timeout: float) -> None:
        self.store, self.variant, self.round = store, variant, round_
        self.hang_timeout = hang_timeout
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread_error: BaseException | None = None
        self.thread = threading.Thread(target=self._transaction, daemon=True)
        self.reports: list[dict[str, Any]] = []
        self.exit_code: int | None = None

    def _transaction(self) -> None:
        try:
            if self.variant == "batch":
                with self.store.batch():
                    for j in range(3):
                        self.store[f"p{self.round}.{j}"] = [self.round, j]
                    self.entered.set()
                    self.release.wait()
            else:

                def step(value: int) -> int:
                    self.entered.set()
                    self.release.wait()
                    return value + 1

                self.store.modify("counter", step, 0)
        except BaseException as exc:
            self.thread_error = exc
        finally:
            self.entered.set()

    def run(self, url: str, options: dict[str, Any]) -> str | None:
        """Fork mid-transaction, collect the child's reports and reap it; return where
        something hung (the child is then killed), else None."""
        self.thread.start()
        self.entered.wait()
        read_fd, write_fd = os.pipe()
        # The thread is released once the child has started. Should fork() ever wait for
        # open transactions to end (a fix for SQLite could), release it anyway.
        fallback = threading.Timer(FORK_GATE_RELEASE, self.release.set)
        fallback.start()
        with warnings.catch_warnings():
            # Python >= 3.12 warns that forking a multi-threaded process may deadlock
            # the child: that is exactly what this test checks.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(read_fd)
            _child(write_fd, self.store, url, options, self.round)
        os.close(write_fd)
        try:
            hung = self._collect(read_fd)
        finally:
            os.close(read_fd)
            self.release.set()
            fallback.cancel()
            self.exit_code, killed = _reap(pid, self.hang_timeout, kill=hung is not None)
        if killed and hung is None:
            hung = "child exit"
        self.thread.join(self.hang_timeout)
        if self.thread.is_alive():
            hung = f"{hung or 'nothing'} in the child; the parent's transaction never ended"
        return hung

    def _collect(self, read_fd: int) -> str | None:
        buffer = b""
        last = "fork"
        while True:
            ready, _, _ = select.select([read_fd], [], [], self.hang_timeout)
            if not ready:
                return last
            chunk = os.read(read_fd, 65536)
            if not chunk:
                return None  # the child exited (how is checked by the caller)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                report = json.loads(line)
                if report["step"] == "started":
                    self.release.set()  # let the parent's thread commit now
                self.reports.append(report)
                last = f"{report.get('which', 'child')} {report['step']}"


def _reap(pid: int, timeout: float, *, kill: bool) -> tuple[int, bool]:
    """Wait for child *pid* (killing it at once with *kill*, or if it has not exited
    within *timeout* seconds); its exit code and whether it had to be killed."""
    killed = False
    if kill:
        os.kill(pid, signal.SIGKILL)
        killed = True
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), killed
        if not killed and time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.002)


def _diff(seen: dict[str, Any], expected: dict[str, Any], where: str) -> list[str]:
    """Every difference between the store's contents and the expected ones."""
    out = [f"{where}: lost {k!r}" for k in expected if k not in seen]
    out += [f"{where}: unexpected {k!r}={seen[k]!r}" for k in seen if k not in expected]
    out += [
        f"{where}: {k!r} is {seen[k]!r}, expected {expected[k]!r}"
        for k in expected
        if k in seen and seen[k] != expected[k]
    ]
    return out


def _expect_child(
    round_: int, reports: list[dict[str, Any]], expected: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Add the child's acknowledged writes to *expected*; return (problems, errors the
    inherited store raised on purpose)."""
    problems: list[str] = []
    refused: list[str] = []
    for rep in reports:
        which, step = rep.get("which"), rep["step"]
        if "error" in rep:
            if which == "inherited" and rep["clear"]:
                refused.append(f"{step}: {rep['type']}")
            else:
                problems.append(f"round {round_}: {which} store, {step}: {rep['error']}")
        elif step == "write":
            expected[f"c{round_}.{which}"] = round_
        elif step == "modify":
            expected["counter"] += 1
        elif step == "batch":
            expected.update({f"c{round_}.{which}.b{j}": [round_, which, j] for j in range(3)})
        elif step == "read" and rep["value"] != "seed":
            problems.append(f"round {round_}: {which} store read {rep['value']!r}")
        elif step == "read back" and rep["value"] != round_:
            problems.append(f"round {round_}: {which} store read back {rep['value']!r}")
    return problems, refused


@pytest.mark.parametrize(("backend", "variant"), _cases())
def test_fork_while_a_thread_is_mid_transaction(
    backend: str, variant: str, tier: str, target: Target, figure: Callable[..., None]
) -> None:
    """Fork while a parent thread is mid-transaction (``batch`` or blocked in
    ``modify``), use the inherited and a fresh store in the child: 0 hangs, 0 integrity
    failures (long tier: 50 forks per backend and variant).

    An integrity failure is a lost or wrong value, a parent transaction that did not
    land whole, a child write acknowledged but missing, a value that does not decode,
    a store opened in the child that fails, an inherited store failing with anything
    but a mappingstore error, or a child that dies without finishing.
    """
    forks = reps(tier, 3, 50)
    options = OPTIONS.get(backend, {})
    store = target.open(**options)
    store.update({"seed": "seed", "counter": 0})
    expected: dict[str, Any] = {"seed": "seed", "counter": 0}
    problems: list[str] = []
    refused: list[str] = []
    hangs: list[str] = []
    done = 0
    for r in range(forks):
        round_ = _Round(store, variant, r, HANG_TIMEOUT[tier])
        hung = round_.run(target.url, options)
        done += 1
        if round_.thread_error is not None:
            problems.append(f"round {r}: the parent's transaction failed: {round_.thread_error!r}")
        elif not round_.thread.is_alive():
            if variant == "batch":
                expected.update({f"p{r}.{j}": [r, j] for j in range(3)})
            else:
                expected["counter"] += 1
        found, said_no = _expect_child(r, round_.reports, expected)
        problems += found
        refused += said_no
        if hung is not None:
            hangs.append(f"round {r}: hung after {hung}")
            break  # the test has failed: do not wait out more hangs
        if round_.exit_code != 0 or not round_.reports or round_.reports[-1]["step"] != "done":
            problems.append(f"round {r}: the child died (exit code {round_.exit_code})")
        store[f"after{r}"] = r  # the parent's own object still works
        expected[f"after{r}"] = r
        mine = (f"p{r}.", f"c{r}.")  # this round's keys (all keys: checked at the end)
        touched = {k: v for k, v in expected.items() if k.startswith(mine)}
        touched.update(seed="seed", counter=expected["counter"], **{f"after{r}": r})
        problems += _diff(store.get_many(list(touched)), touched, f"round {r}")
        if problems:
            break
    store.close()
    with target.open(**options) as again:  # reopens clean: everything decodes
        problems += _diff(dict(again), expected, "reopened")
    figure("forks", done, backend=backend, variant=variant)
    figure("hangs", len(hangs), backend=backend, variant=variant)
    figure("integrity failures", len(problems), backend=backend, variant=variant)
    figure(
        "inherited store refusals",
        len(refused),
        backend=backend,
        variant=variant,
        errors=sorted(set(refused)),
    )
    assert not hangs, f"hangs: {hangs}; problems: {problems[:10]}"
    assert not problems, "\n".join(problems[:20])
