"""mappingstore: keep your data in any store and use it like a dict.

>>> import mappingstore
>>> with mappingstore.open("memory://") as store:
...     store["greeting"] = {"text": "hello", "tags": ("a", "b")}
...     store["greeting"]["tags"]
('a', 'b')
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import errors
from ._adapters import Cached, Prefixed, ReadOnly, Sharded, Tiered
from ._events import Event, EventLog
from ._memory import MemoryStore
from ._registry import known_schemes, open, open_sharded, open_tiered, register_scheme
from ._series import Series
from ._store import FOREVER, Store
from ._tree import View
from .errors import *  # noqa: F403  (the error classes are part of the top-level API)

if TYPE_CHECKING:
    from ._sqlite import SQLiteStore  # type: ignore[import-not-found, unused-ignore]

__version__ = "0.1.0"

__all__ = [
    "FOREVER",
    "Cached",
    "Event",
    "EventLog",
    "MemoryStore",
    "Prefixed",
    "ReadOnly",
    "SQLiteStore",
    "Series",
    "Sharded",
    "Store",
    "Tiered",
    "View",
    "__version__",
    "errors",
    "known_schemes",
    "open",
    "open_sharded",
    "open_tiered",
    "register_scheme",
    *errors.__all__,
]

# A library never configures logging for its user: attach a NullHandler only.
logging.getLogger("mappingstore").addHandler(logging.NullHandler())

_LAZY = {
    "SQLiteStore": "mappingstore._sqlite",
    "SharedMemoryStore": "mappingstore._shm",
    "SharedBytes": "mappingstore._shm",
    "DirectoryStore": "mappingstore._directory",
    "IniStore": "mappingstore._ini",
    "RedisStore": "mappingstore._redis",
    "PostgresStore": "mappingstore._postgres",
}


def __getattr__(name: str) -> Any:
    # Backends import their drivers lazily; `mappingstore.SQLiteStore` still just works.
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mappingstore' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
