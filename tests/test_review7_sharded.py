"""Review 7, Sharded: rebalance scope, per-shard sealing, blob listing, shared locations,
error types."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import mappingstore as ms
from mappingstore import Sharded
from mappingstore.errors import (
    InvalidKeyError,
    InvalidOptionError,
    KeyTypeError,
    OptionTypeError,
)


def test_rebalance_leaves_other_namespaces_and_shard_series(tmp_path: Path) -> None:
    paths = [tmp_path / f"{n}.db" for n in "abc"]
    config = ms.open(f"sqlite:///{paths[0]}", namespace="config")
    config.update({f"c{i}": i for i in range(20)})
    users = [ms.open(f"sqlite:///{p}", namespace="users") for p in paths]
    Sharded(users[:2]).update({f"user:{i}": i for i in range(20)})
    users[0].series("metrics")[1] = 10.0
    users[1].series("metrics")[2] = 20.0
    bigger = Sharded(users)
    bigger.rebalance()
    assert len(config) == 20
    assert dict(bigger) == {f"user:{i}": i for i in range(20)}
    points = [dict(s.series("metrics").items()) for s in users]
    assert sorted(p for d in points for p in d) == [1, 2]  # nothing merged away
    for s in [config, *users]:
        s.close()


def test_encrypted_shards_reorder_and_remove_first(tmp_path: Path) -> None:
    a = ms.open(f"sqlite:///{tmp_path}/a.db", password="pw", security="low")
    b = ms.open(f"sqlite:///{tmp_path}/b.db", password="pw", security="low")
    Sharded([a, b], names=["A", "B"]).update({f"k{i}": i for i in range(10)})
    assert dict(Sharded([b, a], names=["B", "A"])) == {f"k{i}": i for i in range(10)}
    # each shard reads what it holds on its own
    assert len(dict(a)) + len(dict(b)) == 10
    # moving a shard's records to another (first) shard seals them again
    only_b = Sharded([b], names=["B"])
    only_b.update(dict(Sharded([a, b], names=["A", "B"])))
    a.clear()
    only_b.rebalance()
    assert dict(only_b) == {f"k{i}": i for i in range(10)}
    assert dict(b) == {f"k{i}": i for i in range(10)}
    a.close()
    b.close()


def test_blob_names_listed_can_be_opened() -> None:
    a, b = ms.open("memory://"), ms.open("memory://")
    a.put_file("direct_a", io.BytesIO(b"a"))
    b.put_file("direct_b", io.BytesIO(b"b"))
    s = Sharded([a, b])
    s.put_file("via_adapter", io.BytesIO(b"x"))
    for name in s.blob_names():
        with s.open(name) as f:
            assert f.read()
    assert "via_adapter" in s.blob_names()


def test_two_shards_at_one_location_refused(tmp_path: Path) -> None:
    s0 = ms.open(f"sqlite:///{tmp_path}/a.db", namespace="shard0")
    s1 = ms.open(f"sqlite:///{tmp_path}/a.db", namespace="shard1")
    with pytest.raises(InvalidOptionError):
        Sharded([s0, s1])
    s0.close()
    s1.close()


def test_error_types() -> None:
    s = Sharded([ms.open("memory://"), ms.open("memory://")])
    for bad in (5, b"k", None):
        with pytest.raises(KeyTypeError):
            s.shard_of(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        s.shard_of("")
    with pytest.raises(OptionTypeError):
        Sharded([ms.open("memory://"), ms.open("memory://")], names=5)  # type: ignore[arg-type]
