"""``mappingstore.aio``: the async API, for use from ``asyncio`` code.

``store = await mappingstore.aio.open(url, **options)`` gives an :class:`AsyncStore` whose
methods are coroutines with exactly the semantics and the errors of the sync
:class:`~mappingstore.Store` (the same codec, encryption, key checks and URL parsing: it
wraps the sync store). Redis and PostgreSQL run their hot operations with native async
I/O (``redis.asyncio``, psycopg's async connections; ``_redis.py``, ``_postgres.py``);
everything else runs the sync store's methods on a worker thread. See
``docs/guides/async.md``.
"""

from __future__ import annotations

from ._store import AsyncEventLog, AsyncSeries, AsyncStore, open

__all__ = ["AsyncEventLog", "AsyncSeries", "AsyncStore", "open"]
