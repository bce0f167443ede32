"""TTL: expiry with a fake clock (or a few short real sleeps when the backend has no clock)."""

from __future__ import annotations

import time

import pytest

from .._store import FOREVER, Store
from ..errors import InvalidOptionError, OptionTypeError
from ._base import OpenStore, SuiteBase
from ._fixtures import FakeClock

__all__ = ["TTLTests"]


class TTLTests(SuiteBase):
    """Expired items are invisible to every read at once; TTL persists with the data."""

    @pytest.fixture
    def tstore(self, open_store: OpenStore, clock: FakeClock) -> Store:
        return open_store("ttl", clock=clock)

    def _assert_gone(self, store: Store, key: str, others: dict[str, object]) -> None:
        assert key not in store
        assert store.get(key, "missing") == "missing"
        with pytest.raises(KeyError):
            store[key]
        with pytest.raises(KeyError):
            store.ttl(key)
        assert len(store) == len(others)
        assert sorted(store) == sorted(others)
        assert sorted(store.keys()) == sorted(others)
        assert dict(store.items()) == others
        assert sorted(map(repr, store.values())) == sorted(map(repr, others.values()))
        assert store.get_many([key]) == {}
        assert key not in list(store.names())
        assert key not in store.to_dict()
        assert self.raw_record(store, key) is None  # the contract: invisible to raw reads too
        assert bool(store) is bool(others)

    def test_expiry_is_immediate_for_every_read(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set("short", "s", ttl=10)
        tstore["forever"] = "f"
        assert tstore.ttl("short") == pytest.approx(10)
        assert tstore.ttl("forever") is None
        clock.advance(9.5)
        assert tstore["short"] == "s"
        assert tstore.ttl("short") == pytest.approx(0.5)
        assert len(tstore) == 2
        clock.advance(0.5)  # exactly at the expiry time: gone
        self._assert_gone(tstore, "short", {"forever": "f"})
        with pytest.raises(KeyError):
            del tstore["short"]
        assert tstore.pop("short", "d") == "d"
        with pytest.raises(KeyError):
            tstore.expire("short", 10)
        with pytest.raises(KeyError):
            tstore.modify("short", lambda v: v)
        assert tstore.setdefault("short", "new") == "new"
        assert tstore.ttl("short") is None

    def test_only_expired_items(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set_many({"a": 1, "b": 2}, ttl=5)
        assert tstore.namespace in tstore.namespaces()
        clock.advance(5)
        self._assert_gone(tstore, "a", {})
        # namespaces() lists namespaces that hold data: not one whose items all expired.
        assert tstore.namespace not in tstore.namespaces()
        with pytest.raises(KeyError):
            tstore.popitem()
        assert tstore == {}

    def test_overwrite_without_ttl_clears_expiry(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set("k", 1, ttl=10)
        tstore["k"] = 2
        assert tstore.ttl("k") is None
        tstore.set("j", 1, ttl=10)
        tstore.update(j=2)
        tstore.set("m", 1, ttl=10)
        tstore.set_many({"m": 2})
        clock.advance(100)
        assert tstore == {"k": 2, "j": 2, "m": 2}

    def test_overwrite_with_new_ttl(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set("k", 1, ttl=10)
        tstore.set("k", 2, ttl=100)
        clock.advance(50)
        assert tstore["k"] == 2
        assert tstore.ttl("k") == pytest.approx(50)

    def test_delete_item_with_pending_ttl(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set("k", 1, ttl=10)
        del tstore["k"]
        tstore["k"] = 2
        clock.advance(20)
        assert tstore["k"] == 2
        assert tstore.purge_expired() == 0

    def test_expire(self, tstore: Store, clock: FakeClock) -> None:
        tstore["k"] = "v"
        tstore.expire("k", 5)
        assert tstore.ttl("k") == pytest.approx(5)
        tstore.expire("k", None)
        assert tstore.ttl("k") is None
        tstore.expire("k", 5)
        tstore.expire("k", FOREVER)
        assert tstore.ttl("k") is None
        tstore.expire("k", 2)
        assert tstore["k"] == "v"  # expire changes the expiry, never the value
        clock.advance(2)
        assert "k" not in tstore
        with pytest.raises(KeyError):
            tstore.expire("never-set", 5)
        assert "never-set" not in tstore

    def test_modify_keeps_ttl(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set("n", 1, ttl=10)
        clock.advance(4)
        assert tstore.modify("n", lambda v: v + 1) == 2
        assert tstore.ttl("n") == pytest.approx(6)
        clock.advance(6)
        assert "n" not in tstore

    def test_purge_expired(self, tstore: Store, clock: FakeClock) -> None:
        tstore.set_many({f"e{i}": i for i in range(5)}, ttl=1)
        tstore.set("later", 1, ttl=100)
        tstore["keep"] = 1
        assert tstore.purge_expired() == 0
        clock.advance(1)
        # The contract's default removes nothing (a backend that drops expired records
        # lazily keeps it): then only the invisibility is checked, never the count.
        own = _overrides_purge(tstore)
        assert tstore.purge_expired() == (5 if own else 0)
        assert tstore.purge_expired() == 0
        assert sorted(tstore) == ["keep", "later"]
        assert len(tstore) == 2 and "e0" not in tstore

    def test_default_ttl_option(self, open_store: OpenStore, clock: FakeClock) -> None:
        store = open_store("dttl", clock=clock, ttl=60)
        store["plain"] = 1
        store.set("own", 1, ttl=5)
        store.set("forever", 1, ttl=FOREVER)
        store.update(updated=1)
        store.setdefault("defaulted", 1)
        store.modify("modified", lambda v: v + 1, default=0)
        store.set_many({"many": 1})
        assert store.ttl("plain") == pytest.approx(60)
        assert store.ttl("own") == pytest.approx(5)
        assert store.ttl("forever") is None
        clock.advance(60)
        assert store == {"forever": 1}

    def test_ttl_validation(self, tstore: Store) -> None:
        tstore["k"] = 1
        for bad in (0, -1, float("nan")):
            with pytest.raises(InvalidOptionError):
                tstore.set("x", 1, ttl=bad)
            with pytest.raises(InvalidOptionError):
                tstore.expire("k", bad)
        for wrong in ("10", True, [1]):
            with pytest.raises(OptionTypeError):
                tstore.set("x", 1, ttl=wrong)  # type: ignore[arg-type]
        assert tstore == {"k": 1}
        assert tstore.ttl("k") is None

    def test_ttl_persists_across_reopen(self, open_store: OpenStore, clock: FakeClock) -> None:
        store = open_store("ttlp", clock=clock)
        store.set("k", 1, ttl=10)
        store["f"] = 2
        again = self.reopen(open_store, store, "ttlp", clock=clock)
        assert again.ttl("k") == pytest.approx(10)
        clock.advance(10)
        assert again == {"f": 2}

    def test_ttl_seen_by_a_second_instance(self, open_store: OpenStore, clock: FakeClock) -> None:
        store = open_store("ttl2", clock=clock)
        store.set("k", 1, ttl=10)
        other = self.second(open_store, "ttl2", clock=clock)
        assert other.ttl("k") == pytest.approx(10)
        clock.advance(10)
        assert "k" not in other

    def test_real_clock(self, open_store: OpenStore) -> None:
        """One short real sleep: runs for every backend, with or without ``clock=``."""
        store = open_store("real")
        store.set("short", 1, ttl=0.3)
        store.set("cleared", 1, ttl=0.3)
        store["cleared"] = 2  # overwriting without a TTL clears the expiry
        store.set("long", 3, ttl=600)
        try:
            short_ttl = store.ttl("short")
        except KeyError:  # a stalled machine may already be past it: not a failure
            short_ttl = 0.0
        assert short_ttl is not None and short_ttl <= 0.3
        long_ttl = store.ttl("long")
        assert long_ttl is not None and 590 < long_ttl <= 600
        time.sleep(0.45)
        assert "short" not in store
        assert store.get("short") is None
        assert sorted(store) == ["cleared", "long"]
        assert len(store) == 2
        assert store == {"cleared": 2, "long": 3}


def _overrides_purge(store: Store) -> bool:
    """Whether the backend behind *store* (through adapters: every store they wrap) has
    its own ``_purge_expired``, or keeps the contract's default that removes nothing."""
    if type(store)._purge_expired is Store._purge_expired:
        return False
    inners: list[Store] = list(getattr(store, "_inners", ()))
    return all(_overrides_purge(inner) for inner in inners)
