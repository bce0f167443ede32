"""URL parsing shared by every backend (no I/O), and password redaction.

Conventions (the SQLAlchemy one): ``scheme:///relative/path`` and
``scheme:////absolute/path``; query parameters carry options (``?namespace=x&ttl=60``),
typed by :data:`OPTION_TYPES` and a backend's own extra table.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidOptionError, InvalidURLError

__all__ = [
    "OPTION_TYPES",
    "ParsedURL",
    "file_path",
    "file_url",
    "parse_bool",
    "parse_float",
    "parse_int",
    "parse_url",
    "redact",
]


def parse_bool(text: str) -> bool:
    """Parse a boolean URL option (``1/0``, ``true/false``, ``yes/no``, ``on/off``)."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise InvalidOptionError(f"expected a boolean, got {text!r}")


def parse_float(text: str) -> float:
    """Parse a numeric URL option."""
    try:
        return float(text)
    except ValueError as exc:
        raise InvalidOptionError(f"expected a number, got {text!r}") from exc


def parse_int(text: str) -> int:
    """Parse an integer URL option."""
    try:
        return int(text)
    except ValueError as exc:
        raise InvalidOptionError(f"expected an integer, got {text!r}") from exc


def _optional_bool(text: str) -> bool | None:
    return None if text.strip().lower() in ("", "none", "auto") else parse_bool(text)


#: Options every backend accepts in its URL query. Secrets (password, key, salt) are
#: deliberately absent: they never belong in a URL.
OPTION_TYPES: dict[str, Callable[[str], Any]] = {
    "namespace": str,
    "security": str,
    "encrypt": _optional_bool,
    "dot_names": parse_bool,
    "readonly": parse_bool,
    "ttl": parse_float,
}

_SECRET_QUERY = re.compile(r"(?i)^(password|passwd|pwd|secret|token|key|salt)$")


@dataclass
class ParsedURL:
    """A split URL: the scheme, the location, the path and the typed options."""

    scheme: str
    netloc: str
    path: str
    options: dict[str, Any] = field(default_factory=dict)
    username: str | None = None
    password: str | None = None
    hostname: str | None = None
    port: int | None = None
    raw: str = ""


def parse_url(
    url: str, scheme: str | tuple[str, ...], extra: Mapping[str, Callable[[str], Any]] | None = None
) -> ParsedURL:
    """Split *url*, check its scheme, and type its query options."""
    if not isinstance(url, str):
        raise InvalidURLError("a store URL must be a str")
    schemes = (scheme,) if isinstance(scheme, str) else scheme
    head, sep, _ = url.partition("://")
    if not sep:
        raise InvalidURLError(f"not a store URL (no '://'): {redact(url)!r}")
    if head.lower() not in schemes:
        raise InvalidURLError(f"expected a {'/'.join(schemes)}:// URL, got {redact(url)!r}")
    split = urllib.parse.urlsplit(url)
    if split.fragment:
        raise InvalidURLError(f"store URLs take no #fragment: {redact(url)!r}")
    types = {**OPTION_TYPES, **(extra or {})}
    options: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(split.query, keep_blank_values=True):
        if _SECRET_QUERY.match(name):
            raise InvalidURLError(
                f"never put a {name} in a URL; pass it as an option or environment variable"
            )
        if name not in types:
            raise InvalidURLError(f"unknown URL option {name!r}; known: {', '.join(sorted(types))}")
        if name in options:
            raise InvalidURLError(f"URL option {name!r} given twice")
        options[name] = types[name](value)
    try:
        port = split.port
    except ValueError:  # "sqlite://:memory:" has no port; network backends check theirs
        port = None
    return ParsedURL(
        scheme=head.lower(),
        netloc=urllib.parse.unquote(split.netloc),
        path=urllib.parse.unquote(split.path),
        options=options,
        username=urllib.parse.unquote(split.username) if split.username else None,
        password=urllib.parse.unquote(split.password) if split.password else None,
        hostname=split.hostname,
        port=port,
        raw=url,
    )


def file_path(parsed: ParsedURL) -> str:
    """The file path of a file URL: ``x:///rel/p`` -> ``rel/p``; ``x:////abs`` -> ``/abs``."""
    if parsed.netloc and parsed.netloc != "localhost":
        # sqlite://data.db is a common slip for sqlite:///data.db; say so instead of guessing.
        raise InvalidURLError(
            f"{parsed.scheme}://{parsed.netloc}... has a host part; use "
            f"{parsed.scheme}:///relative/path or {parsed.scheme}:////absolute/path"
        )
    path = parsed.path
    if not path.startswith("/") or path == "/":
        raise InvalidURLError(f"{parsed.scheme}:// URL has no path: {redact(parsed.raw)!r}")
    return path[1:]


# The password runs to the LAST "@" before the path (as urllib splits it), so an unescaped
# "@" or ":" inside it is hidden too; whitespace ends a URL inside a longer message.
def file_url(scheme: str, path: str, query: list[str]) -> str:
    """The inverse of :func:`file_path` for an absolute *path*: ``scheme:////abs/path?q``.

    The path is quoted: :func:`parse_url` unquotes, and ``?``, ``#`` or ``%`` in a path
    must survive the round trip. *query* holds ``name=value`` items (already formatted).
    """
    base = f"{scheme}:///{urllib.parse.quote(path)}"
    return base + ("?" + "&".join(query) if query else "")


_USERINFO = re.compile(r"(?P<pre>://[^/@:\s]*:)(?P<pw>[^/\s]*)(?P<post>@)")


def redact(text: str) -> str:
    """Hide the password of every URL in *text* (``redis://u:secret@h`` -> ``redis://u:***@h``)."""
    return _USERINFO.sub(r"\g<pre>***\g<post>", text)
