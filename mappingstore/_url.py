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
    "CREDENTIAL_SCHEMES",
    "OPTION_TYPES",
    "ParsedURL",
    "check_userinfo",
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

_SECRET_NAMES = "password|passwd|pwd|secret|token|key|salt"
_SECRET_QUERY = re.compile(rf"(?i)^({_SECRET_NAMES})$")

#: Schemes whose URL may carry a user and password (for the server). Any other scheme
#: refuses a password in its URL: nothing would use it, and every message, ``repr`` and
#: ``url`` that shows the location (a file path, a store name) would show it too.
CREDENTIAL_SCHEMES = frozenset({"redis", "rediss", "redis+cluster", "postgresql", "postgres"})
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


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
    url: str,
    scheme: str | tuple[str, ...],
    extra: Mapping[str, Callable[[str], Any]] | None = None,
    *,
    credentials: bool | None = None,
) -> ParsedURL:
    """Split *url*, check its scheme, and type its query options.

    *credentials*: whether the URL may hold a password (default: only for the schemes in
    :data:`CREDENTIAL_SCHEMES`). No error message ever repeats a password.
    """
    if not isinstance(url, str):
        raise InvalidURLError("a store URL must be a str")
    schemes = (scheme,) if isinstance(scheme, str) else scheme
    head, sep, _ = url.partition("://")
    if not sep:
        raise InvalidURLError(f"not a store URL (no '://'): {redact(url)!r}")
    if head.lower() not in schemes:
        raise InvalidURLError(f"expected a {'/'.join(schemes)}:// URL, got {redact(url)!r}")
    with_credentials = head.lower() in CREDENTIAL_SCHEMES if credentials is None else credentials
    if with_credentials:
        check_userinfo(url)
    try:
        split = urllib.parse.urlsplit(url)
        has_password = split.password is not None
    except ValueError as exc:  # "Invalid IPv6 URL": urllib's message holds no part of it
        raise InvalidURLError(f"malformed URL ({exc}): {redact(url)!r}") from None
    if has_password and not with_credentials:
        raise InvalidURLError(
            f"a {head.lower()}:// URL takes no password (it would show wherever the "
            "URL does); give the store's password as an option or environment variable"
        )
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
        # A server URL's user and password are decoded below, on their own.
        netloc=urllib.parse.unquote(split.netloc) if with_credentials else _strict(split.netloc),
        path=_strict(split.path),
        options=options,
        username=urllib.parse.unquote(split.username) if split.username else None,
        password=urllib.parse.unquote(split.password) if split.password else None,
        hostname=split.hostname,
        port=port,
        raw=url,
    )


def _strict(part: str) -> str:
    """*part* of a URL (a path, a store name) with its %XX escapes decoded; one that is
    not UTF-8 is refused: ``urllib.parse.unquote`` would turn ``%FF`` into U+FFFD, and
    the URL would name another file or store (``%FF`` and ``%FE`` the same one)."""
    try:
        return urllib.parse.unquote(part, errors="strict")
    except UnicodeDecodeError:
        pass  # raised below: the decoding error would hold bytes of the URL
    raise InvalidURLError(
        "the URL holds a %XX escape that is not UTF-8 text (such as %FF): names "
        "in store URLs are UTF-8, percent-encoded"
    )


def check_userinfo(url: str) -> None:
    """Refuse a server URL whose user and password cannot be told apart from the rest
    without guessing, before anything quotes a part of it.

    A password holding an unescaped ``/``, ``?`` or ``#`` ends the host part early for
    every URL parser (RFC 3986): ``redis://u:s3cr/et99@h/0`` reads as host ``u``, port
    ``s3cr`` and path ``/et99@h/0``, so the password's pieces would land in the host, the
    port, the path or the query, each of which a message, ``repr`` or ``url`` may show.
    Such a URL has an ``@`` after the end of its host part with a ``:`` before it: it is
    refused without quoting it. (This also refuses an ``@`` in a path or query value after
    a ``host:port``; ``%40`` writes it.) An unescaped ``@`` inside the user or password
    (urllib splits at the last ``@``, libpq at the first one) and a ``%`` that is not a
    ``%XX`` escape are refused as well. No message quotes any part of *url*.
    """
    rest = url.partition("://")[2]
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    last_at = rest.rfind("@")
    if last_at > end and ":" in rest[:last_at]:
        raise InvalidURLError(
            "the URL holds an '@' after the end of its host part: if the password (or the "
            "user name) holds a '/', '?' or '#', percent-encode them (write '/' as %2F, "
            "'?' as %3F, '#' as %23); write an '@' of a path or query value as %40"
        )
    userinfo = rest[:end].rpartition("@")[0]
    if "@" in userinfo:
        raise InvalidURLError(
            "the user or password in the URL holds an unescaped '@'; percent-encode "
            "it (write '@' as %40)"
        )
    if _BAD_ESCAPE.search(userinfo):
        raise InvalidURLError(
            "the user or password in the URL holds a '%' that is not a %XX escape; "
            "percent-encode them (write '%' as %25)"
        )


def file_path(parsed: ParsedURL) -> str:
    """The file path of a file URL: ``x:///rel/p`` -> ``rel/p``; ``x:////abs`` -> ``/abs``."""
    if parsed.netloc and parsed.netloc != "localhost":
        # sqlite://data.db is a common slip for sqlite:///data.db; say so instead of guessing.
        raise InvalidURLError(
            f"{redact(f'{parsed.scheme}://{parsed.netloc}')}... has a host part; use "
            f"{parsed.scheme}:///relative/path or {parsed.scheme}:////absolute/path"
        )
    path = parsed.path
    if not path.startswith("/") or path == "/":
        raise InvalidURLError(f"{parsed.scheme}:// URL has no path: {redact(parsed.raw)!r}")
    path = path[1:]
    if "\x00" in path:
        raise InvalidURLError(f"{parsed.scheme}:// URL path holds a NUL character")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file system name
        raise InvalidURLError(f"{parsed.scheme}:// URL path is not valid text") from None
    if path.startswith("//"):  # sqlite://///abs: extra slashes mean one, as on POSIX
        path = "/" + path.lstrip("/")
    return path


def file_url(scheme: str, path: str, query: list[str]) -> str:
    """The inverse of :func:`file_path` for an absolute *path*: ``scheme:////abs/path?q``.

    The path is quoted: :func:`parse_url` unquotes, and ``?``, ``#`` or ``%`` in a path
    must survive the round trip. *query* holds ``name=value`` items (already formatted).
    """
    base = f"{scheme}:///{urllib.parse.quote(path)}"
    return base + ("?" + "&".join(query) if query else "")


# Where a URL's user information may start: after a scheme and a separator, even a
# mistyped one ("redis://", "redis:/", "redis//", a bare "//"). Its end is the LAST "@"
# before the next such start that comes after an "@": urllib splits at the last "@"
# before the path, so an unescaped "@" or ":" in a password is hidden, and so is the rest
# of one with an unescaped "/", "?", "#", a space or a quote (which no parser can split
# right, and which a message quoting the URL keeps). An "@" later in a path or query
# hides a little too much. The user name is kept only when nothing but a user name can be
# in it.
_URL_START = re.compile(r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)(?::/{1,2}|//)|//)")
# A "user:secret@" with no such start ("redis:u:pw@h", "u:pw@h"): no space in it, and
# starting a word (a file URL's "sqlite:///a:b@c.db" is a path, not a password).
_BARE_USERINFO = re.compile(r"(?<![^\s'\"(=,;<\[])(?P<user>[^\s:/@'\"]*):(?P<secret>[^\s@]*)@")
_PLAIN_USER = re.compile(r"[^/?#\[\]@\s'\"]*")


def _hidden(info: str) -> str:
    """*info* (the user information of a URL) with its password hidden."""
    if ":" not in info:
        return info  # a user name alone: no password to hide
    user = info.partition(":")[0]
    return user + ":***" if _PLAIN_USER.fullmatch(user) else "***"


def _hide_userinfo(text: str) -> str:
    parts: list[str] = []
    done = 0  # text[:done] is in parts
    at = 0
    while (start := _URL_START.search(text, at)) is not None:
        begin = start.end()
        first_at = text.find("@", begin)
        if first_at < 0:
            break
        nxt = _URL_START.search(text, first_at)
        last_at = text.rfind("@", begin, nxt.start() if nxt else len(text))
        info = text[begin:last_at]
        scheme = (start["scheme"] or "").lower()
        file_path = info.startswith("/") and scheme not in CREDENTIAL_SCHEMES
        if not file_path:
            parts += (text[done:begin], _hidden(info))
            done = last_at
        at = max(last_at + 1, begin)
    parts.append(text[done:])
    return "".join(parts)


def _hide_bare(match: re.Match[str]) -> str:
    if match["secret"].startswith("/"):
        return match[0]  # "scheme:///path": a file URL's path
    return _hidden(f"{match['user']}:{match['secret']}") + "@"


# A secret given as a query option (refused by parse_url, but the refused URL may still
# be quoted in a message): "?password=x&..." -> "?password=***&...".
_QUERY_SECRET = re.compile(rf"(?i)(?P<pre>[?&](?:{_SECRET_NAMES})=)(?P<value>[^&#\s'\"]*)")


def redact(text: str) -> str:
    """Hide the password of every URL in *text* (``redis://u:secret@h`` -> ``redis://u:***@h``).

    Secret query options (``?password=...``, ``key=``, ``token=``...) are hidden too.
    """
    text = _BARE_USERINFO.sub(_hide_bare, _hide_userinfo(text))
    return _QUERY_SECRET.sub(r"\g<pre>***", text)
