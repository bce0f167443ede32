"""Issue 8, required test 1: ``kill -9`` of a writer at random points, on every backend.

A forked child opens the store itself and writes forever: single ``set``\\s, deletes,
``modify`` calls, multi-key ``batch()`` blocks (sets and deletes mixed) and ``update()``\\s,
all over a small key space (``k00``..``k47``) so that later operations overwrite earlier
ones, the hardest case for a torn write. After each operation returns, the child appends
``<op id>`` to an acknowledgement file (``os.write`` on an ``O_APPEND`` descriptor: once
the call returns the line is in the kernel's page cache, which a ``SIGKILL`` of the writer
cannot take back, so no ``fsync`` is needed for this fault model). The parent kills the
child with ``SIGKILL`` at a random point (seeded): after it acknowledged a random number
of operations plus a random delay, so the kill lands anywhere inside an operation
whatever the machine's load, or (15% of kills) in its first 20 ms, while it starts and
opens the store. Then the parent reopens the store and compares it with a model.

The model is exact: the operations are a pure function of ``(seed, op id)``, so the
parent replays every acknowledged operation on a ``dict``. Exactly one operation can be in
flight (the one after the last acknowledged), so the store must equal the model either
without it or with it applied *whole*. Anything else is classified:

* **corrupt store**: the store does not open, a listed key does not read, ``len`` differs
  from the listing, ``items()`` disagrees with key-by-key reads, or a fresh write fails;
* **lost acknowledged write**: a key outside the in-flight operation differs from the
  model (a value lost, reverted, or torn);
* **half-applied batch**: the in-flight multi-key write shows some of its keys new and
  others old (or a key that is neither);
* **temp file listed**: a key (or namespace) the child never wrote shows up.

For the directory and INI backends the test also looks at the files a killed writer
leaves behind (temp files, a batch journal): they must never be listed as keys, and the
next writer to open the store must remove them.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mappingstore import Store
from tests.torture.harness import FORK, PERSISTENT, Target, listed_temp_files, reps

#: Base seed; override with MAPPINGSTORE_TORTURE_SEED to explore other schedules.
SEED = int(os.environ.get("MAPPINGSTORE_TORTURE_SEED", "8001"))
#: The child's whole key space: every key it ever writes.
KEYS = tuple(f"k{i:02d}" for i in range(48))
#: Key the parent writes (and deletes) to prove the reopened store still takes writes.
PROBE = "parent-probe"
#: The kill comes after the child acknowledged a random number of operations (up to this),
#: then a random delay (up to MAX_DELAY seconds), so that it lands anywhere in an operation
#: and every kill follows real progress, however loaded the machine is.
MAX_ACKS = 10
MAX_DELAY = 0.01
#: Share of kills aimed at the child's start-up (fork, open, first writes).
EARLY_KILLS = 0.15
MISSING: Any = object()


# -- the operations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One operation of the child: its kind and, per key, the value it writes (None: delete).

    ``modify`` carries no value: its result depends on the value it reads (see :func:`bump`).
    """

    op: int
    kind: str
    writes: tuple[tuple[str, Any], ...]


def value(op: int, i: int, pad: int) -> list[Any]:
    """The value operation *op* writes at its *i*-th key (unique per op and key)."""
    return [op, i, b"v" * pad]


def bump(op: int) -> Callable[[Any], Any]:
    """The ``modify`` callback of operation *op*: records *op* and the op it replaced."""

    def fn(old: Any) -> Any:
        return [op, -1, old[0] if isinstance(old, list) else None]

    return fn


def plan(seed: int, op: int) -> Plan:
    """Operation *op* of the schedule *seed* (the same in the child and the parent)."""
    rng = random.Random(seed * 1_000_003 + op)
    pad = rng.choice((0, 16, 200, 1500, 6000))
    roll = rng.random()
    if roll < 0.30:
        return Plan(op, "set", ((rng.choice(KEYS), value(op, 0, pad)),))
    if roll < 0.40:
        return Plan(op, "delete", ((rng.choice(KEYS), None),))
    if roll < 0.55:
        return Plan(op, "modify", ((rng.choice(KEYS), None),))
    keys = rng.sample(KEYS, rng.randint(2, 8))
    if roll < 0.85:  # batch(): sets and deletes mixed, the first one always a set
        writes = tuple(
            (k, value(op, i, pad) if i == 0 or rng.random() < 0.75 else None)
            for i, k in enumerate(keys)
        )
        return Plan(op, "batch", writes)
    return Plan(op, "update", tuple((k, value(op, i, pad)) for i, k in enumerate(keys)))


def perform(store: Store, step: Plan) -> None:
    """Run *step* against *store* (in the child)."""
    if step.kind == "set":
        ((key, val),) = step.writes
        store[key] = val
    elif step.kind == "delete":
        store.pop(step.writes[0][0], None)
    elif step.kind == "modify":
        store.modify(step.writes[0][0], bump(step.op), default=None)
    elif step.kind == "batch":
        with store.batch():
            for key, val in step.writes:
                if val is None:
                    store.pop(key, None)
                else:
                    store[key] = val
    else:
        store.update(dict(step.writes))


def apply(model: dict[str, Any], step: Plan) -> dict[str, Any]:
    """The model after *step* (a new dict; *model* is left alone)."""
    out = dict(model)
    for key, val in step.writes:
        if step.kind == "modify":
            out[key] = bump(step.op)(out.get(key))
        elif val is None:
            out.pop(key, None)
        else:
            out[key] = val
    return out


# -- the child --------------------------------------------------------------------------


def writer(url: str, seed: int, first_op: int, ack_path: str, progress: Any) -> None:
    """Open the store and run the schedule from *first_op* until killed; ack each op.

    *progress* (shared memory) tells the parent how many ops were acknowledged (-1: the
    store is not open yet).
    """
    import mappingstore

    ack = os.open(ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    store = mappingstore.open(url)
    progress.value = 0
    op = first_op
    while True:
        perform(store, plan(seed, op))
        os.write(ack, b"%d\n" % op)
        progress.value += 1
        op += 1


def wait_for(progress: Any, count: int, what: str) -> None:
    """Wait until the child acknowledged *count* ops (0: opened the store)."""
    deadline = time.monotonic() + 60
    while progress.value < count:
        assert time.monotonic() < deadline, f"{what}: the child made no progress in 60 s"
        time.sleep(0.0005)


def last_acknowledged(ack_path: Path, first_op: int) -> int:
    """The last op id the child acknowledged (``first_op - 1`` if none)."""
    last = first_op - 1
    if ack_path.exists():
        for line in ack_path.read_bytes().split(b"\n")[:-1]:  # a torn last line is no ack
            op = int(line)
            assert op == last + 1, f"acknowledgements out of order: {op} after {last}"
            last = op
    return last


# -- the checks -------------------------------------------------------------------------


@dataclass
class Tally:
    """What the kills found (the figures of this test)."""

    kills: int = 0
    early_kills: int = 0
    progress_waited: int = 0
    acknowledged_ops: int = 0
    acknowledged_batches: int = 0
    in_flight_applied: int = 0
    corrupt_stores: int = 0
    lost_acknowledged_writes: int = 0
    half_applied_batches: int = 0
    temp_files_listed: int = 0
    stray_files_seen: int = 0
    stray_files_left: int = 0
    problems: list[str] = field(default_factory=list)


def read_back(target: Target, tally: Tally, where: str) -> dict[str, Any] | None:
    """Reopen the store and read it whole; ``None`` (and a corrupt store counted) on error."""
    try:
        store = target.open()
    except Exception as exc:
        tally.corrupt_stores += 1
        tally.problems.append(f"{where}: reopen failed: {exc!r}")
        return None
    try:
        listed = list(store)
        count = len(store)
        contents = {key: store[key] for key in listed}
        scanned = dict(store.items())
        namespaces = store.namespaces()
        store[PROBE] = [where]
        probe_ok = store[PROBE] == [where]
        del store[PROBE]
        probe_ok = probe_ok and PROBE not in store
    except Exception as exc:
        tally.corrupt_stores += 1
        tally.problems.append(f"{where}: read failed: {exc!r}")
        return None
    finally:
        store.close()
    if count != len(listed) or len(set(listed)) != len(listed) or scanned != contents:
        tally.corrupt_stores += 1
        tally.problems.append(f"{where}: len {count}, {len(listed)} listed, scan differs")
    if not probe_ok:
        tally.corrupt_stores += 1
        tally.problems.append(f"{where}: a fresh write did not read back")
    strangers = [k for k in listed if k not in KEYS] + [n for n in namespaces if n != "default"]
    strangers += [k for k in listed_temp_files(listed) if k not in strangers]
    if strangers:
        tally.temp_files_listed += len(strangers)
        tally.problems.append(f"{where}: listed what the child never wrote: {strangers[:5]!r}")
    return {k: v for k, v in contents.items() if k in KEYS}


def judge(
    actual: dict[str, Any], model: dict[str, Any], step: Plan, tally: Tally, where: str
) -> None:
    """Compare the store with the model without / with the in-flight *step*."""
    after = apply(model, step)
    if actual == after and after != model:
        tally.in_flight_applied += 1
    if actual in (model, after):
        return
    touched = {key for key, _ in step.writes}
    for key in sorted((set(actual) | set(model)) - touched):
        if key in KEYS and actual.get(key, MISSING) != model.get(key, MISSING):
            tally.lost_acknowledged_writes += 1
            tally.problems.append(
                f"{where}: {key} is {actual.get(key)!r:.60}, acked {model.get(key)!r:.60}"
            )
    old = [k for k in touched if actual.get(k, MISSING) == model.get(k, MISSING)]
    new = [k for k in touched if actual.get(k, MISSING) == after.get(k, MISSING)]
    neither = [k for k in touched if k not in old and k not in new]
    if len(touched) > 1 and (neither or (set(old) - set(new) and set(new) - set(old))):
        tally.half_applied_batches += 1
        tally.problems.append(
            f"{where}: {step.kind} op {step.op} half applied: old {old} new {new}"
        )
    elif neither:  # a single-key write that left a value it never wrote
        tally.lost_acknowledged_writes += len(neither)
        tally.problems.append(f"{where}: op {step.op} left {neither} torn")


class Settler:
    """Waits, after a kill, until the server has finished with the dead child's sessions.

    A killed client may have sent a COMMIT (or a Redis script) the server has not run
    yet; reading before it lands would see the operation as not applied, and the next
    child would run it again. The child's sessions carry a name (``application_name`` /
    ``client_name``) so the parent can wait for them to be gone.
    """

    def __init__(self, target: Target) -> None:
        self.backend = target.backend
        self.name = f"mstt-kill-{target.name}"
        self.admin: Any = None
        if self.backend == "postgres":
            import psycopg

            from tests.servers import POSTGRES_URL

            self.admin = psycopg.connect(POSTGRES_URL, autocommit=True)
        elif self.backend == "redis":
            import redis

            from tests.servers import REDIS_URL

            self.admin = redis.Redis.from_url(REDIS_URL)

    def child_url(self, url: str) -> str:
        """*url* with the session name the child must use."""
        if self.backend == "postgres":
            return f"{url}&application_name={self.name}"
        if self.backend == "redis":
            return f"{url}&client_name={self.name}"
        return url

    def sessions(self) -> int:
        if self.backend == "postgres":
            row = self.admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (self.name,),
            ).fetchone()
            return int(row[0])
        if self.backend == "redis":
            return sum(c.get("name") == self.name for c in self.admin.client_list())
        return 0

    def wait(self) -> None:
        deadline = time.monotonic() + 30
        while self.sessions():
            assert time.monotonic() < deadline, "the server kept a dead child's session"
            time.sleep(0.002)

    def close(self) -> None:
        if self.admin is not None:
            self.admin.close()


def check_listing_with_strays(target: Target, tally: Tally, where: str) -> None:
    """List the store read-only while a killed writer's files are still there."""
    try:
        with target.open(readonly=True) as reader:
            listed = list(reader)
            namespaces = reader.namespaces()
    except Exception as exc:
        tally.corrupt_stores += 1
        tally.problems.append(f"{where}: read-only open next to stray files failed: {exc!r}")
        return
    strangers = [k for k in listed if k not in KEYS] + [n for n in namespaces if n != "default"]
    if strangers:
        tally.temp_files_listed += len(strangers)
        tally.problems.append(f"{where}: stray files listed: {strangers[:5]!r}")


def stray_files(target: Target) -> list[str]:
    """Files a killed writer may leave: directory temps and journal, INI temps."""
    assert target.path is not None
    if target.backend == "dir":
        tmp = target.path / ".tmp"
        found = [f".tmp/{n}" for n in os.listdir(tmp)] if tmp.is_dir() else []
        return found + ([".journal"] if (target.path / ".journal").exists() else [])
    prefix = f".{target.path.name}.tmp."
    return [n for n in os.listdir(target.path.parent) if n.startswith(prefix)]


# -- the test ---------------------------------------------------------------------------


def run_kills(target: Target, kills: int, seed: int, acks: Path) -> Tally:
    """Start, kill and check *kills* children in turn; the tally of what the checks found."""
    rng = random.Random(seed)
    tally = Tally()
    model: dict[str, Any] = {}
    next_op = 0
    settler = Settler(target)
    url = settler.child_url(target.url)
    named_session_seen = False
    try:
        for n in range(kills):
            ack_path = acks / f"{n}.ack"
            progress = FORK.RawValue("q", -1)
            child = FORK.Process(
                target=writer, args=(url, seed, next_op, str(ack_path), progress), daemon=True
            )
            child.start()
            if rng.random() < EARLY_KILLS:
                tally.early_kills += 1
                time.sleep(rng.uniform(0, 0.02))
            else:
                acks_before_kill = rng.randint(0, MAX_ACKS)
                tally.progress_waited += acks_before_kill
                wait_for(progress, acks_before_kill, f"kill {n}")
                if not named_session_seen and target.backend in ("postgres", "redis"):
                    # Else the wait after the kill would be a no-op, and the test weaker.
                    named_session_seen = settler.sessions() > 0
                    assert named_session_seen, "the child's session does not carry its name"
                time.sleep(rng.uniform(0, MAX_DELAY))
            os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
            child.join(30)
            assert child.exitcode == -signal.SIGKILL, f"kill {n}: the child ended by itself"
            tally.kills += 1
            settler.wait()

            last = last_acknowledged(ack_path, next_op)
            for op in range(next_op, last + 1):
                step = plan(seed, op)
                model = apply(model, step)
                tally.acknowledged_ops += 1
                tally.acknowledged_batches += step.kind in ("batch", "update")
            next_op = last + 1
            in_flight = plan(seed, next_op)
            where = f"kill {n} (seed {seed}, in flight: {in_flight.kind} op {next_op})"

            strays = stray_files(target) if target.backend in ("dir", "ini") else []
            tally.stray_files_seen += len(strays)
            if strays:  # a reader (which cleans nothing) must not list them either
                check_listing_with_strays(target, tally, where)
            actual = read_back(target, tally, where)
            if actual is None:
                break  # a corrupt store: counted; nothing more to learn from this one
            judge(actual, model, in_flight, tally, where)
            if actual != model:
                # Applied whole (or, counted above, damaged): go on from what the store
                # holds, and the next child starts after the in-flight op.
                model = actual
                next_op += 1
            if strays:
                left = [s for s in stray_files(target) if s in strays]
                tally.stray_files_left += len(left)
                if left:
                    tally.problems.append(f"{where}: stray files not removed on reopen: {left}")
    finally:
        settler.close()
    return tally


# Long: a Redis writer killed inside the store lock (a batch whose pop or modify must be
# checked at the commit takes it) holds it until its 10 s lease runs out, and 200 kills
# can add up past the suite's 300 s default. The per-kill progress check stays 60 s.
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("backend", PERSISTENT)
def test_kill_9_loses_no_acknowledged_write_and_tears_no_batch(
    backend: str, target: Target, tier: str, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """A writer killed with SIGKILL at random points, again and again: the reopened store
    always equals the acknowledged history, plus at most the one operation in flight
    applied whole; it never is corrupt, never lists a key the writer did not write, and
    the files a killed writer leaves behind are ignored and then removed."""
    kills = reps(tier, fast=20, long=200)
    seed = SEED + PERSISTENT.index(backend)
    acks = tmp_path / "acks"
    acks.mkdir()
    started = time.monotonic()
    tally = run_kills(target, kills, seed, acks)
    elapsed = time.monotonic() - started

    detail = {"backend": backend, "tier": tier, "seed": seed}
    figure("kills", tally.kills, **detail, seconds=round(elapsed, 1))
    figure("acknowledged operations", tally.acknowledged_ops, **detail)
    figure("acknowledged multi-key writes", tally.acknowledged_batches, **detail)
    figure("kills before the store was open", tally.early_kills, **detail)
    figure("in-flight operations found applied", tally.in_flight_applied, **detail)
    figure("corrupt stores", tally.corrupt_stores, **detail)
    figure("lost acknowledged writes", tally.lost_acknowledged_writes, **detail)
    figure("half-applied batches", tally.half_applied_batches, **detail)
    figure("temp files listed", tally.temp_files_listed, **detail)
    if backend in ("dir", "ini"):
        figure("stray files left by kills", tally.stray_files_seen, **detail)
        figure("stray files left after reopen", tally.stray_files_left, **detail)
    assert tally.problems == []
    assert tally.kills == kills
    # The schedule really exercised what it claims to (else the test could not fail).
    assert tally.acknowledged_ops >= tally.progress_waited > 0 and tally.acknowledged_batches > 0
