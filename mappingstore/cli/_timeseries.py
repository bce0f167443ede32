"""The ``series`` and ``events`` command groups: time series and event logs from the shell.

Both work through :meth:`Store.series <mappingstore.Store.series>` and
:meth:`Store.events <mappingstore.Store.events>` only, so they behave the same on every
backend. Values are typed JSON, as for ``get``/``set``. Timestamps are integers (any unit
for a series; milliseconds for an event log).

``-n`` is ``--namespace`` on every command, so the point count of ``series range`` is
``--count``/``-c``.
"""

from __future__ import annotations

import json
from typing import IO, Any

import click

from .._events import OPS
from ._app import (
    CLIError,
    DeepJSONError,
    Settings,
    UsageFailure,
    dumps,
    echo_json,
    loads,
    open_store,
    store_options,
)
from ._items import parse_json_value, typed_value, value_from_json

__all__ = ["COMMANDS", "parse_changes"]

# ignore_unknown_options: a negative timestamp (`-5`) is an argument, not an option.
_ARGS_MAY_BE_NEGATIVE = {"ignore_unknown_options": True}

#: Operators whose change takes no value: ``["delitem"]``, ``["neg"]``, ``["not_"]``.
_UNARY = ("delitem", "neg", "not_")


def _echo_summary(settings: Settings, text: str) -> None:
    """A one-line note on stderr for people (nothing with --quiet or --json)."""
    if not settings.quiet and not settings.json:
        click.echo(text, err=True)


def _point(t: int, value: Any) -> dict[str, Any]:
    return {"t": t, "value": typed_value(value)}


def _echo_points(settings: Settings, points: list[tuple[int, Any]]) -> None:
    if settings.json:
        echo_json([_point(t, v) for t, v in points], settings)
        return
    for t, v in points:
        click.echo(f"{t}\t{dumps(typed_value(v))}")


# -- series ---------------------------------------------------------------------------------


@click.group("series")
def series_group() -> None:
    """Time series: sorted integer timestamps -> values.

    \b
      mappingstore series append temp 100 21.5 160 22.0 220 21.75
      mappingstore series range temp --start 100 --end 200
      mappingstore series last temp
      mappingstore series missing temp 100 400 --freq 60

    Values are typed JSON (like `set`). Output lines are TIMESTAMP<TAB>VALUE; with --json,
    a list of {"t": TIMESTAMP, "value": VALUE} objects (the JSON Lines form that
    `series append --file` reads, one per line).
    """


def _read_points(file: IO[bytes], as_string: bool) -> list[tuple[int, Any]]:
    points: list[tuple[int, Any]] = []
    for number, raw in enumerate(file, start=1):
        where = f"line {number} of the file"
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UsageFailure(f"{where} is not UTF-8 text") from None
        if not line:
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as exc:
            raise UsageFailure(f"{where} is not valid JSON ({exc.msg})") from None
        except DeepJSONError as exc:
            raise UsageFailure(f"{where} is {exc}") from None
        if not isinstance(obj, dict) or set(obj) != {"t", "value"}:
            raise UsageFailure(f'{where} is not an object {{"t": TIMESTAMP, "value": VALUE}}')
        t = obj["t"]
        if isinstance(t, bool) or not isinstance(t, int):
            raise UsageFailure(f"{where}: the timestamp must be an integer, got {dumps(t)}")
        value = obj["value"]
        if as_string:
            if not isinstance(value, str):
                raise UsageFailure(f"{where}: --string needs a string value")
        else:
            value = value_from_json(value, where)
        points.append((t, value))
    return points


def _parse_timestamp(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageFailure(f"{what} must be an integer timestamp, got {text!r}") from None


@series_group.command("append", context_settings=_ARGS_MAY_BE_NEGATIVE)
@click.argument("name")
@click.argument("pairs", nargs=-1, metavar="[T VALUE]...")
@click.option(
    "--file",
    "file",
    type=click.File("rb"),
    default=None,
    help='Read points from FILE (\'-\': stdin), JSON Lines {"t": T, "value": VALUE}.',
)
@click.option("--string", "as_string", is_flag=True, help="Take every VALUE as text, not JSON.")
@store_options
def series_append_cmd(
    settings: Settings,
    name: str,
    pairs: tuple[str, ...],
    file: IO[bytes] | None,
    as_string: bool,
) -> None:
    """Add points to series NAME: pairs of timestamp and typed-JSON value, or --file.

    Points may come in any order; a timestamp already in the series (or repeated) takes
    the last value given. Everything is written in one atomic step: a bad line or value
    stores nothing.
    """
    if bool(pairs) == (file is not None):
        raise UsageFailure("give T VALUE pairs or --file (exactly one of them)")
    if len(pairs) % 2:
        raise UsageFailure(f"T VALUE pairs expected, got an odd number of arguments ({len(pairs)})")
    if file is not None:
        points = _read_points(file, as_string)
    else:
        points = []
        for i in range(0, len(pairs), 2):
            t = _parse_timestamp(pairs[i], "T")
            text = pairs[i + 1]
            points.append((t, text if as_string else parse_json_value(text, f"the value at {t}")))
    with open_store(settings, readonly=False) as store:
        store.series(name).extend(points)
    if settings.json:
        echo_json({"series": name, "points": len(points)}, settings)
    else:
        _echo_summary(settings, f"{len(points)} point(s) written to series {name!r}")


_start = click.option("--start", type=int, default=None, help="Earliest timestamp (inclusive).")
_end = click.option("--end", type=int, default=None, help="Latest timestamp (inclusive).")
_positive = click.IntRange(min=1)


@series_group.command("range")
@click.argument("name")
@_start
@_end
@click.option(
    "--count",
    "-c",
    type=click.IntRange(min=0),
    default=None,
    help="At most this many points, from the start (-n is --namespace).",
)
@click.option(
    "--freq",
    type=_positive,
    default=None,
    help="Thin out: keep the first point, then only points at least FREQ after the last kept.",
)
@store_options
def series_range_cmd(
    settings: Settings,
    name: str,
    start: int | None,
    end: int | None,
    count: int | None,
    freq: int | None,
) -> None:
    """Print the points of series NAME between --start and --end (both inclusive).

    An unknown or empty series prints nothing (exit status 0).
    """
    with open_store(settings, readonly=True) as store:
        points = store.series(name).range(start, end, n=count, freq=freq)
    _echo_points(settings, points)


def _edge(settings: Settings, name: str, which: str) -> None:
    with open_store(settings, readonly=True) as store:
        series = store.series(name)
        point = series.first() if which == "first" else series.last()
    if point is None:
        raise CLIError(f"not found: series {name!r} has no points")
    if settings.json:
        echo_json(_point(*point), settings)
    else:
        click.echo(f"{point[0]}\t{dumps(typed_value(point[1]))}")


@series_group.command("last")
@click.argument("name")
@store_options
def series_last_cmd(settings: Settings, name: str) -> None:
    """Print the latest point of series NAME; exit status 1 if it has none."""
    _edge(settings, name, "last")


@series_group.command("first")
@click.argument("name")
@store_options
def series_first_cmd(settings: Settings, name: str) -> None:
    """Print the earliest point of series NAME; exit status 1 if it has none."""
    _edge(settings, name, "first")


@series_group.command("missing", context_settings=_ARGS_MAY_BE_NEGATIVE)
@click.argument("name")
@click.argument("start")
@click.argument("end", required=False)
@click.option("--freq", type=_positive, required=True, help="Grid step (required).")
@click.option("--check", is_flag=True, help="Exit with status 1 if any point is missing.")
@store_options
def series_missing_cmd(
    settings: Settings, name: str, start: str, end: str | None, freq: int, check: bool
) -> None:
    """Print the grid timestamps START, START+FREQ, ... up to END (inclusive) with no point.

    END defaults to START. With --check, the exit status says whether the series is
    complete on that grid (0) or not (1).
    """
    lo = _parse_timestamp(start, "START")
    hi = None if end is None else _parse_timestamp(end, "END")
    with open_store(settings, readonly=True) as store:
        missing = store.series(name).missing(lo, hi, freq=freq)
    if settings.json:
        echo_json(missing, settings)
    else:
        for t in missing:
            click.echo(str(t))
    if check and missing:
        raise click.exceptions.Exit(1)


@series_group.command("ls")
@click.option(
    "--long",
    "-l",
    "long_",
    is_flag=True,
    help="Also show each series' point count and first and last timestamps.",
)
@store_options
def series_ls_cmd(settings: Settings, long_: bool) -> None:
    """List the names of the non-empty series (sorted).

    Names are never encrypted: plain `ls` needs no password; --long reads the series.
    """
    with open_store(settings, readonly=True, values=long_) as store:
        names = store.series_names()
        rows: list[dict[str, Any]] = []
        if long_:
            for name in names:
                series = store.series(name)
                first, last = series.first(), series.last()
                rows.append(
                    {
                        "name": name,
                        "points": len(series),
                        "first": None if first is None else first[0],
                        "last": None if last is None else last[0],
                    }
                )
    if not long_:
        if settings.json:
            echo_json(names, settings)
        else:
            for name in names:
                click.echo(name if name.isprintable() else dumps(name))
        return
    if settings.json:
        echo_json(rows, settings)
        return
    for row in rows:
        shown = row["name"] if row["name"].isprintable() else dumps(row["name"])
        click.echo(f"{row['points']:>10} {row['first']:>20} {row['last']:>20} {shown}")


@series_group.command("rm")
@click.argument("name")
@_start
@_end
@click.option("--force", "-f", is_flag=True, help="An unknown series is not an error.")
@store_options
def series_rm_cmd(
    settings: Settings, name: str, start: int | None, end: int | None, force: bool
) -> None:
    """Delete the points of series NAME between --start and --end (inclusive).

    Without bounds the whole series is deleted. Deleting a series that does not exist
    exits with status 1 unless --force; a range with no points in it is not an error.
    """
    whole = start is None and end is None
    with open_store(settings, readonly=False) as store:
        if whole and not force and name not in store.series_names():
            raise CLIError(f"not found: series {name!r}")
        removed = store.series(name).remove(start, end)
    if settings.json:
        echo_json({"series": name, "removed": removed}, settings)
    else:
        _echo_summary(settings, f"{removed} point(s) removed from series {name!r}")


# -- events ---------------------------------------------------------------------------------


def parse_changes(obj: Any, *, plain: bool = False) -> dict[str, Any]:
    """The ``changes`` mapping for :meth:`EventLog.apply` from decoded (typed) JSON.

    A change is a plain value (set the item), or, unless *plain*, a JSON list whose first
    element names a supported operator: ``["add", 5]`` (a binary operator and its
    operand), ``["delitem"]``, ``["neg"]``, ``["not_"]`` (no operand; ``null`` is accepted
    as one), ``["setitem", VALUE]`` (set explicitly, e.g. to a list that would otherwise
    read as an operator). Any other value, lists included, is set as is.
    """
    if not isinstance(obj, dict):
        raise UsageFailure('CHANGES must be a JSON object {"item": value or ["op", value]}')
    changes: dict[str, Any] = {}
    for item, change in obj.items():
        if not isinstance(item, str):
            raise UsageFailure(f"item names are strings, got {item!r}")
        if plain or not (
            isinstance(change, list) and change and isinstance(change[0], str) and change[0] in OPS
        ):
            changes[item] = change
            continue
        op, rest = change[0], change[1:]
        if op in _UNARY:
            if len(rest) > 1 or (rest and rest[0] is not None):
                raise UsageFailure(f'{item!r}: ["{op}"] takes no value')
            changes[item] = (OPS[op],)
        elif len(rest) == 1:
            changes[item] = (OPS[op], rest[0])
        else:
            raise UsageFailure(
                f'{item!r}: ["{op}", VALUE] needs exactly one value (or use --plain to set '
                "the list itself)"
            )
    return changes


@click.group("events")
def events_group() -> None:
    """Event logs: timestamped changes to a dict, replayable to any time.

    \b
      mappingstore events apply account '{"balance": 100, "owner": "ann"}' --at 1000
      mappingstore events apply account '{"balance": ["add", 50]}' --at 2000
      mappingstore events current account
      mappingstore events past account 1500
      mappingstore events log account --op add

    A change is a typed-JSON value (set the item) or a list naming an operator:
    ["add", 5], ["sub", 1], ["mul", 2], ["truediv", 2], ["floordiv", 2], ["mod", 3],
    ["pow", 2], ["concat", [1]], ["setitem", VALUE], ["delitem"], ["neg"], `["not_"]`.
    Use --plain to store such a list as a value. Timestamps are integer milliseconds.
    """


#: Operator names ``events log --op`` accepts. A callback checks them rather than a
#: :class:`click.Choice`: the reference docs would list a Choice's values as
#: reStructuredText, where ``not_`` reads as a link target.
_OP_NAMES = (*OPS, "snapshot")


def _check_ops(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    for name in value:
        if name not in _OP_NAMES:
            raise click.BadParameter(f"{name!r} is not one of {', '.join(_OP_NAMES)}")
    return list(value)


def _complete_ops(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return [n for n in _OP_NAMES if n.startswith(incomplete)]


@events_group.command("apply", context_settings=_ARGS_MAY_BE_NEGATIVE)
@click.argument("name")
@click.argument("changes", metavar="CHANGES_JSON")
@click.option(
    "--at",
    "at",
    type=int,
    default=None,
    metavar="MS",
    help="Timestamp in milliseconds (default: now, after the log's last event).",
)
@click.option("--plain", is_flag=True, help="Every change is a plain value, lists included.")
@store_options
def events_apply_cmd(
    settings: Settings, name: str, changes: str, at: int | None, plain: bool
) -> None:
    """Record one change set in event log NAME and print the new current state.

    An event already at --at, or a change that cannot replay (an "add" to a missing
    item, a "delitem" of one...) fails with status 1 and stores nothing.
    """
    parsed = parse_changes(parse_json_value(changes, "CHANGES_JSON"), plain=plain)
    with open_store(settings, readonly=False) as store:
        state = store.events(name).apply(parsed, at)
    echo_json(typed_value(state), settings)


def _echo_state(settings: Settings, result: Any, with_timestamp: bool) -> None:
    if with_timestamp:
        ts, state = result
        echo_json({"timestamp": ts, "state": typed_value(state)}, settings)
    else:
        echo_json(typed_value(result), settings)


_with_timestamp = click.option(
    "--with-timestamp",
    is_flag=True,
    help='Print {"timestamp": MS of the last event applied (or null), "state": {...}}.',
)


@events_group.command("current")
@click.argument("name")
@_with_timestamp
@store_options
def events_current_cmd(settings: Settings, name: str, with_timestamp: bool) -> None:
    """Print the current state of event log NAME ({} for an unknown log)."""
    with open_store(settings, readonly=True) as store:
        result = store.events(name).current(with_timestamp=with_timestamp)
    _echo_state(settings, result, with_timestamp)


@events_group.command("past", context_settings=_ARGS_MAY_BE_NEGATIVE)
@click.argument("name")
@click.argument("t", metavar="MS")
@_with_timestamp
@store_options
def events_past_cmd(settings: Settings, name: str, t: str, with_timestamp: bool) -> None:
    """Print the state of event log NAME after every event at or before MS."""
    ts = _parse_timestamp(t, "MS")
    with open_store(settings, readonly=True) as store:
        result = store.events(name).past(ts, with_timestamp=with_timestamp)
    _echo_state(settings, result, with_timestamp)


@events_group.command("log")
@click.argument("name")
@_start
@_end
@click.option(
    "--op",
    "ops",
    multiple=True,
    metavar="OP",
    callback=_check_ops,
    shell_complete=_complete_ops,
    help="Only events of this operator (repeatable): a name that `events apply` takes, "
    "or snapshot (what prune writes).",
)
@store_options
def events_log_cmd(
    settings: Settings, name: str, start: int | None, end: int | None, ops: list[str]
) -> None:
    """Print the events of log NAME in replay order: MS<TAB>ITEM<TAB>OP<TAB>VALUE.

    A plain change is shown with the operator "setitem"; "delitem", "neg" and `not_`
    have the value null. With --json, a list of {"t", "item", "op", "value"} objects.
    """
    with open_store(settings, readonly=True) as store:
        events = store.events(name).events(start, end, ops=ops or None)
    if settings.json:
        echo_json(
            [
                {"t": e.timestamp, "item": e.item, "op": e.op, "value": typed_value(e.value)}
                for e in events
            ],
            settings,
        )
        return
    for e in events:
        item = e.item if e.item.isprintable() and "\t" not in e.item else dumps(e.item)
        click.echo(f"{e.timestamp}\t{item}\t{e.op}\t{dumps(typed_value(e.value))}")


@events_group.command("ls")
@store_options
def events_ls_cmd(settings: Settings) -> None:
    """List the names of the event logs (sorted); needs no password."""
    with open_store(settings, readonly=True, values=False) as store:
        names = store.event_names()
    if settings.json:
        echo_json(names, settings)
    else:
        for name in names:
            click.echo(name if name.isprintable() else dumps(name))


@events_group.command("prune", context_settings=_ARGS_MAY_BE_NEGATIVE)
@click.argument("name")
@click.argument("before", metavar="MS")
@store_options
def events_prune_cmd(settings: Settings, name: str, before: str) -> None:
    """Compact every event of log NAME at or before MS into one snapshot event.

    The current state and every past state from MS on are unchanged.
    """
    ts = _parse_timestamp(before, "MS")
    with open_store(settings, readonly=False) as store:
        removed = store.events(name).prune(ts)
    if settings.json:
        echo_json({"events": name, "removed": removed}, settings)
    else:
        _echo_summary(settings, f"{removed} event(s) folded into a snapshot in event log {name!r}")


@events_group.command("rm")
@click.argument("name")
@click.option("--force", "-f", is_flag=True, help="An unknown event log is not an error.")
@store_options
def events_rm_cmd(settings: Settings, name: str, force: bool) -> None:
    """Delete event log NAME and its whole history (status 1 if unknown, unless --force)."""
    with open_store(settings, readonly=False) as store:
        exists = name in store.event_names()
        store.events(name).remove()
    if settings.json:
        echo_json({"events": name, "removed": exists}, settings)
    if not exists and not force:
        raise CLIError(f"not found: event log {name!r}")


COMMANDS = [series_group, events_group]
