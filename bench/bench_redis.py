"""Redis speed: RedisStore beside raw redis-py, redis-dict, pottery and rstore, in one run.

Issue 3's targets are ratios against peers measured in the same process on the same
server, so noise on a shared machine moves both sides together. Every case runs its
contenders interleaved, ``--repeat`` times, and keeps each contender's best run.

==========================  ===========================================================
case                        contenders
==========================  ===========================================================
single set / get            raw redis-py ``SET``/``GET`` of msgpack bytes; redis-dict;
                            pottery ``RedisDict``; rstore (``rlib-store``)
set_many / update / get_    20,000 keys: raw redis-py pipeline (``transaction=False``)
many                        of ``SET``/``GET``; redis-dict ``update`` (its pipeline);
                            pottery ``update`` (one ``HSET``); peers without a bulk
                            read do one ``get`` per key
len()                       a 100,000-key namespace: redis-dict and rstore count by
                            ``SCAN``/``KEYS``, pottery uses ``HLEN``
full iteration              100,000 items: raw ``SCAN MATCH`` + ``MGET`` per batch;
                            peers' ``items()`` (rstore: ``find()``); slow peers are
                            timed for at most a few seconds and reported as items/s.
                            For len() and iteration every contender has a logical
                            database (``SELECT``) of its own holding only its own
                            100,000 items, so whole-database ``SCAN``/``KEYS`` peers
                            scan nothing but their own data
encrypted                   the same RedisStore with ``password=`` (``security="low"``)
==========================  ===========================================================

By default the benchmark starts a private ``redis-server`` (no persistence) on a spare
loopback port so that no other data skews ``KEYS``/``SCAN`` peers; ``--url`` uses an
existing server instead (it only touches keys it created, but uses five logical
databases besides the URL's for the len() and iteration cases, which should be empty).
Run from a clone::

    pip install -e ".[redis]" hiredis redis-dict pottery rlib-store
    python bench/bench_redis.py            # full run (a few minutes)
    python bench/bench_redis.py --quick    # smoke run

Exit status 0 even when a target is missed: the table says so.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgpack
import redis

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mappingstore import RedisStore

try:
    import redis_dict
except ImportError:  # pragma: no cover - optional peer
    redis_dict = None
try:
    import pottery
except ImportError:  # pragma: no cover - optional peer
    pottery = None
try:
    import rstore
except ImportError:  # pragma: no cover - optional peer
    rstore = None


def value(i: int) -> dict[str, Any]:
    return {"name": f"item {i}", "n": i, "tags": ["a", "b"], "score": 1.5, "ok": True}


def keys(n: int, tag: str = "key") -> list[str]:
    return [f"{tag}{i:07d}" for i in range(n)]


@dataclass
class Row:
    case: str
    peer: str
    ours_rate: float
    peer_rate: float | None
    unit: str
    target: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer_rate is None or not self.peer_rate:
            return None
        return self.ours_rate / self.peer_rate


def best_rate(fns: dict[str, Callable[[], int]], repeat: int) -> dict[str, float]:
    """Run each contender *repeat* times, interleaved; return each one's best rate."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            n = fn()
            elapsed = time.perf_counter() - start
            best[name] = max(best[name], n / elapsed)
    return best


@contextmanager
def private_server() -> Iterator[str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not found: install it or pass --url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.kill()
            proc.wait()


class Raw:
    """The raw redis-py peer: what a careful user writes by hand (msgpack values)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.r = redis.Redis.from_url(url)
        self.prefix = prefix

    def set(self, key: str, v: Any) -> None:
        self.r.set(self.prefix + key, msgpack.packb(v))

    def get(self, key: str) -> Any:
        data = self.r.get(self.prefix + key)
        return None if data is None else msgpack.unpackb(data)

    def set_many(self, items: dict[str, Any]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for k, v in items.items():
            pipe.set(self.prefix + k, msgpack.packb(v))
        pipe.execute()

    def get_many(self, ks: list[str]) -> dict[str, Any]:
        pipe = self.r.pipeline(transaction=False)
        for k in ks:
            pipe.get(self.prefix + k)
        return {
            k: msgpack.unpackb(d) for k, d in zip(ks, pipe.execute(), strict=True) if d is not None
        }

    def iterate(self) -> int:
        n = 0
        cursor = 0
        pattern = self.prefix + "*"  # our prefix has no glob characters
        while True:
            cursor, names = self.r.scan(cursor, match=pattern, count=1000)
            if names:
                cut = len(self.prefix)
                for name, data in zip(names, self.r.mget(names), strict=True):
                    if data is not None:  # the (key, value) pair a dict user wants
                        pair = (name[cut:].decode(), msgpack.unpackb(data))
                        n += pair is not None
            if cursor == 0:
                return n

    def clear(self) -> None:
        for batch in _chunks(list(self.r.scan_iter(match=self.prefix + "*", count=1000)), 1000):
            self.r.delete(*batch)
        self.r.close()


def db_of(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if "db" in query:
        return int(query["db"][0])
    path = parts.path.strip("/")
    return int(path) if path else 0


def with_db(url: str, db: int) -> str:
    """*url* pointing at logical database *db* (path form; any ``?db=`` dropped)."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "db"]
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, f"/{db}", urllib.parse.urlencode(query), parts.fragment)
    )


def _chunks(seq: list[Any], n: int) -> Iterator[list[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class Peers:
    """redis-dict, pottery and rstore on the same server (each only if installed)."""

    def __init__(self, url: str, tag: str) -> None:
        self.url = url
        self.tag = tag
        self.client = redis.Redis.from_url(url)
        self.made: dict[str, Any] = {}
        self.broken: dict[str, str] = {}

    def open(self, name: str, suffix: str) -> Any:
        ns = f"{self.tag}-{name}-{suffix}"
        if name == "redis-dict" and redis_dict is not None:
            store = redis_dict.RedisDict(namespace=ns, redis=redis.Redis.from_url(self.url))
        elif name == "pottery" and pottery is not None:
            store = pottery.RedisDict(redis=self.client, key=ns)
        elif name == "rstore" and rstore is not None:
            store = rstore.Store(self.url, namespace=ns.replace("-", "_"), frozen=False)
            store.__enter__()
        else:
            return None
        self.made[f"{name}/{suffix}"] = store
        return store

    def close(self) -> None:
        for label, store in self.made.items():
            try:
                if label.startswith("rstore"):
                    store.discard()
                else:
                    store.clear()
            except Exception as exc:  # a peer's own cleanup bug must not hide our results
                print(f"  cleanup of {label} failed: {exc!r}", file=sys.stderr)
        self.client.close()


def limited(fn: Callable[[], Iterator[Any]], budget: float) -> Callable[[], int]:
    """Consume an iterator for at most *budget* seconds; return how many items it gave."""

    def go() -> int:
        n = 0
        deadline = time.perf_counter() + budget
        for _ in fn():
            n += 1
            if not n % 256 and time.perf_counter() > deadline:
                break
        return n

    return go


def run(url: str, n_single: int, n_batch: int, n_big: int, repeat: int, budget: float) -> list[Row]:
    tag = f"msb{uuid.uuid4().hex[:6]}"
    rows: list[Row] = []
    raw = Raw(url, f"{tag}raw:")
    plain = RedisStore(url, prefix=tag, namespace="plain")
    enc = RedisStore(url, prefix=tag + "e", namespace="enc", password="bench", security="low")
    peers = Peers(url, tag)
    names = ["redis-dict", "pottery", "rstore"]
    big: RedisStore | None = None
    raw_big: Raw | None = None
    big_peer_sets: list[Peers] = []
    try:
        # -- single set / get --------------------------------------------------------
        ks = keys(n_single)
        vals = [value(i) for i in range(n_single)]
        singles = {name: peers.open(name, "single") for name in names}

        def set_with(setter: Callable[[str, Any], Any]) -> Callable[[], int]:
            def go() -> int:
                for k, v in zip(ks, vals, strict=True):
                    setter(k, v)
                return n_single

            return go

        def get_with(getter: Callable[[str], Any]) -> Callable[[], int]:
            def go() -> int:
                for k in ks:
                    getter(k)
                return n_single

            return go

        setters = {
            "ours": set_with(plain.__setitem__),
            "raw": set_with(raw.set),
            "enc": set_with(enc.__setitem__),
        }
        getters = {
            "ours": get_with(plain.__getitem__),
            "raw": get_with(raw.get),
            "enc": get_with(enc.__getitem__),
        }
        for name, peer in singles.items():
            if peer is None:
                continue
            setters[name] = set_with(peer.set if name == "rstore" else peer.__setitem__)
            getters[name] = get_with(peer.get if name == "rstore" else peer.__getitem__)
        for fn in setters.values():
            fn()  # create the keys: timed passes overwrite them (the steady state)
        # Single operations are cheap and the noisiest: the best of many short runs (each
        # contender in turn, 1/5 of the keys each time) dodges the load bursts of a
        # shared machine best.
        short = n_single // 5
        ks, vals = ks[:short], vals[:short]
        n_single = short
        s = best_rate(setters, max(repeat * 5, 15))
        g = best_rate(getters, max(repeat * 5, 15))
        rows.append(Row("set", "raw redis-py SET", s["ours"], s["raw"], "ops/s", ">= 0.9x"))
        rows.append(Row("get", "raw redis-py GET", g["ours"], g["raw"], "ops/s", ">= 0.9x"))
        for name in names:
            if name in s:
                rows.append(Row("set", name, s["ours"], s[name], "ops/s", "> 1x"))
                rows.append(Row("get", name, g["ours"], g[name], "ops/s", "> 1x"))
        rows.append(
            Row("set, encrypted", "same store, plain", s["enc"], s["ours"], "ops/s", "cost <= 1.3x")
        )
        rows.append(
            Row("get, encrypted", "same store, plain", g["enc"], g["ours"], "ops/s", "cost <= 1.3x")
        )

        # -- bulk: set_many / update / get_many of n_batch keys ----------------------
        bks = keys(n_batch, "b")
        batch = {k: value(i) for i, k in enumerate(bks)}
        bulk_peers = {name: peers.open(name, "bulk") for name in names}

        def once(fn: Callable[[], Any], n: int) -> Callable[[], int]:
            def go() -> int:
                fn()
                return n

            return go

        writes = {
            "ours set_many": once(lambda: plain.set_many(batch), n_batch),
            "ours update": once(lambda: plain.update(batch), n_batch),
            "raw": once(lambda: raw.set_many(batch), n_batch),
            "enc": once(lambda: enc.set_many(batch), n_batch),
        }
        for name, peer in bulk_peers.items():
            if peer is None:
                continue
            if name == "rstore":  # no bulk API: one set each (bounded by the time budget)
                writes[name] = limited(
                    lambda p=peer: (p.set(k, v) for k, v in batch.items()), budget
                )
            else:
                writes[name] = once(lambda p=peer: p.update(batch), n_batch)
        w = best_rate(writes, repeat)
        reads = {
            "ours": once(lambda: plain.get_many(bks), n_batch),
            "raw": once(lambda: raw.get_many(bks), n_batch),
            "enc": once(lambda: enc.get_many(bks), n_batch),
        }
        for name, peer in bulk_peers.items():
            if peer is not None:  # no bulk read in any peer: one get per key
                reads[name] = limited(lambda p=peer: (p.get(k) for k in bks), budget)
        r = best_rate(reads, repeat)
        rows.append(
            Row(
                f"set_many {n_batch:,}",
                "raw pipeline of SET",
                w["ours set_many"],
                w["raw"],
                "keys/s",
                ">= 0.8x",
            )
        )
        rows.append(
            Row(
                f"update {n_batch:,}",
                "raw pipeline of SET",
                w["ours update"],
                w["raw"],
                "keys/s",
                ">= 0.8x",
            )
        )
        rows.append(
            Row(
                f"get_many {n_batch:,}",
                "raw pipeline of GET",
                r["ours"],
                r["raw"],
                "keys/s",
                ">= 0.8x",
            )
        )
        for name in names:
            if name in w:
                note = "one set per key (no bulk API)" if name == "rstore" else ""
                rows.append(
                    Row(
                        f"update {n_batch:,}",
                        name,
                        w["ours update"],
                        w[name],
                        "keys/s",
                        "> 1x",
                        note,
                    )
                )
                rows.append(
                    Row(
                        f"get_many {n_batch:,}",
                        name,
                        r["ours"],
                        r[name],
                        "keys/s",
                        "> 1x",
                        "one get per key",
                    )
                )
        rows.append(
            Row(
                f"set_many {n_batch:,}, encrypted",
                "same store, plain",
                w["enc"],
                w["ours set_many"],
                "keys/s",
                "cost <= 1.3x",
            )
        )
        rows.append(
            Row(
                f"get_many {n_batch:,}, encrypted",
                "same store, plain",
                r["enc"],
                r["ours"],
                "keys/s",
                "cost <= 1.3x",
            )
        )

        # -- a big namespace: len() and full iteration --------------------------------
        # Each contender gets a logical database of its own that holds only its own n_big
        # items: redis-dict, rstore and the raw peer count or scan the whole database, so
        # nobody else's keys (the earlier cases' or the other contenders') may be there.
        spare = [d for d in range(16) if d != db_of(url)]
        dbs = {name: with_db(url, spare[i]) for i, name in enumerate(["ours", "raw", *names])}
        for name, db_url in dbs.items():
            probe = redis.Redis.from_url(db_url)
            try:
                if probe.dbsize():
                    print(
                        f"  warning: {db_url} (for {name}) is not empty: "
                        "its len()/iterate numbers may be skewed",
                        file=sys.stderr,
                    )
            finally:
                probe.close()
        big = RedisStore(dbs["ours"], prefix=tag, namespace="big")
        raw_big = Raw(dbs["raw"], f"{tag}raw:")
        items = {k: value(i) for i, k in enumerate(keys(n_big, "g"))}
        for part in _chunks(list(items.items()), 20_000):
            big.set_many(part)
            raw_big.set_many(dict(part))
        big_peers = {}
        for name in names:
            own = Peers(dbs[name], tag)
            big_peer_sets.append(own)
            big_peers[name] = own.open(name, "big")
        for name, peer in big_peers.items():
            if peer is None:
                continue
            for part in _chunks(list(items.items()), 20_000):
                if name == "rstore":
                    pipe_free = dict(part)
                    for k, v in pipe_free.items():
                        peer.set(k, v)
                else:
                    peer.update(dict(part))

        def calls(fn: Callable[[], Any]) -> Callable[[], int]:
            def go() -> int:
                n = 0
                deadline = time.perf_counter() + min(budget, 1.0)
                while True:
                    fn()
                    n += 1
                    if time.perf_counter() > deadline:
                        return n

            return go

        lens = {"ours": calls(lambda: len(big))}
        for name, peer in big_peers.items():
            if peer is not None:
                lens[name] = calls(lambda p=peer: len(p))
        ln = best_rate(lens, repeat)
        rows.append(
            Row(f"len() of {n_big:,}", "target", ln["ours"], 1000.0, "calls/s", ">= 1,000 calls/s")
        )
        for name in names:
            if name in ln:
                rows.append(
                    Row(f"len() of {n_big:,}", name, ln["ours"], ln[name], "calls/s", "> 1x")
                )

        its = {
            "ours": lambda: sum(1 for _ in big.items()),
            "raw": raw_big.iterate,
        }
        for name, peer in big_peers.items():
            if peer is None:
                continue
            if name == "rstore":
                its[name] = limited(lambda p=peer: iter(p.find("*")), budget)
            else:
                its[name] = limited(lambda p=peer: iter(p.items()), budget)
        it = best_rate(its, repeat)
        rows.append(
            Row(
                f"iterate {n_big:,}", "raw SCAN + MGET", it["ours"], it["raw"], "items/s", ">= 0.8x"
            )
        )
        for name in names:
            if name in it:
                rows.append(
                    Row(f"iterate {n_big:,}", name, it["ours"], it[name], "items/s", "> 1x")
                )

        # -- rstore's Redis store beyond key/value: observed to fail -----------------
        if rstore is not None:
            ts = peers.open("rstore", "ts")
            try:
                ts.extend("series", (1_700_000_000, 1.0))
                peers.broken["rstore time series (extend)"] = "worked"
            except Exception as exc:
                peers.broken["rstore time series (extend)"] = f"{type(exc).__name__}: {exc}"
    finally:
        try:
            for s_ in (plain, enc) if big is None else (plain, enc, big):
                try:
                    s_.clear()
                finally:
                    s_.close()
            raw.clear()
            if raw_big is not None:
                raw_big.clear()
        finally:
            peers.close()
            for own in big_peer_sets:
                own.close()
    for label, outcome in peers.broken.items():
        rows.append(Row(label, "(correctness)", 0.0, None, "", "", outcome))
    return rows


def fmt(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:,.1f}"


def needed(target: str) -> float:
    """The least ratio that meets *target* (ours / peer)."""
    if target.startswith("cost <= "):
        return 1 / float(target.removeprefix("cost <= ").rstrip("x"))
    if target.startswith(">= ") and target.endswith("x"):
        return float(target.removeprefix(">= ").rstrip("x"))
    return 1.0  # "> 1x" (beat the peer) and ">= 1,000 calls/s" (rate / 1,000)


def report(rows: list[Row]) -> str:
    lines = [
        "| case | versus | ours | peer | unit | ratio | target | |",
        "|---|---|---:|---:|---|---:|---|---|",
    ]
    for row in rows:
        if row.peer_rate is None:
            lines.append(f"| {row.case} | {row.peer} | - | - | | - | {row.note} | |")
            continue
        ratio = row.ratio
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        ok = ratio is not None and (
            ratio > 1.0 if row.target == "> 1x" else ratio >= needed(row.target)
        )
        target = row.target + (f" ({row.note})" if row.note else "")
        lines.append(
            f"| {row.case} | {row.peer} | {fmt(row.ours_rate)} | {fmt(row.peer_rate)} | {row.unit} "
            f"| {shown} | {target} | {'ok' if ok else '**MISSED**'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="use this Redis server instead of a private one")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    # pottery warns on every O(n) call (len, iteration): that cost is what we measure.
    warnings.simplefilter("ignore")
    sizes = (
        (300, 2_000, 10_000, 1, 0.5) if args.quick else (3_000, 20_000, 100_000, args.repeat, 3.0)
    )
    n_single, n_batch, n_big, repeat, budget = sizes
    print(
        f"python {platform.python_version()}, redis-py {redis.__version__}, "
        f"hiredis {'yes' if redis.utils.HIREDIS_AVAILABLE else 'no'}, "
        f"redis-dict {getattr(redis_dict, '__version__', 'installed') if redis_dict else 'absent'}, "
        f"pottery {getattr(pottery, '__version__', 'installed') if pottery else 'absent'}, "
        f"rstore {'installed' if rstore else 'absent'}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    try:
        if args.url:
            rows = run(args.url, n_single, n_batch, n_big, repeat, budget)
        else:
            with private_server() as url:
                info = redis.Redis.from_url(url).info("server")
                print(f"private redis-server {info['redis_version']}", file=sys.stderr)
                rows = run(url, n_single, n_batch, n_big, repeat, budget)
    except Exception:
        traceback.print_exc()
        raise
    print(report(rows))


if __name__ == "__main__":
    main()
