"""Cached and Prefixed: regressions from review 7 (adapters).

* ``Prefixed(Cached(tree), "app.")``: the leaf check of a batch commit (and of every
  write) reads the store inside its exclusive section, never a stale cached entry.
* ``Cached`` under dot names: ``names(prefix)`` and ``view()`` read the store.
* ``Cached.invalidate()`` validates its argument.
* ``Prefixed.namespaces()`` lists a namespace that holds only blobs inside the prefix.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

import mappingstore
from mappingstore import Cached, Prefixed, Store
from mappingstore.errors import InvalidKeyError, KeyTypeError, NameConflictError


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Store, Store]]:
    """Two store objects over one dot-names SQLite file: the second is another writer
    (another process, in effect)."""
    url = f"sqlite:///{tmp_path}/t.db"
    a = mappingstore.open(url, dot_names=True)
    b = mappingstore.open(url, dot_names=True)
    yield a, b
    a.close()
    b.close()


def _stale_parent(two: tuple[Store, Store]) -> tuple[Prefixed, Store]:
    tree, other = two
    app = Prefixed(Cached(tree, ttl=60), "app.")
    assert "app" not in app.stores[0]  # caches "app" as missing
    other["app"] = "a leaf"  # another writer makes "app" a leaf
    return app, other


def test_batch_commit_leaf_check_reads_the_store(two: tuple[Store, Store]) -> None:
    app, other = _stale_parent(two)
    with pytest.raises(NameConflictError), app.batch():
        app["x"] = 1
    assert sorted(other.names()) == ["app"]
    assert dict(other) == {"app": "a leaf"}


def test_set_many_and_modify_leaf_check_reads_the_store(two: tuple[Store, Store]) -> None:
    app, other = _stale_parent(two)
    with pytest.raises(NameConflictError):
        app.set_many([("x", 1), ("y", 2)])
    with pytest.raises(NameConflictError):
        app["x"] = 1
    assert dict(other) == {"app": "a leaf"}


def test_prefixed_cached_writes_still_work(two: tuple[Store, Store]) -> None:
    tree, other = two
    app = Prefixed(Cached(tree), "app.")
    with app.batch():
        app["x"] = 1
        app["y"] = 2
    app["z"] = 3
    app.modify("z", lambda v: v + 1)
    assert dict(other) == {"app": {"x": 1, "y": 2, "z": 4}}


def test_names_with_a_prefix_come_from_the_store(two: tuple[Store, Store]) -> None:
    db, other = two
    c = Cached(db)
    c["a"] = 1  # cached as a leaf
    del other["a"]
    other["a.x"] = 2  # another writer turns the leaf into a branch
    assert list(c.names("a")) == ["a.x"] == list(db.names("a"))
    assert dict(c.view("a")) == {"x": 2}


def test_names_still_lists_a_leaf_and_reads_stay_cached(two: tuple[Store, Store]) -> None:
    db, _ = two
    c = Cached(db)
    c["a"] = 1
    c["b.x"] = 2
    assert list(c.names("a")) == ["a"]
    assert list(c.names("b")) == ["b.x"]
    assert list(c.names("zz")) == []
    hits = c.cache_info().hits
    assert c["a"] == 1
    assert c.cache_info().hits == hits + 1


@pytest.mark.parametrize("bad", [["k"], 5, b"k", ("k",)])
def test_invalidate_refuses_a_non_str_key(bad: object) -> None:
    c = Cached(mappingstore.open("memory://"))
    c["k"] = 1
    with pytest.raises(KeyTypeError):
        c.invalidate(bad)  # type: ignore[arg-type]
    assert c.cache_info().currsize == 1  # nothing forgotten


def test_invalidate_refuses_an_empty_key() -> None:
    c = Cached(mappingstore.open("memory://"))
    with pytest.raises(InvalidKeyError):
        c.invalidate("")
    c["k"] = 1
    c.invalidate("k")
    assert c.cache_info().currsize == 0


@pytest.mark.parametrize("scheme", ["memory", "sqlite", "dir"])
def test_prefixed_namespaces_lists_blob_only_namespaces(scheme: str, tmp_path: Path) -> None:
    url = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path}/b.db",
        "dir": f"dir:///{tmp_path}/d",
    }[scheme]
    db = mappingstore.open(url)
    try:
        p = Prefixed(db, "app1:")
        assert p.namespaces() == []
        Prefixed(db, "app2:").put_file("f", io.BytesIO(b"data"))
        assert p.namespaces() == []  # another prefix's blob
        p.put_file("f", io.BytesIO(b"data"))
        assert p.blob_names() == ["f"]
        assert p.namespaces() == ["default"]
    finally:
        db.close()


def test_prefixed_namespaces_lists_blobs_of_another_namespace(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/b.db"
    db = mappingstore.open(url)
    other = mappingstore.open(url + "?namespace=other")
    try:
        Prefixed(other, "app1:").put_file("f", io.BytesIO(b"data"))
        Prefixed(other, "app2:").put_file("g", io.BytesIO(b"data"))
        assert Prefixed(db, "app1:").namespaces() == ["other"]
        assert Prefixed(db, "app3:").namespaces() == []
    finally:
        db.close()
        other.close()


def test_views_of_views_check_the_store_not_the_cache() -> None:
    """``c.view("a").view("b")`` (and a view through another adapter over the cache)
    checks the leaf ``a.b`` in the store: a stale cached leaf beside the branch another
    writer made is not taken for a conflict."""
    import mappingstore
    from mappingstore import Cached, Prefixed

    inner = mappingstore.open("memory://", dot_names=True)
    c = Cached(inner)
    c["a.b"] = 1
    assert c["a.b"] == 1  # cached
    inner["a.b"] = {"c": 2}  # another writer: a.b is now a branch
    assert c.view("a").view("b").to_dict() == {"c": 2}
    assert Prefixed(c, "a.").view("b").to_dict() == {"c": 2}
