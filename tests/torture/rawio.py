"""Raw access to a backend's storage: read and write the record bytes of (namespace, key).

The garbage and encryption torture tests plant bytes straight into the backing storage,
bypassing the store's codec and cipher, then read them back through the public API.
Each backend is reached the way an attacker or a damaged disk would reach it, following
the documented layouts:

* SQLite: the ``value`` column of the store's table, through the ``sqlite3`` module;
* directory: the key's record file (``docs/backends/directory.md``: a checked file header
  and the key, then the value record), rewritten in place;
* INI: the option's text in the file (``!ms1:`` + base64 of the record), the file
  replaced as a text editor would;
* PostgreSQL: the ``value`` column of the store's table, through psycopg;
* Redis: the record's Redis string ``<prefix>:{<ns>:<bucket>}:k:<key>`` (``_redis_lua``);
* shared memory: the segment layout is internal, so through the backend's raw record
  methods (``_put`` / ``_get_record``) of a handle opened with ``encrypt=False``.

Names are kept simple (no dots, ASCII) where the INI layout would split them.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import mappingstore
from mappingstore import Store
from mappingstore._codec import pack, wrap_plain
from tests.servers import POSTGRES_URL, REDIS_URL
from tests.torture.harness import Target

__all__ = ["META_NS", "NO_FSYNC", "RawIO", "raw_get", "raw_put"]

#: The internal namespace holding the store id and the key slot (``_store._META_NS``).
META_NS = "\x00meta\x00"

#: Open options that skip fsync on the file backends that have them (for tests about what
#: is read back, not about power loss).
NO_FSYNC: dict[str, dict[str, Any]] = {"dir": {"durable": False}, "ini": {"durable": False}}
_INI_TAG = "!ms1:"
_DIR_MAGIC = b"\x93MSD"
_DIR_HEAD = struct.Struct(">4sBBHdII")


# -- directory: names and record files (docs/backends/directory.md) -----------------------

_DIR_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_DIR_RESERVED = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{d}{i}" for d in ("com", "lpt") for i in range(10)]
)


def _dir_name(text: str) -> str:
    """The documented file name of *text* (short names only: no hashing)."""
    out = "".join(
        ch
        if ch in _DIR_SAFE
        else "^" + ch.lower()
        if "A" <= ch <= "Z"
        else "".join(f"%{b:02x}" for b in ch.encode("utf-8"))
        for ch in text
    )
    if out[0] == ".":
        out = "%2e" + out[1:]
    if out[-1] == ".":
        out = out[:-1] + "%2e"
    if out.split(".", 1)[0] in _DIR_RESERVED:
        out = f"%{ord(out[0]):02x}" + out[1:]
    assert len(out) <= 140, "long names are hashed: not supported here"
    return out


def _dir_file(key: str, data: bytes) -> bytes:
    kb = key.encode("utf-8")
    head = _DIR_HEAD.pack(_DIR_MAGIC, 1, 0, 0, 0.0, len(kb), 0)[:20]
    crc = zlib.crc32(kb, zlib.crc32(head))
    return head + crc.to_bytes(4, "big") + kb + data


def _dir_data(raw: bytes) -> bytes:
    magic, version, _flags, _, _exp, klen, crc = _DIR_HEAD.unpack_from(raw)
    end = _DIR_HEAD.size + klen
    assert magic == _DIR_MAGIC and version == 1
    assert zlib.crc32(raw[_DIR_HEAD.size : end], zlib.crc32(raw[:20])) == crc
    return raw[end:]


# -- INI: sections and options (docs/backends/ini.md) ---------------------------------------


def _ini_escape(text: str, special: str) -> str:
    last = len(text) - 1
    return "".join(
        "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        if ch in special or ch == "%" or not ch.isprintable() or (ch == " " and i in (0, last))
        else ch
        for i, ch in enumerate(text)
    )


def _ini_header(ns: str) -> str | None:
    """The section header holding the dot-less keys of *ns* (None: before any header)."""
    if ns == "default":
        return None
    return f"[{_ini_escape(ns, ':[]')}::]"


def _ini_option(key: str) -> str:
    assert "." not in key or key.startswith("."), "dotted keys live in other sections"
    return _ini_escape(key, "=:#;[]")


class _IniFile:
    """The lines of an INI file, edited as text."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, encoding="utf-8") as f:
            self.lines = f.read().split("\n")

    def _section_bounds(self, ns: str) -> tuple[int, int] | None:
        header = _ini_header(ns)
        start = 0
        if header is not None:
            try:
                start = self.lines.index(header) + 1
            except ValueError:
                return None
        end = start
        while end < len(self.lines) and not self.lines[end].startswith("["):
            end += 1
        return start, end

    def _find(self, ns: str, key: str) -> int | None:
        bounds = self._section_bounds(ns)
        if bounds is None:
            return None
        option = _ini_option(key)
        for i in range(*bounds):
            name, sep, _ = self.lines[i].partition("=")
            if sep and name.strip() == option:
                return i
        return None

    def get(self, ns: str, key: str) -> bytes:
        at = self._find(ns, key)
        assert at is not None, f"no option {key!r} in namespace {ns!r}"
        text = self.lines[at].partition("=")[2].strip()
        if text.startswith(_INI_TAG):
            return base64.b64decode(text[len(_INI_TAG) :], validate=True)
        # A JSON literal: the record is its canonical plain encoding.
        return wrap_plain(pack(json.loads(text)))

    def put(self, ns: str, key: str, data: bytes) -> None:
        line = f"{_ini_option(key)} = {_INI_TAG}{base64.b64encode(data).decode('ascii')}"
        at = self._find(ns, key)
        if at is not None:
            self.lines[at] = line
            return
        bounds = self._section_bounds(ns)
        if bounds is None:
            header = _ini_header(ns)
            assert header is not None
            if self.lines and self.lines[-1] == "":
                self.lines.pop()
            self.lines += [header, line, ""]
        else:
            self.lines.insert(bounds[0], line)

    def save(self) -> None:
        # Replaced, as an editor saving the file would: the store sees a new file.
        tmp = f"{self.path}.raw-edit"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(self.lines))
        os.replace(tmp, self.path)


# -- Redis: record keys (mappingstore/_redis_lua.py) ----------------------------------------


def _redis_names(prefix: str, ns: str, key: str) -> tuple[bytes, bytes]:
    """(record key, index key) of *key* in *ns*: 16 buckets by CRC-32 of the key."""
    kb = key.encode("utf-8")
    esc = ns.replace("%", "%25").replace("}", "%7D").encode("utf-8")
    base = prefix.encode() + b":{" + esc + b":%02x}:" % (zlib.crc32(kb) & 15)
    return base + b"k:" + kb, base + b"i"


class RawIO:
    """Raw record access to one target's storage; open it in the process that uses it."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.backend = target.backend
        self._conn: Any = None
        if self.backend == "sqlite":
            self._conn = sqlite3.connect(str(target.path), timeout=30, isolation_level=None)
            self._conn.execute("PRAGMA synchronous = OFF")  # this session only: no fsync
            from mappingstore._sqlite import NS_TABLE, TABLE

            self._table = TABLE
            # Rows name their namespace by its id in the side table NS_TABLE.
            self._ns_id = f"(SELECT id FROM {NS_TABLE} WHERE name = ?)"
        elif self.backend == "postgres":
            import psycopg

            self._conn = psycopg.connect(POSTGRES_URL, autocommit=True)
            # Each raw write commits on its own; not waiting for the WAL flush keeps a
            # write-then-read loop fast (it affects only this session's durability).
            self._conn.execute("SET synchronous_commit = off")
        elif self.backend == "redis":
            import redis

            self._conn = redis.Redis.from_url(REDIS_URL)
        elif self.backend == "shm":
            self._conn = mappingstore.open(target.url, encrypt=False)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RawIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --

    def get(self, ns: str, key: str) -> bytes:
        """The stored record bytes of (ns, key) (which must exist)."""
        b = self.backend
        if b == "sqlite":
            row = self._conn.execute(
                f"SELECT value FROM {self._table} WHERE ns_id = {self._ns_id} AND key = ?",
                (ns, key),
            ).fetchone()
            assert row is not None, (ns, key)
            return bytes(row[0])
        if b == "postgres":
            from psycopg import sql

            row = self._conn.execute(
                sql.SQL("SELECT value FROM {} WHERE ns = %s AND key = %s").format(
                    sql.Identifier(self.target.name)
                ),
                (ns.encode(), key.encode()),
            ).fetchone()
            assert row is not None, (ns, key)
            return bytes(row[0])
        if b == "redis":
            value = self._conn.get(_redis_names(self.target.name, ns, key)[0])
            assert value is not None, (ns, key)
            return bytes(value)
        if b == "shm":
            rec = self._conn._get_record(ns, key)
            assert rec is not None, (ns, key)
            return bytes(rec[0])
        if b == "dir":
            with open(self._dir_path(ns, key), "rb") as f:
                return _dir_data(f.read())
        if b == "ini":
            return _IniFile(str(self.target.path)).get(ns, key)
        raise ValueError(b)

    def get_many(self, places: Sequence[tuple[str, str]]) -> list[bytes]:
        """The stored record bytes of many (ns, key) (an INI file is parsed once)."""
        if self.backend == "ini":
            doc = _IniFile(str(self.target.path))
            return [doc.get(ns, key) for ns, key in places]
        return [self.get(ns, key) for ns, key in places]

    # -- writing --

    def put(self, ns: str, key: str, data: bytes) -> None:
        """Replace the stored record bytes of (ns, key)."""
        self.put_many([(ns, key, data)])

    def put_many(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        """Replace the records of many (ns, key) at once (one transaction or pipeline).

        Each (ns, key) must already hold a record (written through a store), so the
        backend's own indexes (Redis's key index, a namespace directory) list it.
        """
        b = self.backend
        if b == "sqlite":
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.executemany(
                    f"UPDATE {self._table} SET value = ? WHERE ns_id = {self._ns_id} AND key = ?",
                    [(data, ns, key) for ns, key, data in items],
                )
                assert cur.rowcount == len(items), "every raw write needs an existing record"
            finally:
                self._conn.execute("COMMIT")
        elif b == "postgres":
            from psycopg import sql

            query = sql.SQL("UPDATE {} SET value = %s WHERE ns = %s AND key = %s").format(
                sql.Identifier(self.target.name)
            )
            with self._conn.cursor() as cur:
                cur.executemany(
                    query, [(data, ns.encode(), key.encode()) for ns, key, data in items]
                )
                assert cur.rowcount == len(items), "every raw write needs an existing record"
        elif b == "redis":
            pipe = self._conn.pipeline(transaction=False)
            for ns, key, data in items:
                pipe.set(_redis_names(self.target.name, ns, key)[0], data, xx=True)
            assert all(pipe.execute()), "every raw write needs an existing record"
        elif b == "shm":
            for ns, key, data in items:
                self._conn._put(ns, key, data, None)
        elif b == "dir":
            for ns, key, data in items:
                path = self._dir_path(ns, key)
                assert os.path.exists(path), "every raw write needs an existing record"
                with open(path, "r+b") as f:
                    f.write(_dir_file(key, data))
                    f.truncate()
        elif b == "ini":
            doc = _IniFile(str(self.target.path))
            for ns, key, data in items:
                doc.put(ns, key, data)
            doc.save()
        else:
            raise ValueError(b)

    def _dir_path(self, ns: str, key: str) -> str:
        return os.path.join(str(self.target.path), _dir_name(ns), _dir_name(key))


def raw_get(target: Target, store: Store, key: str) -> bytes:
    """The record bytes of *key* in *store*'s namespace, read from the storage itself."""
    with RawIO(target) as raw:
        return raw.get(store.namespace, key)


def raw_put(target: Target, store: Store, key: str, data: bytes) -> None:
    """Write *data* as the record of *key* in *store*'s namespace, in the storage itself."""
    with RawIO(target) as raw:
        raw.put(store.namespace, key, data)
