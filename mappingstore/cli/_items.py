"""Item commands: ``get``, ``set``, ``del``, ``ls``, ``len``, ``ttl``, ``expire``."""

from __future__ import annotations

import json
import math
from typing import IO, Any

import click

from .._codec import is_encrypted
from .._jsonio import from_typed, to_typed
from .._store import FOREVER
from .._tree import View
from ..errors import PasswordRequiredError
from . import _raw
from ._app import (
    DEFAULT_URL,
    CLIError,
    DeepJSONError,
    Settings,
    UsageFailure,
    binary_stdout,
    dumps,
    echo_json,
    loads,
    open_store,
    show_key,
    store_options,
)

__all__ = ["COMMANDS", "complete_keys", "parse_json_value", "typed_value", "value_from_json"]

_COMPLETION_LIMIT = 500


def complete_keys(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of key names; never prompts, reads no value, fails silently."""

    def opt(name: str) -> Any:
        c: click.Context | None = ctx
        while c is not None:
            if c.params.get(name) not in (None, False):
                return c.params[name]
            c = c.parent
        return None

    settings = Settings(
        url=opt("url") or DEFAULT_URL, namespace=opt("namespace"), dot_names=bool(opt("dot_names"))
    )
    try:
        with open_store(settings, readonly=True, values=False) as store:
            found = []
            for name in store.names(incomplete) if not store.dot_names else store.names():
                if name.startswith(incomplete):
                    found.append(name)
                    if len(found) >= _COMPLETION_LIMIT:
                        break
            return sorted(found)
    except Exception:  # completion must never break the user's shell
        return []


def parse_json_value(text: str, what: str = "VALUE") -> Any:
    """Parse typed JSON given on the command line; bad input is a usage error (exit 2)."""
    try:
        obj = loads(text)
    except json.JSONDecodeError as exc:
        raise UsageFailure(
            f"{what} is not valid JSON ({exc.msg} at character {exc.pos}); "
            "quote strings ('\"text\"') or use --string to store text as is"
        ) from None
    except DeepJSONError as exc:
        raise UsageFailure(f"{what} is {exc}") from None
    return value_from_json(obj, what)


def value_from_json(obj: Any, what: str = "VALUE") -> Any:
    """The value of parsed typed JSON *obj*; a bad tag is a usage error (exit 2)."""
    try:
        return from_typed(obj)
    except RecursionError:
        raise UsageFailure(f"{what} is nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError) as exc:
        raise UsageFailure(f"{what} has a bad typed-JSON tag: {exc}") from None


def typed_value(value: Any) -> Any:
    """The typed-JSON form of a value read from a store (a branch view becomes a dict)."""
    if isinstance(value, View):
        value = value.to_dict()
    return to_typed(value)


def _parse_ttl(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """Seconds (> 0), or ``never`` / ``none`` for no expiry."""
    text = value.strip().lower()
    if text in ("never", "none", "forever"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a number of seconds or 'never'") from None
    if math.isnan(seconds) or seconds <= 0:
        raise click.BadParameter(f"must be > 0 seconds, got {value!r}")
    return FOREVER if math.isinf(seconds) else seconds


_POSITIVE = click.FloatRange(min=0, min_open=True)


# -- get ------------------------------------------------------------------------------------


@click.command("get")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...", shell_complete=complete_keys)
@click.option(
    "--raw",
    is_flag=True,
    help="Write a str value as plain text and a bytes value as raw bytes, exactly (no newline).",
)
@click.option(
    "--default",
    metavar="JSON",
    default=None,
    help="Print this typed JSON for a missing key instead of failing.",
)
@store_options
def get_cmd(settings: Settings, keys: tuple[str, ...], raw: bool, default: str | None) -> None:
    """Print the value of KEY as typed JSON.

    With several keys, print one JSON object {key: value}. A missing key exits with
    status 1 (nothing is printed) unless --default is given. Under --dot-names a branch
    prints as a nested object.
    """
    fallback = parse_json_value(default, "--default") if default is not None else None
    if raw and len(keys) > 1:
        raise UsageFailure("--raw takes exactly one KEY")
    with open_store(settings, readonly=True) as store:
        found: dict[str, Any] = {}
        missing: list[str] = []
        for key in keys:
            try:
                found[key] = store[key]
            except KeyError:
                if default is None:
                    missing.append(key)
                else:
                    found[key] = fallback
        if missing:
            raise CLIError("not found: " + ", ".join(repr(k) for k in missing))
        if len(keys) > 1:
            echo_json({k: typed_value(v) for k, v in found.items()}, settings)
            return
        value = found[keys[0]]
        if raw and isinstance(value, bytes):
            binary_stdout().write(value)
        elif raw and isinstance(value, str):
            click.echo(value, nl=False)
        else:
            echo_json(typed_value(value), settings)


# -- set ------------------------------------------------------------------------------------


# ignore_unknown_options: a negative number is a value (`set t -5`), not an option.
@click.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("key")
@click.argument("value", required=False)
@click.option(
    "--string", "as_string", is_flag=True, help="Store VALUE (or the file) as text, not JSON."
)
@click.option(
    "--bytes", "as_bytes", is_flag=True, help="Store the file's content as bytes (with --file)."
)
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    default=None,
    help="Read the value from FILE ('-': stdin) instead of VALUE; JSON unless --string or --bytes.",
)
@click.option(
    "--ttl", type=_POSITIVE, default=None, metavar="SECONDS", help="Expire the item after SECONDS."
)
@click.option(
    "--encrypt/--no-encrypt",
    default=None,
    help="Override the store's default encryption for this item.",
)
@store_options
def set_cmd(
    settings: Settings,
    key: str,
    value: str | None,
    as_string: bool,
    as_bytes: bool,
    file: IO[bytes] | None,
    ttl: float | None,
    encrypt: bool | None,
) -> None:
    """Store VALUE (typed JSON) at KEY.

    \b
      mappingstore set greeting '"hello"'
      mappingstore set point '{"$tuple": [1, 2]}'
      mappingstore set --string motd 'Hello, world'
      mappingstore set --file logo.png --bytes logo
      mappingstore set --ttl 60 session '{"user": 7}'

    With --dot-names, an object value writes a branch (replacing its old content).
    """
    if (value is None) == (file is None):
        raise UsageFailure("give exactly one of VALUE or --file")
    if as_string and as_bytes:
        raise UsageFailure("--string and --bytes exclude each other")
    if as_bytes and file is None:
        raise UsageFailure("--bytes needs --file (a VALUE on the command line is text)")
    parsed: Any
    if file is not None:
        content = file.read()
        if as_bytes:
            parsed = content
        else:
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageFailure(
                    "the file is not UTF-8 text; use --bytes to store it as bytes"
                ) from None
            parsed = text if as_string else parse_json_value(text, "the file")
    else:
        assert value is not None  # checked above; narrows the type for mypy
        parsed = value if as_string else parse_json_value(value)
    with open_store(settings, readonly=False) as store:
        try:
            store.set(key, parsed, ttl=ttl, encrypt=encrypt)
        except PasswordRequiredError:
            if not encrypt:
                raise
            raise PasswordRequiredError(
                "--encrypt needs the store's password: set $MAPPINGSTORE_PASSWORD "
                "or use --password-file"
            ) from None


# -- del ------------------------------------------------------------------------------------


@click.command("del")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...", shell_complete=complete_keys)
@click.option("--force", "-f", is_flag=True, help="A missing key is not an error.")
@store_options
def del_cmd(settings: Settings, keys: tuple[str, ...], force: bool) -> None:
    """Delete each KEY (under --dot-names, a branch and everything in it).

    The deletions commit together. A missing key exits with status 1 (the others
    are still deleted) unless --force.
    """
    with open_store(settings, readonly=False, values=False) as store:
        wanted = list(dict.fromkeys(keys))
        missing = [k for k in wanted if k not in store]
        present = [k for k in wanted if k not in missing]
        store.delete_many(present)
    if settings.json:
        echo_json({"deleted": present, "missing": missing}, settings)
    if missing and not force:
        raise CLIError("not found: " + ", ".join(repr(k) for k in missing))


# -- ls -------------------------------------------------------------------------------------


def _ttl_text(expires: float | None, now: float) -> str:
    return "-" if expires is None else f"{max(0.0, expires - now):.1f}s"


@click.command("ls")
@click.argument("prefix", default="", required=False, shell_complete=complete_keys)
@click.option(
    "--long",
    "-l",
    "long_",
    is_flag=True,
    help="Also show stored size in bytes, TTL and encryption.",
)
@store_options
def ls_cmd(settings: Settings, prefix: str, long_: bool) -> None:
    """List key names (sorted) starting with PREFIX.

    Under --dot-names PREFIX is a path: 'ls 2' lists 2 and 2.x, never 20. With --long,
    each line is SIZE TTL ENC KEY: the stored record's size in bytes, the seconds left
    ('-': no expiry) and 'enc' for an encrypted value. Key names are never encrypted,
    so no password is needed.
    """
    with open_store(settings, readonly=True, values=False) as store:
        names = sorted(store.names(prefix))
        if not long_:
            if settings.json:
                echo_json(names, settings)
            else:
                for name in names:
                    click.echo(show_key(name))
            return
        ns, now = store.namespace, _raw.now(store)
        rows = []
        for name in names:
            rec = _raw.record(store, ns, name)
            if rec is None:  # deleted or expired since it was listed
                continue
            data, expires = rec
            rows.append((name, len(data), expires, is_encrypted(data)))
    if settings.json:
        echo_json(
            [
                {
                    "key": k,
                    "size": size,
                    "ttl": None if exp is None else max(0.0, exp - now),
                    "encrypted": enc,
                }
                for k, size, exp, enc in rows
            ],
            settings,
        )
        return
    for name, size, expires, enc in rows:
        click.echo(
            f"{size:>10} {_ttl_text(expires, now):>12} {'enc' if enc else '-':<3} {show_key(name)}"
        )


# -- len, ttl, expire -----------------------------------------------------------------------


@click.command("len")
@click.argument("prefix", default="", required=False, shell_complete=complete_keys)
@store_options
def len_cmd(settings: Settings, prefix: str) -> None:
    """Print the number of items (of keys starting with PREFIX).

    Under --dot-names: the number of names directly in the root (or in branch PREFIX).
    """
    with open_store(settings, readonly=True, values=False) as store:
        if store.dot_names:
            n = len(store.view(prefix)) if prefix else len(store)
        elif prefix:
            n = sum(1 for _ in store.names(prefix))
        else:
            n = len(store)
    click.echo(str(n))


@click.command("ttl")
@click.argument("key", shell_complete=complete_keys)
@store_options
def ttl_cmd(settings: Settings, key: str) -> None:
    """Print the seconds until KEY expires ('no expiry', or null with --json)."""
    with open_store(settings, readonly=True, values=False) as store:
        left = store.ttl(key)
    if left == math.inf:  # an infinite expiry (see _raw.record) is no expiry
        left = None
    if settings.json:
        click.echo(dumps(left))
    else:
        click.echo("no expiry" if left is None else f"{left:.3f}")


@click.command("expire")
@click.argument("key", shell_complete=complete_keys)
@click.argument("seconds", metavar="SECONDS|never", callback=_parse_ttl)
@store_options
def expire_cmd(settings: Settings, key: str, seconds: float | None) -> None:
    """Make KEY expire in SECONDS, or never ('never' removes the expiry)."""
    with open_store(settings, readonly=False, values=False) as store:
        store.expire(key, seconds)


COMMANDS = [get_cmd, set_cmd, del_cmd, ls_cmd, len_cmd, ttl_cmd, expire_cmd]
