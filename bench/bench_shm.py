"""Shared memory: SharedMemoryStore beside Manager().dict() and UltraDict, in one run.

Issue 4's targets are ratios against peers measured in the same process:

* get >= 20x and set >= 5x ``multiprocessing.Manager().dict()``;
* set >= 1x and get >= 0.4x UltraDict (PyPI ``UltraDict``).

Every contender runs the same loop: ``N`` operations cycling over 1,000 keys, value a
small dict ``{"name": "x", "n": 1, "tags": [1, 2, 3]}``. Rounds are interleaved and each
contender keeps its best round (the least disturbed, as :mod:`timeit` recommends); set
rounds are long enough to include each contender's periodic work twice. Times
are wall-clock (``perf_counter``): a Manager's work happens in its server process, so the
caller's CPU time would flatter it.

UltraDict is measured twice: with its default lock (a ``multiprocessing.RLock``, which
only processes *forked* from the creator share: processes that attach by name do not
exclude each other) and with ``shared_lock=True`` (its cross-process lock, which needs
the ``atomics`` package). SharedMemoryStore always locks across processes (``flock``).
UltraDict returns the stored object itself on get (no copy); SharedMemoryStore returns a
fresh copy of mutable values, like every mappingstore store.

Extra rows (no target): SharedMemoryStore get of str values (immutable values are served
from the validated read cache as is), a cold get (first read of each key by a fresh
instance: the full lookup without the cache) and the first get after this instance's own
set (the codec checks the value once, then the cache takes over).

Run from a clone (``pip install -e . UltraDict atomics psutil``)::

    python bench/bench_shm.py            # full run (one to two minutes)
    python bench/bench_shm.py --quick    # smoke run

Exit status 0 even when a target is missed: the table says so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import mappingstore
from mappingstore import SharedMemoryStore

VALUE = {"name": "x", "n": 1, "tags": [1, 2, 3]}
NKEYS = 1000
KEYS = [f"key{i}" for i in range(NKEYS)]


def timed(n: int, fn: Callable[[str], Any]) -> tuple[float, float]:
    """(wall, CPU) seconds for *n* calls of *fn* over the keys (GC off, like timeit)."""
    keys = (KEYS * (n // NKEYS + 1))[:n]
    gc.disable()
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for k in keys:
            fn(k)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        gc.enable()


@contextlib.contextmanager
def contenders(quick: bool) -> Iterator[dict[str, Any]]:
    """Open every contender; yield {label: mapping} (missing peers are reported)."""
    tag = uuid.uuid4().hex[:8]
    found: dict[str, Any] = {}
    cleanup: list[Callable[[], None]] = []
    manager = multiprocessing.Manager()
    cleanup.append(manager.shutdown)
    found["Manager().dict()"] = manager.dict()
    try:
        from UltraDict import UltraDict

        ultra = UltraDict(name=f"bench{tag}u", create=True, buffer_size=1_000_000)
        found["UltraDict"] = ultra
        cleanup.append(ultra.unlink)
        try:
            ultra_sl = UltraDict(
                name=f"bench{tag}l", create=True, buffer_size=1_000_000, shared_lock=True
            )
        except Exception as exc:  # its shared lock needs `atomics` and `psutil`
            print(f"UltraDict(shared_lock=True) unavailable: {exc!r}")
        else:
            found["UltraDict(shared_lock)"] = ultra_sl
            cleanup.append(ultra_sl.unlink)
    except Exception as exc:
        print(f"UltraDict unavailable: {exc!r}")
    store = SharedMemoryStore(f"bench{tag}")
    found["SharedMemoryStore"] = store
    cleanup.append(store.unlink)
    try:
        yield found
    finally:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeat", type=int, default=60, help="rounds per contender")
    args = parser.parse_args()
    repeat = 3 if args.quick else args.repeat
    # Short rounds (a few milliseconds), many of them: on a busy machine every contender
    # gets its chance at a round the scheduler did not interrupt (the best one is kept).
    n_fast = 2_000
    n_slow = 300  # the Manager is ~30 us per operation
    # Set rounds are longer, so that each includes the periodic work every contender
    # amortises: the store rebuilds its segment and UltraDict dumps its whole dict about
    # every 15,000 writes here. A round must span that period twice, or the best round is
    # one that skipped it (best-of rounds of 6,000 dropped UltraDict's dump from its
    # number, and would drop the store's rebuild now that it comes as rarely).
    n_set = 30_000
    set_repeat = max(3, repeat // 2)  # rounds 5x longer: half as many

    print(f"python {sys.version.split()[0]}, {platform.platform()}, {os.cpu_count()} CPUs")
    print(
        f"mappingstore {mappingstore.__version__}; best of {set_repeat} set rounds "
        f"({n_set:,} sets), {repeat} get rounds; wall clock\n"
    )
    best: dict[tuple[str, str], float] = {}  # wall-clock ops/s
    best_cpu: dict[tuple[str, str], float] = {}  # ops per CPU second of this process

    def keep(label: str, op: str, n: int, seconds: tuple[float, float]) -> None:
        wall, cpu = seconds
        best[(label, op)] = max(best.get((label, op), 0.0), n / wall)
        best_cpu[(label, op)] = max(best_cpu.get((label, op), 0.0), n / max(cpu, 1e-9))

    with contenders(args.quick) as found:
        for d in found.values():  # fill every key first
            for k in KEYS:
                d[k] = VALUE
        # Phase 1, sets; phase 2, gets of the values the last set round left (the
        # read-mostly case: a key is read many times between writes).
        for _ in range(set_repeat):
            for label, d in found.items():
                n = n_slow if label.startswith("Manager") else n_set
                keep(label, "set", n, timed(n, lambda k, d=d: d.__setitem__(k, VALUE)))
        for _ in range(repeat):
            for label, d in found.items():
                n = n_slow if label.startswith("Manager") else n_fast
                keep(label, "get", n, timed(n, d.__getitem__))
            store = found["SharedMemoryStore"]
            cold = SharedMemoryStore(store.name)  # a fresh instance: no cached locations
            keep(
                "SharedMemoryStore", "get (cold, first read)", NKEYS, timed(NKEYS, cold.__getitem__)
            )
            cold.close()
        # The first read after a write checks the value's checksum once, then caches it.
        store = found["SharedMemoryStore"]
        for _ in range(repeat):
            for k in KEYS:
                store[k] = VALUE
            keep(
                "SharedMemoryStore",
                "get (first after own set)",
                NKEYS,
                timed(NKEYS, store.__getitem__),
            )
        store = found["SharedMemoryStore"]
        for k in KEYS:
            store[k] = "a short string value"
        for _ in range(repeat):
            keep("SharedMemoryStore", "get (str values)", n_fast, timed(n_fast, store.__getitem__))

    print(f"{'contender':26} {'op':24} {'ops/s':>12} {'us/op':>8} {'CPU us/op':>10}")
    for (label, op), rate in sorted(best.items()):
        cpu = 1e6 / best_cpu[(label, op)]
        cpu_text = "(server)" if label.startswith("Manager") else f"{cpu:10.2f}"
        print(f"{label:26} {op:24} {rate:12,.0f} {1e6 / rate:8.2f} {cpu_text:>10}")

    shm = "SharedMemoryStore"
    targets = [
        ("get", "Manager().dict()", 20.0),
        ("set", "Manager().dict()", 5.0),
        ("set", "UltraDict", 1.0),
        ("get", "UltraDict", 0.4),
        ("set", "UltraDict(shared_lock)", 1.0),
        ("get", "UltraDict(shared_lock)", 0.4),
    ]
    # The CPU ratio is only shown against in-process peers: a Manager's work is done by
    # its server process, which this process's CPU clock does not see.
    print(f"\n{'ratio':46} {'wall':>7} {'CPU':>7} {'target':>7}")
    for op, peer, target in targets:
        what = f"{shm} {op} / {peer}"
        if (peer, op) not in best:
            print(f"{what:46} {'n/a':>7} {'n/a':>7} {target:>6.1f}x  peer unavailable")
            continue
        ratio = best[(shm, op)] / best[(peer, op)]
        if peer.startswith("Manager"):
            cpu_text = "-"
        else:
            cpu_text = f"{best_cpu[(shm, op)] / best_cpu[(peer, op)]:.2f}x"
        verdict = "met" if ratio >= target else "MISSED"
        print(f"{what:46} {ratio:6.2f}x {cpu_text:>7} {target:>6.1f}x  {verdict} (wall)")


if __name__ == "__main__":
    main()
