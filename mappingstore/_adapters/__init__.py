"""Adapters (layer 4): stores made of stores. Each one is itself a :class:`Store`.

:class:`Cached` (an LRU read cache), :class:`Tiered` (fast tiers in front of a slow
one), :class:`Sharded` (keys spread over stores), :class:`ReadOnly` and
:class:`Prefixed`. See ``docs/guides/adapters.md``.
"""

from __future__ import annotations

from ._base import Adapter
from ._cached import Cached, CacheInfo
from ._prefixed import Prefixed
from ._readonly import ReadOnly
from ._sharded import Sharded
from ._tiered import Tiered

__all__ = ["Adapter", "CacheInfo", "Cached", "Prefixed", "ReadOnly", "Sharded", "Tiered"]
