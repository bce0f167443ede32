"""Typed JSON export and import (no I/O beyond the file object the caller passes).

Typed JSON keeps every codec type exact by tagging values JSON cannot hold as one-key
objects whose key starts with ``$``: ``{"$bytes": "<base64>"}``, ``{"$tuple": [...]}``,
``{"$set": [...]}``, ``{"$frozenset": [...]}``, ``{"$datetime": "<ISO>", "zone": ...}``,
``{"$date": ...}``, ``{"$time": ...}``, ``{"$timedelta": [d, s, us]}``,
``{"$decimal": "1.10"}``, ``{"$uuid": "..."}``, ``{"$complex": [re, im]}``,
``{"$int": "<digits>"}`` (beyond 53 bits, so JavaScript readers stay exact),
``{"$float": "nan"|"inf"|"-inf"}``, and ``{"$dict": [[k, v], ...]}`` for a dict with
non-str keys or a key starting with ``$``. Plain JSON (``typed=False``) turns those into
the closest JSON value and cannot be read back exactly.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import re
import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import IO, Any

from ._codec import pack, unpack
from .errors import CorruptValueError, SerializationError

__all__ = ["dump", "from_typed", "load", "to_typed"]

_SAFE_INT = 2**53
#: Plain JSON writes ints below this as numbers, larger ones as a string of digits.
_PLAIN_INT = 10**4000


_INT_TEXT = re.compile(r"-?[0-9]+")


def _digits(value: int) -> str:
    """The decimal digits of *value*, however many (``str(int)`` refuses more than
    ``sys.get_int_max_str_digits()``, 4,300 by default; Decimal's conversion has no limit)."""
    return str(Decimal(value))


def to_typed(value: Any) -> Any:
    """A JSON-safe tagged form of *value* that :func:`from_typed` reverses exactly."""
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return value if -_SAFE_INT < value < _SAFE_INT else {"$int": _digits(value)}
    if t is float:
        if math.isfinite(value):
            return value
        return {"$float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    # map() and zip() instead of comprehensions: no extra Python frame per level, so the
    # deepest value the codec stores (511 levels) converts within the recursion limit.
    if t is list:
        return list(map(to_typed, value))
    if t is dict:
        if all(type(k) is str and not k.startswith("$") for k in value):
            return dict(zip(value, map(to_typed, value.values()), strict=True))
        return {"$dict": [[to_typed(k), to_typed(v)] for k, v in value.items()]}
    if t is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if t in (tuple, set, frozenset):
        return {f"${t.__name__}": list(map(to_typed, value))}
    # Everything else goes through the codec's own extension types, so the JSON form and
    # the stored form can never disagree about a type.
    unpacked = unpack(pack(value))
    if type(unpacked) is not t:
        return to_typed(unpacked)
    value = unpacked  # what a read returns (a zone the codec keeps by offset, by offset)
    if t is _dt.datetime:
        zone = getattr(value.tzinfo, "key", None)
        return _with_tzname(
            {"$datetime": value.isoformat(), "zone": zone, "fold": value.fold}, value.tzinfo
        )
    if t is _dt.date:
        return {"$date": value.isoformat()}
    if t is _dt.time:
        return _with_tzname({"$time": value.isoformat(), "fold": value.fold}, value.tzinfo)
    if t is _dt.timedelta:
        return {"$timedelta": [value.days, value.seconds, value.microseconds]}
    if t is Decimal:
        return {"$decimal": str(value)}
    if t is uuid.UUID:
        return {"$uuid": str(value)}
    if t is complex:
        return {"$complex": [to_typed(value.real), to_typed(value.imag)]}
    raise SerializationError(f"cannot export values of type {t.__qualname__}")


def _with_tzname(obj: dict[str, Any], tz: _dt.tzinfo | None) -> dict[str, Any]:
    # ISO text keeps the offset but not the name of timezone(offset, "CEST").
    from ._codec import _fixed_offset_name

    name = _fixed_offset_name(tz)
    if name is not None:
        obj["tzname"] = name
    return obj


def _named(value: Any, extra: dict[str, Any]) -> Any:
    name = extra.get("tzname")
    if name is None or value.tzinfo is None:
        return value
    return value.replace(tzinfo=_dt.timezone(value.utcoffset(), name))


def to_plain(value: Any) -> Any:
    """The closest plain JSON value (lossy for bytes, tuples, sets, datetimes...)."""
    t = type(value)
    if value is None or t in (bool, str):
        return value
    if t is int:  # json.dumps would call str(int): no number of more than 4,300 digits
        return value if -_PLAIN_INT < value < _PLAIN_INT else _digits(value)
    if t is float:
        return value if math.isfinite(value) else None
    if t in (list, tuple, set, frozenset):
        return list(map(to_plain, value))
    if t is dict:
        return {
            k if type(k) is str else json.dumps(to_plain(k)): to_plain(v) for k, v in value.items()
        }
    if t is bytes:
        return base64.b64encode(value).decode("ascii")
    if t in (_dt.datetime, _dt.date, _dt.time):
        return value.isoformat()
    if t is _dt.timedelta:
        return value.total_seconds()
    if t is complex:
        return [value.real, value.imag]
    return str(value)


def _need(ok: bool, tag: str, what: str, value: Any) -> None:
    if not ok:
        raise CorruptValueError(f"{tag} needs {what}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _extra(extra: dict[str, Any], tag: str, name: str, kinds: tuple[type, ...]) -> Any:
    """The ``name`` field beside *tag* (None when absent), of one of *kinds* or None."""
    value = extra.get(name)
    if value is not None and type(value) not in kinds:
        raise CorruptValueError(f'{tag}\'s "{name}" field has the wrong type: {_shown(value)}')
    return value


def _fold(extra: dict[str, Any], tag: str) -> int:
    fold = extra.get("fold", 0)
    if type(fold) is not int or fold not in (0, 1):
        raise CorruptValueError(f'{tag}\'s "fold" field must be 0 or 1, got {_shown(fold)}')
    return fold


_COLLECTIONS: dict[str, type] = {
    "$tuple": tuple,
    "$set": set,
    "$frozenset": frozenset,
    "$list": list,
}


def _tagged(tag: str, value: Any, extra: dict[str, Any]) -> Any:
    """The value of the typed object ``{tag: value, **extra}``. Every payload's type, size
    and value is checked: anything else raises :class:`CorruptValueError` (a ValueError),
    never an error of the type it would have been built with."""
    try:
        return _build(tag, value, extra)
    except CorruptValueError:
        raise
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        # ValueError: a bad ISO text, UUID, base64; TypeError: an unhashable set item or
        # dict key; ArithmeticError: decimal's InvalidOperation, OverflowError.
        raise CorruptValueError(f"bad {tag} value {_shown(value)}: {exc}") from None


def _build(tag: str, value: Any, extra: dict[str, Any]) -> Any:
    from ._codec import ZoneInfo

    if tag == "$bytes":
        _need(type(value) is str, tag, "base64 text", value)
        return base64.b64decode(value, validate=True)
    if tag in _COLLECTIONS:
        _need(type(value) is list, tag, "a list", value)
        return _COLLECTIONS[tag](map(from_typed, value))
    if tag == "$dict":
        _need(type(value) is list, tag, "a list of [key, value] pairs", value)
        for pair in value:
            _need(type(pair) is list and len(pair) == 2, tag, "[key, value] pairs", pair)
        return {from_typed(k): from_typed(v) for k, v in value}
    if tag == "$int":
        if type(value) is not str or not _INT_TEXT.fullmatch(value):
            raise CorruptValueError(f"$int needs decimal digits, got {_shown(value)}")
        # Through Decimal: int(text) refuses more than sys.get_int_max_str_digits() digits.
        return int(Decimal(value))
    if tag == "$float":
        _need(type(value) is str, tag, 'text ("nan", "inf" or "-inf")', value)
        return float(value)
    if tag == "$datetime":
        _need(type(value) is str, tag, "ISO text", value)
        zone = _extra(extra, tag, "zone", (str,))
        _extra(extra, tag, "tzname", (str,))
        fold = _fold(extra, tag)
        dt = _dt.datetime.fromisoformat(value)
        if zone and ZoneInfo is not None:
            try:
                dt = dt.replace(tzinfo=ZoneInfo(zone))
            except (KeyError, ValueError, OSError):
                # Unknown here (ZoneInfoNotFoundError is a KeyError; with tzdata a
                # directory such as "Europe" raises IsADirectoryError): keep the ISO
                # offset, as the codec does.
                pass
        return _named(dt, extra).replace(fold=fold)
    if tag == "$date":
        _need(type(value) is str, tag, "ISO text", value)
        return _dt.date.fromisoformat(value)
    if tag == "$time":
        _need(type(value) is str, tag, "ISO text", value)
        _extra(extra, tag, "tzname", (str,))
        fold = _fold(extra, tag)
        return _named(_dt.time.fromisoformat(value), extra).replace(fold=fold)
    if tag == "$timedelta":
        _need(
            type(value) is list and len(value) == 3 and all(type(n) is int for n in value),
            tag,
            "[days, seconds, microseconds] (integers)",
            value,
        )
        d, s, us = value
        return _dt.timedelta(days=d, seconds=s, microseconds=us)
    if tag == "$decimal":
        _need(type(value) is str, tag, "text", value)
        return Decimal(value)
    if tag == "$uuid":
        _need(type(value) is str, tag, "text", value)
        return uuid.UUID(value)
    if tag == "$complex":
        _need(type(value) is list and len(value) == 2, tag, "[real, imag]", value)
        real, imag = map(from_typed, value)
        _need(
            type(real) in (int, float) and type(imag) in (int, float),
            tag,
            "two numbers [real, imag]",
            value,
        )
        return complex(real, imag)
    raise CorruptValueError(f"unknown type tag {tag!r}")


def from_typed(value: Any) -> Any:
    """Reverse :func:`to_typed`. A malformed typed object raises :class:`CorruptValueError`."""
    if isinstance(value, list):
        return list(map(from_typed, value))
    if isinstance(value, dict):
        tags = [k for k in value if k.startswith("$")]
        if tags:
            if len(tags) != 1:
                raise CorruptValueError(f"ambiguous typed object with tags {tags}")
            tag = tags[0]
            return _tagged(tag, value[tag], {k: v for k, v in value.items() if k != tag})
        return dict(zip(value, map(from_typed, value.values()), strict=True))
    return value


def dump(pairs: Iterable[tuple[str, Any]], fp: IO[str] | None, *, typed: bool) -> str | None:
    """Write ``{name: value}`` as JSON to *fp*, or return the text when *fp* is None."""
    convert = to_typed if typed else to_plain
    try:
        obj = {name: convert(value) for name, value in pairs}
        if fp is None:
            return json.dumps(obj, ensure_ascii=False, allow_nan=False)
        json.dump(obj, fp, ensure_ascii=False, allow_nan=False)
    except RecursionError as exc:  # the caller's stack was already deep
        raise SerializationError("a value is nested too deeply to export") from exc
    return None


def load(src: str | bytes | IO[str] | IO[bytes]) -> dict[str, Any]:
    """Read JSON written by :func:`dump` (typed tags are restored)."""
    try:
        text = src if isinstance(src, (str, bytes, bytearray)) else src.read()
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("expected a JSON object {name: value}")
        return {k: from_typed(v) for k, v in obj.items()}
    except (ValueError, TypeError, KeyError, ArithmeticError, RecursionError) as exc:
        raise CorruptValueError(f"not valid mappingstore JSON: {exc}") from exc
