"""Namespaces, read-only, close and reopen, repr and logging, batches, JSON, concurrency."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from .._store import Store
from ..errors import BatchConflictError, CorruptValueError, ReadOnlyError, StoreClosedError
from ._base import ENCRYPTION, OpenStore, StoreFactory, SuiteBase
from ._fixtures import HOSTILE_KEYS, HOSTILE_NAMESPACE_PAIRS, VALUE_SAMPLES, assert_same

__all__ = ["LifecycleTests"]


def _mutators(store: Store) -> dict[str, Callable[[], Any]]:
    """Every public mutator of a store, called with plausible arguments."""

    def in_batch() -> None:
        with store.batch():
            pass

    return {
        "setitem": lambda: store.__setitem__("k", 2),
        "setitem-new": lambda: store.__setitem__("new", 2),
        "set": lambda: store.set("k", 2),
        "delitem": lambda: store.__delitem__("k"),
        "pop": lambda: store.pop("k"),
        "pop-default": lambda: store.pop("missing", None),
        "popitem": lambda: store.popitem(),
        "setdefault": lambda: store.setdefault("new", 1),
        "setdefault-existing": lambda: store.setdefault("k", 1),
        "update": lambda: store.update(k=3),
        "update-empty": lambda: store.update(),
        "clear": lambda: store.clear(),
        "modify": lambda: store.modify("k", lambda v: v),
        "expire": lambda: store.expire("k", 10),
        "batch": in_batch,
        "set_many": lambda: store.set_many({"k": 1}),
        "delete_many": lambda: store.delete_many(["k"]),
        "import_json": lambda: store.import_json('{"k": 5}'),
        "purge_expired": lambda: store.purge_expired(),
        "change_password": lambda: store.change_password("new password", security="low"),
    }


def _readers(store: Store) -> dict[str, Callable[[], Any]]:
    return {
        "getitem": lambda: store["k"],
        "get": lambda: store.get("k"),
        "contains": lambda: "k" in store,
        "len": lambda: len(store),
        "bool": lambda: bool(store),
        "iter": lambda: list(store),
        "keys": lambda: list(store.keys()),
        "items": lambda: list(store.items()),
        "values": lambda: list(store.values()),
        "eq": lambda: store == {},
        "get_many": lambda: store.get_many(["k"]),
        "names": lambda: list(store.names()),
        "to_dict": lambda: store.to_dict(),
        "export_json": lambda: store.export_json(),
        "ttl": lambda: store.ttl("k"),
        "namespaces": lambda: store.namespaces(),
        "info": lambda: store.info(),
    }


def _expect(error: type[Exception], name: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except error:
        return
    pytest.fail(f"{name}() did not raise {error.__name__}")


def _child_increments(factory: StoreFactory, name: str, n: int) -> None:
    """Body of a forked child: never return into pytest."""
    code = 1
    try:
        store = factory(name)
        try:
            for _ in range(n):
                store.modify("counter", lambda v: v + 1, default=0)
        finally:
            store.close()
        code = 0
    except BaseException:  # the parent only sees the exit code: show why on stderr
        traceback.print_exc()
    finally:
        os._exit(code)


class LifecycleTests(SuiteBase):
    """Everything around the mapping: state, isolation, persistence, concurrency."""

    # -- namespaces ---------------------------------------------------------------------

    def test_namespaces_are_isolated(self, open_store: OpenStore) -> None:
        for (ns1, key1), (ns2, key2) in HOSTILE_NAMESPACE_PAIRS:
            pair = f"{ns1!r}/{key1!r} vs {ns2!r}/{key2!r}"
            first = open_store("ns", namespace=ns1)
            second = self.second(open_store, "ns", namespace=ns2)
            first[key1] = "one"
            first["shared"] = 1
            second[key2] = "two"
            second["shared"] = 2
            assert first == {key1: "one", "shared": 1}, pair
            assert second == {key2: "two", "shared": 2}, pair
            assert list(first.names(key1)) == [key1], pair
            assert list(second.names(key2)) == [key2], pair
            if key1 != key2:
                assert key2 not in first and key1 not in second, pair
                assert first.get_many([key1, key2]) == {key1: "one"}, pair
            first.clear()
            assert len(first) == 0, pair
            assert second == {key2: "two", "shared": 2}, pair
            assert second.popitem() in {(key2, "two"), ("shared", 2)}, pair
            assert len(second) == 1, pair
            assert len(first) == 0, pair
            second.clear()
            first.close()
            second.close()

    def test_namespaces_listing(self, open_store: OpenStore) -> None:
        stores = {ns: open_store("nsl", namespace=ns) for ns in ("default", "default2", "a*", "ab")}
        stores["default"]["k"] = 1
        stores["a*"]["k"] = 1
        stores["ab"]["k"] = 1
        listed = stores["default2"].namespaces()
        assert listed == sorted(["default", "a*", "ab"])
        stores["ab"].clear()
        assert "ab" not in stores["default"].namespaces()
        assert all(not ns.startswith("\x00") for ns in stores["default"].namespaces())
        assert stores["default"].namespace == "default"

    def test_encrypted_metadata_is_no_namespace(self, open_store: OpenStore) -> None:
        store = open_store("nsenc", **ENCRYPTION)
        assert store.namespaces() == []
        assert len(store) == 0 and list(store) == []
        store["k"] = 1
        assert store.namespaces() == ["default"]

    # -- read-only ----------------------------------------------------------------------

    def test_readonly_every_mutator_raises(self, open_store: OpenStore) -> None:
        writer = open_store("ro")
        writer.update(k=1, other=2)
        writer.set("ttl", 3, ttl=600)
        reader = self.second(open_store, "ro", readonly=True)
        assert reader.readonly
        for name, call in _mutators(reader).items():
            _expect(ReadOnlyError, name, call)
            assert writer == {"k": 1, "other": 2, "ttl": 3}, name
        assert isinstance(ReadOnlyError("x"), TypeError)
        # reads work
        assert reader["k"] == 1
        assert reader == {"k": 1, "other": 2, "ttl": 3}
        for call in _readers(reader).values():
            call()

    def test_readonly_dot_names_and_views(self, open_store: OpenStore) -> None:
        writer = open_store("rod", dot_names=True)
        writer["a.b"] = 1
        reader = self.second(open_store, "rod", dot_names=True, readonly=True)
        view = reader["a"]
        for call in (
            lambda: view.__setitem__("c", 1),
            lambda: view.__delitem__("b"),
            lambda: view.pop("b"),
            lambda: view.setdefault("c", 1),
            lambda: view.clear(),
            lambda: view.update(c=1),
            lambda: reader.view("x").__setitem__("y", 1),
            lambda: reader.__setitem__("a", {"c": 1}),
        ):
            with pytest.raises(ReadOnlyError):
                call()
        assert writer.to_dict() == {"a": {"b": 1}}
        assert view.to_dict() == {"b": 1}

    # -- close, reopen, context manager --------------------------------------------------

    def test_use_after_close(self, store: Store) -> None:
        store["k"] = 1
        view_store_calls = {**_mutators(store), **_readers(store)}
        store.close()
        assert store.closed
        store.close()  # idempotent
        for name, call in view_store_calls.items():
            _expect(StoreClosedError, name, call)
        for call in (lambda: store.view("x"), lambda: store.export_json(io.StringIO())):
            with pytest.raises(StoreClosedError):
                call()
        repr(store)  # still cheap and safe

    def test_context_manager(self, open_store: OpenStore) -> None:
        with open_store("cm") as store:
            store["k"] = 1
            assert "closed" not in repr(store)
        assert store.closed
        assert "closed" in repr(store)
        other = open_store("cm2")

        def fail_inside() -> None:
            with other:
                raise RuntimeError

        with pytest.raises(RuntimeError):
            fail_inside()
        assert other.closed

    def test_close_and_reopen_keeps_everything(self, open_store: OpenStore) -> None:
        if not self.persistent:
            pytest.skip("not persistent")
        store = open_store("persist")
        store.update(VALUE_SAMPLES)
        store.update((k, i) for i, k in enumerate(HOSTILE_KEYS[:20]))
        other = open_store("persist", namespace="other")
        other["o"] = 1
        other.close()
        again = self.reopen(open_store, store, "persist")
        for name, value in VALUE_SAMPLES:
            assert_same(again[name], value, name)
        assert len(again) == len(VALUE_SAMPLES) + 20
        assert again.namespaces() == ["default", "other"]
        assert open_store("persist", namespace="other") == {"o": 1}
        again.clear()
        assert self.reopen(open_store, again, "persist") == {}

    def test_other_name_is_independent(self, open_store: OpenStore) -> None:
        one = open_store("one")
        two = open_store("two")
        one["k"] = 1
        assert "k" not in two
        assert two.namespaces() == []

    def test_second_instance_sees_writes(self, open_store: OpenStore) -> None:
        first = open_store("shared")
        second = self.second(open_store, "shared")
        first["k"] = 1
        assert second["k"] == 1
        second["k"] = 2
        del second["k"]
        assert "k" not in first
        with first.batch():
            first["b"] = 1
        assert second["b"] == 1

    # -- repr, info, logging ------------------------------------------------------------

    def test_repr_is_cheap_and_secret_free(self, open_store: OpenStore) -> None:
        store = open_store("repr", **ENCRYPTION)
        store["k"] = "value-marker"

        def forbidden(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("repr() must not read the store")

        for method in ("_get_record", "_get", "_iter_keys", "_iter_items", "_count", "_get_many"):
            setattr(store, method, forbidden)
        text = repr(store) + str(store) + store.url
        for method in ("_get_record", "_get", "_iter_keys", "_iter_items", "_count", "_get_many"):
            delattr(store, method)
        assert ENCRYPTION["password"] not in text
        assert "value-marker" not in text
        assert ENCRYPTION["password"] not in json.dumps(store.info(), default=repr)

    def test_no_secret_in_logs(self, open_store: OpenStore) -> None:
        records: list[logging.LogRecord] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record)

        logger = logging.getLogger(f"mappingstore.test.{id(self)}")
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        handler = Keep(logging.DEBUG)
        logger.addHandler(handler)
        try:
            store = open_store("log", logger=logger, **ENCRYPTION)
            store["k"] = "secret-value"
            store.change_password("the new secret", security="low")
            store.close()
            with pytest.raises(ValueError) as info:
                open_store("log", logger=logger, password="wrong guess", security="low")
            assert "wrong guess" not in str(info.value)
            open_store("log", logger=logger, password="the new secret", security="low").close()
        finally:
            logger.removeHandler(handler)
        for record in records:
            text = record.getMessage() + repr(record.args) + str(record.exc_text)
            for secret in (ENCRYPTION["password"], "the new secret", "wrong guess", "secret-value"):
                assert secret not in text, record.getMessage()

    # -- batch --------------------------------------------------------------------------

    def test_batch_commits_together(self, open_store: OpenStore) -> None:
        store = open_store("batch")
        store["gone"] = 0
        with store.batch() as same:
            assert same is store
            store["a"] = 1
            store.update(b=2)
            del store["gone"]
            assert store["a"] == 1  # reads inside see the writes
            assert "gone" not in store
            assert sorted(store) == ["a", "b"]
            assert len(store) == 2
            assert store.modify("a", lambda v: v + 10) == 11
            with store.batch():  # nested batches join the outer one
                store["c"] = 3
            assert store.pop("b") == 2
            assert store.get_many(["a", "c"]) == {"a": 11, "c": 3}
        assert store == {"a": 11, "c": 3}

    def test_batch_exception_discards_everything(self, store: Store) -> None:
        store.update(keep=1, other=2)

        def attempt() -> None:
            with store.batch():
                store["new"] = 1
                store["keep"] = 99
                del store["other"]
                store.clear()
                with store.batch():
                    store["nested"] = 1
                store["missing-key-raises"]

        with pytest.raises(KeyError):
            attempt()
        assert store == {"keep": 1, "other": 2}

    def test_batch_invisible_to_others_until_commit(self, open_store: OpenStore) -> None:
        store = open_store("bvis")
        other = self.second(open_store, "bvis")
        with store.batch():
            store["k"] = 1
            assert "k" not in other
        assert other["k"] == 1

    def test_read_modify_writes_in_a_batch_never_overwrite_another_writer(
        self, open_store: OpenStore
    ) -> None:
        # modify/setdefault inside a batch read now and write at the commit: a write of
        # another store object (another process) in between must not be overwritten.
        store = open_store("brmw")
        other = self.second(open_store, "brmw")
        store["n"] = 0

        def increment() -> None:
            with store.batch():
                assert store.modify("n", lambda n: n + 1) == 1
                other.modify("n", lambda n: n + 1)  # acknowledged: must survive
                store["untouched"] = 1

        def set_default() -> None:
            with store.batch():
                store.setdefault("sd", "mine")
                assert other.setdefault("sd", "theirs") == "theirs"

        with pytest.raises(BatchConflictError):
            increment()
        assert other["n"] == 1 and "untouched" not in other  # nothing of the batch
        with pytest.raises(BatchConflictError):
            set_default()
        assert store["sd"] == "theirs"
        with store.batch():  # no other writer: commits
            store.modify("n", lambda n: n + 10)
            store.setdefault("sd2", "mine")
            store.pop("sd")
        # A store object that read nothing yet (a second Cached object caches what it
        # read, and is stale by design until its entries go).
        fresh = self.second(open_store, "brmw")
        assert fresh["n"] == 11 and fresh["sd2"] == "mine" and "sd" not in fresh

    # -- JSON ---------------------------------------------------------------------------

    def test_export_import_typed_round_trip(self, open_store: OpenStore) -> None:
        items = dict(VALUE_SAMPLES)
        items.update((k, k) for k in HOSTILE_KEYS if k not in items)
        source = open_store("json-src")
        source.update(items)
        text = source.export_json()
        assert isinstance(text, str)
        json.loads(text)  # valid JSON
        target = open_store("json-dst")
        assert target.import_json(text) == len(items)
        for name, value in items.items():
            assert_same(target[name], value, name)
        buffer = io.StringIO()
        assert source.export_json(buffer) is None
        again = open_store("json-file")
        again.import_json(io.StringIO(buffer.getvalue()))
        again.import_json(buffer.getvalue().encode())
        assert again == target

    def test_export_plain_json(self, store: Store) -> None:
        store.update(b=b"\x00\xff", t=(1, 2), s={3}, i=2**70, n=None, d={"x": [1]})
        plain = json.loads(store.export_json(typed=False) or "")
        assert plain["t"] == [1, 2] and plain["s"] == [3] and plain["n"] is None
        assert plain["d"] == {"x": [1]}
        assert plain["i"] == 2**70
        assert isinstance(plain["b"], str)

    def test_import_garbage_stores_nothing(self, store: Store) -> None:
        store["k"] = 1
        for bad in ("not json", "[1, 2]", '{"a": {"$bytes": "!!"}}', '{"a": {"$nope": 1}}'):
            with pytest.raises(CorruptValueError):
                store.import_json(bad)
        assert store == {"k": 1}

    # -- concurrency --------------------------------------------------------------------

    def test_threads_modify_exact_count(self, open_store: OpenStore) -> None:
        store = open_store("threads")
        n_threads, n_each = 4, 50
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(n_each):
                    store.modify("counter", lambda v: v + 1, default=0)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert store["counter"] == n_threads * n_each

    def test_processes_modify_exact_count(
        self, open_store: OpenStore, factory: StoreFactory
    ) -> None:
        if not self.multiprocess:
            pytest.skip("not shared between processes")
        store = open_store("procs")
        store["counter"] = 0
        ctx = multiprocessing.get_context("fork")
        n_each = 200
        procs = [
            ctx.Process(target=_child_increments, args=(factory, "procs", n_each)) for _ in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        assert store["counter"] == 2 * n_each
