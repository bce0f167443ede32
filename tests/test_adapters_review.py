"""Adapters: regressions from the adapters review.

* ``Tiered`` with a faster tier that fails (full, unreachable): reads still return the
  slowest tier's record, a write that reached the slowest tier returns normally, and no
  faster tier keeps an old copy.
* ``Prefixed`` over a dot-names store refuses a write under a prefix that passes
  through a leaf of the wrapped store, on every write path.
* ``info()`` of an adapter reports the wrapped store's durability and sharing.
* The ``url`` of nested adapters reopens an equivalent store.
* Every mutator of a read-only adapter's time series refuses, even with nothing to do.
"""

from __future__ import annotations

import threading
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mappingstore
from mappingstore import (
    Cached,
    MemoryStore,
    Prefixed,
    ReadOnly,
    Sharded,
    SQLiteStore,
    Store,
    Tiered,
)
from mappingstore._store import Op, Record
from mappingstore.errors import BackendError, NameConflictError, ReadOnlyError

# -- Tiered with a failing faster tier ---------------------------------------------------

BIG = b"x" * 200_000  # more than a 64 KiB shared-memory segment can hold


@pytest.fixture
def shm_small() -> Iterator[Store]:
    """A real shared-memory store capped at 64 KiB, unlinked at the end."""
    store = mappingstore.open(f"shm://msrev-{uuid.uuid4().hex[:12]}?max_size=65536")
    try:
        yield store
    finally:
        store.unlink()  # type: ignore[attr-defined]
        store.close()


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Store]:
    with mappingstore.open(f"sqlite:///{tmp_path}/slow.db") as store:
        yield store


def test_tiered_read_of_slow_value_survives_a_full_fast_tier(shm_small: Store, slow: Store) -> None:
    tiers = Tiered([shm_small, slow])
    slow["big"] = BIG  # only in the slow tier; too big to promote
    slow["small"] = b"s"
    assert tiers["big"] == BIG
    assert "big" in tiers
    assert tiers.get("big") == BIG
    assert tiers.get_many(["big", "small", "none"]) == {"big": BIG, "small": b"s"}
    assert "big" not in shm_small
    assert shm_small["small"] == b"s"  # promotion still works for what fits


def test_tiered_write_that_reached_the_slow_tier_returns(shm_small: Store, slow: Store) -> None:
    tiers = Tiered([shm_small, slow])
    tiers["k"] = b"old"
    assert shm_small["k"] == b"old"
    tiers["k"] = BIG  # the fast tier cannot hold it: dropped there, written below
    assert slow["k"] == BIG
    assert "k" not in shm_small  # never the old copy
    assert tiers["k"] == BIG and "k" in tiers
    tiers.update({"k": b"small again", "j": BIG})
    # The fast tier's batch failed as a whole (each tier's write is atomic): no copies.
    assert "k" not in shm_small and "j" not in shm_small
    assert tiers["j"] == BIG and tiers["k"] == b"small again"
    assert shm_small["k"] == b"small again"  # promoted by the read
    tiers["m"] = b"m"
    assert tiers.modify("m", lambda v: v + BIG) == b"m" + BIG
    assert "m" not in shm_small and tiers["m"] == b"m" + BIG
    assert tiers.setdefault("n", BIG) == BIG and tiers["n"] == BIG
    assert tiers.pop("n") == BIG and "n" not in tiers


class Flaky(MemoryStore):
    """A memory store whose writes can be made to fail.

    ``fail_writes``: every ``_put``/``_apply``/``_update`` that stores a record raises;
    with ``after=True`` the write is done first (an unknown outcome, as on a network).
    ``fail_deletes``: removals raise too; ``fail_updates=False`` spares ``_update`` (what
    a promotion uses). ``hooks[name]`` runs before the raw call.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.fail_writes = False
        self.after = False
        self.fail_deletes = False
        self.fail_updates = True
        self._updating = 0  # MemoryStore._update may call _put: that _put is the update's
        self.hooks: dict[str, Callable[[], None]] = {}

    def _hook(self, name: str) -> None:
        hook = self.hooks.get(name)
        if hook is not None:
            hook()

    def _fail(self, what: str) -> None:
        raise BackendError(f"injected failure: {what}")

    def _get_record(self, ns: str, key: str) -> Record | None:
        rec = super()._get_record(ns, key)
        self._hook("get")
        return rec

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        self._hook("put")
        fail = self.fail_writes and not self._updating
        if fail and not self.after:
            self._fail("put")
        super()._put(ns, key, data, expires)
        if fail:
            self._fail("put (after writing)")

    def _apply(self, ops: Any) -> None:
        writes = any(op.data is not None for op in ops)
        self._hook("apply" if writes else "drop")
        fail = self.fail_writes if writes else self.fail_deletes
        if fail and not self.after:
            self._fail("apply")
        super()._apply(ops)
        if fail:
            self._fail("apply (after writing)")

    def _update(self, ns: str, key: str, fn: Callable[[Record | None], Any]) -> None:
        fail = self.fail_writes and self.fail_updates
        if fail and not self.after:
            self._fail("update")
        self._updating += 1
        try:
            super()._update(ns, key, fn)
        finally:
            self._updating -= 1
        if fail:
            self._fail("update (after writing)")

    def _delete(self, ns: str, key: str) -> bool:
        if self.fail_deletes:
            self._fail("delete")
        return super()._delete(ns, key)


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_tiered_failed_promotion_leaves_no_copy(after: bool) -> None:
    fast, slow_ = Flaky(), MemoryStore()
    tiers = Tiered([fast, slow_])
    slow_["k"] = 1
    fast.fail_writes, fast.after = True, after
    assert tiers["k"] == 1 and "k" in tiers
    assert "k" not in fast  # a copy the failure may have left is deleted
    fast.fail_writes = False
    assert tiers["k"] == 1 and fast["k"] == 1  # promotion works again


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_tiered_fast_write_failure_after_slow_write(after: bool) -> None:
    fast, slow_ = Flaky(), MemoryStore()
    tiers = Tiered([fast, slow_])
    tiers["k"] = "old"
    assert fast["k"] == "old"
    fast.fail_writes, fast.after = True, after
    tiers["k"] = "new"  # reached the slow tier: the write has happened
    assert slow_["k"] == "new" and "k" not in fast
    assert tiers["k"] == "new"
    tiers.modify("k", lambda v: v + "!")
    assert slow_["k"] == "new!" and "k" not in fast and tiers["k"] == "new!"


def test_tiered_error_before_the_slow_tier_changes_nothing() -> None:
    fast, slow_ = Flaky(), MemoryStore()
    tiers = Tiered([fast, slow_])
    tiers["k"] = "old"
    fast.fail_deletes = True  # the first step (drop the fast copies) fails
    with pytest.raises(BackendError):
        tiers["k"] = "new"
    assert slow_["k"] == "old" and tiers["k"] == "old"


def test_tiered_read_racing_a_write_never_leaves_the_old_copy() -> None:
    """A read that saw the old record in the slow tier must not copy it into a fast
    tier while a write of the key is under way: if the write's fast step then fails, and
    so does dropping the fast copy, the old value would be served for good."""
    fast, slow_ = Flaky(), Flaky()
    tiers = Tiered([fast, slow_])
    slow_["k"] = "old"  # in the slow tier only
    wait = 10.0  # only if broken: the sequence below never waits this long when correct
    writer_at_slow, reader_read, writer_in_fast, reader_done = (threading.Event() for _ in range(4))
    errors: list[BaseException] = []

    def slow_apply() -> None:  # the writer, about to write the slow tier
        writer_at_slow.set()
        reader_read.wait(wait)

    def slow_get() -> None:  # the reader, having read the old record
        if threading.current_thread() is threading.main_thread():
            slow_.hooks.pop("get")
            reader_read.set()
            writer_in_fast.wait(wait)

    def fast_apply() -> None:  # the writer, about to write the fast tier (and fail)
        fast.fail_deletes = True  # dropping the copy afterwards fails too
        writer_in_fast.set()
        reader_done.wait(wait)

    def write() -> None:
        try:
            tiers["k"] = "new"
        except BaseException as exc:
            errors.append(exc)

    slow_.hooks.update(apply=slow_apply, get=slow_get)
    fast.hooks["apply"] = fast_apply
    fast.fail_writes, fast.fail_updates = True, False  # the writer fails, a promotion not
    writer = threading.Thread(target=write)
    writer.start()
    assert writer_at_slow.wait(wait)
    assert tiers["k"] == "old"  # read while the write is under way: the old value
    reader_done.set()
    writer.join(wait)
    assert not writer.is_alive() and not errors
    fast.hooks.clear()
    slow_.hooks.clear()
    fast.fail_writes = fast.fail_deletes = False
    assert "k" not in fast
    assert tiers["k"] == "new"


# -- Prefixed over a dot-names store -----------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def dotted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        store: Store = MemoryStore(dot_names=True)
    else:
        store = SQLiteStore(str(tmp_path / "dot.db"), dot_names=True)
    with store:
        yield store


def _write_paths(p: Store) -> list[tuple[str, Callable[[], Any]]]:
    def batch() -> None:
        with p.batch():
            p["x"] = 1

    return [
        ("setitem", lambda: p.__setitem__("x", 1)),
        ("set", lambda: p.set("x", 1, ttl=60)),
        ("branch", lambda: p.__setitem__("b", {"c": 1})),
        ("update", lambda: p.update({"x": 1})),
        ("set_many", lambda: p.set_many([("x", 1), ("y", 2)])),
        ("setdefault", lambda: p.setdefault("x", 1)),
        ("modify", lambda: p.modify("x", lambda v: v + 1, default=0)),
        ("batch", batch),
    ]


@pytest.mark.parametrize(("prefix", "leaf"), [("app.", "app"), ("a.b.c", "a.b"), ("a.b.", "a")])
def test_prefixed_refuses_writes_under_a_leaf_of_the_wrapped_store(
    dotted: Store, prefix: str, leaf: str
) -> None:
    dotted[leaf] = "leaf"
    p = Prefixed(dotted, prefix)
    for adapter in (p, Cached(p)):
        for name, write in _write_paths(adapter):
            with pytest.raises(NameConflictError):
                write()
            assert list(dotted.names()) == [leaf], name
    assert dotted.to_dict() == {leaf.split(".")[0]: dotted.to_dict()[leaf.split(".")[0]]}
    assert dict(dotted.items()) == dotted.to_dict()
    assert len(p) == 0 and p.get("x") is None and "x" not in p
    p.series("s")[1] = 1.0  # time series are not dot names: unaffected
    assert p.series("s")[1] == 1.0


def test_prefixed_dot_names_without_conflict(dotted: Store) -> None:
    p = Prefixed(dotted, "app.")
    for name, write in _write_paths(p):
        write()
        assert "app.x" in dotted.names() or "app.b.c" in dotted.names(), name
    with pytest.raises(NameConflictError):
        dotted["app"] = "leaf"  # the wrapped store's own check, as before
    dotted["apple"] = "leaf"  # not a name the prefix passes through
    p["z"] = 3
    assert dotted["app.z"] == 3 and p.pop("z") == 3


def test_prefixed_deletes_stay_possible_over_a_conflict(dotted: Store) -> None:
    # A store left inconsistent (by an older version): removing under the prefix works.
    dotted["app.x"] = 1
    dotted["app.y"] = 2
    raw = Prefixed(dotted, "app.")
    dotted._put(dotted._ns, "app", dotted._encode(dotted._ns, "app", "leaf"), None)
    assert raw.pop("x") == 1
    del raw["y"]
    assert list(dotted.names()) == ["app"]


# -- info(): the wrapped store's durability and sharing ---------------------------------


def test_adapter_info_reports_the_wrapped_store(tmp_path: Path) -> None:
    db = mappingstore.open(f"sqlite:///{tmp_path}/info.db")
    other = mappingstore.open(f"sqlite:///{tmp_path}/info2.db")
    mem = MemoryStore()
    try:
        for adapter in (Cached(db), Prefixed(db, "p:"), ReadOnly(db), Cached(Prefixed(db, "a"))):
            info = adapter.info()
            assert info["durability"] == db.durability, adapter
            assert info["shared_across_processes"] is True, adapter
            assert adapter.durability == db.durability
        assert ReadOnly(mem).info()["shared_across_processes"] is False
        tiered = Tiered([mem, db])
        assert db.durability in tiered.info()["durability"]
        assert tiered.info()["shared_across_processes"] is False  # a private fast tier
        assert Tiered([db]).shared_across_processes is True
        sharded = Sharded([db, other])
        assert sharded.info()["shared_across_processes"] is True
        assert db.durability in sharded.info()["durability"]
        mixed = Sharded([db, mem])
        assert mixed.shared_across_processes is False
        assert db.durability in mixed.durability and mem.durability in mixed.durability
        with mappingstore.open(f"sqlite:///{tmp_path}/info.db?cache=10&key_prefix=k") as s:
            assert s.info()["durability"] == db.durability
    finally:
        for s in (db, other, mem):
            s.close()


def test_cli_info_of_an_adapter_url(tmp_path: Path) -> None:
    import json

    from click import testing as click_testing

    from mappingstore.cli import cli

    url = f"sqlite:///{tmp_path}/cli.db"
    with mappingstore.open(url) as db:
        expected = db.durability
    for query in ("?cache=10", "?key_prefix=p:", "?cache=5&key_prefix=p:"):
        result = click_testing.CliRunner().invoke(cli, ["--url", url + query, "--json", "info"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.stdout)
        assert info["durability"] == expected and info["shared_across_processes"] is True


# -- url of nested adapters reopens an equivalent store ---------------------------------


def _query(url: str) -> dict[str, str]:
    pairs = urllib.parse.parse_qsl(url.partition("?")[2], keep_blank_values=True)
    names = [n for n, _ in pairs]
    assert len(names) == len(set(names)), url  # open() refuses an option given twice
    return dict(pairs)


def _shape(store: Store) -> list[Any]:
    """The adapter chain, outermost first: what reopening must reproduce."""
    out: list[Any] = []
    while isinstance(store, (Cached, Prefixed, ReadOnly)):
        if isinstance(store, Cached):
            out.append(("cache", store.maxsize, store.ttl_seconds))
        elif isinstance(store, Prefixed):
            out.append(("prefix", store.prefix))
        store = store.stores[0]
    return out


NESTINGS: list[tuple[str, Callable[[Store], Store], str, bool]] = [
    # (id, build, the full key of adapter key "k" in the wrapped store, read-only)
    ("prefixed", lambda s: Prefixed(s, "a:"), "a:k", False),
    ("cached", lambda s: Cached(s, 7, 2.5), "k", False),
    ("readonly", ReadOnly, "k", True),
    ("prefixed-prefixed", lambda s: Prefixed(Prefixed(s, "a:"), "b&c="), "a:b&c=k", False),
    ("prefixed-x3", lambda s: Prefixed(Prefixed(Prefixed(s, "a"), "b"), "c"), "abck", False),
    ("cached-cached", lambda s: Cached(Cached(s, 10, 1.0), 20), "k", False),
    ("cached-prefixed", lambda s: Cached(Prefixed(s, "a:"), 5), "a:k", False),
    ("prefixed-cached", lambda s: Prefixed(Cached(s, 5), "a:"), "a:k", False),
    (
        "prefixed-cached-prefixed",
        lambda s: Prefixed(Cached(Prefixed(s, "a:"), 5), "b:"),
        "a:b:k",
        False,
    ),
    ("readonly-prefixed", lambda s: ReadOnly(Prefixed(s, "a:")), "a:k", True),
    ("readonly-cached", lambda s: ReadOnly(Cached(s, 3)), "k", True),
    ("readonly-readonly", lambda s: ReadOnly(ReadOnly(s)), "k", True),
    ("prefixed-readonly", lambda s: Prefixed(ReadOnly(s), "a:"), "a:k", True),
    (
        "cached-readonly-prefixed-prefixed",
        lambda s: Cached(ReadOnly(Prefixed(Prefixed(s, "a+"), "%b")), 4),
        "a+%bk",
        True,
    ),
]


@pytest.mark.parametrize(
    ("build", "full", "readonly"), [n[1:] for n in NESTINGS], ids=[n[0] for n in NESTINGS]
)
def test_nested_adapter_url_reopens(
    tmp_path: Path, build: Callable[[Store], Store], full: str, readonly: bool
) -> None:
    with mappingstore.open(f"sqlite:///{tmp_path}/n.db") as db:
        db[full] = "value"
        db["k"] = "outside" if full != "k" else "value"
        adapter = build(db)
        url = adapter.url
        _query(url)
        with mappingstore.open(url) as again:
            assert again["k"] == "value"
            assert list(again) == list(adapter)
            assert again.readonly is readonly
            assert again.url == mappingstore.open(again.url).url  # stable from here on
            # (a backend's own url leaves readonly= out: the reopened store's may lack it)
            assert {**_query(again.url), "readonly": "-"} == {**_query(url), "readonly": "-"}
            # One cache (the outermost's options) over one prefix (all of them joined).
            layers = _shape(adapter)
            prefix = "".join(reversed([s[1] for s in layers if s[0] == "prefix"]))
            want = [s for s in layers if s[0] == "cache"][:1]
            if prefix:
                want.append(("prefix", prefix))
            assert _shape(again) == want


def test_tiered_and_sharded_urls_stay_display_only() -> None:
    a, b = MemoryStore(), MemoryStore()
    url = Prefixed(Tiered([a, b]), "p:").url
    assert url.startswith("tiered:[") and url.endswith("?key_prefix=p%3A")


# -- read-only adapters: series mutators refuse with nothing to do ----------------------


@pytest.mark.parametrize(
    ("wrap", "writable"),
    [
        (ReadOnly, lambda s: s),
        (lambda s: Cached(ReadOnly(s)), lambda s: s),
        (lambda s: Prefixed(ReadOnly(s), "p:"), lambda s: Prefixed(s, "p:")),
    ],
    ids=["readonly", "cached-readonly", "prefixed-readonly"],
)
def test_readonly_series_mutators_refuse_even_when_empty(
    wrap: Callable[[Store], Store], writable: Callable[[Store], Store]
) -> None:
    db = MemoryStore()
    writable(db).series("full")[1] = 1.0
    ro = wrap(db)
    empty, full = ro.series("empty"), ro.series("full")
    assert dict(full.items()) == {1: 1.0}
    calls: list[Callable[[], Any]] = [
        empty.clear,
        lambda: empty.update({}),
        lambda: empty.update(),
        lambda: empty.pop(5, None),
        empty.popitem,
        lambda: empty.setdefault(1, 2.0),
        lambda: empty.extend([]),
        empty.remove,
        lambda: full.setdefault(1, 2.0),  # present: nothing to write, still refused
        lambda: full.pop(99, None),
        lambda: ro.events("empty").remove(),
    ]
    for call in calls:
        with pytest.raises(ReadOnlyError):
            call()
    assert dict(writable(db).series("full").items()) == {1: 1.0}


def test_writable_adapter_series_unchanged() -> None:
    db = MemoryStore()
    s = Cached(db).series("s")
    s.clear()  # nothing to clear, writable: fine
    assert s.pop(1, "d") == "d" and s.setdefault(1, 2.0) == 2.0
    s.update({2: 3.0})
    assert dict(db.series("s").items()) == {1: 2.0, 2: 3.0}
    assert s.popitem() == (1, 2.0)


def test_readonly_store_ops_still_refused_when_empty() -> None:
    ro = ReadOnly(MemoryStore())
    for call in (ro.clear, lambda: ro.update({}), lambda: ro.pop("x", None), ro.popitem):
        with pytest.raises(ReadOnlyError):
            call()
    ops = [Op(ro._ns, "k", None, None)]
    with pytest.raises(ReadOnlyError):
        ro._apply(ops)
