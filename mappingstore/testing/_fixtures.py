"""Hostile keys, namespaces and values, a fake clock, and an exact-equality assertion.

These are plain data (no pytest fixtures) so a backend's own tests can reuse them.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
import uuid
from collections import OrderedDict
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

__all__ = [
    "HOSTILE_KEYS",
    "HOSTILE_NAMESPACE_PAIRS",
    "UNSUPPORTED_VALUES",
    "VALUE_SAMPLES",
    "FakeClock",
    "assert_same",
]


class FakeClock:
    """A settable clock for ``clock=``: ``clock()`` returns :attr:`now`; :meth:`advance` moves it.

    Starts at a fixed epoch time far from 0 so that backends storing absolute expiry
    times see realistic numbers. Thread-safe.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        """The current fake time (seconds since the epoch)."""
        return self()

    def advance(self, seconds: float) -> None:
        """Move the clock forward by *seconds*."""
        with self._lock:
            self._now += seconds

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"


#: Keys that break naive backends: path tricks, separators, glob and SQL characters,
#: escapes, look-alikes that Unicode normalisation or case folding would merge, very long
#: keys. Every backend must store, list and read back each of them exactly, all at once.
HOSTILE_KEYS: tuple[str, ...] = (
    "plain",
    "ü",
    "日本語のキー",
    "emoji 🎉",
    "é",  # NFC, composed
    "e\u0301",  # NFD, decomposed: must stay distinct from the composed form
    "\u2126",  # OHM SIGN, NFKC-normalises to the next one
    "\u03a9",  # GREEK CAPITAL LETTER OMEGA
    "ﬁ",  # LATIN SMALL LIGATURE FI (NFKC: "fi")
    "fi",
    "CaseKey",
    "casekey",  # distinct on case-insensitive file systems too
    "x" * 10_000,
    "é" * 5_000,  # 10,000 UTF-8 bytes
    "%",
    "%00",
    "%2F",
    "a%2Fb",
    "100%",
    "/",
    "//",
    "a/b",
    "/leading",
    "trailing/",
    "\\",
    "a\\b",
    ".",
    "..",
    "../escape",
    "a/../b",
    "...",
    ".hidden",
    "\x00",
    "a\x00b",
    "\x00\x00",
    ":",
    "a:b",
    "ns:key",
    ";",
    ",",
    "|",
    "=",
    "&",
    "?",
    "#",
    "#comment",
    ";comment",
    "key = value",
    "[section]",
    "*",
    "?x",
    "[",
    "]",
    "[a-z]",
    "a*",
    "\\*",
    "{tag}",
    "key{1}",
    " ",
    "  leading",
    "trailing  ",
    "\t",
    "\n",
    "line\nbreak",
    "\r\n",
    "\u00a0",  # NO-BREAK SPACE
    "\u2028",  # LINE SEPARATOR
    "\ufeff",  # BOM
    "\x7f",
    "\x1b[31mred",
    "'",
    '"',
    "'; DROP TABLE store; --",
    "$",
    "$bytes",  # a typed-JSON tag as a key
    "~",
    "CON",
    "nul",
    "aux.txt",
    "0",
    "00",
    "-1",
    "1e3",
    "None",
    "true",
    "\U0010ffff",
)

#: Pairs of (namespace, key) whose naive concatenations collide. A backend whose
#: namespace encoding is not injective fails on them.
HOSTILE_NAMESPACE_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("default", "k"), ("default2", "k")),
    (("a*", "k"), ("ab", "k")),
    (("a", "b/c"), ("a/b", "c")),
    (("a", "b:c"), ("a:b", "c")),
    (("a", "b.c"), ("a.b", "c")),
    (("a", "b\x00c"), ("a\x00b", "c")),
    (("a", "%2Fc"), ("a%2F", "c")),
    (("A", "k"), ("a", "k")),
    (("[ab]", "k"), ("a", "k")),
    (("..", "k"), (".", ".k")),
)

_PARIS = ZoneInfo("Europe/Paris")
_NEW_YORK = ZoneInfo("America/New_York")

#: ``(id, value)``: every type the codec supports, with the edges of each.
VALUE_SAMPLES: tuple[tuple[str, Any], ...] = (
    ("none", None),
    ("true", True),
    ("false", False),
    ("zero", 0),
    ("int", 42),
    ("negative", -7),
    ("int64-max", 2**63 - 1),
    ("int64-min", -(2**63)),
    ("uint64-max", 2**64 - 1),
    ("uint64-max+1", 2**64),
    ("int64-min-1", -(2**63) - 1),
    ("huge-int", 3**400),
    ("huge-negative-int", -(7**300)),
    ("float", 3.25),
    ("negative-zero", -0.0),
    ("inf", math.inf),
    ("-inf", -math.inf),
    ("tiny-float", 5e-324),
    ("empty-str", ""),
    ("str", "hello"),
    ("unicode-str", "zürich 日本 🎉 \x00 \ud7ff"),
    ("long-str", "y" * 100_000),
    ("empty-bytes", b""),
    ("bytes", bytes(range(256))),
    ("empty-list", []),
    ("list", [1, "a", None, [2.5, b"x"]]),
    ("empty-tuple", ()),
    ("tuple", (1, "a", (2, 3), [4])),
    ("empty-set", set()),
    ("set", {1, "a", (2, 3), b"x"}),
    ("frozenset", frozenset({1, 2, frozenset({3})})),
    ("empty-dict", {}),
    ("dict", {"a": 1, "b": [1, 2], "c": {"d": None}}),
    ("dict-non-str-keys", {1: "int", (1, 2): "tuple", b"k": "bytes", None: 0, 2.5: "f"}),
    ("dict-bool-key", {True: "yes", False: "no"}),
    ("dict-frozenset-key", {frozenset({1}): 1}),
    ("naive-datetime", _dt.datetime(2024, 2, 29, 23, 59, 59, 999_999)),
    ("utc-datetime", _dt.datetime(2024, 1, 1, 12, tzinfo=_dt.timezone.utc)),
    (
        "named-offset-datetime",
        _dt.datetime(
            2024, 6, 1, 8, 30, tzinfo=_dt.timezone(_dt.timedelta(hours=5, minutes=30), "IST")
        ),
    ),
    ("offset-datetime", _dt.datetime(2024, 6, 1, tzinfo=_dt.timezone(-_dt.timedelta(hours=3)))),
    ("zoneinfo-datetime", _dt.datetime(2024, 7, 14, 10, tzinfo=_PARIS)),
    # 01:30 happens twice in New York that night; fold=1 is the second one (EST).
    ("zoneinfo-fold", _dt.datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=_NEW_YORK)),
    ("datetime-min", _dt.datetime.min),
    ("datetime-max", _dt.datetime.max),
    ("date", _dt.date(1999, 12, 31)),
    ("time", _dt.time(23, 59, 1, 5)),
    ("aware-time", _dt.time(8, tzinfo=_dt.timezone(_dt.timedelta(hours=2)))),
    ("named-offset-time", _dt.time(8, 15, tzinfo=_dt.timezone(_dt.timedelta(hours=2), "CEST"))),
    ("timedelta", _dt.timedelta(days=-3, seconds=5, microseconds=7)),
    ("timedelta-max", _dt.timedelta.max),
    ("decimal", Decimal("1.10")),
    ("decimal-exp", Decimal("-1.5E+400")),
    ("decimal-inf", Decimal("-Infinity")),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("complex", complex(1.5, -2)),
    ("nested", {"rows": [(1, {"s": {2, 3}}), [frozenset({"x"}), {b"k": (None,)}]]}),
    ("deep", [[[[[[[[[[["deep"]]]]]]]]]]]),
)


class _Unsupported:
    pass


#: ``(id, value)``: values that must raise ``SerializationError`` and store nothing.
UNSUPPORTED_VALUES: tuple[tuple[str, Any], ...] = (
    ("object", object()),
    ("custom-class-instance", _Unsupported()),
    ("class", _Unsupported),
    ("function", len),
    ("lambda", lambda: 1),
    ("generator", (i for i in range(3))),
    ("ellipsis", ...),
    ("range", range(3)),
    ("nested-in-list", [1, 2, object()]),
    ("nested-in-dict", {"ok": 1, "bad": {"deeper": object()}}),
    ("nested-in-tuple", (1, (2, _Unsupported()))),
    ("as-dict-key", {_Unsupported(): 1}),
    ("exception", ValueError("x")),
    ("ordered-dict-with-bad-value", OrderedDict(a=object())),
)


def _same_tz(actual: Any, expected: Any, path: str) -> None:
    assert actual.utcoffset() == expected.utcoffset(), f"{path}: utcoffset differs"
    assert actual.tzname() == expected.tzname(), (
        f"{path}: tzname {actual.tzname()!r} != {expected.tzname()!r}"
    )
    assert getattr(actual.tzinfo, "key", None) == getattr(expected.tzinfo, "key", None), (
        f"{path}: zone {actual.tzinfo!r} != {expected.tzinfo!r}"
    )
    assert actual.fold == expected.fold, f"{path}: fold differs"


def assert_same(actual: Any, expected: Any, path: str = "value") -> None:
    """Assert that *actual* equals *expected* with exactly the same types, recursively.

    ``==`` alone is not enough: ``(1,) != [1]`` but ``1 == 1.0 == True``, an aware datetime
    equals the same instant in another zone, and ``Decimal("1.1") == Decimal("1.10")``.
    """
    assert type(actual) is type(expected), (
        f"{path}: type {type(actual).__qualname__} != {type(expected).__qualname__} "
        f"({actual!r:.200} vs {expected!r:.200})"
    )
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), f"{path}: {actual!r} is not NaN"
        else:
            assert actual == expected, f"{path}: {actual!r} != {expected!r}"
            assert math.copysign(1.0, actual) == math.copysign(1.0, expected), (
                f"{path}: sign of zero"
            )
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert list(actual) == list(expected) or set(actual) == set(expected), (
            f"{path}: keys differ"
        )
        for k, e in expected.items():
            assert_same(actual[k], e, f"{path}[{k!r}]")
        # The keys themselves must keep their types too (1 vs 1.0 vs True hash alike).
        assert sorted(map(repr, actual)) == sorted(map(repr, expected)), f"{path}: key types differ"
    elif isinstance(expected, (set, frozenset)):
        assert actual == expected, f"{path}: {actual!r:.200} != {expected!r:.200}"
        assert sorted(map(repr, actual)) == sorted(map(repr, expected)), (
            f"{path}: element types differ"
        )
    elif isinstance(expected, Decimal):
        assert str(actual) == str(expected), f"{path}: {actual!r} != {expected!r}"
    elif isinstance(expected, (_dt.datetime, _dt.time)):
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"
        assert actual.replace(tzinfo=None) == expected.replace(tzinfo=None), f"{path}: wall time"
        _same_tz(actual, expected, path)
    else:
        assert actual == expected, f"{path}: {actual!r:.200} != {expected!r:.200}"
