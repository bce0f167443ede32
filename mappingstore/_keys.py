"""Key and namespace validation, done once, in one place (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import InvalidKeyError, KeyTypeError

__all__ = [
    "INTERNAL_PREFIX",
    "MISSING",
    "check_dotted",
    "check_key",
    "check_namespace",
    "internal_ns",
]


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: "No default given" (distinct from ``None``), shared by the store and its views.
MISSING: Any = _Missing()

#: Namespaces that start with NUL are reserved for mappingstore's own records (metadata,
#: time series, event logs). User namespaces may contain NUL anywhere else.
INTERNAL_PREFIX = "\x00"


def check_key(key: Any) -> str:
    """Return *key* as a plain ``str`` or raise; never coerces other types."""
    if type(key) is not str:
        if not isinstance(key, str):
            raise KeyTypeError(f"keys must be str, not {type(key).__qualname__}")
        key = str.__str__(key)  # a str subclass (StrEnum...) is stored as its text
    if not key:
        raise InvalidKeyError("keys must not be empty")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(f"key {key!r} is not valid Unicode text") from exc
    checked: str = key
    return checked


def check_dotted(key: Any) -> str:
    """Like :func:`check_key`, and reject empty dot-name segments (``a..b``, ``.a``, ``a.``)."""
    checked = check_key(key)
    if "." in checked and (checked[0] == "." or checked[-1] == "." or ".." in checked):
        raise InvalidKeyError(f"dot name {checked!r} has an empty segment")
    return checked


def check_namespace(namespace: Any) -> str:
    """Validate a user namespace name."""
    if not isinstance(namespace, str):
        raise KeyTypeError(f"namespace must be str, not {type(namespace).__qualname__}")
    checked = check_key(namespace)
    if checked.startswith(INTERNAL_PREFIX):
        raise InvalidKeyError("namespaces starting with NUL are reserved")
    return checked


def internal_ns(kind: str, namespace: str = "") -> str:
    """The raw namespace of mappingstore's own records of *kind* for user *namespace*.

    ``kind`` never contains NUL, so ``"\\0" + kind + "\\0" + namespace`` is injective.
    """
    return f"{INTERNAL_PREFIX}{kind}{INTERNAL_PREFIX}{namespace}"


def tagged_key(tag: str, name: str) -> str:
    """``tag:<len(name)>:<name>``: the key of *name*'s record of kind *tag* inside an
    internal namespace. The length prefix keeps ``tagged_key(...) + suffix`` injective
    whatever a name holds (NUL and ``:`` included)."""
    return f"{tag}:{len(name)}:{name}"


def tagged_names(keys: Iterable[str], tag: str) -> list[str]:
    """The sorted names of those *keys* that are exactly ``tagged_key(tag, name)``."""
    head = tag + ":"
    names = []
    for key in keys:
        if not key.startswith(head):
            continue
        length, _, rest = key[len(head) :].partition(":")
        if length.isdigit() and len(rest) == int(length):
            names.append(rest)
    return sorted(names)
