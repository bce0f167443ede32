"""Fault sweep (issue 8, test 2): injected write failures on every file backend.

Two ways to make a write fail, as the issue names them:

* **Disk full.** A forked child lowers ``RLIMIT_FSIZE`` (with ``SIGXFSZ`` ignored, so a
  write past the limit fails with ``EFBIG`` instead of killing the process) to a sweep of
  limits around the size of the file the operation writes: the SQLite WAL, the INI file,
  the directory store's record or journal file, the shared-memory data segment (the
  limit also bounds ``posix_fallocate`` on tmpfs, i.e. segment growth).
* **A failing I/O call.** The child makes the N-th storage-modifying call of the
  operation fail (``ENOSPC`` or ``EIO``): ``os.write``, ``fsync``, ``replace``,
  ``rename``, ``unlink``, ``mkdir``, ``ftruncate``, ``posix_fallocate``, ``fchmod``,
  ``mmap``, and ``os.open`` for writing; N = 1, 2, 3 ... until the operation succeeds,
  as SQLite's ioerr tests do. SQLite's own I/O happens in C, where Python cannot reach
  it: there the N-th WAL frame write fails (``RLIMIT_FSIZE`` set at the N-th frame
  boundary past the current end of the WAL).

The operations broken: a single set, an overwrite with a bigger value, a delete, a
``batch()`` of several keys (puts and a delete), ``modify``, and growth (a value so big
that the shared-memory data segment must grow; a big write elsewhere). On ``shm://`` a
set, an overwrite or a modify writes no file unless the heap is full, so the child fills
the heap first and the operation has to build the next segment generation; a delete
there only writes a tombstone into mapped memory, so no fault can reach it.

Each injection runs in its own forked child, which

1. opens the store fresh, without any fault, and reads every key: it must hold exactly
   what the previous child left (for SQLite ``PRAGMA integrity_check`` must say ``ok``
   first), then writes a probe key (a fresh process accepts writes);
2. runs the operation under the fault: it must either succeed or raise a
   :class:`~mappingstore.errors.MappingStoreError` (never a raw ``OSError`` or
   ``sqlite3`` error);
3. lifts the fault and reads every key with the same instance: after a failure, every
   key holds its previous value (a batch is all-or-nothing); after a success, the new
   state. The one exception, checked precisely: a failure reported *after* the write's
   commit point (a successful ``os.replace`` of the INI file, of a record file or of a
   batch journal, then a failing directory ``fsync`` or a failing write of the journal's
   replay, which the next writer or reader finishes) must leave the complete new state,
   never a mix. SQLite and shared memory have no such point here: an error there must
   leave the previous state;
4. writes a second probe with that same instance (it recovers once the fault is gone).

The next child's fresh open checks what this one left, and a last child checks the end.
Tiers: the long one runs two rounds of every operation, limits in sixths of the file
size (sixths of a WAL frame on SQLite) and every N; the fast one a round, halves and
every other N.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import mmap
import os
import resource
import signal
import sqlite3
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from mappingstore import Store
from mappingstore.errors import MappingStoreError
from tests.torture.harness import FILE_BACKENDS, FORK, SHM_DIR, Target, reps

#: The operations the sweep breaks, in the order each round runs them.
OPS: tuple[str, ...] = ("set", "overwrite", "delete", "batch", "modify", "grow")
#: Calls of ``os`` that change storage; ``os.open`` counts when it opens for writing.
_OS_CALLS: tuple[str, ...] = (
    "write",
    "pwrite",
    "fsync",
    "fdatasync",
    "replace",
    "rename",
    "unlink",
    "rmdir",
    "mkdir",
    "ftruncate",
    "truncate",
    "posix_fallocate",
    "fchmod",
    "chmod",
    "link",
)
#: Calls that can be a commit point, and which argument names the file they change.
_COMMITS = {"replace": 1, "rename": 1, "unlink": 0}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
#: A WAL frame: 24-byte frame header + one page (SQLite's default page size).
_FRAME = 24 + 4096
_DELETE: Any = object()
_CHILD_TIMEOUT = 60.0
_MAX_ATTEMPTS = 400
#: Key names long enough that every record of an operation exceeds the 64 bytes of heap
#: the shm child leaves free: the operation cannot fit in place and must rebuild.
_K_SET = "single-set-key-r"
_K_OVER = "overwrite-with-bigger-value"
_K_DEL = "deleted-key-r"
_K_COUNTER = "counter-for-modify"
_K_GROW = "growth-of-the-store"
_K_FILLER = "filler"
_K_BATCH = ("batch-key-a", "batch-key-b", "batch-key-c")
_PROBE1, _PROBE2 = "probe-fresh-process", "probe-after-fault"


@dataclass
class Attempt:
    """One injection: the operation, the fault, and the state the child must find."""

    step: int
    round: int
    op: str | None  # None: only the fresh-open check (the last child)
    mechanism: str  # "rlimit" or "nth"
    n: int  # attempt number within the sweep of this operation (0, 1, 2 ...)
    expected: dict[str, Any]
    fractions: int  # rlimit sweep: limits of base * n / fractions
    stride: int  # failing-call sweep: N = 1 + n * stride
    grow: int  # size of the value that grows a file store


@dataclass
class Tally:
    """The figures of one sweep (one backend, one mechanism)."""

    attempts: int = 0
    failures: int = 0
    surfaced: int = 0
    raw: int = 0
    damaged: int = 0
    after_commit: int = 0
    absorbed: int = 0
    reopens: int = 0
    clean_reopens: int = 0
    problems: list[str] = field(default_factory=list)


# -- the fault, inside the child --------------------------------------------------------------


def _is_temp(backend: str, path: object) -> bool:
    """True for a path a backend writes before its commit point (a temp file)."""
    if backend in ("sqlite", "shm"):
        return True  # no call is a commit point: an error must leave the previous state
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""
    return "/.tmp/" in text or ".tmp." in os.path.basename(text)


class Injector:
    """Counts storage-modifying calls; fails call number *fail_at* (None: only counts).

    Also notes whether a commit-point call (``replace``/``rename`` onto a real name,
    ``unlink`` of a real file) had succeeded when the operation raised.
    """

    def __init__(self, backend: str, fail_at: int | None) -> None:
        self.backend = backend
        self.fail_at = fail_at
        self.calls = 0
        self.fired = False
        self.committed = False
        self._saved: list[tuple[Any, str, Any]] = []

    def _fault(self, name: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            self.fired = True
            code = errno.ENOSPC if self.calls % 2 else errno.EIO
            raise OSError(code, f"injected failure of {name} (call {self.calls})")

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._fault(name)
            result = fn(*args, **kwargs)
            target = _COMMITS.get(name)  # the argument naming the file made visible
            if target is not None and not _is_temp(self.backend, args[target]):
                self.committed = True
            return result

        return call

    def install(self) -> None:
        for name in _OS_CALLS:
            fn = getattr(os, name, None)
            if fn is not None:
                self._patch(os, name, self._wrap(name, fn))
        real_open = os.open

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if flags & _WRITE_FLAGS:
                self._fault("open")
            return real_open(path, flags, *args, **kwargs)

        self._patch(os, "open", open_)
        real_mmap = mmap.mmap

        def mmap_(*args: Any, **kwargs: Any) -> mmap.mmap:
            self._fault("mmap")
            return real_mmap(*args, **kwargs)

        self._patch(mmap, "mmap", mmap_)

    def _patch(self, module: Any, name: str, value: Any) -> None:
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    def remove(self) -> None:
        while self._saved:
            module, name, value = self._saved.pop()
            setattr(module, name, value)


def _shm_data_files(target: Target) -> list[tuple[int, str]]:
    """(generation, path) of the data segments of a shm target, oldest first."""
    base = f"{SHM_DIR}/mappingstore.{target.name}."
    found = []
    for path in glob.glob(glob.escape(base) + "*"):
        suffix = path[len(base) :]
        if suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def _shm_heap(target: Target) -> tuple[int, int]:
    """(segment size, free heap bytes) of the newest data segment (layout: _shm_table)."""
    path = _shm_data_files(target)[-1][1]
    with open(path, "rb") as fh:
        head = fh.read(64)
    heap_end = int.from_bytes(head[40:48], "little")
    size = int.from_bytes(head[48:56], "little")
    return size, size - heap_end


def _rlimit_base(backend: str, target: Target, effects: dict[str, Any]) -> int:
    """The size of the file the operation writes, before it writes it."""
    assert target.path is not None or backend == "shm"
    if backend == "sqlite":
        wal = f"{target.path}-wal"
        return os.path.getsize(wal) if os.path.exists(wal) else 0
    if backend == "ini":
        # The file is rewritten whole: its current size, or the size it is growing to.
        grown = sum(len(k) + len(repr(v)) + 4 for k, v in effects.items() if v is not _DELETE)
        return max(os.path.getsize(str(target.path)), grown)
    if backend == "shm":
        return _shm_heap(target)[0]
    # dir: a record file is 24 bytes + key + value record; a batch writes a journal of
    # all of them first.
    sizes = [40 + len(k) + len(repr(v)) for k, v in effects.items() if v is not _DELETE]
    return sum(sizes) if len(effects) > 1 else max(sizes, default=0)


@contextlib.contextmanager
def _fault(
    attempt: Attempt, backend: str, target: Target, effects: dict[str, Any]
) -> Iterator[Injector]:
    """Install the attempt's fault for the block; the injector reports what happened."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit: int | None = None
    fail_at: int | None = None
    if backend == "sqlite":
        base = _rlimit_base(backend, target, effects)
        if attempt.mechanism == "nth":  # the N-th WAL frame of the operation fails
            limit = base + attempt.n * attempt.stride * _FRAME
        else:  # mid-frame limits, starting just below the current end of the WAL
            step = _FRAME // attempt.fractions
            limit = max(0, base + (attempt.n - 1) * step)
    elif attempt.mechanism == "rlimit":
        limit = _rlimit_base(backend, target, effects) * attempt.n // attempt.fractions
    else:
        fail_at = 1 + attempt.n * attempt.stride
    injector = Injector(backend, fail_at)
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    injector.install()
    try:
        yield injector
    finally:
        injector.remove()
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# -- the operations -----------------------------------------------------------------------


def _value(key: str, step: int, size: int) -> str:
    head = f"{key}@{step}:"
    return head + "v" * max(0, size - len(head))


def _prepare(store: Store, backend: str, target: Target, attempt: Attempt) -> None:
    """Set the stage without any fault: the key a delete removes; on shm, a full heap
    (so a set, overwrite or modify has to build the next generation) or a compacted
    segment (so growth really grows it)."""
    op = attempt.op
    if op == "delete":
        store[f"{_K_DEL}{attempt.round}"] = _value("del", attempt.step, 40)
    if backend != "shm":
        return
    if op == "grow":
        store.pop(_K_GROW, None)
        with store.batch():  # a multi-key write rebuilds: the segment is compacted
            store[_K_FILLER] = b""
            store[_K_FILLER + "2"] = b""
    elif op in ("set", "overwrite", "modify"):
        _fill_heap(store, target)


def _fill_heap(store: Store, target: Target) -> None:
    """Leave less than 64 bytes of free heap, with garbage: a filler record of exactly
    ``free - 64`` bytes, then overwritten by an empty one (56 bytes). Live data stays
    small, so the segment does not grow from one attempt to the next."""
    # A record of the filler: 32-byte header, "default" + "filler" (13), the value record
    # header (6), the msgpack bin length (2, 3 or 5 bytes), the bytes; 8-byte aligned.
    for _ in range(20):
        free = _shm_heap(target)[1]
        if free < 64:
            return
        target_size = free - 64
        for head, limit in ((2, 1 << 8), (3, 1 << 16), (5, 1 << 32)):
            n = target_size - 51 - head
            if n < limit:
                break
        if n >= 0:
            store[_K_FILLER] = bytes(n)
        store[_K_FILLER] = b""
    raise AssertionError("could not fill the shared-memory heap")


def _effects(
    backend: str, target: Target, attempt: Attempt, before: dict[str, Any]
) -> dict[str, Any]:
    """What the operation writes: {key: new value, or _DELETE}."""
    op, step, rnd = attempt.op, attempt.step, attempt.round
    if op == "set":
        return {f"{_K_SET}{rnd}": _value("set", step, 60)}
    if op == "overwrite":
        return {_K_OVER: _value("over", step, len(before.get(_K_OVER, "")) + 3000)}
    if op == "delete":
        return {f"{_K_DEL}{rnd}": _DELETE}
    if op == "batch":
        toggled = _DELETE if _K_BATCH[2] in before else ("tuple", step, b"\x00\xff")
        return {
            _K_BATCH[0]: _value("batch", step, 300),
            _K_BATCH[1]: {"step": step, "items": [1, 2.5, None, "x" * 200]},
            _K_BATCH[2]: toggled,
            f"batch-new-{rnd}-{step}": step,
        }
    if op == "modify":
        return {_K_COUNTER: before[_K_COUNTER] + 1}
    if op == "grow":
        # shm: as big as the whole current segment, so the next one must be bigger.
        size = _shm_heap(target)[0] if backend == "shm" else attempt.grow
        return {_K_GROW: _value("grow", step, size)}
    raise AssertionError(op)


def _run(store: Store, op: str, effects: dict[str, Any]) -> None:
    if op == "delete":
        (key,) = effects
        del store[key]
    elif op == "batch":
        with store.batch() as b:
            for key, value in effects.items():
                if value is _DELETE:
                    del b[key]
                else:
                    b[key] = value
    elif op == "modify":
        store.modify(_K_COUNTER, lambda v: v + 1)
    else:
        ((key, value),) = effects.items()
        store[key] = value


def _applied(before: dict[str, Any], effects: dict[str, Any]) -> dict[str, Any]:
    after = dict(before)
    for key, value in effects.items():
        if value is _DELETE:
            after.pop(key, None)
        else:
            after[key] = value
    return after


# -- the child ------------------------------------------------------------------------------


def _integrity(path: str) -> str:
    """``PRAGMA integrity_check`` through a plain connection, closed before the store opens
    (closing a descriptor of the file would drop the store's POSIX locks)."""
    conn = sqlite3.connect(path)
    try:
        return "; ".join(str(r[0]) for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def _describe(exc: BaseException) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "ours": isinstance(exc, MappingStoreError),
        "message": str(exc)[:300],
        "trace": "".join(traceback.format_exception(exc))[-3000:],
    }


def _child_body(target: Target, backend: str, attempt: Attempt) -> dict[str, Any]:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    out: dict[str, Any] = {}
    if backend == "sqlite":
        assert target.path is not None
        out["integrity"] = _integrity(str(target.path))
    store = target.open()
    out["reopened"] = dict(store.items())
    store[_PROBE1] = attempt.step
    if attempt.op is None:
        store.close()
        return out
    _prepare(store, backend, target, attempt)
    before = dict(store.items())
    effects = _effects(backend, target, attempt, before)
    error: BaseException | None = None
    with _fault(attempt, backend, target, effects) as injector:
        try:
            _run(store, attempt.op, effects)
        except BaseException as exc:  # classified below: ours, or a raw leak
            error = exc
        committed = injector.committed
    out.update(
        before=before,
        after=_applied(before, effects),
        error=None if error is None else _describe(error),
        committed=committed,
        fired=injector.fired,
        calls=injector.calls,
    )
    # The fault is gone: the same instance must read a consistent state and write again.
    out["lifted"] = dict(store.items())
    store[_PROBE2] = attempt.step
    store.close()
    return out


def _child(conn: Any, other_end: Any, target: Target, backend: str, attempt: Attempt) -> None:
    other_end.close()  # else a report nobody reads blocks this child forever
    try:
        report = _child_body(target, backend, attempt)
    except BaseException as exc:  # reported to the parent, which fails the test
        report = {"crash": _describe(exc)}
    conn.send(report)
    conn.close()


def _run_child(target: Target, backend: str, attempt: Attempt) -> dict[str, Any]:
    parent_end, child_end = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_child, args=(child_end, parent_end, target, backend, attempt))
    proc.start()
    child_end.close()
    try:
        if not parent_end.poll(_CHILD_TIMEOUT):
            proc.kill()
            proc.join()
            return {"crash": {"type": "hang", "ours": False, "message": "no report", "trace": ""}}
        report: dict[str, Any] = parent_end.recv()
    except EOFError:
        report = {"crash": {"type": "died", "ours": False, "message": "", "trace": ""}}
    finally:
        parent_end.close()
    proc.join(_CHILD_TIMEOUT)
    if proc.exitcode != 0:
        report.setdefault("crash", {"type": f"exit code {proc.exitcode}", "ours": False})
    return report


# -- the parent: sweeps and checks -----------------------------------------------------------


def _diff(seen: dict[str, Any], want: dict[str, Any]) -> str:
    keys = sorted(set(seen) | set(want))
    bad = [k for k in keys if seen.get(k, "<missing>") != want.get(k, "<missing>")]
    return ", ".join(
        f"{k}: {str(seen.get(k, '<missing>'))[:40]!r} != {str(want.get(k, '<missing>'))[:40]!r}"
        for k in bad[:5]
    )


def _check_reopen(report: dict[str, Any], attempt: Attempt, tally: Tally) -> None:
    tally.reopens += 1
    where = f"step {attempt.step} (fresh open)"
    if report.get("integrity", "ok") != "ok":
        tally.problems.append(f"{where}: integrity_check says {report['integrity']}")
    elif report["reopened"] != attempt.expected:
        tally.problems.append(
            f"{where}: state differs: {_diff(report['reopened'], attempt.expected)}"
        )
    else:
        tally.clean_reopens += 1


def _check_attempt(report: dict[str, Any], attempt: Attempt, tally: Tally) -> dict[str, Any]:
    """Check one injection; return the state the next fresh open must find."""
    where = f"step {attempt.step}: {attempt.op} ({attempt.mechanism} #{attempt.n})"
    tally.attempts += 1
    before, after, lifted = report["before"], report["after"], report["lifted"]
    # Before the operation: what the fresh open read, the probe, and the stage set by
    # _prepare (only the keys it touches may differ).
    staged = {_K_FILLER, _K_FILLER + "2", _K_GROW, f"{_K_DEL}{attempt.round}"}
    want = {**attempt.expected, _PROBE1: attempt.step}
    if {k: v for k, v in before.items() if k not in staged} != {
        k: v for k, v in want.items() if k not in staged
    }:
        tally.problems.append(f"{where}: state before the operation: {_diff(before, want)}")
    error = report["error"]
    if error is None:
        if report["fired"]:
            tally.absorbed += 1  # the backend handled the failed call itself
        if lifted != after:
            tally.problems.append(f"{where}: succeeded but reads {_diff(lifted, after)}")
            tally.damaged += 1
    else:
        tally.failures += 1
        if error["ours"]:
            tally.surfaced += 1
        else:
            tally.raw += 1
            tally.problems.append(
                f"{where}: raw {error['type']} leaked: {error['message']}\n{error['trace']}"
            )
        if lifted == before:
            pass
        elif lifted == after and report["committed"]:
            tally.after_commit += 1  # failed after its commit point: complete, not torn
        else:
            tally.damaged += 1
            tally.problems.append(
                f"{where}: failed ({error['type']}: {error['message']}) but the store reads "
                f"neither the previous state"
                + (" nor (past its commit point) the new one" if report["committed"] else "")
                + f": {_diff(lifted, before)}\n{error['trace']}"
            )
    return {**lifted, _PROBE2: attempt.step}


def _sweep(target: Target, backend: str, mechanism: str, tier: str, tally: Tally) -> None:
    """Every operation, every round: attempt it under the fault until it succeeds."""
    rounds = reps(tier, 1, 2)
    fractions = reps(tier, 2, 6)
    stride = reps(tier, 2, 1)
    grow = reps(tier, 12_000, 40_000)
    with target.open() as store:
        store.update({_K_COUNTER: 1_000_000, _K_OVER: "o" * 100, "plain": "text", "n": 7})
        store[_K_BATCH[2]] = ["present"]
        expected = dict(store.items())
    step = 0
    for rnd in range(rounds):
        for op in OPS:
            for n in range(_MAX_ATTEMPTS):
                step += 1
                attempt = Attempt(step, rnd, op, mechanism, n, expected, fractions, stride, grow)
                report = _run_child(target, backend, attempt)
                if "crash" in report:
                    crash = report["crash"]
                    tally.problems.append(
                        f"{mechanism} step {step}: {op}: child failed: {crash['type']}: "
                        f"{crash.get('message')}\n{crash.get('trace', '')}"
                    )
                    return
                _check_reopen(report, attempt, tally)
                expected = _check_attempt(report, attempt, tally)
                if report["error"] is None:
                    break
            else:
                tally.problems.append(f"{op}: still failing after {_MAX_ATTEMPTS} attempts")
    step += 1
    final = Attempt(step, rounds, None, mechanism, 0, expected, fractions, stride, grow)
    report = _run_child(target, backend, final)
    if "crash" in report:
        tally.problems.append(f"{mechanism}: final reopen failed: {report['crash']}")
    else:
        _check_reopen(report, final, tally)


def _check_shm_files(target: Target, tally: Tally) -> None:
    """No segment outlives the next rebuild: a failed build removes its file, and a stale
    generation a failed clean-up left is removed by the next publish."""
    with target.open() as store, store.batch():  # a multi-key write: one more rebuild
        store[_K_FILLER] = b""
        store[_K_FILLER + "2"] = b""
    strays = [path for _, path in _shm_data_files(target)[:-1]]
    if strays:
        tally.problems.append(f"stray shared-memory segments left: {strays}")


def _record(figure: Callable[..., None], tally: Tally, **detail: Any) -> None:
    figure("injected write failures", tally.failures, attempts=tally.attempts, **detail)
    figure("failures surfaced as mappingstore errors", tally.surfaced, **detail)
    figure("raw errors leaked", tally.raw, **detail)
    figure("previous values damaged", tally.damaged, **detail)
    figure("failures after the commit point (new state complete)", tally.after_commit, **detail)
    figure("failed calls absorbed by the backend", tally.absorbed, **detail)
    figure("clean reopens", tally.clean_reopens, reopens=tally.reopens, **detail)


#: Least injected failures per backend (both mechanisms), and per mechanism: a sweep
#: whose fault stopped reaching the backend fails instead of passing vacuously.
_MIN_FAILURES = {"fast": (20, 5), "long": (100, 30)}
_MECHANISMS = {"rlimit": "disk full (RLIMIT_FSIZE)", "nth": "failing I/O call (N-th)"}


@pytest.mark.parametrize("backend", FILE_BACKENDS)
def test_fault_sweep(backend: str, target: Target, tier: str, figure: Callable[..., None]) -> None:
    """Disk full (RLIMIT_FSIZE at a sweep of limits around the size of the file written)
    and a failing N-th I/O call (N = 1, 2, 3 ... until the operation succeeds), under a
    set, a bigger overwrite, a delete, a batch, a modify and growth: every failure is a
    mappingstore error, every previous value stays intact (a batch is all-or-nothing; a
    failure past the commit point leaves the complete new state), and the store reopens
    clean in a fresh process (every key read, a write accepted, SQLite integrity ok)."""
    total = Tally()
    per_mechanism: dict[str, Tally] = {}
    for mechanism, label in _MECHANISMS.items():
        tally = per_mechanism[mechanism] = Tally()
        _sweep(target, backend, mechanism, tier, tally)
        _record(figure, tally, backend=backend, mechanism=label, tier=tier)
        for name in vars(total):
            setattr(total, name, getattr(total, name) + getattr(tally, name))
    if backend == "shm":
        _check_shm_files(target, total)
    _record(figure, total, backend=backend, mechanism="both", tier=tier)
    problems = total.problems
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:8])
    assert total.raw == 0
    assert total.damaged == 0
    assert total.clean_reopens == total.reopens == total.attempts + len(_MECHANISMS)
    least_total, least_each = _MIN_FAILURES[tier]
    assert total.surfaced == total.failures >= least_total
    assert all(t.failures >= least_each for t in per_mechanism.values()), {
        m: t.failures for m, t in per_mechanism.items()
    }
