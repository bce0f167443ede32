"""The URL scheme registry and :func:`open` (layer 5: the factory).

Schemes map to ``"module:Class"`` strings imported on first use, so opening
``memory://`` never imports a database driver. Backends in other packages register with
:func:`register_scheme` or the ``mappingstore.backends`` entry-point group.
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from ._url import redact
from .errors import InvalidURLError, UnknownSchemeError

if TYPE_CHECKING:
    from ._store import Store

__all__ = ["known_schemes", "open", "register_scheme", "resolve_scheme"]

# Built-in backends. A scheme listed here whose module is missing (a later issue's
# backend, or an optional driver that is not installed) fails with a clear error.
_SCHEMES: dict[str, str] = {
    "memory": "mappingstore._memory:MemoryStore",
    "sqlite": "mappingstore._sqlite:SQLiteStore",
    "shm": "mappingstore._shm:SharedMemoryStore",
    "dir": "mappingstore._directory:DirectoryStore",
    "ini": "mappingstore._ini:IniStore",
    "redis": "mappingstore._redis:RedisStore",
    "rediss": "mappingstore._redis:RedisStore",
    "redis+cluster": "mappingstore._redis:RedisStore",
    "postgresql": "mappingstore._postgres:PostgresStore",
    "postgres": "mappingstore._postgres:PostgresStore",
}
_LOCK = threading.Lock()
_ENTRY_POINTS_LOADED = False


def register_scheme(scheme: str, target: str | type[Store], *, replace: bool = False) -> None:
    """Register a backend for *scheme* (``"module:Class"`` or the class itself).

    The class must offer ``from_url(url, **options) -> Store``.
    """
    scheme = scheme.lower()
    if not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        raise InvalidURLError(f"invalid scheme name {scheme!r}")
    with _LOCK:
        if scheme in _SCHEMES and not replace:
            raise InvalidURLError(f"scheme {scheme!r} is already registered")
        _SCHEMES[scheme] = (
            target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"
        )


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in entry_points(group="mappingstore.backends"):
        with _LOCK:
            _SCHEMES.setdefault(ep.name.lower(), ep.value)


def known_schemes() -> list[str]:
    """Every registered scheme, sorted."""
    _load_entry_points()
    with _LOCK:
        return sorted(_SCHEMES)


def resolve_scheme(scheme: str) -> type[Store]:
    """Import and return the backend class for *scheme*."""
    _load_entry_points()
    with _LOCK:
        target = _SCHEMES.get(scheme.lower())
    if target is None:
        raise UnknownSchemeError(
            f"unknown store scheme {scheme!r}; known schemes: {', '.join(known_schemes())}"
        )
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownSchemeError(
            f"the backend for {scheme}:// cannot be imported ({exc}); is its optional "
            f"dependency installed? e.g. pip install 'mappingstore[{scheme.split('+')[0]}]'"
        ) from exc
    cls: type[Store] = getattr(module, attr)
    return cls


def open(url: str = "memory://", **options: Any) -> Store:
    """Open the store named by *url*.

    ``memory://`` (private), ``memory://NAME`` (shared in the process),
    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite://:memory:``,
    and every scheme in :func:`known_schemes`. Keyword options (``namespace=``,
    ``password=``, ``dot_names=``, ``ttl=``...) override options in the URL query.
    """
    if not isinstance(url, str):
        raise InvalidURLError(f"a store URL must be a str, not {type(url).__qualname__}")
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise InvalidURLError(f"not a store URL (expected scheme://...): {redact(url)!r}")
    cls = resolve_scheme(scheme)
    return cls.from_url(url, **options)  # type: ignore[attr-defined, no-any-return]
