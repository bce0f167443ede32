"""Conformance tests for time series and event sequences (joined by every backend).

A backend's test class inherits :class:`SeriesTests` and :class:`EventTests` (through
``StoreTests``) and provides the same ``factory`` fixture as the rest of the suite:
``factory(name="a", **options) -> Store``.
"""

from __future__ import annotations

import datetime as dt
import operator
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mappingstore
from mappingstore import errors
from mappingstore._keys import internal_ns

Factory = Callable[..., mappingstore.Store]

__all__ = ["EventTests", "SeriesTests"]

_TS = st.integers(min_value=-3000, max_value=3000)
_VAL = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.tuples(st.integers()))


class SeriesTests:
    """Time-series behaviour every backend must show."""

    persistent: bool = True

    def test_series_basic_rstore_scenario(self, factory: Factory) -> None:
        s = factory()
        t = s.series("t")
        t.extend([(130, "c"), (100, "a"), (120, "b0"), (120, "b"), (110, "x")])
        assert t.range() == [(100, "a"), (110, "x"), (120, "b"), (130, "c")]
        t.extend([(110, "x2")])
        assert t.range(110, 120) == [(110, "x2"), (120, "b")]
        assert t.range(111, 129) == [(120, "b")]
        assert t.range(120) == [(120, "b"), (130, "c")]
        assert t.range(end=110) == [(100, "a"), (110, "x2")]
        assert t.range(n=2) == [(100, "a"), (110, "x2")]
        assert t.range(105, n=2) == [(110, "x2"), (120, "b")]
        assert t.range(n=0) == []
        assert t.range(130, 100) == []
        assert t.range(200) == []
        assert len(t) == 4 and list(t) == [100, 110, 120, 130]
        assert t.first() == (100, "a") and t.last() == (130, "c")
        assert 110 in t
        assert 111 not in t
        assert "110" not in t  # type: ignore[comparison-overlap]
        assert t[120] == "b"
        with pytest.raises(KeyError):
            t[121]

    def test_series_thinning_and_missing(self, factory: Factory) -> None:
        s = factory()
        u = s.series("u", freq=10)
        u.extend([(x, i) for i, x in enumerate([100, 105, 110, 112, 125, 131])])
        assert u.range(freq=10) == [(100, 0), (110, 2), (125, 4)]
        assert u.range(freq=10, n=2) == [(100, 0), (110, 2)]
        assert u.missing(100, 130) == [120, 130]
        assert u.missing(100, 130, freq=5) == [115, 120, 130]
        assert u.missing(100) == [] and u.missing(101) == [101]
        assert u.missing(100, 145) == [120, 130, 140]  # never beyond end
        assert u.iscomplete(100, 110, freq=5) is True
        assert u.iscomplete(100, 120, freq=5) is False  # 115 and 120 are missing
        assert u.iscomplete(100, 110) is True
        g = s.series("g")
        g.extend([(100, "a"), (115, "b"), (120, "c")])
        assert g.missing(100, 120, freq=10) == [110]  # 120 exists: no thinning artefact
        with pytest.raises(errors.MissingFrequencyError):
            g.missing(100, 120)
        with pytest.raises(ValueError):
            g.missing(100, 120, freq=0)
        assert s.series("unknown").missing(100, 150, freq=10) == [100, 110, 120, 130, 140, 150]

    def test_series_negative_and_zero(self, factory: Factory) -> None:
        s = factory()
        neg = s.series("neg")
        neg.extend([(-20, "a"), (-10, "b"), (5, "c")])
        assert neg.first() == (-20, "a")
        assert neg.range(-30, 10) == [(-20, "a"), (-10, "b"), (5, "c")]
        z = s.series("z")
        z.extend([(0, 1), (10, 2)])
        assert z.missing(-10, 0, freq=10) == [-10]
        assert z.range(0, 0) == [(0, 1)]
        assert z.missing(0, freq=10) == []

    def test_series_remove_and_names(self, factory: Factory) -> None:
        s = factory()
        t = s.series("t")
        t.extend([(100, "a"), (110, "b"), (120, "c"), (130, "d")])
        assert t.remove(110, 120) == 2
        assert t.range() == [(100, "a"), (130, "d")]
        assert t.remove(end=99) == 0
        assert t.remove(200, 100) == 0
        del t[130]
        with pytest.raises(KeyError):
            del t[130]
        assert s.series_names() == ["t"]
        t.remove()
        assert s.series_names() == [] and len(t) == 0 and t.first() is None

    def test_series_reads_return_copies(self, factory: Factory) -> None:
        s = factory()
        t = s.series("t")
        t.extend([(1, {"a": [1]}), (2, {"b": [2]}), (3000, {"z": [3]})])
        for read in (t.first, t.last, lambda: t.range()[0], lambda: t.range()[-1]):
            got = read()
            assert got is not None
            got[1].clear()  # mutating what a read returned changes nothing stored
        assert t.first() == (1, {"a": [1]}) and t.last() == (3000, {"z": [3]})
        assert t[2] == {"b": [2]} and t.range() == [
            (1, {"a": [1]}),
            (2, {"b": [2]}),
            (3000, {"z": [3]}),
        ]
        del t[1]
        t[4000] = "new last"
        assert t.first() == (2, {"b": [2]}) and t.last() == (4000, "new last")
        t.remove(3000, None)
        assert t.first() == t.last() == (2, {"b": [2]})
        t.remove()
        assert t.first() is None and t.last() is None and s.series_names() == []

    def test_series_independent_of_plain_key_and_namespaces(self, factory: Factory) -> None:
        s = factory()
        s["x"] = "plain"
        s.series("x")[1] = "point"
        assert s["x"] == "plain" and s.series("x")[1] == "point"
        assert list(s) == ["x"]
        other = factory(namespace="other")
        assert other.series_names() == []
        other.series("x")[1] = "other"
        assert s.series("x")[1] == "point"
        assert "other" in s.namespaces()

    def test_series_many_chunks(self, factory: Factory) -> None:
        s = factory()
        t = s.series("big")
        t.extend((i * 3, i) for i in range(3000))
        t.extend((i * 3 + 1, -i) for i in range(0, 3000, 7))  # into the middle of chunks
        expected = {i * 3: i for i in range(3000)}
        expected.update({i * 3 + 1: -i for i in range(0, 3000, 7)})
        assert len(t) == len(expected)
        assert list(t) == sorted(expected)
        window = t.range(3000, 3300)
        assert window == [(k, expected[k]) for k in sorted(expected) if 3000 <= k <= 3300]
        assert t.remove(1000, 7000) == sum(1 for k in expected if 1000 <= k <= 7000)
        left = {k: v for k, v in expected.items() if not 1000 <= k <= 7000}
        assert dict(t.items()) == left
        assert t.last() == (8997, 2999)

    def test_series_values_and_bad_input(self, factory: Factory) -> None:
        s = factory()
        t = s.series("v")
        values: list[Any] = [None, (1, 2), {"a": [1]}, b"x", Decimal("1.5"), dt.date(2020, 1, 1)]
        t.extend(enumerate(values))
        assert [v for _, v in t.range()] == values
        got = t[2]
        got["a"].append(2)
        assert t[2] == {"a": [1]}  # a copy
        with pytest.raises(TypeError):
            t["1"] = 1  # type: ignore[index]
        with pytest.raises(TypeError):
            t[1.5] = 1  # type: ignore[index]
        with pytest.raises(errors.SerializationError):
            t.extend([(10, 1), (11, object())])
        assert 10 not in t  # atomic: nothing stored

    def test_series_deepest_values(self, factory: Factory) -> None:
        # A chunk is one msgpack array: a point nested as deep as the writer allows inside
        # it must read back through every path (whole chunk, windows, edges), and a deeper
        # one is refused whole.
        from ._mapping import _assert_nested, _nested

        t = factory().series("deep")
        t.extend([(1, 0), (2, _nested(list, 1024)), (3, 0)])
        for label, got in (
            ("[]", t[2]),
            ("range", t.range(2, 2)[0][1]),
            ("whole", t.range()[1][1]),
            ("iteration", dict(t.items())[2]),
        ):
            _assert_nested(got, list, 1024, label)
        assert t.first() == (1, 0) and t.last() == (3, 0)
        with pytest.raises(errors.SerializationError):
            t.extend([(4, 4), (5, _nested(list, 1025))])
        assert 4 not in t and len(t) == 3

    def test_series_readonly(self, factory: Factory) -> None:
        if not self.persistent:
            pytest.skip("needs reopen")
        s = factory()
        s.series("t")[1] = 1
        s.close()
        ro = factory(readonly=True)
        t = ro.series("t")
        assert t[1] == 1
        for call in (
            lambda: t.__setitem__(2, 2),
            lambda: t.extend([(2, 2)]),
            lambda: t.__delitem__(1),
            lambda: t.remove(),
        ):
            with pytest.raises(errors.ReadOnlyError):
                call()
        assert t.range() == [(1, 1)]

    def test_series_persistence_and_encryption(self, factory: Factory) -> None:
        if not self.persistent:
            pytest.skip("needs reopen")
        s = factory(password="pw", security="low")
        t = s.series("secret")
        t.extend([(1, "one"), (2, "two")])
        s.series("other")[1] = "x"
        ns = internal_ns("ts", s.namespace)
        chunk_key = next(k for k in s._iter_keys(ns, "C:") if ":secret:" in k)
        other_key = next(k for k in s._iter_keys(ns, "C:") if ":other:" in k)
        raw = s._get(ns, chunk_key)
        assert raw is not None and b"one" not in raw
        s.close()
        s = factory(password="pw", security="low")
        assert s.series("secret").range() == [(1, "one"), (2, "two")]
        # A chunk moved to another series fails authentication, never returns data.
        s._put(ns, other_key, raw, None)
        with pytest.raises(errors.IntegrityError):
            s.series("other").range()
        flipped = bytearray(raw)
        flipped[-1] ^= 1
        s._put(ns, chunk_key, bytes(flipped), None)
        with pytest.raises(errors.IntegrityError):
            s.series("secret")[1]

    @settings(
        max_examples=25,
        deadline=None,
        # Each backend's test class inherits this method with its own factory: running it
        # from several classes ("executors") is the design, not an accident.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.differing_executors,
        ],
    )
    @given(
        steps=st.lists(
            st.one_of(
                st.tuples(st.just("set"), _TS, _VAL),
                st.tuples(st.just("extend"), st.lists(st.tuples(_TS, _VAL), max_size=30)),
                st.tuples(st.just("remove"), st.none() | _TS, st.none() | _TS),
                st.tuples(st.just("del"), _TS),
            ),
            max_size=20,
        ),
        query=st.tuples(st.none() | _TS, st.none() | _TS, st.none() | st.integers(0, 5)),
    )
    def test_series_model(self, factory: Factory, steps: list[Any], query: Any) -> None:
        store = factory(name="model", namespace="m")
        series = store.series("m")
        series.remove()
        model: dict[int, Any] = {}
        for step in steps:
            if step[0] == "set":
                series[step[1]] = step[2]
                model[step[1]] = step[2]
            elif step[0] == "extend":
                series.extend(step[1])
                model.update(dict(step[1]))
            elif step[0] == "remove":
                lo, hi = step[1], step[2]
                removed = series.remove(lo, hi)
                dead = [
                    k
                    for k in model
                    if (lo is None or k >= lo)
                    and (hi is None or k <= hi)
                    and not (lo is not None and hi is not None and lo > hi)
                ]
                assert removed == len(dead)
                for k in dead:
                    del model[k]
            elif step[1] in model:
                del series[step[1]]
                del model[step[1]]
            else:
                with pytest.raises(KeyError):
                    del series[step[1]]
        ordered = sorted(model.items())
        assert list(series.items()) == ordered
        assert len(series) == len(model)
        assert series.first() == (ordered[0] if ordered else None)
        assert series.last() == (ordered[-1] if ordered else None)
        lo, hi, n = query
        want = [(k, v) for k, v in ordered if (lo is None or k >= lo) and (hi is None or k <= hi)]
        if lo is not None and hi is not None and lo > hi:
            want = []
        if n is not None:
            want = want[:n]
        assert series.range(lo, hi, n=n) == want


class EventTests:
    """Event-sequence behaviour every backend must show."""

    persistent: bool = True

    def test_events_rstore_transcript(self, factory: Factory) -> None:
        s = factory()
        e = s.events("e")
        assert e.apply({}, 1000) == {}
        assert s.event_names() == []
        assert e.apply({"a": 1, "b": "x"}, 1000) == {"a": 1, "b": "x"}
        assert e.apply({"a": (operator.add, 5)}, 2000) == {"a": 6, "b": "x"}
        for changes in ({"c": 1}, {}):
            with pytest.raises(errors.EventConflictError):
                e.apply(changes, 2000)
        e.apply({"b": (operator.concat, "y")}, 3000)
        e.apply({"a": (operator.mul, 2)}, 4000)
        assert e.apply({"a": (operator.neg,)}, 5000) == {"a": -12, "b": "xy"}
        assert e.current(with_timestamp=True) == (5000, {"a": -12, "b": "xy"})
        assert e.past(999) == {}
        assert e.past(1000) == e.past(1999) == {"a": 1, "b": "x"}
        assert e.past(2500, with_timestamp=True) == (2000, {"a": 6, "b": "x"})
        assert len(e.events()) == 6
        assert len(e.events(start=2000)) == 4
        assert len(e.events(end=2000)) == 3
        assert len(e.events(start=2000, end=3000)) == 2
        assert e.events(ops=operator.add) == [mappingstore.Event(2000, "a", "add", 5)]
        assert [x.timestamp for x in e.events(ops={operator.neg, "mul"})] == [4000, 5000]
        # An event in the past is replayed in time order.
        assert e.apply({"b": "old"}, 1500) == {"a": -12, "b": "oldy"}
        assert e.apply({"z": 1}, 1600)["z"] == 1
        assert s.event_names() == ["e"]

    def test_events_never_poisoned(self, factory: Factory) -> None:
        s = factory()
        e = s.events("p")
        e.apply({"a": 1}, 10)
        for bad in (
            {"missing": (operator.add, 1)},
            {"missing": (operator.delitem, None)},
            {"missing": (operator.not_,)},
            {"a": (operator.truediv, 0)},
            {"a": (operator.concat, "x")},
        ):
            with pytest.raises(errors.ReplayError):
                e.apply(bad, 20)
        with pytest.raises(errors.ReplayError):
            e.apply({"a": (operator.delitem,)}, 5)  # in the past, before "a" existed
        with pytest.raises(errors.SerializationError):
            e.apply({"b": object()}, 30)
        # (operator.lt, 1) is not a supported change: it is a plain tuple value, and a
        # function cannot be stored, so it is refused before anything is written.
        with pytest.raises(errors.SerializationError):
            e.apply({"u": (operator.lt, 1)}, 30)
        assert len(e.events()) == 1 and e.current() == {"a": 1}
        # A tuple that does not start with a supported operator is a plain value.
        assert e.apply({"t": (1, 2)}, 40)["t"] == (1, 2)
        assert e.apply({"t": (operator.setitem, (3, 4))}, 50)["t"] == (3, 4)

    def test_events_default_timestamp_bumps(self, factory: Factory) -> None:
        now = [1_000_000.0]
        s = factory(clock=lambda: now[0])
        e = s.events("clock")
        e.apply({"a": 1})
        e.apply({"a": 2})
        e.apply({"a": 3}, 5_000_000_000)
        e.apply({"a": 4})
        stamps = [x.timestamp for x in e.events()]
        assert len(set(stamps)) == 4 and stamps == sorted(stamps)

    def test_events_prune_and_remove(self, factory: Factory) -> None:
        s = factory()
        e = s.events("pr")
        for i in range(1, 11):
            e.apply({"n": i, f"k{i % 3}": i}, i * 100)
        before = {t: e.past(t) for t in range(500, 1100, 50)}
        current = e.current(with_timestamp=True)
        assert e.prune(500) > 0
        assert e.current(with_timestamp=True) == current
        assert {t: e.past(t) for t in range(500, 1100, 50)} == before
        assert e.events()[0].op == "snapshot"
        assert e.prune(100) == 0
        e.remove()
        assert s.event_names() == [] and e.current() == {}

    def test_events_many_chunks_and_past_insert(self, factory: Factory) -> None:
        s = factory()
        e = s.events("long")
        model: dict[str, Any] = {}
        for i in range(700):
            e.apply({"count": (operator.add, 1)} if i else {"count": 0}, i * 10)
        model["count"] = 699
        assert e.current() == model
        assert e.past(3000) == {"count": 300}
        e.apply({"extra": "x"}, 5)  # deep in the past: every later chunk is replayed
        assert e.current() == {"count": 699, "extra": "x"}
        e.apply({"count": 1000}, 15)
        assert e.current()["count"] == 1000 + 698
        assert len(e) == 702

    def test_events_readonly_and_persistence(self, factory: Factory) -> None:
        if not self.persistent:
            pytest.skip("needs reopen")
        s = factory(password="pw", security="low")
        s.events("r").apply({"a": 1}, 1)
        s.close()
        ro = factory(readonly=True, password="pw", security="low")
        e = ro.events("r")
        assert e.current() == {"a": 1}
        for call in (lambda: e.apply({"a": 2}), lambda: e.prune(5), e.remove):
            with pytest.raises(errors.ReadOnlyError):
                call()
        assert e.current() == {"a": 1}

    @settings(
        max_examples=25,
        deadline=None,
        # Each backend's test class inherits this method with its own factory: running it
        # from several classes ("executors") is the design, not an accident.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.differing_executors,
        ],
    )
    @given(
        steps=st.lists(
            st.tuples(
                st.integers(0, 60),
                st.dictionaries(
                    st.sampled_from("abc"),
                    st.one_of(
                        st.integers(-5, 5),
                        st.tuples(
                            st.sampled_from([operator.add, operator.mul]), st.integers(-3, 3)
                        ),
                        st.just((operator.delitem, None)),
                        st.just((operator.neg,)),
                    ),
                    max_size=3,
                ),
            ),
            max_size=25,
        )
    )
    def test_events_model(self, factory: Factory, steps: list[Any]) -> None:
        store = factory(name="emodel", namespace="m")
        log = store.events("m")
        log.remove()
        accepted: list[tuple[int, dict[str, Any]]] = []

        def replay(upto: int | None) -> dict[str, Any]:
            state: dict[str, Any] = {}
            for t, changes in sorted(accepted, key=lambda x: x[0]):
                if upto is not None and t > upto:
                    break
                for item, change in changes.items():
                    if isinstance(change, tuple):
                        fn = change[0]
                        if fn is operator.delitem:
                            del state[item]
                        elif fn is operator.neg:
                            state[item] = -state[item]
                        else:
                            state[item] = fn(state[item], change[1])
                    else:
                        state[item] = change
            return state

        for t, changes in steps:
            if t in {ts for ts, _ in accepted}:
                with pytest.raises(errors.EventConflictError):
                    log.apply(changes, t)
            elif not changes:
                assert log.apply(changes, t) == replay(None)  # nothing recorded
            else:
                accepted.append((t, changes))
                try:
                    expected: dict[str, Any] | None = replay(None)
                except KeyError:  # an op on a missing item: the model cannot replay it
                    expected = None
                    accepted.pop()
                if expected is None:
                    with pytest.raises(errors.ReplayError):
                        log.apply(changes, t)
                else:
                    assert log.apply(changes, t) == expected
            assert log.current() == replay(None)
        for probe in range(-1, 62, 7):
            assert log.past(probe) == replay(probe)
