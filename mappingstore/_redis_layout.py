"""Redis key names of :class:`~mappingstore.RedisStore` (no I/O): see ``_redis_lua``'s
docstring and ``docs/backends/redis.md`` for the layout and why it is injective."""

from __future__ import annotations

import re
import zlib

__all__ = [
    "BUCKETS",
    "PREFIX_RE",
    "Layout",
    "bucket",
    "count_of",
    "escape_namespace",
    "unescape_namespace",
]

#: A namespace is split over this many buckets (hash tags, so cluster slots).
BUCKETS = 16
#: Allowed key prefixes: no glob characters (never escaped in SCAN MATCH), no braces.
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def escape_namespace(ns: str) -> bytes:
    """Injective escape of a namespace for the hash tag: no ``}`` may appear inside it."""
    return ns.replace("%", "%25").replace("}", "%7D").encode("utf-8")


def unescape_namespace(text: bytes) -> str:
    """Inverse of :func:`escape_namespace` (single pass, left to right)."""
    out = text.decode("utf-8")
    parts = out.split("%")
    result = [parts[0]]
    for part in parts[1:]:
        if part.startswith("25"):
            result.append("%" + part[2:])
        elif part.startswith("7D"):
            result.append("}" + part[2:])
        else:
            raise ValueError("not an escaped namespace")
    return "".join(result)


class Layout:
    """Redis key names of one namespace (computed once per namespace)."""

    __slots__ = ("bases", "count_command", "counters", "flat", "pairs")

    def __init__(self, prefix: bytes, ns: str) -> None:
        esc = escape_namespace(ns)
        self.bases = [prefix + b":{" + esc + b":%02x}:" % b for b in range(BUCKETS)]
        self.pairs = [(base + b"i", base + b"x") for base in self.bases]
        self.flat = [key for pair in self.pairs for key in pair]
        #: The counter of every bucket (``len()``; see ``_redis_lua``).
        self.counters = [base + b"c" for base in self.bases]
        #: ``MGET`` of the counters in wire form (RESP), built once.
        self.count_command = b"*%d\r\n$4\r\nMGET\r\n" % (len(self.counters) + 1) + b"".join(
            b"$%d\r\n%s\r\n" % (len(key), key) for key in self.counters
        )


def count_of(counters: list[bytes | None]) -> int | None:
    """The live record count from an ``MGET`` of ``Layout.counters``, or ``None`` when
    some bucket holds expiring keys (then only the COUNT script, which compares expiry
    times with the server's clock, knows how many are still live).

    A counter is ``index entries + expiry entries * 2**32``: the sum stays below 2**32
    exactly when no bucket has an expiry entry (and the namespace fewer than 2**32 keys;
    beyond that the COUNT script answers too).

    A counter holding anything but an integer (written by another program) also gives
    ``None``: a counter only caches what the index holds, so the COUNT script, which
    reads the index itself, still counts right."""
    try:
        total = sum(map(int, filter(None, counters)))
    except ValueError:
        return None
    return None if total >> 32 else total


def bucket(kb: bytes) -> int:
    """The bucket of a key (its UTF-8 bytes)."""
    return zlib.crc32(kb) & (BUCKETS - 1)
