"""INI file backend (``ini:///relative/file.ini``, ``ini:////absolute/file.ini``).

The file stays one that people read and edit (format in ``docs/backends/ini.md``):

* a key ``a.b.c`` is option ``c`` of section ``[a.b]`` (split at the last dot when both
  sides are non-empty); any other key is an option before the first section header;
* values JSON can express exactly are JSON literals (``port = 8080``, ``name = "web"``);
  anything else, and every encrypted value, is ``!ms1:`` + base64 of the value record;
  a hand-written value that is not a JSON literal reads back as a plain string;
* another namespace ``N`` uses sections ``[N::section]`` (``[N::]`` for its plain keys);
  metadata and expiry times live in such sections of reserved namespaces that start with
  NUL (written ``%00``): ``[%00meta%00::]``, ``[%00ttl%00<namespace>::]``;
* names are escaped reversibly with ``%XX`` (UTF-8) where INI cannot hold them as they
  are; comments, blank lines, unknown lines and their order survive every write.

This module has its own small reader and writer: ``configparser`` lower-cases option
names, interpolates ``%`` and drops comments on write.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

from ._codec import PLAIN_HEADER, decode_plain, pack, wrap_plain
from ._filelock import (
    LOCKED_FILE_OPTIONS,
    LockHandle,
    fsync_dir,
    io_errors,
    lock_timeout_option,
    locked_file_url,
    renew_after_fork,
)
from ._keys import INTERNAL_PREFIX, internal_ns
from ._store import Op, Record, Store
from ._url import file_path, parse_url
from .errors import (
    BackendError,
    CorruptValueError,
    InvalidOptionError,
    MappingStoreError,
    SerializationError,
    StoreCorruptError,
    StoreNotFoundError,
)

__all__ = ["IniStore"]

T = TypeVar("T")

#: Prefix of a value stored as base64 of its record (non-JSON types, encrypted values).
TAG = "!ms1:"
DEFAULT_NS = "default"
_NS_SEP = "::"

_OPTION_SPECIAL = re.compile(r"[%=:#;\[\]]")
_SECTION_SPECIAL = re.compile(r"[%:\[\]]")


def _escape(text: str, special: re.Pattern[str]) -> str:
    """Escape what INI cannot hold as is: *special* characters, ``%``, every character
    that is not printable (newlines, NUL, tabs, U+2028...) and spaces at either end."""
    if text.isprintable() and not special.search(text) and text.strip(" ") == text:
        return text
    out = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if special.match(ch) or not ch.isprintable() or (ch == " " and (i == 0 or i == last)):
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8")))
        else:
            out.append(ch)
    return "".join(out)


def _unescape(text: str) -> str:
    # Lenient for hand-written names: a "%" not followed by two hex digits stays as is.
    return urllib.parse.unquote(text) if "%" in text else text


_TTL_NS: dict[str, str] = {}


def _ttl_ns(ns: str) -> str:
    """The reserved namespace holding the expiry times of *ns* (memoised: hot path)."""
    name = _TTL_NS.get(ns)
    if name is None:
        if len(_TTL_NS) > 1024:
            _TTL_NS.clear()
        name = _TTL_NS[ns] = internal_ns("ttl", ns)
    return name


def _place(ns: str, key: str) -> tuple[str, str]:
    """``(section, option)`` of *key*: split at the last dot when both sides are non-empty."""
    if not ns.startswith(INTERNAL_PREFIX):
        dot = key.rfind(".")
        if 0 < dot < len(key) - 1:
            return key[:dot], key[dot + 1 :]
    return "", key


def _header(ns: str, section: str) -> str:
    sec = _escape(section, _SECTION_SPECIAL)
    if ns == DEFAULT_NS:
        return f"[{sec}]"
    return f"[{_escape(ns, _SECTION_SPECIAL)}{_NS_SEP}{sec}]"


def _parse_header(inner: str) -> tuple[str | None, str]:
    """``(namespace, section)`` of a header's text; namespace ``None`` if unusable."""
    cut = inner.find(_NS_SEP)
    if cut < 0:
        return DEFAULT_NS, _unescape(inner.strip())
    ns = _unescape(inner[:cut].strip())
    return (ns or None), _unescape(inner[cut + len(_NS_SEP) :].strip())


# -- values --------------------------------------------------------------------------------


def _json_exact(value: Any) -> bool:
    """True if JSON carries *value* with its exact types (no tuple, no NaN, str keys)."""
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return True
    if t is float:
        return math.isfinite(value)
    if t is list:
        return all(_json_exact(v) for v in value)
    if t is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return False


def value_text(data: bytes) -> str:
    """The INI text of a record: a readable JSON literal when that round-trips to the very
    same bytes, else the tagged base64 form."""
    if data[:2] == PLAIN_HEADER:
        try:
            value = decode_plain(data)
            if _json_exact(value) and wrap_plain(pack(value)) == data:
                text = json.dumps(value, ensure_ascii=False, allow_nan=False)
                if not text.isprintable():  # U+2028, DEL...: keep every line one line
                    text = json.dumps(value, allow_nan=False)
                return text
        except (MappingStoreError, ValueError, RecursionError):
            pass
    return TAG + base64.b64encode(data).decode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refused when it is out of range (``1e400``): JSON has no
    infinity, so such a hand-written value reads as the text, as ``NaN`` does."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def record_of(text: str) -> bytes:
    """The record of an INI value text (the inverse of :func:`value_text`)."""
    if text.startswith(TAG):
        try:
            return base64.b64decode(text[len(TAG) :], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CorruptValueError(f"damaged {TAG} value in the INI file") from exc
    try:
        value: Any = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        value = text  # hand-written text that is not a JSON literal: a plain string
    try:
        return wrap_plain(pack(value))
    except SerializationError:
        # A JSON literal no value can hold (a lone surrogate such as "\ud800", nested
        # deeper than the codec allows): the text as written, as for any other text.
        try:
            return wrap_plain(pack(text))
        except SerializationError as exc:
            raise CorruptValueError("an INI value is not valid text") from exc


# -- the document --------------------------------------------------------------------------


#: What a line of the fast path in :meth:`_Doc.parse` may not start with (nor end with,
#: nor have around its "name = "): whitespace as ``str.strip`` sees it, and the starts
#: of comments and section headers.
_SPACE = frozenset(ch for ch in map(chr, range(0x3001)) if ch.isspace())
_NOT_NAME_START = _SPACE | frozenset("#;[")
#: Off only in the tests that compare both paths.
_FAST_PATH = True


class _Line:
    """One line of the file (with its continuation lines); an option if ``key`` is set."""

    __slots__ = ("dead", "expiry", "head", "key", "ns", "record", "section", "sep", "text", "value")

    def __init__(self, text: str, sep: bool = False) -> None:
        self.text = text
        self.sep = sep  # a blank line this module added between sections
        self.dead = False
        self.section: _Section | None = None
        self.ns: str | None = None
        self.key: str | None = None
        self.head = ""  # "name = " as written, kept when the value changes
        self.value = ""
        self.record: bytes | None = None
        self.expiry: float | None = None

    def set_value(self, text: str, record: bytes | None) -> None:
        self.value = text
        self.text = self.head + text
        self.record = record
        self.expiry = None


class _Section:
    __slots__ = ("header", "lines", "name", "ns", "touched")

    def __init__(self, ns: str | None, name: str, header: str | None) -> None:
        self.ns = ns
        self.name = name
        self.header = header
        self.lines: list[_Line] = []
        self.touched = False  # lost a line: dropped on write if nothing but blanks is left


class _Doc:
    """The parsed file: every line in order, plus an index of the options by key."""

    def __init__(self) -> None:
        self.sections: list[_Section] = [_Section(DEFAULT_NS, "", None)]
        self.index: dict[str, dict[str, _Line]] = {}
        self.by_name: dict[tuple[str, str], _Section] = {(DEFAULT_NS, ""): self.sections[0]}
        self.dups: dict[tuple[str, str], list[_Line]] = {}  # earlier, shadowed copies
        self.newline = "\n"
        self.bom = False
        self.dirty = False

    # -- reading the file --

    @classmethod
    def parse(cls, text: str) -> _Doc:
        doc = cls()
        if text.startswith("\ufeff"):
            doc.bom, text = True, text[1:]
        if "\r\n" in text:
            doc.newline = "\r\n"
            text = text.replace("\r\n", "\n")
        raw_lines = text.split("\n")  # never str.splitlines: it splits on U+2028 too
        if raw_lines and raw_lines[-1] == "":
            raw_lines.pop()
        sec = doc.sections[0]
        last: _Line | None = None
        indent = 0
        fast = _FAST_PATH
        for raw in raw_lines:
            # Fast path: "name = value" as this module writes it (no leading or trailing
            # space, no "=" or ":" in the name, one space around "="). It gives exactly
            # what the general path below would.
            eq = raw.find(" = ") if fast else -1
            if (
                eq > 0
                and raw[0] not in _NOT_NAME_START
                and raw[eq - 1] not in _SPACE
                and len(raw) > eq + 3
                and raw[eq + 3] not in _SPACE
                and raw[-1] not in _SPACE
                and raw.find("=", 0, eq) < 0
                and raw.find(":", 0, eq) < 0
            ):
                line = _Line(raw)
                line.head = raw[: eq + 3]
                line.value = raw[eq + 3 :]
                sec.lines.append(line)
                last, indent = line, 0
                if sec.ns is not None:
                    option = raw[:eq]
                    if "%" in option:
                        option = _unescape(option)
                    doc.register(sec, sec.ns, line, f"{sec.name}.{option}" if sec.name else option)
                continue
            stripped = raw.strip()
            lead = len(raw) - len(raw.lstrip())
            if last is not None and stripped and lead > indent:
                # A continuation line (configparser's multi-line value).
                last.text += "\n" + raw
                last.value += "\n" + stripped
                continue
            last = None
            line = _Line(raw)
            if not stripped or stripped[0] in "#;":
                sec.lines.append(line)
                continue
            if stripped[0] == "[":
                close = stripped.find("]")
                if close > 0:
                    ns, name = _parse_header(stripped[1:close])
                    sec = _Section(ns, name, raw)
                    doc.sections.append(sec)
                    if ns is not None:
                        doc.by_name.setdefault((ns, name), sec)
                    continue
            cut = min((i for i in (raw.find("="), raw.find(":")) if i >= 0), default=-1)
            name_text = raw[:cut].strip() if cut > 0 else ""
            if not name_text:
                sec.lines.append(line)  # not an option: kept verbatim, never read
                continue
            rest = raw[cut + 1 :]
            line.head = raw[: cut + 1] + rest[: len(rest) - len(rest.lstrip())]
            if not line.head[-1].isspace() and raw[cut - 1].isspace():
                line.head += " "
            line.value = rest.strip()
            sec.lines.append(line)
            last, indent = line, lead
            if sec.ns is not None:
                option = _unescape(name_text)
                doc.register(sec, sec.ns, line, f"{sec.name}.{option}" if sec.name else option)
        return doc

    def register(self, sec: _Section, ns: str, line: _Line, key: str) -> None:
        line.ns, line.key, line.section = ns, key, sec
        bucket = self.index.setdefault(ns, {})
        old = bucket.get(key)
        if old is not None:  # the same key written twice by hand: the last one wins
            self.dups.setdefault((ns, key), []).append(old)
        bucket[key] = line

    def compact(self) -> None:
        """Forget removed lines, and sections that removals left empty (with the blank
        lines that only separated them)."""
        kept: list[_Section] = []
        dropped_last = False
        for sec in self.sections:
            dropped_last = False
            if sec.touched:
                sec.lines = [line for line in sec.lines if not line.dead]
                sec.touched = False
                if not any(x.text.strip() for x in sec.lines):
                    if sec.header is None:
                        sec.lines = []  # an emptied preamble leaves no blank lines
                    else:
                        if sec.ns is not None and self.by_name.get((sec.ns, sec.name)) is sec:
                            del self.by_name[(sec.ns, sec.name)]
                        dropped_last = True
                        continue
            kept.append(sec)
        if dropped_last:
            lines = kept[-1].lines
            while lines and not lines[-1].text.strip():
                lines.pop()
        self.sections = kept

    def render(self) -> bytes:
        self.compact()
        out: list[str] = []
        trailing_sep = False
        for sec in self.sections:
            if sec.header is not None:
                out.append(sec.header)
                trailing_sep = False
            for line in sec.lines:
                if line.sep:
                    # A separator we added goes where it no longer separates anything.
                    if out and out[-1].strip():
                        out.append("")
                        trailing_sep = True
                    continue
                out.append(line.text)
                trailing_sep = False
        if trailing_sep:
            out.pop()
        text = "\n".join(out)
        if out:
            text += "\n"
        if self.newline != "\n":
            text = text.replace("\n", self.newline)
        return (("\ufeff" if self.bom else "") + text).encode("utf-8")

    # -- lookups --

    def record(self, line: _Line) -> bytes:
        rec = line.record
        if rec is None:
            rec = line.record = record_of(line.value)
        return rec

    def expires(self, ns: str, key: str) -> float | None:
        ttl = self.index.get(_ttl_ns(ns))
        if not ttl:
            return None
        line = ttl.get(key)
        if line is None:
            return None
        if line.expiry is None:
            try:
                line.expiry = float(line.value)
            except ValueError:
                line.expiry = math.inf  # a damaged expiry never hides the value
        return line.expiry

    # -- editing --

    def _section(self, ns: str, name: str) -> _Section:
        sec = self.by_name.get((ns, name))
        if sec is not None:
            return sec
        prev = self.sections[-1]
        live = [x for x in prev.lines if not x.dead]
        if (live and live[-1].text.strip()) or (prev.header is not None and not live):
            prev.lines.append(_Line("", sep=True))  # a blank line between sections
        sec = _Section(ns, name, _header(ns, name))
        self.sections.append(sec)
        self.by_name[(ns, name)] = sec
        return sec

    def put_text(self, ns: str, key: str, text: str, record: bytes | None) -> None:
        self.dirty = True
        for dup in self.dups.pop((ns, key), ()):
            self._remove(dup)
        line = self.index.get(ns, {}).get(key)
        if line is not None:
            line.set_value(text, record)
            return
        name, option = _place(ns, key)
        sec = self._section(ns, name)
        line = _Line("")
        line.head = _escape(option, _OPTION_SPECIAL) + " = "
        line.set_value(text, record)
        # Before the blank lines that end the section, so sections stay separated.
        at = len(sec.lines)
        while at and (sec.lines[at - 1].dead or not sec.lines[at - 1].text.strip()):
            at -= 1
        sec.lines.insert(at, line)
        if at == len(sec.lines) - 1 and sec is self.sections[0] and len(self.sections) > 1:
            sec.lines.append(_Line("", sep=True))  # a blank line before the first header
        self.register(sec, ns, line, key)

    def drop(self, ns: str, key: str) -> bool:
        for dup in self.dups.pop((ns, key), ()):
            self.dirty = True
            self._remove(dup)
        bucket = self.index.get(ns)
        line = bucket.pop(key, None) if bucket else None
        if line is None:
            return False
        if not bucket:
            del self.index[ns]
        self.dirty = True
        self._remove(line)
        return True

    def _remove(self, line: _Line) -> None:
        # Marked, not removed: deleting many keys stays linear (compact() sweeps).
        line.dead = True
        if line.section is not None:
            line.section.touched = True

    def put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        self.put_text(ns, key, value_text(data), data)
        if expires is None:
            self.drop(_ttl_ns(ns), key)
        else:
            self.put_text(_ttl_ns(ns), key, repr(float(expires)), None)

    def delete(self, ns: str, key: str, now: float) -> bool:
        expires = self.expires(ns, key)
        self.drop(_ttl_ns(ns), key)
        return self.drop(ns, key) and (expires is None or expires > now)


class _Shared:
    """The parsed document of one file, shared by its instances in this process.

    ``pin`` keeps the parsed file open and ``sig`` is its ``(st_nlink, st_size,
    st_mtime_ns, st_ctime_ns)`` (see :meth:`IniStore._fresh`); ``digest`` is a hash of
    the bytes ``doc`` was parsed from or written as, so a file whose bytes did not change
    (one opened again, say) is not parsed again; ``mem`` guards them all. Instances
    acquire it by the file's real path and release it on close; the last release closes
    ``pin`` and keeps the document among those of the few most recently closed files
    (:data:`_RECENT_FILES`, :data:`_RECENT_BYTES`), used again only if the file's bytes
    still have its digest.
    """

    __slots__ = ("__weakref__", "digest", "doc", "mem", "path", "pin", "sig", "size", "users")

    _all: ClassVar[dict[str, _Shared]] = {}
    _recent: ClassVar[collections.OrderedDict[str, tuple[bytes, int, _Doc]]] = (
        collections.OrderedDict()
    )
    _guard: ClassVar[threading.RLock] = threading.RLock()

    def __init__(self, path: str) -> None:
        self.path = path
        self.mem = threading.RLock()
        renew_after_fork(self, "mem")
        self.doc = _Doc()
        self.sig: tuple[int, ...] | None = None
        self.digest: bytes | None = None
        self.size = 0
        self.pin = -1
        self.users = 0

    @classmethod
    def acquire(cls, path: str) -> _Shared:
        with cls._guard:
            shared = cls._all.get(path)
            if shared is None:
                shared = cls._all[path] = cls(path)
                kept = cls._recent.pop(path, None)
                if kept is not None:  # a candidate only: _reload compares the digest
                    shared.digest, shared.size, shared.doc = kept
            shared.users += 1
            return shared

    def release(self) -> None:
        cls = type(self)
        # ``mem`` first: a thread inside a write of this file (holding ``mem``) may open
        # or close a store (taking ``_guard``); waiting for ``mem`` while holding
        # ``_guard`` would deadlock with it.
        with self.mem, cls._guard:
            self.users -= 1
            if self.users > 0:
                return
            if cls._all.get(self.path) is self:
                del cls._all[self.path]
            if self.pin >= 0:
                os.close(self.pin)
            if self.digest is not None and self.size <= _RECENT_BYTES:
                cls._recent[self.path] = (self.digest, self.size, self.doc)
                total = sum(size for _, size, _ in cls._recent.values())
                while len(cls._recent) > _RECENT_FILES or total > _RECENT_BYTES:
                    _, (_, size, _) = cls._recent.popitem(last=False)
                    total -= size
            self.pin, self.sig, self.digest, self.doc = -1, None, None, _Doc()

    def set(
        self,
        doc: _Doc,
        sig: tuple[int, ...],
        fd: int,
        data: bytes | None,
        digest: bytes | None = None,
    ) -> None:
        """Make *doc* (parsed from or written as *data*, whose digest the caller may
        already have) the current document."""
        if self.pin >= 0:
            os.close(self.pin)
        self.doc, self.sig, self.pin = doc, sig, fd
        if digest is None and data is not None:
            digest = _digest(data)
        self.digest = digest
        self.size = 0 if data is None else len(data)


#: Documents of closed files kept for a quick reopen: of this many files at most, and
#: of files of this many bytes in all.
_RECENT_FILES = 4
_RECENT_BYTES = 32 << 20


def _absent(key: str, text: str) -> bool:
    """True if no line of the file *text* can hold *key*, in any namespace: without a
    ``%`` anywhere no name is escaped, and every line that holds *key* (as option
    ``a.b.c`` before any header, ``b.c`` of ``[a]`` or ``c`` of ``[a.b]``) has the part
    of *key* after its last dot in its name. Two substring searches: much cheaper than
    parsing a large file another process just rewrote."""
    tail = key[key.rfind(".") + 1 :]
    return bool(tail) and "%" not in text and tail not in text


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


renew_after_fork(_Shared, "_guard")


# -- the store -----------------------------------------------------------------------------


class IniStore(Store):
    """Values in one human-readable INI file, shared by every process on the host.

    The file is parsed once and parsed again only when it changes on disk: the instance
    keeps the parsed file open and each read compares its link count, size, mtime and
    ctime (one ``fstat``); a replaced or deleted file has lost its link.
    Every write takes an exclusive ``flock`` on a hidden lock file next to it
    (``.<name>.lock``), re-reads the file if another process changed it, edits it and
    replaces it atomically (temp file, ``fsync``, ``os.replace``, directory ``fsync``;
    ``durable=False`` skips the ``fsync`` calls). So writers never lose each other's
    changes, :meth:`modify` is atomic across processes, and a :meth:`batch` writes the
    file once. Readers take no lock: a read-only instance works while others write.
    :meth:`get_many` looks every key up in one parsed copy, so it sees a batch whole or
    not at all.

    Thread-safe. Every write rewrites the whole file: good for configuration-sized data
    (thousands of keys), not for write-heavy workloads. Edits made by hand while a
    program writes are not locked out (editors do not take the lock). The file's
    permission bits are kept on rewrite; its owner is that of the writing process.
    Inline comments are not supported (``#`` after a value is part of the value).
    POSIX only (``flock``).
    """

    scheme: ClassVar[str] = "ini"
    durability: ClassVar[str] = (
        "every write replaces the file atomically and is fsynced before it returns "
        "(durable=False: atomic, not power-loss safe)"
    )
    shared_across_processes: ClassVar[bool] = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durable: bool = True,
        lock_timeout: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not isinstance(durable, bool):
            raise InvalidOptionError("durable must be True or False")
        self._file = os.path.realpath(os.fspath(path))  # write the target, not the symlink
        self._dir, name = os.path.split(self._file)
        self._durable = durable
        self._lock_timeout = lock_timeout = lock_timeout_option(lock_timeout)
        self._tmp_prefix = f".{name}.tmp."
        # The parsed file, shared by every instance of it in this process (so opening a
        # file again, or in another namespace, parses nothing if it did not change).
        self._s = _Shared.acquire(self._file)
        self._released = False
        self._flock = LockHandle.open(
            os.path.join(self._dir, f".{name}.lock"), timeout=lock_timeout
        )
        try:
            if self._readonly:
                if not os.path.isfile(self._file):
                    raise StoreNotFoundError(f"no INI file at {self._file!r}")
                with self._s.mem:
                    self._fresh()
            else:
                with io_errors(f"cannot create {self._file!r}"):
                    os.makedirs(self._dir, exist_ok=True)
                with self._exclusive(), io_errors(f"cannot open {self._file!r}"):
                    self._clean_temps()
                    if not os.path.exists(self._file):
                        self._write(_Doc())
        except BaseException:
            self._close()
            raise
        self._start()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> IniStore:
        """``ini:///relative/file.ini`` or ``ini:////absolute/file.ini``."""
        parsed = parse_url(url, cls.scheme, LOCKED_FILE_OPTIONS)
        return cls(file_path(parsed), **{**parsed.options, **options})

    @property
    def url(self) -> str:
        """docstring inherited"""
        return locked_file_url(self.scheme, self._file, self._durable, self._lock_timeout)

    @property
    def path(self) -> str:
        """The absolute path of the INI file."""
        return self._file

    # -- file I/O -----------------------------------------------------------------------

    def _clean_temps(self) -> None:
        # Temp files are only created under the lock we hold: any left belong to a dead
        # writer.
        for entry in os.scandir(self._dir):
            if entry.name.startswith(self._tmp_prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)

    def _fresh(self) -> _Doc:
        """The parsed document, re-read if the file changed (caller holds ``_mem``).

        The parsed file stays open (``_pin``), so one ``fstat`` (no path lookup) tells
        whether it changed: a replaced or deleted file has lost a link, an edit in place
        changed its size or times. A replaced file can never be mistaken for the parsed
        one, even if the new file got the same inode number: it cannot while ours is open.
        """
        doc = self._lookup(None)
        assert doc is not None  # without a probe, always a document
        return doc

    def _lookup(self, key: str | None) -> _Doc | None:
        """:meth:`_fresh`, or ``None`` when the file changed and its bytes show, without
        parsing them, that *key* is in no namespace of it (see :func:`_absent`). The
        document then stays the old one, still marked out of date."""
        shared = self._s
        pin = shared.pin
        if pin >= 0:
            st = os.fstat(pin)
            if (st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == shared.sig:
                return shared.doc
        elif not os.path.exists(self._file) and shared.sig is not None:
            return shared.doc  # still missing
        return self._reload(key)

    def _reload(self, probe: str | None = None) -> _Doc | None:
        """Read the file again; ``None`` if it shows that the key *probe* is absent."""
        shared = self._s
        try:
            fd = os.open(self._file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            shared.set(_Doc(), (), -1, None)
            return shared.doc
        except OSError as exc:
            raise BackendError(f"cannot read {self._file!r}: {exc}") from exc
        try:
            st = os.fstat(fd)
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            data = b"".join(chunks)
            digest = _digest(data)
            if digest == shared.digest:
                doc = shared.doc  # the bytes of the document we have: no need to parse
            else:
                text = data.decode("utf-8")
                if probe is not None and _absent(probe, text):
                    os.close(fd)
                    return None
                doc = _Doc.parse(text)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, UnicodeDecodeError):
                raise StoreCorruptError(f"{self._file!r} is not a UTF-8 text (INI) file") from exc
            if isinstance(exc, OSError):
                raise BackendError(f"cannot read {self._file!r}: {exc}") from exc
            raise
        sig = (st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        shared.set(doc, sig, fd, data, digest)
        return doc

    def _write(self, doc: _Doc) -> None:
        """Replace the file with *doc* (caller holds the file lock and ``_mem``)."""
        data = doc.render()
        tmp = os.path.join(self._dir, f"{self._tmp_prefix}{os.urandom(6).hex()}")
        # Keep the file's permission bits (a 0600 file stays 0600). The temp file is
        # created with no bit the file lacks: created wider and narrowed afterwards, it
        # could be opened in between by another user, who would then read the new file
        # through that descriptor. The umask can only take bits away: fchmod restores them.
        try:
            mode: int | None = os.stat(self._file).st_mode & 0o7777
        except FileNotFoundError:
            mode = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o666 if mode is None else mode & 0o777)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self._durable:
                os.fsync(fd)
            os.replace(tmp, self._file)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        try:
            if self._durable:
                fsync_dir(self._dir)
            st = os.fstat(fd)  # after the rename, which may change ctime
        except BaseException:
            os.close(fd)
            raise
        doc.dirty = False
        self._s.set(doc, (st.st_nlink, st.st_size, st.st_mtime_ns, st.st_ctime_ns), fd, data)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Cross-process write lock (re-entrant), then the in-process document lock."""
        self._flock.acquire(True)
        try:
            with self._s.mem:
                yield
        finally:
            self._flock.release()

    def _mutate(self, edit: Callable[[_Doc], T]) -> T:
        with self._exclusive(), io_errors(f"cannot write {self._file!r}"):
            doc = self._fresh()
            try:
                result = edit(doc)
                if doc.dirty:
                    self._write(doc)
            except BaseException:
                # The document may be half edited: parse the file again.
                self._s.sig = self._s.digest = None
                raise
            return result

    # -- backend contract ---------------------------------------------------------------

    def _get_record(self, ns: str, key: str) -> Record | None:
        with self._s.mem:
            doc = self._lookup(key)
            if doc is None:
                return None
            line = doc.index.get(ns, _NONE).get(key)
            if line is None:
                return None
            expires = doc.expires(ns, key)
            if expires is not None:
                if expires <= self._clock():
                    return None
                if math.isinf(expires):
                    expires = None
            return doc.record(line), expires

    def _get(self, ns: str, key: str) -> bytes | None:
        with self._s.mem:
            doc = self._lookup(key)
            if doc is None:
                return None
            line = doc.index.get(ns, _NONE).get(key)
            if line is None:
                return None
            expires = doc.expires(ns, key)
            if expires is not None and expires <= self._clock():
                return None
            return doc.record(line)

    def _get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        # Every key from one parsed document (one version of the file): a batch another
        # process or thread commits meanwhile is seen whole or not at all, never half.
        if len(keys) < 2:
            return [self._get(ns, key) for key in keys]
        with self._s.mem:
            doc = self._fresh()
            bucket = doc.index.get(ns, _NONE)
            now = self._clock() if _ttl_ns(ns) in doc.index else None
            out: list[bytes | None] = []
            for key in keys:
                line = bucket.get(key)
                if line is None:
                    out.append(None)
                    continue
                if now is not None:
                    expires = doc.expires(ns, key)
                    if expires is not None and expires <= now:
                        out.append(None)
                        continue
                out.append(doc.record(line))
            return out

    def _live(self, ns: str, prefix: str) -> list[tuple[str, _Line]]:
        with self._s.mem:
            doc = self._fresh()
            lines = [(k, v) for k, v in doc.index.get(ns, _NONE).items() if k.startswith(prefix)]
            if _ttl_ns(ns) not in doc.index:
                return lines
            now = self._clock()
            return [(k, v) for k, v in lines if _alive(doc.expires(ns, k), now)]

    def _iter_keys(self, ns: str, prefix: str = "") -> Iterator[str]:
        for key, _ in self._live(ns, prefix):
            yield key

    def _iter_items(self, ns: str, prefix: str = "") -> Iterator[tuple[str, bytes]]:
        with self._s.mem:
            lines = self._live(ns, prefix)
            doc = self._s.doc  # after _live(): it may have re-read the file
            pairs = [(k, doc.record(line)) for k, line in lines]
        yield from pairs

    def _count(self, ns: str) -> int:
        return len(self._live(ns, ""))

    def _namespaces(self) -> Iterable[str]:
        with self._s.mem:
            return [ns for ns, bucket in self._fresh().index.items() if bucket]

    def _put(self, ns: str, key: str, data: bytes, expires: float | None) -> None:
        self._mutate(lambda doc: doc.put(ns, key, data, expires))

    def _delete(self, ns: str, key: str) -> bool:
        return self._mutate(lambda doc: doc.delete(ns, key, self._clock()))

    def _apply(self, ops: Sequence[Op]) -> None:
        # docstring inherited (one rewrite of the file for the whole batch)
        now = self._clock()

        def edit(doc: _Doc) -> None:
            for op in ops:
                if op.data is None:
                    doc.delete(op.ns, op.key, now)
                else:
                    doc.put(op.ns, op.key, op.data, op.expires)

        if ops:
            self._mutate(edit)

    def _clear(self, ns: str) -> None:
        def edit(doc: _Doc) -> None:
            for key in list(doc.index.get(ns, _NONE)):
                doc.drop(ns, key)
            for key in list(doc.index.get(_ttl_ns(ns), _NONE)):
                doc.drop(_ttl_ns(ns), key)

        self._mutate(edit)

    def _purge_expired(self, ns: str) -> int:
        now = self._clock()

        def edit(doc: _Doc) -> int:
            dead = [
                k for k in doc.index.get(_ttl_ns(ns), _NONE) if not _alive(doc.expires(ns, k), now)
            ]
            for key in dead:
                doc.drop(_ttl_ns(ns), key)
                doc.drop(ns, key)
            return len(dead)

        return self._mutate(edit)

    def _close(self) -> None:
        if not self._released:
            self._released = True
            self._s.release()
        self._flock.close()


_NONE: dict[str, _Line] = {}


def _alive(expires: float | None, now: float) -> bool:
    return expires is None or expires > now
