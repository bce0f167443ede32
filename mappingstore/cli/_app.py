"""The ``mappingstore`` command group: shared options, opening stores, secrets, errors.

Layer 5 of the architecture: commands reach storage only through :func:`mappingstore.open`
(and, for the few record-level jobs, the helpers in :mod:`._raw`).

Secrets come only from ``--password-file``, an environment variable, or a hidden prompt
when the store turns out to be encrypted and stdin is a terminal. They are never taken
from an argument, never printed, and scrubbed from error messages as a last line of
defence (the library's messages never contain them in the first place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import IO, Any, TypeVar

import click

import mappingstore

from .._url import redact
from ..errors import (
    InvalidKeyError,
    InvalidOptionError,
    MappingStoreError,
    MissingKeyError,
    OptionTypeError,
    PasswordRequiredError,
    WrongPasswordError,
)

__all__ = [
    "DEFAULT_URL",
    "CLIError",
    "DeepJSONError",
    "Settings",
    "UsageFailure",
    "binary_stdout",
    "cli",
    "dumps",
    "echo_json",
    "iter_chunks",
    "loads",
    "open_store",
    "read_secret",
    "show_key",
    "store_options",
    "store_options_no_url",
]

#: The store every command uses when neither ``--url`` nor ``$MAPPINGSTORE_URL`` is set:
#: a file in the current directory, so the tool works without any server.
DEFAULT_URL = "sqlite:///mappingstore.db"
PASSWORD_ENV = "MAPPINGSTORE_PASSWORD"
_PROMPT_ATTEMPTS = 3
F = TypeVar("F", bound=Callable[..., Any])


class CLIError(click.ClickException):
    """A one-line error, exit status 1 (failure, or not found)."""

    exit_code = 1


class UsageFailure(CLIError):
    """A one-line error, exit status 2 (bad arguments, options, URL or key name).

    Unlike :class:`click.UsageError` it prints no usage text: the message says it all.
    """

    exit_code = 2


@dataclasses.dataclass
class Settings:
    """Options shared by every command (given before or after the command name)."""

    url: str = DEFAULT_URL
    namespace: str | None = None
    dot_names: bool = False
    json: bool = False
    quiet: bool = False
    password_file: str | None = None
    security: str | None = None
    #: Every secret read during this run, to scrub from error messages. Shared (not
    #: copied) between the group's settings and each command's merged settings.
    secrets: list[str] = dataclasses.field(default_factory=list)
    #: The password each URL was opened with during this run (shared like *secrets*), so
    #: that a job which needs the same store in another namespace (``copy`` and ``check``
    #: of series, event logs and blobs) opens it again without asking twice.
    unlocked: dict[str, str] = dataclasses.field(default_factory=dict)

    def merged(self, **given: Any) -> Settings:
        """A copy where every option given at the command level wins."""
        changes = {k: v for k, v in given.items() if v is not None and v is not False}
        return dataclasses.replace(self, **changes)


# -- errors ---------------------------------------------------------------------------------


#: Secrets shorter than this are not scrubbed from messages: they collide with ordinary
#: words ("wrong password" with the password "a" would print "wrong p***ssword"), and the
#: scrub is only a second line of defence (no library message contains a secret).
_SCRUB_MIN = 8


def _one_line(text: str, secrets: list[str]) -> str:
    text = redact(text)
    for secret in secrets:
        if len(secret) >= _SCRUB_MIN:
            text = text.replace(secret, "***")
    return " ".join(text.split())


def _exit_code(exc: MappingStoreError) -> int:
    # Bad URLs, options and key names are usage errors (click's own convention is 2).
    if isinstance(exc, (InvalidOptionError, OptionTypeError, InvalidKeyError)):
        return 2
    return 1


def _message(exc: BaseException) -> str:
    if isinstance(exc, MissingKeyError):
        return f"not found: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, MappingStoreError):
        # OSError's str() may hold a path and errno; keep it, it is what the user needs.
        return f"{type(exc).__name__}: {exc}"
    return str(exc) or type(exc).__name__


def is_digit_limit(exc: BaseException) -> bool:
    """True for CPython's refusal to convert an int of more than
    ``sys.get_int_max_str_digits()`` digits (4,300 by default) to or from text."""
    return type(exc) is ValueError and "integer string conversion" in str(exc)


#: While a command runs, the recursion limit is at least this. The codec stores lists and
#: dicts nested up to 1,023 levels (msgpack's limit), and typed JSON (``to_typed``,
#: ``from_typed``, ``json``) takes a frame per level, on top of click's own frames: the
#: default limit of 1,000 would fail on such a value. A value nested more deeply than
#: this cannot have come from a store; it is bad input and gets a one-line error.
RECURSION_LIMIT = 2_000


@contextlib.contextmanager
def _recursion_limit(limit: int) -> Iterator[None]:
    # Process-wide, so it is restored after the command (the group may be embedded).
    old = sys.getrecursionlimit()
    if old < limit:
        sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        if old < limit:
            sys.setrecursionlimit(old)


class _Group(click.Group):
    """Turns library errors into one-line messages and exit codes, never a traceback.

    Beyond :class:`MappingStoreError` and :class:`OSError`, two builtin errors come from
    the data rather than from the code, and get a one-line error too: RecursionError (a
    value nested more deeply than typed JSON can carry) and the ValueError CPython raises
    for an int of too many digits. Any other exception is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with _recursion_limit(RECURSION_LIMIT):
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, BrokenPipeError):
            raise
        except MappingStoreError as exc:
            error = UsageFailure if _exit_code(exc) == 2 else CLIError
            raise error(_one_line(_message(exc), _secrets(ctx))) from None
        except OSError as exc:
            raise CLIError(_one_line(_message(exc), _secrets(ctx))) from None
        except RecursionError:
            raise CLIError(
                f"a value is nested too deeply (more than about {RECURSION_LIMIT:,} levels)"
            ) from None
        except ValueError as exc:
            if not is_digit_limit(exc):
                raise
            raise CLIError(f"a number has too many digits: {_one_line(str(exc), [])}") from None


def _secrets(ctx: click.Context) -> list[str]:
    settings = ctx.find_object(Settings)
    return settings.secrets if settings is not None else []


# -- shared options ------------------------------------------------------------------------

_SECURITY = click.Choice(["low", "medium", "high"])


def _shared_options(command_level: bool) -> list[Callable[[F], F]]:
    also = " (also accepted before the command)" if command_level else ""
    url_help = (
        "Store URL, e.g. sqlite:///data.db, redis://host/0, memory://"
        + (
            " [env: MAPPINGSTORE_URL; default: sqlite:///mappingstore.db]"
            if not command_level
            else ""
        )
        + also
    )
    return [
        click.option(
            "--url",
            metavar="URL",
            default=None if command_level else DEFAULT_URL,
            envvar=None if command_level else "MAPPINGSTORE_URL",
            show_envvar=False,
            help=url_help,
        ),
        click.option(
            "--namespace",
            "-n",
            metavar="NAME",
            default=None,
            help="Namespace inside the store (default: default)." + also,
        ),
        click.option(
            "--dot-names", is_flag=True, default=False, help="Treat 'a.b.c' as a path." + also
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            default=False,
            help="Machine-readable JSON output." + also,
        ),
        click.option(
            "--quiet",
            "-q",
            is_flag=True,
            default=False,
            help="No progress bar, summary or warnings." + also,
        ),
        click.option(
            "--password-file",
            type=click.Path(dir_okay=False),
            metavar="FILE",
            default=None,
            help=f"Read the password from this file (else ${PASSWORD_ENV}, else a prompt).{also}",
        ),
        click.option(
            "--security",
            type=_SECURITY,
            metavar="LEVEL",
            default=None,
            help="argon2id cost of a new password: low, medium or high (default)." + also,
        ),
    ]


def _make_store_options(with_url: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(
            *args: Any,
            namespace: str | None,
            as_json: bool,
            quiet: bool,
            password_file: str | None,
            security: str | None,
            url: str | None = None,
            dot_names: bool = False,
            **kwargs: Any,
        ) -> Any:
            ctx = click.get_current_context()
            base = ctx.find_object(Settings) or Settings()
            settings = base.merged(
                url=url,
                namespace=namespace,
                dot_names=dot_names,
                json=as_json,
                quiet=quiet,
                password_file=password_file,
                security=security,
            )
            return fn(settings, *args, **kwargs)

        decorated: Callable[..., Any] = wrapper
        options = _shared_options(command_level=True)
        if not with_url:  # and without --dot-names: such commands work on raw key names
            options = [options[1], *options[3:]]
        for option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


#: Add the shared options to a command; it receives the merged :class:`Settings` first.
store_options = _make_store_options(with_url=True)
#: The same without ``--url`` and ``--dot-names``, for ``copy`` (its URLs are arguments).
store_options_no_url = _make_store_options(with_url=False)


def _group_options(fn: F) -> F:
    for option in reversed(_shared_options(command_level=False)):
        fn = option(fn)
    return fn


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@_group_options
@click.version_option(mappingstore.__version__, "--version", "-V", prog_name="mappingstore")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str,
    namespace: str | None,
    dot_names: bool,
    as_json: bool,
    quiet: bool,
    password_file: str | None,
    security: str | None,
) -> None:
    """Read, write, inspect and migrate mappingstore stores.

    Every command works on the store named by --url (or $MAPPINGSTORE_URL; default
    sqlite:///mappingstore.db, a file in the current directory). Values are JSON on
    the command line; typed JSON tags such as {"$bytes": "..."} or {"$tuple": [...]}
    keep every stored type exact.

    Exit codes: 0 success, 1 not found or check failed (or any store error), 2 usage.
    """
    ctx.obj = Settings(
        url=url,
        namespace=namespace,
        dot_names=dot_names,
        json=as_json,
        quiet=quiet,
        password_file=password_file,
        security=security,
    )


# -- secrets and opening stores -------------------------------------------------------------


def read_secret(settings: Settings, path: str | None, env: str) -> str | None:
    """The secret from *path* (first line) or ``$env``, or ``None``; remembered for scrubbing."""
    secret: str | None = None
    if path is not None:
        try:
            with open(path, "rb") as fp:
                raw = fp.read()
        except OSError as exc:
            raise UsageFailure(f"cannot read the password file {path!r}: {exc.strerror}") from None
        # One trailing newline is what `echo secret > file` adds; it is not part of it.
        raw = raw.splitlines()[0] if raw.strip(b"\r\n") else b""
        if not raw:
            raise UsageFailure(f"the password file {path!r} is empty")
        try:
            secret = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageFailure(f"the password file {path!r} is not UTF-8 text") from None
    else:
        secret = os.environ.get(env) or None
    if secret is not None:
        settings.secrets.append(secret)
    return secret


def _interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def open_store(
    settings: Settings,
    *,
    readonly: bool,
    values: bool = True,
    url: str | None = None,
    namespace: str | None = None,
    dot_names: bool | None = None,
    password_file: str | None = None,
    password_env: str | None = None,
    password: str | None = None,
    file_option: str = "--password-file",
    label: str = "",
) -> mappingstore.Store:
    """Open the store a command works on.

    *values*: the command reads or writes values, so it needs the key of an encrypted
    store. Commands that only touch names, sizes and expiry (``ls``, ``len``, ``del``,
    ``expire``, ``purge``, ``info``) pass ``False``: they never ask for a password, never
    use one (so a password in the environment cannot turn encryption on for a plain store
    by accident), and work on encrypted stores, whose key names are not encrypted.
    *password* is given explicitly only by ``passwd``; *password_file* and
    *password_env* name the sources of another store's secret (``copy``'s destination).
    """
    url = url or settings.url
    # Flags only switch options on: an unset --dot-names (or a command that is not read-
    # only) must not override "?dot_names=true" or "?readonly=true" in the URL. A command
    # that needs raw key names passes dot_names=False explicitly.
    options: dict[str, Any] = {}
    if dot_names is not None:
        options["dot_names"] = dot_names
    elif settings.dot_names:
        options["dot_names"] = True
    if readonly:
        options["readonly"] = True
    ns = namespace if namespace is not None else settings.namespace
    if ns is not None:
        options["namespace"] = ns
    if settings.security is not None:
        options["security"] = settings.security
    if not values:
        return mappingstore.open(url, encrypt=False, **options)
    if password_env is None:  # this run's own store: --password-file, $MAPPINGSTORE_PASSWORD
        password_file, password_env = settings.password_file, PASSWORD_ENV
    if password is None:
        password = read_secret(settings, password_file, password_env)
    where = f"{label}{redact(url)}"
    if password is not None:
        try:
            store = mappingstore.open(url, password=password, **options)
        except WrongPasswordError as exc:
            raise WrongPasswordError(f"{where}: {exc}") from None
        settings.unlocked[url] = password
        return store
    try:
        return mappingstore.open(url, **options)
    except PasswordRequiredError:
        if not _interactive():
            raise PasswordRequiredError(
                f"{where} is encrypted: set ${password_env} or use {file_option} "
                "(or run in a terminal to be prompted)"
            ) from None
    for attempt in range(1, _PROMPT_ATTEMPTS + 1):
        password = click.prompt(f"Password for {where}", hide_input=True, err=True)
        settings.secrets.append(password)
        try:
            store = mappingstore.open(url, password=password, **options)
        except WrongPasswordError:
            if attempt == _PROMPT_ATTEMPTS:
                raise
            click.echo("Wrong password, try again.", err=True)
            continue
        settings.unlocked[url] = password
        return store
    raise AssertionError("unreachable")  # pragma: no cover


# -- output ---------------------------------------------------------------------------------


def dumps(obj: Any, *, pretty: bool = False) -> str:
    """JSON text; non-ASCII kept readable, lone surrogates escaped so output always encodes."""
    indent = 2 if pretty and isinstance(obj, (dict, list)) and obj else None
    text = json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a key or value with a lone surrogate
        text = json.dumps(obj, ensure_ascii=True, indent=indent, allow_nan=False)
    return text


class DeepJSONError(ValueError):
    """JSON input nested more deeply than :func:`loads` parses."""


def _exact_int(text: str) -> int:
    # int(text) refuses more than sys.get_int_max_str_digits() digits; Decimal has no limit.
    return int(Decimal(text))


def loads(text: str | bytes) -> Any:
    """``json.loads`` for the user's input: an int literal of any length parses exactly.

    Bad JSON raises :class:`json.JSONDecodeError`; nesting deeper than the recursion
    limit allows raises :class:`DeepJSONError` (both are ValueErrors).
    """
    try:
        try:
            return json.loads(text)
        except ValueError as exc:
            # The fast path first: a custom parse_int costs a Python call per int literal.
            if not is_digit_limit(exc):
                raise
            return json.loads(text, parse_int=_exact_int)
    except RecursionError:
        raise DeepJSONError(
            f"nested too deeply (more than about {RECURSION_LIMIT:,} levels)"
        ) from None


def echo_json(obj: Any, settings: Settings) -> None:
    """Print *obj* as JSON: one compact line with --json, indented for people otherwise."""
    click.echo(dumps(obj, pretty=not settings.json))


def binary_stdout() -> IO[bytes]:
    """stdout for bytes (what click's deprecated ``get_binary_stream`` returned)."""
    sys.stdout.flush()
    return sys.stdout.buffer


def show_key(key: str) -> str:
    """A key as people should see it: as is, or JSON-quoted when it holds control chars."""
    return key if key.isprintable() else dumps(key)


def iter_chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of up to *size* items."""
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
