"""The URL scheme registry and :func:`open` (layer 5: the factory).

Schemes map to ``"module:Class"`` strings imported on first use, so opening
``memory://`` never imports a database driver. Backends in other packages register with
:func:`register_scheme` or the ``mappingstore.backends`` entry-point group.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from ._url import redact
from .errors import InvalidURLError, UnknownSchemeError

if TYPE_CHECKING:
    from ._adapters import Sharded, Tiered
    from ._store import Store

__all__ = [
    "known_schemes",
    "open",
    "open_sharded",
    "open_tiered",
    "register_scheme",
    "resolve_scheme",
]

# Built-in backends. A scheme listed here whose module is missing (a later issue's
# backend, or an optional driver that is not installed) fails with a clear error.
_SCHEMES: dict[str, str | type[Store]] = {
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
# Optional-dependency extra of each built-in scheme whose driver is not a core dependency.
_EXTRAS: dict[str, str] = {
    "redis": "redis",
    "rediss": "redis",
    "redis+cluster": "redis",
    "postgresql": "postgres",
    "postgres": "postgres",
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
        # Keep a class itself: "module:qualname" cannot re-import a class defined in a
        # function (a plugin factory, a test).
        _SCHEMES[scheme] = target


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
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _EXTRAS.get(scheme.lower())
        hint = (
            f"pip install 'mappingstore[{extra}]'"
            if extra
            else "pip install the package that provides this backend"
        )
        raise UnknownSchemeError(
            f"the backend for {scheme}:// cannot be imported ({exc}); "
            f"is its dependency installed? ({hint})"
        ) from exc
    cls: type[Store] = getattr(module, attr)
    return cls


def open(url: str = "memory://", **options: Any) -> Store:
    """Open the store named by *url*.

    ``memory://`` (private), ``memory://NAME`` (shared in the process),
    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite://:memory:``,
    and every scheme in :func:`known_schemes`. Keyword options (``namespace=``,
    ``password=``, ``dot_names=``, ``ttl=``...) override options in the URL query.

    Adapters compose from options, in the URL query or as keywords: ``key_prefix="p:"`` wraps
    the store in :class:`~mappingstore.Prefixed`, ``cache=N`` (with ``cache_ttl=S``) in
    :class:`~mappingstore.Cached`; e.g. ``open("sqlite:///a.db?cache=1000")``. Closing the
    result closes the store it wraps.
    """
    if not isinstance(url, str):
        raise InvalidURLError(f"a store URL must be a str, not {type(url).__qualname__}")
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise InvalidURLError(f"not a store URL (expected scheme://...): {redact(url)!r}")
    cls = resolve_scheme(scheme)
    url, layers = _adapter_options(url, options)
    try:
        store: Store = cls.from_url(url, **options)  # type: ignore[attr-defined]
    except TypeError as exc:
        # Python's own error for a keyword no constructor takes; turned into ours (still a
        # TypeError) when it names one of the caller's options, never any other TypeError.
        match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if match is None or match.group(1) not in options:
            raise
        from .errors import OptionTypeError

        raise OptionTypeError(
            f"{cls.__name__} has no option {match.group(1)!r} (see its docs page)"
        ) from exc
    return _wrap(store, layers) if layers else store


# -- adapter composition (docs/guides/adapters.md) ---------------------------------------

#: Options open() handles itself by wrapping the store in adapters; they never reach the
#: backend, whose URL parser rejects unknown query options. "key_prefix", not "prefix":
#: RedisStore has its own native ``prefix`` option, which must keep working.
_ADAPTER_OPTIONS = ("cache", "cache_ttl", "key_prefix")


def _adapter_options(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Take ``cache``, ``cache_ttl`` and ``key_prefix`` out of *url*'s query and *options*
    (a keyword wins over the URL); return the URL without them and their values."""
    import urllib.parse

    from .errors import InvalidOptionError

    head, qmark, rest = url.partition("?")
    query, hsh, fragment = rest.partition("#")
    layers: dict[str, Any] = {}
    kept: list[str] = []
    for part in query.split("&") if qmark else ():
        name = urllib.parse.unquote_plus(part.partition("=")[0])
        if name not in _ADAPTER_OPTIONS:
            kept.append(part)
            continue
        if name in layers:
            raise InvalidURLError(f"URL option {name!r} given twice")
        text = urllib.parse.unquote_plus(part.partition("=")[2])
        try:
            layers[name] = (
                text if name == "key_prefix" else (int if name == "cache" else float)(text)
            )
        except ValueError as exc:
            raise InvalidOptionError(f"URL option {name}={text!r} is not a number") from exc
    if layers:
        url = head + ("?" + "&".join(kept) if kept else "") + hsh + fragment
    for name in _ADAPTER_OPTIONS:
        if name in options:
            layers[name] = options.pop(name)
    if layers.get("cache") in (None, 0):
        if layers.get("cache_ttl") is not None:
            raise InvalidOptionError("cache_ttl= needs cache=N (the number of cached items)")
        layers.pop("cache", None)
        layers.pop("cache_ttl", None)
    if layers.get("key_prefix") is None:
        layers.pop("key_prefix", None)
    return url, layers


def _wrap(store: Store, layers: dict[str, Any]) -> Store:
    """Wrap *store*: the prefix inside, the cache outside (it caches the user's keys)."""
    from ._adapters import Cached, Prefixed

    try:
        if "key_prefix" in layers:
            store = Prefixed(store, layers["key_prefix"], close_inner=True)
        if "cache" in layers:
            store = Cached(store, layers["cache"], layers.get("cache_ttl"), close_inner=True)
    except BaseException:
        store.close()
        raise
    return store


def _open_all(urls: Any, options: dict[str, Any]) -> list[Store]:
    if isinstance(urls, str) or not hasattr(urls, "__iter__"):
        from .errors import OptionTypeError

        raise OptionTypeError("expected a list of store URLs")
    stores: list[Store] = []
    try:
        for url in urls:
            stores.append(open(url, **options))
    except BaseException:
        for store in stores:
            store.close()
        raise
    return stores


def open_tiered(urls: Iterable[str], **options: Any) -> Tiered:
    """Open each URL (fastest first) with *options* and stack them in a
    :class:`~mappingstore.Tiered`; closing it closes every tier."""
    from ._adapters import Tiered

    stores = _open_all(urls, options)
    try:
        return Tiered(stores, close_inner=True)
    except BaseException:
        for store in stores:
            store.close()
        raise


def open_sharded(
    urls: Iterable[str],
    placement: Callable[[str], int] | None = None,
    *,
    names: Sequence[str] | None = None,
    **options: Any,
) -> Sharded:
    """Open each URL with *options* and spread keys over them with a
    :class:`~mappingstore.Sharded`; closing it closes every shard."""
    from ._adapters import Sharded

    stores = _open_all(urls, options)
    try:
        return Sharded(stores, placement, names=names, close_inner=True)
    except BaseException:
        for store in stores:
            store.close()
        raise
