"""Time zones through the codec and typed JSON: a zone is kept by name only when it is a
ZoneInfo opened by name; anything else keeps its instant and offset; nothing is dropped
silently."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from mappingstore import MemoryStore
from mappingstore.errors import SerializationError


class _LookAlike(dt.tzinfo):
    """A tzinfo with a ``key`` attribute that is not a ZoneInfo (UTC+02:00)."""

    key = "Europe/Paris"

    def utcoffset(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=2)

    def dst(self, when: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, when: dt.datetime | None) -> str:
        return "LOOK"


def _round_trips(value: object) -> tuple[object, object]:
    store = MemoryStore()
    store["v"] = value
    copy = MemoryStore()
    copy.import_json(store.export_json())
    return store["v"], copy["v"]


def test_a_look_alike_zone_keeps_its_instant() -> None:
    # It was stored as ZoneInfo(its key) and read back an hour off (CET in January).
    when = dt.datetime(2024, 1, 10, 9, 0, tzinfo=_LookAlike())
    for back in _round_trips(when):
        assert isinstance(back, dt.datetime)
        assert back == when and back.utcoffset() == dt.timedelta(hours=2)
        assert not isinstance(back.tzinfo, ZoneInfo)


def test_a_named_zone_keeps_its_rules() -> None:
    when = dt.datetime(2024, 3, 30, 12, 0, tzinfo=ZoneInfo("Europe/Paris"))
    for back in _round_trips(when):
        assert isinstance(back, dt.datetime) and back.tzinfo == ZoneInfo("Europe/Paris")
        assert (back + dt.timedelta(days=1)).utcoffset() == dt.timedelta(hours=2)


def test_a_time_whose_zone_has_no_offset_is_refused() -> None:
    # It was stored as a naive time: the zone was lost without a word.
    store = MemoryStore()
    with pytest.raises(SerializationError):
        store["t"] = dt.time(9, 30, tzinfo=ZoneInfo("Europe/Paris"))
    assert "t" not in store
    fixed = dt.time(9, 30, tzinfo=dt.timezone(dt.timedelta(hours=1), "CET"))
    for back in _round_trips(fixed):
        assert back == fixed and isinstance(back, dt.time) and back.tzname() == "CET"
