"""Issue 8, required test 11: secrets never leak.

Every CLI command (found by walking the click group, so a new command cannot be forgotten)
and every error path we can provoke (wrong password, no password, missing key, bad URL,
bad JSON value, unreachable server, wrong server password, read-only store, corrupt and
tampered values, bad options) runs with distinctive secrets supplied every way the tool
and the library take them:

* the store password in ``$MAPPINGSTORE_PASSWORD`` (and ``$MAPPINGSTORE_DST_PASSWORD``,
  ``$MAPPINGSTORE_NEW_PASSWORD``), or in files named by ``--password-file`` (and
  ``--dst-password-file``, ``--new-password-file``): the CLI has no password option on
  purpose, the file options are its "option" form;
* a server password inside the URL, percent-encoded (with ``@ : / % # ? &`` and a space in
  it) and raw (unescaped ``:``; an unescaped ``@`` or a ``%`` that is no ``%XX`` escape
  must be refused), given with ``--url`` or ``$MAPPINGSTORE_URL``: a private
  ``redis-server --requirepass`` that really checks it, PostgreSQL (trust auth ignores
  it), and local backends' URLs, which must refuse it (and a ``?password=`` option);
* in the Python API: ``password=``, ``key=`` (a raw key) and ``redis_password=``.

Everything a person or a log collector could see is scanned: stdout, stderr, every record
of the ``mappingstore``, ``redis`` and ``psycopg`` loggers at DEBUG (tracebacks included),
warnings, ``repr()``/``str()``/``url``/``info()`` of stores and views, and for every
exception its ``str``, ``repr``, ``args``, each chained ``__cause__``/``__context__``
(suppressed ones too) and ``traceback.format_exception``. Real subprocess runs add what
the interpreter itself prints (tracebacks, warnings at exit). The needle is each secret in
every form: raw, percent-encoded (three ways), its random token alone and its distinctive
head (so a partly redacted secret counts too). Pass figure: 0 occurrences.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import json
import logging
import operator
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import time
import traceback
import urllib.parse
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("click")  # the cli extra

import click
from click.testing import CliRunner, Result

import mappingstore
from mappingstore import MemoryStore, Store
from mappingstore.cli import _raw, cli
from tests.redis_cluster import PrivateRedis, free_port, require_binaries
from tests.servers import POSTGRES_URL, REDIS_URL
from tests.torture.harness import PERSISTENT, make_target

ROOT = Path(__file__).resolve().parents[2]

# -- the secrets ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Secret:
    """A password: a distinctive head (never hex), separators that URLs must escape, a token."""

    head: str
    middle: str
    token: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))

    @property
    def text(self) -> str:
        return f"{self.head}{self.middle}{self.token}"

    @property
    def quoted(self) -> str:
        """The form that belongs in a URL's userinfo."""
        return urllib.parse.quote(self.text, safe="")

    def needles(self) -> list[str]:
        text = self.text
        forms = {
            text,
            self.quoted,
            urllib.parse.quote(text),
            urllib.parse.quote_plus(text),
            json.dumps(text)[1:-1],
            self.head,
            self.token,
        }
        return sorted({form.lower() for form in forms})


#: The store password (env, --password-file, prompt, ``password=``).
STORE = Secret("S3cr3tPw", "-p@ss-")
#: The new password of ``passwd`` / ``change_password``, and ``copy``'s destination password.
NEW = Secret("N3wPw", ":p@ss/w%rd-")
#: A wrong password (a secret too: it is somebody's mistyped real one).
WRONG = Secret("Wr0ngPw", "-p@ss-")
#: The Redis server password, percent-encoded in URLs; every character a URL must escape.
SERVER = Secret("S3rv3rPw", ":p@ss/w%rd #?&+=;-")
#: A second server password, written raw in URLs (unescaped ":", which every parser reads).
RAW = Secret("R4wPw", ":p:ss:")
#: A raw password whose "%" is not a %XX escape (an unencoded "%" typed into a URL).
BADESC = Secret("B4dEscPw", "%zz-p@ss-")
#: A raw 32-byte key (``key=``), for the API.
RAW_KEY = os.urandom(32)

SECRETS = (STORE, NEW, WRONG, SERVER, RAW, BADESC)
NEEDLES: list[str] = sorted(
    {n for s in SECRETS for n in s.needles()}
    | {
        RAW_KEY.hex(),
        base64.b64encode(RAW_KEY).decode().lower(),
        base64.urlsafe_b64encode(RAW_KEY).decode().lower(),
        repr(RAW_KEY)[2:-1].lower(),
    }
)
assert all(any(c not in "0123456789abcdef" for c in s.head.lower()) for s in SECRETS)

#: Environment variables the CLI reads; unset for every run unless a run sets them.
CLI_ENV = (
    "MAPPINGSTORE_URL",
    "MAPPINGSTORE_PASSWORD",
    "MAPPINGSTORE_DST_PASSWORD",
    "MAPPINGSTORE_NEW_PASSWORD",
)
LOGGERS = ("mappingstore", "redis", "psycopg", "urllib3")


# -- scanning ------------------------------------------------------------------------------


class Scan:
    """Counts what was scanned and keeps every occurrence of a secret (the figure: 0)."""

    def __init__(self) -> None:
        self.outputs = 0
        self.log_records = 0
        self.leaks: list[str] = []
        self.failures: list[str] = []  # wrong exit codes, uncaught exceptions, tracebacks

    def text(self, where: str, text: str | bytes) -> None:
        """Scan one output for every needle (case-insensitive; bytes also raw)."""
        self.outputs += 1
        if isinstance(text, bytes):
            if RAW_KEY in text:
                self.leaks.append(f"{where}: the raw key bytes")
            text = text.decode("utf-8", "backslashreplace")
        low = text.lower()
        for needle in NEEDLES:
            at = low.find(needle)
            if at >= 0:
                excerpt = text[max(0, at - 100) : at + len(needle) + 60]
                self.leaks.append(f"{where}: {needle!r} in ...{excerpt!r}...")

    def exception(self, where: str, exc: BaseException) -> None:
        """Scan everything an exception can show: its chain (suppressed parts too)."""
        self.text(f"{where} format_exception", "".join(traceback.format_exception(exc)))
        seen: list[BaseException] = []
        todo: list[BaseException] = [exc]
        while todo:
            cur = todo.pop()
            if any(cur is s for s in seen):
                continue
            seen.append(cur)
            name = type(cur).__name__
            self.text(f"{where} str({name})", str(cur))
            self.text(f"{where} repr({name})", repr(cur))
            self.text(f"{where} {name}.args", repr(cur.args))
            for note in getattr(cur, "__notes__", []):
                self.text(f"{where} {name} note", str(note))
            self.text(
                f"{where} {name} format_exception_only",
                "".join(traceback.format_exception_only(type(cur), cur)),
            )
            todo.extend(c for c in (cur.__cause__, cur.__context__) if c is not None)

    def obj(self, where: str, thing: Any) -> None:
        """``repr`` and ``str`` of an object."""
        self.text(f"{where} repr", repr(thing))
        self.text(f"{where} str", str(thing))

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def check(self, figure: Callable[..., None] | None, **detail: Any) -> None:
        """Record the figures (unless *figure* is None), then assert them."""
        if figure is not None:
            figure("outputs scanned", self.outputs, **detail)
            if self.log_records:
                figure("log records scanned", self.log_records, **detail)
            figure("secret occurrences", len(self.leaks), **detail)
        assert not self.failures, "\n".join(self.failures[:40])
        assert not self.leaks, f"{len(self.leaks)} leaks:\n" + "\n".join(self.leaks[:40])
        assert self.outputs > 0


class _Capture(logging.Handler):
    """Keeps every log record formatted as a log file would show it (tracebacks too)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception as exc:  # a record that cannot format is itself worth seeing
            self.lines.append(f"UNFORMATTABLE {record.name} {record.msg!r} {exc!r}")


@contextlib.contextmanager
def observed(scan: Scan, where: str) -> Iterator[None]:
    """Capture DEBUG logs (ours, redis-py's, psycopg's) and warnings; scan them after."""
    handler = _Capture()
    # Our loggers get the handler directly and stop propagating for the duration (pytest's
    # own capture need not format thousands of DEBUG records); the root one catches the rest.
    loggers = [logging.getLogger(name) for name in LOGGERS] + [logging.getLogger()]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.name != "root":
            lg.setLevel(logging.DEBUG)
            lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate
        scan.log_records += len(handler.lines)
        scan.text(f"{where} logs", "\n".join(handler.lines))
        for w in caught:
            scan.text(f"{where} warning", f"{w.category.__name__}: {w.message}")


# -- locations -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A private redis-server that requires SERVER's password (and also accepts RAW's)."""
    require_binaries()
    import redis

    server = PrivateRedis(
        tmp_path_factory.mktemp("auth-redis"),
        "--requirepass",
        SERVER.text,
        "--appendonly",
        "no",
    )
    with server:
        admin = redis.Redis(port=server.port, password=SERVER.text)
        try:
            admin.execute_command("ACL", "SETUSER", "default", f">{RAW.text}")  # type: ignore[no-untyped-call]
        finally:
            admin.close()
        yield server


def _pg_url_with(password: str, table: str, extra: str = "") -> str:
    split = urllib.parse.urlsplit(POSTGRES_URL)
    user = split.username or "postgres"
    host = split.netloc.rpartition("@")[2]
    query = split.query + ("&" if split.query else "") + f"table={table}&pool_min_size=0{extra}"
    return f"postgresql://{user}:{password}@{host}{split.path}?{query}"


@dataclasses.dataclass
class Location:
    """A store the tests write: its URL (with the server password when it has a server)."""

    backend: str
    url: str
    cleanup: Callable[[], None]


def _location(backend: str, tmp_path: Path, auth: PrivateRedis | None) -> Location:
    if backend == "memory":
        name = f"sec-{uuid.uuid4().hex}"

        def drop() -> None:
            MemoryStore.drop(name)

        return Location(backend, f"memory://{name}", drop)
    if backend == "redis":
        assert auth is not None
        prefix = f"sec{uuid.uuid4().hex[:12]}"
        url = f"redis://:{SERVER.quoted}@127.0.0.1:{auth.port}/0?prefix={prefix}"
        return Location(backend, url, lambda: _drop_redis_prefix(auth, prefix))
    tmp_path.mkdir(parents=True, exist_ok=True)
    target = make_target(backend, tmp_path)
    url = target.url
    if backend == "postgres":
        url = _pg_url_with(SERVER.quoted, target.name, f"&application_name={target.name}")

    def cleanup() -> None:
        target.cleanup()
        if target.path is not None:
            for path in target.path.parent.glob(target.path.name + "*"):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    return Location(backend, url, cleanup)


def _drop_redis_prefix(auth: PrivateRedis, prefix: str) -> None:
    import redis

    client = redis.Redis(port=auth.port, password=SERVER.text)
    try:
        names = list(client.scan_iter(match=prefix.encode() + b"*", count=1000))
        if names:
            client.delete(*names)
    finally:
        client.close()


def with_query(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


def populate(url: str) -> None:
    """Items, dot names, a TTL, series, event logs, and a namespace of damaged records."""
    with mappingstore.open(url, password=STORE.text, security="low") as s:
        s["k"] = {"user": 42, "roles": ("admin",)}
        s["s"] = "plain text"
        s["b"] = b"\x00\xffbytes"
        s["app.db.host"] = "localhost"
        s["app.db.port"] = 5432
        s.set("t", 1, ttl=3600)
        s.series("temp").extend([(100, 21.5), (160, 22.0), (220, 21.75)])
        s.events("acct").apply({"balance": 100, "owner": "ann"}, 1000)
        s.events("acct").apply({"balance": (operator.add, 50)}, 2000)
    with mappingstore.open(url, password=STORE.text, namespace="bad") as s:
        s["fine"] = 1
        s["tampered"] = "sealed"
        rec = _raw.record(s, "bad", "tampered")
        assert rec is not None
        flipped = rec[0][:-1] + bytes([rec[0][-1] ^ 1])
        garbage = b"\x00\x01 not a record"
        _raw.write(s, [("bad", "tampered", flipped, None), ("bad", "garbage", garbage, None)])


# -- running the CLI -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One invocation: words after the shared options, and the exit status it must end with.

    Placeholders: ``{url}`` the store, ``{dst}`` copy's destination, ``{ro_dst}`` the same
    read-only, files ``{value_file}``, ``{jsonl}``, ``{json_obj}``, ``{points}``, ``{out}``,
    bad inputs ``{bad_json}``, ``{bad_jsonl}``, ``{bad_points}``, ``{missing}``, ``{empty}``,
    ``{binary}``, ``{dir}``; ``{dst_pw}``/``{new_pw}`` expand to ``--dst-password-file F``
    / ``--new-password-file F`` when passwords come from files (to nothing otherwise).
    """

    args: tuple[str, ...]
    code: int = 0
    #: Which secret the store password source holds: "store", "new", "wrong" or None.
    pw: str | None = "store"
    #: The same for the destination / new password.
    other: str | None = "new"
    #: The store URL to use (a placeholder or a literal URL).
    url: str = "{url}"
    category: str = ""


_PW = {"store": STORE, "new": NEW, "wrong": WRONG}


@dataclasses.dataclass
class CliWorld:
    """Everything the placeholders name, for one backend."""

    url: str
    dst: str
    files: dict[str, str]
    tmp: Path

    def expand(self, call: Call, via_files: bool) -> tuple[list[str], dict[str, str | None]]:
        """Arguments and environment of *call* (passwords in env vars or files)."""
        env: dict[str, str | None] = dict.fromkeys(CLI_ENV)
        values = {
            **self.files,
            "url": self.url,
            "dst": self.dst,
            "ro_dst": with_query(self.dst, "readonly=true"),
            "ro_url": with_query(self.url, "readonly=true"),
            "bogus_url": with_query(self.url, "bogus=1"),
        }
        url = call.url.format(**values)
        args: list[str] = []
        # With files, --password-file goes before the command name, or after it (a command
        # option) when the command takes it, one call in two.
        after = _leaf_words(call.args) if via_files and len(call.args) % 2 else 0
        if via_files:
            env["MAPPINGSTORE_URL"] = url  # the URL (and its server password) from the env
            if call.pw is not None and not after:
                args += ["--password-file", self.files[f"pw_{call.pw}"]]
        else:
            args += ["--url", url]
            if call.pw is not None:
                env["MAPPINGSTORE_PASSWORD"] = _PW[call.pw].text
            if call.other is not None:
                env["MAPPINGSTORE_DST_PASSWORD"] = _PW[call.other].text
                env["MAPPINGSTORE_NEW_PASSWORD"] = _PW[call.other].text
        for i, word in enumerate(call.args):
            if after and i == after and call.pw is not None:
                args += ["--password-file", self.files[f"pw_{call.pw}"]]
            if word in ("{dst_pw}", "{new_pw}"):
                if via_files and call.other is not None:
                    option = "--dst-password-file" if word == "{dst_pw}" else "--new-password-file"
                    args += [option, self.files[f"pw_{call.other}"]]
            elif word.startswith("{") and word.endswith("}") and word[1:-1] in values:
                args.append(values[word[1:-1]])
            else:
                args.append(word)
        return args, env


def _leaf_words(words: Sequence[str]) -> int:
    """How many leading *words* name a command that takes --password-file (0: none)."""
    for n in (2, 1):
        node: Any = cli
        for word in words[:n]:
            node = node.commands.get(word) if isinstance(node, click.Group) else None
        if (
            n <= len(words)
            and isinstance(node, click.Command)
            and not isinstance(node, click.Group)
        ):
            return n if n < len(words) else 0
    return 0


def run_cli(
    scan: Scan,
    where: str,
    args: Sequence[str],
    env: dict[str, str | None],
    code: int | None,
    input: str | None = None,
) -> Result:
    """Run the CLI in-process; scan stdout, stderr, logs, warnings and any exception."""
    runner = CliRunner()
    with observed(scan, where):
        result = runner.invoke(cli, list(args), env=env, input=input, catch_exceptions=True)
    scan.text(f"{where} stdout", result.stdout_bytes)
    scan.text(f"{where} stderr", result.stderr_bytes)
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        scan.exception(f"{where} uncaught", exc)
        scan.fail(f"{where}: uncaught {type(exc).__name__}: {exc} (a traceback for the user)")
    if b"Traceback" in result.stderr_bytes:
        scan.fail(f"{where}: a traceback on stderr")
    if code is not None and result.exit_code != code:
        scan.fail(
            f"{where}: exit status {result.exit_code}, expected {code}; "
            f"stderr={result.stderr_bytes[-300:]!r}"
        )
    return result


def _files(tmp: Path) -> dict[str, str]:
    """Password files, inputs for set/import/append, and broken ones for the error paths."""
    (tmp / "in").mkdir()
    made: dict[str, str] = {}

    def put(name: str, content: bytes) -> None:
        path = tmp / "in" / name
        path.write_bytes(content)
        made[name] = str(path)

    for label, secret in _PW.items():
        put(f"pw_{label}", secret.text.encode() + b"\n")
    put("value_file", b'{"$tuple": [1, 2]}')
    put("json_obj", b'{"imported_obj": {"$set": [1]}}')
    put("jsonl", b'{"key": "imported", "value": 1}\n{"key": "i2", "value": {"$bytes": "aGk="}}\n')
    put("points", b'{"t": 1, "value": 1.5}\n{"t": 2, "value": "x"}\n')
    put("bad_json", b'{"unclosed": ')
    put("bad_jsonl", b'{"key": "ok", "value": 1}\nnot json at all\n')
    put("bad_points", b'{"t": "soon", "value": 1}\n')
    put("empty", b"")
    put("binary", b"\xff\xfe\x00\x80password\n")
    made["missing"] = str(tmp / "in" / "no-such-file")
    made["dir"] = str(tmp / "in")
    made["out"] = str(tmp / "export.jsonl")
    return made


# -- the command table ---------------------------------------------------------------------

C = Call
#: Every command of the CLI (by its path; "" is the group itself) and invocations that
#: succeed, in the order they run against one populated store. A command added to the CLI
#: without an entry here fails ``test_the_command_table_covers_every_cli_command``.
COMMANDS: dict[str, list[Call]] = {
    "": [C(("--help",)), C(("--version",))],
    "get": [
        C(("get", "k")),
        C(("get", "--raw", "s")),
        C(("get", "--raw", "b")),
        C(("get", "k", "s", "--json")),
        C(("get", "--dot-names", "app")),
        C(("get", "--default", "1", "nope")),
    ],
    "set": [
        C(("set", "k2", '"v"')),
        C(("set", "--ttl", "600", "k3", "1")),
        C(("set", "--string", "k4", "plain text")),
        C(("set", "--file", "{value_file}", "k5")),
        C(("set", "--encrypt", "k6", "2")),
        C(("set", "--no-encrypt", "k7", "3")),
        C(("set", "--dot-names", "tree.branch", '{"a": 1, "b": 2}')),
    ],
    "del": [C(("del", "k2")), C(("del", "-f", "k2", "--json"))],
    "ls": [C(("ls",)), C(("ls", "-l")), C(("ls", "-l", "--json")), C(("ls", "--dot-names", "app"))],
    "len": [C(("len",)), C(("len", "app"))],
    "ttl": [C(("ttl", "k3")), C(("ttl", "k", "--json"))],
    "expire": [C(("expire", "k3", "never")), C(("expire", "k3", "600"))],
    "tree": [C(("tree",)), C(("tree", "--values")), C(("tree", "app", "--values", "--json"))],
    "info": [C(("info",)), C(("info", "--json"))],
    "namespaces": [C(("namespaces",)), C(("namespaces", "--json"))],
    "check": [C(("check",)), C(("check", "--json"))],
    "purge": [C(("purge",)), C(("purge", "-A", "--json"))],
    "passwd": [
        C(("passwd", "{new_pw}")),  # STORE -> NEW
        C(("passwd", "{new_pw}"), pw="new", other="store"),  # and back
    ],
    "export": [
        C(("export",)),
        C(("export", "{out}")),
        C(("export", "--json", "--prefix", "app")),
        C(("export", "--plain")),
    ],
    "import": [C(("import", "{jsonl}")), C(("import", "--json", "{json_obj}"))],
    "copy": [
        C(("copy", "{url}", "{dst}", "{dst_pw}", "--security", "low")),
        C(("copy", "{url}", "{dst}", "{dst_pw}", "--dry-run", "--json")),
        C(("copy", "{url}", "{dst}", "{dst_pw}", "--overwrite", "--prefix", "app")),
    ],
    "series": [C(("series",), code=2), C(("series", "--help"))],
    "series append": [
        C(("series", "append", "temp", "400", "23.5")),
        C(("series", "append", "temp2", "1", "1", "2", '"x"')),
        C(("series", "append", "temp3", "--file", "{points}")),
    ],
    "series range": [
        C(("series", "range", "temp")),
        C(("series", "range", "temp", "--start", "100", "--json")),
    ],
    "series last": [C(("series", "last", "temp"))],
    "series first": [C(("series", "first", "temp", "--json"))],
    "series missing": [C(("series", "missing", "temp", "100", "400", "--freq", "60"))],
    "series ls": [C(("series", "ls", "-l"))],
    "series rm": [C(("series", "rm", "temp2"))],
    "events": [C(("events",), code=2), C(("events", "--help"))],
    "events apply": [
        C(("events", "apply", "acct", '{"balance": ["add", 5]}')),
        C(("events", "apply", "e2", '{"x": 1}', "--at", "1000")),
    ],
    "events current": [C(("events", "current", "acct", "--with-timestamp"))],
    "events past": [C(("events", "past", "acct", "1500"))],
    "events log": [C(("events", "log", "acct", "--json")), C(("events", "log", "acct"))],
    "events ls": [C(("events", "ls"))],
    "events prune": [C(("events", "prune", "acct", "1500"))],
    "events rm": [C(("events", "rm", "e2"))],
}


def _errors() -> list[Call]:
    """Error paths on a populated store (the backend's own URL)."""
    ro = "{ro_url}"
    out: list[Call] = []

    def add(category: str, *calls: Call) -> None:
        out.extend(dataclasses.replace(c, category=category) for c in calls)

    add(
        "wrong password",
        C(("get", "k"), 1, pw="wrong"),
        C(("get", "--raw", "s"), 1, pw="wrong"),
        C(("export",), 1, pw="wrong"),
        C(("check",), 1, pw="wrong"),
        C(("tree", "--values"), 1, pw="wrong"),
        C(("set", "x", "1"), 1, pw="wrong"),
        C(("import", "{jsonl}"), 1, pw="wrong"),
        C(("passwd", "{new_pw}"), 1, pw="wrong"),
        C(("series", "range", "temp"), 1, pw="wrong"),
        C(("events", "current", "acct"), 1, pw="wrong"),
        C(("copy", "{url}", "{dst}", "{dst_pw}"), 1, pw="wrong"),
        C(("copy", "{url}", "{dst}", "{dst_pw}"), 1, other="wrong"),
    )
    add(
        "no password",
        C(("get", "k"), 1, pw=None),
        C(("export",), 1, pw=None),
        C(("check",), 1, pw=None),
        C(("series", "last", "temp"), 1, pw=None),
        C(("copy", "{url}", "{dst}"), 1, pw=None, other=None),
        C(("copy", "{url}", "{dst}"), 1, other=None),
        C(("passwd",), 2, other=None),  # no new password given
    )
    add(
        "missing key",
        C(("get", "nope"), 1),
        C(("get", "k", "nope"), 1),
        C(("get", "--raw", "nope"), 1),
        C(("del", "nope"), 1),
        C(("ttl", "nope"), 1),
        C(("expire", "nope", "5"), 1),
        C(("series", "first", "nope"), 1),
        C(("series", "rm", "nope"), 1),
        C(("events", "rm", "nope"), 1),
    )
    add(
        "bad JSON value",
        C(("set", "k", "not json"), 2),
        C(("set", "k", '{"$bytes": 5}'), 2),
        C(("set", "--file", "{bad_json}", "k"), 2),
        C(("get", "--default", "{bad", "nope"), 2),
        C(("series", "append", "t", "1", "{bad"), 2),
        C(("series", "append", "t", "--file", "{bad_points}"), 2),
        C(("events", "apply", "acct", "{bad"), 2),
        C(("events", "apply", "acct", '{"x": ["add"]}'), 2),
        C(("import", "{bad_jsonl}"), 1),
    )
    add(
        "read-only store",
        C(("set", "x", "1"), 1, url=ro),
        C(("del", "k"), 1, url=ro),
        C(("expire", "k", "5"), 1, url=ro),
        C(("purge",), 1, url=ro),
        C(("import", "{jsonl}"), 1, url=ro),
        C(("passwd", "{new_pw}"), 1, url=ro),
        C(("series", "append", "temp", "1", "1"), 1, url=ro),
        C(("events", "apply", "acct", '{"x": 1}'), 1, url=ro),
        C(("events", "prune", "acct", "1500"), 1, url=ro),
        C(("copy", "{url}", "{ro_dst}", "{dst_pw}"), 1),
    )
    add(
        "corrupt value",
        C(("get", "-n", "bad", "garbage"), 1),
        C(("get", "-n", "bad", "tampered"), 1),
        C(("tree", "-n", "bad", "--values"), 1),
        C(("check", "-n", "bad"), 1),
        C(("check", "-A", "--json"), 1),
        C(("export", "-n", "bad"), 1),
        C(("export", "-A"), 1),
        C(("copy", "{url}", "{dst}", "{dst_pw}", "--src-namespace", "bad"), 1),
    )
    add(
        "bad option",
        C(("--bogus", "ls"), 2),
        C(("get",), 2),
        C(("nosuchcommand",), 2),
        C(("--security", "extreme", "ls"), 2),
        C(("set", "--ttl", "-1", "k", "1"), 2),
        C(("set", "--string", "--bytes", "k", "v"), 2),
        C(("expire", "k", "soon"), 2),
        C(("get", "--raw", "k", "s"), 2),
        C(("series", "range", "temp", "--count", "-1"), 2),
        C(("series", "append", "t", "1"), 2),
        C(("events", "past", "acct", "soon"), 2),
        C(("events", "log", "acct", "--op", "bogus"), 2),
        C(("import", "--batch-size", "0", "{jsonl}"), 2),
        C(("export", "--json", "-A"), 2),
        C(("--password-file", "{missing}", "get", "k"), 2, pw=None),
        C(("--password-file", "{empty}", "get", "k"), 2, pw=None),
        C(("--password-file", "{binary}", "get", "k"), 2, pw=None),
        C(("--password-file", "{dir}", "get", "k"), 2, pw=None),
        C(("copy", "{url}", "{dst}", "--dst-password-file", "{missing}"), 2),
        C(("passwd", "--new-password-file", "{empty}"), 2),
        C(("ls",), 2, url="{bogus_url}"),
    )
    return out


ERRORS = _errors()


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one CLI case runs: the ways passwords are given, and which tables."""

    modes: tuple[bool, ...] = (False, True)  # False: env vars + --url; True: files + $URL
    help: bool = True
    errors: bool = True


#: The fast tier (CI) covers every command and error path on SQLite in both ways, and the
#: URL-with-a-server-password dimension on Redis and PostgreSQL with a part of the tables;
#: the long tier runs everything on every persistent backend.
FAST_PLANS = {
    "sqlite": Plan(),
    "redis": Plan(modes=(True,), help=False),
    "postgres": Plan(modes=(False,), help=False, errors=False),
}


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[str]:
    """Every command and group under *group*, recursively, as space-separated paths."""
    paths = [" ".join(prefix)]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append(" ".join((*prefix, name)))
    return paths


def test_the_command_table_covers_every_cli_command() -> None:
    """Walking the click group finds exactly the commands the table runs (none forgotten),
    and each table entry really invokes its command (its words come first)."""
    paths = command_paths(cli)
    assert len(paths) > 30
    missing = sorted(set(paths) - set(COMMANDS))
    assert not missing, f"CLI commands without an invocation in COMMANDS: {missing}"
    assert sorted(set(COMMANDS) - set(paths)) == [], "COMMANDS names a command that is gone"
    for path, calls in COMMANDS.items():
        assert calls, path
        words = path.split()
        for call in calls:
            assert list(call.args[: len(words)]) == words, (path, call)


def _cli_cases() -> list[Any]:
    cases = [pytest.param(b, "fast", id=f"fast-{b}") for b in FAST_PLANS]
    cases += [
        pytest.param(b, "long", id=f"long-{b}", marks=pytest.mark.torture) for b in PERSISTENT
    ]
    return cases


@pytest.mark.parametrize(("backend", "tier"), _cli_cases())
def test_every_cli_command_and_error_path_leaks_no_secret(
    backend: str,
    tier: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    figure: Callable[..., None],
) -> None:
    """Every command (success paths, then ``--help``) and every error path, on a store
    encrypted with STORE (and, on server backends, a URL holding SERVER), once with the
    passwords in environment variables and the URL in ``--url``, once with password
    files and the URL in ``$MAPPINGSTORE_URL``: 0 secret occurrences, every exit status
    as documented, no traceback."""
    auth = request.getfixturevalue("auth_redis") if backend == "redis" else None
    plan = FAST_PLANS[backend] if tier == "fast" else Plan()
    locations = [_location(backend, tmp_path / sub, auth) for sub in ("store", "dst")]
    world = CliWorld(locations[0].url, locations[1].url, _files(tmp_path), tmp_path)
    scan = Scan()
    commands = errors = 0
    try:
        for via_files in plan.modes:
            how = "files" if via_files else "env"
            for loc in locations:  # a fresh store and destination for each way
                loc.cleanup()
            populate(world.url)
            for path, calls in COMMANDS.items():
                for i, call in enumerate(calls):
                    args, env = world.expand(call, via_files)
                    run_cli(scan, f"[{how}] {path or 'cli'} #{i} {args}", args, env, call.code)
                    commands += 1
                if plan.help:
                    help_args, env = world.expand(C((*path.split(), "--help")), via_files)
                    run_cli(scan, f"[{how}] {path} --help", help_args, env, 0)
                    commands += 1
            for call in ERRORS if plan.errors else ():
                args, env = world.expand(call, via_files)
                run_cli(scan, f"[{how}] {call.category}: {args}", args, env, call.code)
                errors += 1
    finally:
        for loc in locations:
            loc.cleanup()
    figure("commands run", commands, backend=backend, tier=tier)
    figure("error paths run", errors, backend=backend, tier=tier)
    scan.check(figure, backend=backend, tier=tier)


# -- bad URLs, unreachable and refusing servers ---------------------------------------------


def bad_urls(
    tmp: Path, auth_port: int, closed: int, fast: bool, shared_prefix: str
) -> list[tuple[str, str]]:
    """``(category, URL)``: URLs that hold a password and must fail without showing it.

    An unreachable Redis is retried with backoff for about a second; the fast tier keeps
    that for one URL and turns retries off for the others.
    """
    no_retry = "?retries=0" if fast else ""
    enc, raw, badesc, wrong = SERVER.quoted, RAW.text, BADESC.text, WRONG.quoted
    db = f"/{tmp}/x.db"
    here = f"127.0.0.1:{auth_port}"
    pg = urllib.parse.urlsplit(POSTGRES_URL).netloc.rpartition("@")[2]
    return [
        # Local backends: a password has no place in their URLs.
        ("bad URL", f"sqlite://:{enc}@localhost/{db}"),
        ("bad URL", f"sqlite://user:{raw}@localhost/{db}"),
        ("bad URL", f"sqlite://:{enc}@otherhost/{db}"),
        ("bad URL", f"sqlite:///{db}?password={enc}"),
        ("bad URL", f"sqlite:///{db}?password={enc}#fragment"),
        ("bad URL", f"sqlite:///{db}?namespace=x&key={enc}#fragment"),
        ("bad URL", f"dir://:{enc}@localhost/{tmp}/d"),
        ("bad URL", f"dir:///{tmp}/d?password={enc}"),
        ("bad URL", f"ini://:{raw}@localhost/{tmp}/d.ini"),
        ("bad URL", f"shm://:{enc}@name"),
        ("bad URL", f"shm://name?password={enc}"),
        ("bad URL", f"memory://:{enc}@name"),
        ("bad URL", f"memory://user:{raw}@name"),
        ("bad URL", f"nosuch://:{enc}@host/0"),
        ("bad URL", f"sqlit://:{raw}@host/0"),
        # Server backends: the URL is right to hold it, and still never shows it.
        ("bad URL", f"redis://:{enc}@{here}/abc"),
        ("bad URL", f"redis://:{raw}@{here}/abc"),
        ("bad URL", f"redis://:{enc}@{here}/0?bogus=1"),
        ("bad URL", f"redis://:{enc}@{here}/0?password={enc}"),
        ("bad URL", f"redis://:{enc}@127.0.0.1:notaport/0"),
        ("bad URL", f"redis://:{badesc}@{here}/0"),
        ("bad URL", f"redis://:{STORE.text}@{here}/0"),  # an unescaped "@" in it
        ("bad URL", f"redis://:{enc}@{here}/0#fragment"),
        ("bad URL", f"redis://:{enc}@[::1/0"),
        ("bad URL", f"redis://:{enc}@{here}/0?db=3"),
        ("bad URL", f"rediss://:{enc}@{here}/0?ssl_cert_reqs=bogus"),
        ("bad URL", f"redis://:{enc}@{here}/0?ssl_certfile=/nonexistent"),
        ("bad URL", f"postgresql://postgres:{badesc}@{pg}/test?table=x"),
        ("bad URL", f"postgresql://postgres:{STORE.text}@{pg}/test?table=x"),
        ("bad URL", f"postgresql://postgres:{enc}@127.0.0.1:notaport/test?table=x"),
        ("bad URL", f"postgresql://postgres:{enc}@{pg}/test?table=bad-name!"),
        ("bad URL", f"postgresql://postgres:{enc}@{pg}/test?table=x&sslmode=bogus"),
        ("bad URL", f"postgresql://postgres:{enc}@{pg}/test?table=x&bogus=1"),
        ("bad URL", f"postgresql://postgres:{enc}@{pg}/test?table=x&password={enc}"),
        ("bad URL", f"postgres://postgres:{raw}@[::1/test"),
        ("unreachable server", f"redis://:{enc}@127.0.0.1:{closed}/0"),  # retried
        ("unreachable server", f"redis://user:{raw}@127.0.0.1:{closed}/0{no_retry}"),
        ("unreachable server", f"rediss://:{enc}@127.0.0.1:{closed}/0{no_retry}"),
        ("unreachable server", f"redis://:{badesc}@127.0.0.1:{closed}/0{no_retry}"),
        (
            "unreachable server",
            f"postgresql://postgres:{enc}@127.0.0.1:{closed}/test?table=x&connect_timeout=1",
        ),
        ("unreachable server", f"postgresql://postgres:{raw}@{pg}/nodb_sectest?table=x"),
        ("wrong server password", f"redis://:{wrong}@{here}/0"),
        ("wrong server password", f"redis://nobody:{enc}@{here}/0"),
        ("wrong server password", f"redis://:{RAW.quoted}x@{here}/0"),
        ("wrong server password", f"redis://{here}/0"),  # none at all
        # The shared server asks for no password: one in the URL is simply not needed.
        ("server without a password", _shared_redis_with(enc, shared_prefix)),
    ]


def _shared_redis_with(password: str, prefix: str) -> str:
    split = urllib.parse.urlsplit(REDIS_URL)
    host = split.netloc.rpartition("@")[2]
    return f"redis://:{password}@{host}{split.path}?prefix={prefix}"


def _drop_shared_redis_prefix(prefix: str) -> None:
    """Opening a store writes its metadata: remove it from the shared server."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = list(client.scan_iter(match=prefix.encode() + b"*", count=1000))
        if names:
            client.delete(*names)
    finally:
        client.close()


def _expect_error(
    scan: Scan, where: str, fn: Callable[[], Any], *types: type[BaseException]
) -> None:
    """Run *fn*; it must raise one of *types* (scanned in every form) and nothing else."""
    try:
        result = fn()
    except BaseException as exc:
        scan.exception(where, exc)
        if types and not isinstance(exc, types):
            names = [t.__name__ for t in types]
            scan.fail(f"{where}: {type(exc).__name__}: {exc} (expected one of {names})")
        elif not types and not isinstance(exc, mappingstore.MappingStoreError):
            scan.fail(f"{where}: {type(exc).__name__} is not a mappingstore error: {exc}")
    else:
        scan.obj(f"{where} result", result)
        scan.fail(f"{where}: no error (returned {result!r})")


def _open_and_use(url: str, **options: Any) -> Any:
    with mappingstore.open(url, **options) as store:
        return store["k"]


def test_bad_urls_and_unreachable_or_refusing_servers_leak_no_secret(
    tier: str, tmp_path: Path, auth_redis: PrivateRedis, figure: Callable[..., None]
) -> None:
    """Each URL holding a server password that is malformed, names a server that is down,
    or is refused by the server: ``mappingstore.open`` (with and without ``password=``)
    raises a mappingstore error, and the CLI (``get``, ``ls``, ``info``, both sides of
    ``copy``; ``--url`` and ``$MAPPINGSTORE_URL``; the fast tier runs ``get`` and ``info``)
    exits non-zero with one line: 0 secret occurrences anywhere."""
    make_target("postgres", tmp_path)  # fails in CI / skips on a laptop if PostgreSQL is down
    closed = free_port()
    shared_prefix = f"sec{uuid.uuid4().hex[:8]}"
    urls = bad_urls(tmp_path, auth_redis.port, closed, tier == "fast", shared_prefix)
    scan = Scan()
    files = _files(tmp_path)
    good = f"sqlite:///{tmp_path}/good.db"
    populate(good)
    runs = 0
    try:
        for i, (category, url) in enumerate(urls):
            where = f"{category} #{i} {url[:60]}"
            with observed(scan, where):
                _expect_error(scan, f"{where} open", functools.partial(_open_and_use, url))
                _expect_error(
                    scan,
                    f"{where} open(password=)",
                    functools.partial(_open_and_use, url, password=STORE.text, security="low"),
                )
            env: dict[str, str | None] = dict.fromkeys(CLI_ENV)
            env["MAPPINGSTORE_PASSWORD"] = STORE.text
            env["MAPPINGSTORE_DST_PASSWORD"] = NEW.text
            invocations = [
                ["--url", url, "get", "k"],
                ["--url", url, "ls"],
                ["copy", url, f"sqlite:///{tmp_path}/dst{i}.db", "--security", "low"],
                ["copy", good, url],
            ]
            # A URL that works (a server asking for no password) gets read-only commands only.
            works = category == "server without a password"
            for args in invocations[: 1 if tier == "fast" else 2 if works else 4]:
                result = run_cli(scan, f"{where} {args[-2:]}", args, env, None)
                runs += 1
                if result.exit_code == 0 and not works:
                    scan.fail(f"{where} {args}: exit status 0")
            files_env = {**dict.fromkeys(CLI_ENV), "MAPPINGSTORE_URL": url}
            result = run_cli(
                scan,
                f"{where} [files] info",
                ["--password-file", files["pw_store"], "info"],
                files_env,
                None,
            )
            runs += 1
            if result.exit_code == 0 and not works:
                scan.fail(f"{where} info: exit status 0")
    finally:
        _drop_shared_redis_prefix(shared_prefix)
    figure("bad URLs", len(urls), tier=tier)
    figure("error paths run", runs, tier=tier)
    scan.check(figure, tier=tier)


def test_unreachable_redis_cluster_is_a_one_line_error(figure: Callable[..., None]) -> None:
    """An unreachable Redis Cluster with a password in its URL: a mappingstore error in the
    API, a one-line error in the CLI, and the password nowhere."""
    closed = free_port()
    url = f"redis+cluster://:{SERVER.quoted}@127.0.0.1:{closed},127.0.0.1:{free_port()}"
    scan = Scan()
    with observed(scan, "cluster"):
        _expect_error(
            scan, "cluster open", lambda: _open_and_use(url), mappingstore.errors.BackendError
        )
    run_cli(scan, "cluster ls", ["--url", url, "ls"], dict.fromkeys(CLI_ENV), 1)
    scan.check(figure)


def test_an_unescaped_slash_in_a_url_password_is_never_shown(
    auth_redis: PrivateRedis, figure: Callable[..., None]
) -> None:
    """``redis://:pa/ss@host`` cannot be parsed right by anyone; the error must still not
    show any part of the password (the message hides up to the last '@')."""
    pg = urllib.parse.urlsplit(POSTGRES_URL).netloc.rpartition("@")[2]
    scan = Scan()
    for url in (
        f"redis://:{NEW.text}@127.0.0.1:{auth_redis.port}/0",
        f"postgresql://postgres:{NEW.text}@{pg}/test?table=x",
    ):
        with observed(scan, url):
            _expect_error(scan, url, functools.partial(_open_and_use, url))
        run_cli(scan, f"cli {url}", ["--url", url, "ls"], dict.fromkeys(CLI_ENV), None)
    scan.check(figure)


# -- the Python API ------------------------------------------------------------------------


def _surfaces(scan: Scan, where: str, store: Any) -> None:
    """Everything a store shows about itself."""
    scan.obj(f"{where} store", store)
    scan.text(f"{where} url", store.url)
    if not store.closed:
        scan.text(f"{where} info", repr(store.info()))
        scan.text(f"{where} namespaces", repr(store.namespaces()))
        if store.dot_names:
            scan.obj(f"{where} view", store.view("app"))
        scan.obj(f"{where} series", store.series("temp"))
        scan.obj(f"{where} events", store.events("acct"))


API_BACKENDS = ("memory", *PERSISTENT)


@pytest.mark.parametrize("backend", API_BACKENDS)
def test_api_surfaces_and_exceptions_leak_no_secret(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, figure: Callable[..., None]
) -> None:
    """Stores opened with ``password=``, ``key=``, a server password in the URL (encoded
    and raw) or ``redis_password=``, used normally (DEBUG logs captured), then every error
    the API can raise on them: wrong password or key, no password, missing key, read-only,
    corrupt and tampered records, bad options, bad values, closed store, pickling:
    ``repr``/``str``/``url``/``info()`` and every exception (chain and traceback) hold
    0 secret occurrences."""
    from mappingstore import errors as E

    auth = request.getfixturevalue("auth_redis") if backend == "redis" else None
    loc = _location(backend, tmp_path / "a", auth)
    keyed = _location(backend, tmp_path / "b", auth)
    scan = Scan()
    errors = 0

    def expect(what: str, fn: Callable[[], Any], *types: type[BaseException]) -> None:
        nonlocal errors
        errors += 1
        _expect_error(scan, f"{backend} {what}", fn, *types)

    opened: list[Store] = []

    def use(url: str, **options: Any) -> Store:
        store = mappingstore.open(url, **options)
        opened.append(store)
        return store

    try:
        with observed(scan, f"{backend} api"):
            populate(loc.url)
            s = use(loc.url, password=STORE.text, security="low", dot_names=True)
            _surfaces(scan, "password=", s)
            s["x"] = ["n", 1]
            with s.batch():
                s["y"] = b"bytes"
                s.set("z", 2, ttl=60)
            assert s["x"] == ["n", 1] and s.get_many(["y", "z"]) == {"y": b"bytes", "z": 2}
            s.series("temp").extend([(300, 1.0)])
            s.events("acct").apply({"owner": "bob"}, 3000)
            s.change_password(NEW.text, security="low")
            _surfaces(scan, "after change_password", s)
            s.change_password(STORE.text, security="low")
            wrapped = use(loc.url, password=STORE.text, cache=10, key_prefix="p:")
            wrapped["w"] = 1
            scan.obj("adapters", wrapped)
            scan.text("adapters url", wrapped.url)
            k = use(keyed.url, key=RAW_KEY, encrypt=True)
            k["x"] = 1
            _surfaces(scan, "key=", k)
            if backend == "redis":
                assert auth is not None
                plain = f"redis://127.0.0.1:{auth.port}/0?prefix={uuid.uuid4().hex[:10]}"
                r = use(plain, redis_password=SERVER.text, password=STORE.text, security="low")
                r["x"] = 1
                _surfaces(scan, "redis_password=", r)
                r2 = use(plain.replace("redis://", f"redis://:{RAW.text}@"), password=STORE.text)
                assert r2["x"] == 1
                _surfaces(scan, "raw URL password", r2)
            if backend == "postgres":
                split = urllib.parse.urlsplit(loc.url)
                raw_url = loc.url.replace(
                    split.netloc, "postgres:" + RAW.text + "@" + split.netloc.rpartition("@")[2]
                )
                p = use(raw_url, password=STORE.text)
                assert p["x"] == ["n", 1]
                _surfaces(scan, "raw URL password", p)

            if backend in ("redis", "postgres"):
                # The server drops our connections: the reconnect and retry paths log.
                _kill_connections(backend, s, auth)
                assert s["s"] == "plain text"
                s["after_kill"] = 1

            # Error paths.
            expect(
                "wrong password", lambda: use(loc.url, password=WRONG.text), E.WrongPasswordError
            )
            expect("wrong key", lambda: use(keyed.url, key=os.urandom(32)), E.WrongPasswordError)
            expect(
                "key for a password store", lambda: use(loc.url, key=RAW_KEY), E.WrongPasswordError
            )
            expect("no password", lambda: use(loc.url)["k"], E.PasswordRequiredError)
            expect("missing key", lambda: s["nope"], KeyError)
            expect("pop missing", lambda: s.pop("nope"), KeyError)
            ro = use(loc.url, password=STORE.text, readonly=True)
            expect("read-only set", lambda: ro.__setitem__("x", 1), E.ReadOnlyError)
            expect("read-only passwd", lambda: ro.change_password(NEW.text), E.ReadOnlyError)
            bad = use(loc.url, password=STORE.text, namespace="bad")
            expect("garbage record", lambda: bad["garbage"], E.CorruptValueError, E.IntegrityError)
            expect(
                "tampered record", lambda: bad["tampered"], E.IntegrityError, E.CorruptValueError
            )
            expect(
                "bad security",
                lambda: use(loc.url, password=STORE.text, security="extreme"),
                E.InvalidOptionError,
            )
            expect(
                "unknown option",
                lambda: use(loc.url, password=STORE.text, bogus=1),
                E.MappingStoreError,
                TypeError,
            )
            expect(
                "password type",
                lambda: use(loc.url, password=12345),
                E.MappingStoreError,
                TypeError,
            )
            expect(
                "password and key",
                lambda: use(loc.url, password=STORE.text, key=RAW_KEY),
                E.MappingStoreError,
            )
            expect("short key", lambda: use(keyed.url, key=RAW_KEY[:16]), E.MappingStoreError)
            expect("unstorable value", lambda: s.__setitem__("o", object()), E.SerializationError)
            expect("bad key", lambda: s.__setitem__("", 1), E.MappingStoreError)
            expect(
                "change_password with a password and key=",
                lambda: s.change_password(NEW.text, key=RAW_KEY),
                E.InvalidOptionError,
            )
            expect("pickle", lambda: __import__("pickle").dumps(s), TypeError)
            closing = use(loc.url, password=STORE.text)
            closing.close()
            _surfaces(scan, "closed", closing)
            expect("closed store", lambda: closing["k"], E.StoreClosedError)
            for store in opened:
                store.close()
    finally:
        for store in opened:
            with contextlib.suppress(Exception):
                store.close()
        loc.cleanup()
        keyed.cleanup()
    figure("error paths run", errors, backend=backend)
    assert scan.log_records > 0  # the DEBUG capture works (every open logs a line)
    scan.check(figure, backend=backend)


def _kill_connections(backend: str, store: Store, auth: PrivateRedis | None) -> None:
    """Close the server side of *store*'s connections (only ours: a private Redis, or
    PostgreSQL backends holding a lock on this store's table)."""
    if backend == "redis":
        import redis

        assert auth is not None
        admin = redis.Redis(port=auth.port, password=SERVER.text)
        try:
            mine = admin.client_id()
            for client in admin.client_list():
                if int(client["id"]) != mine:
                    admin.client_kill_filter(_id=client["id"])
        finally:
            admin.close()
        return
    import psycopg

    table = store.url.partition("table=")[2].partition("&")[0]
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a"
            " WHERE a.pid <> pg_backend_pid() AND a.application_name = %s",
            (table,),
        )


# -- the real program, in subprocesses -----------------------------------------------------

#: Runs the CLI with every logger at DEBUG on stderr and every warning shown.
_LOGGED_MAIN = (
    "import logging, sys, warnings; "
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, "
    "format='LOG %(levelname)s %(name)s %(message)s'); "
    "warnings.simplefilter('default'); "
    "from mappingstore.cli import main; main()"
)


def _program_env(env: dict[str, str | None]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in CLI_ENV}
    out["PYTHONPATH"] = os.pathsep.join([str(ROOT), out.get("PYTHONPATH", "")])
    out.update({k: v for k, v in env.items() if v is not None})
    return out


def _command(args: Sequence[str], logged: bool) -> list[str]:
    if logged:  # -X dev: ResourceWarnings and the like are printed too
        return [sys.executable, "-X", "dev", "-c", _LOGGED_MAIN, *args]
    return [sys.executable, "-m", "mappingstore", *args]


@dataclasses.dataclass
class Spawned:
    where: str
    proc: subprocess.Popen[bytes]
    code: int | None
    logged: bool


def spawn(
    where: str, args: Sequence[str], env: dict[str, str | None], code: int | None, logged: bool
) -> Spawned:
    proc = subprocess.Popen(
        _command(args, logged),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_program_env(env),
    )
    return Spawned(where, proc, code, logged)


def finish(scan: Scan, run: Spawned) -> None:
    """Wait; scan stdout and stderr; the exit status must match; no interpreter traceback."""
    out, err = run.proc.communicate(timeout=300)
    scan.text(f"{run.where} stdout", out)
    scan.text(f"{run.where} stderr", err)
    code = run.proc.returncode
    if run.code is not None and code != run.code:
        scan.fail(f"{run.where}: exit status {code}, expected {run.code}; stderr={err[-400:]!r}")
    if run.code is None and code == 0:
        scan.fail(f"{run.where}: exit status 0 on an error path")
    # A logged run may log a traceback on purpose (exc_info); only an uncaught one counts.
    lines = err.decode("utf-8", "replace").splitlines()
    uncaught = [
        i
        for i, line in enumerate(lines)
        if line.startswith("Traceback (most recent call last)")
        and not (run.logged and i > 0 and lines[i - 1].startswith("LOG "))
    ]
    if uncaught and not run.logged:
        scan.fail(f"{run.where}: a traceback on stderr: {err[-600:]!r}")
    if run.logged and b"Exception ignored" in err:
        scan.fail(f"{run.where}: 'Exception ignored' at exit: {err[-600:]!r}")


def _subprocess_cases(auth_port: int, closed: int, tier: str) -> list[tuple[str, Call, bool, bool]]:
    """``(label, call, via_files, logged)``: success with each secret source, error paths."""
    enc = SERVER.quoted
    here = f"127.0.0.1:{auth_port}"
    cases = [
        ("get via env", C(("get", "k")), False, False),
        ("wrong password", C(("get", "k"), 1, pw="wrong"), False, True),
        ("bad URL", C(("get", "k"), 2, url=f"sqlite://:{enc}@localhost//tmp/x.db"), False, False),
        (
            "refused",
            C(("get", "k"), 1, url=f"redis://:{WRONG.quoted}@{here}/0?prefix=x"),
            True,
            True,
        ),
    ]
    if tier == "long":
        cases += [
            ("get via env", C(("get", "k")), False, True),
            ("get via files", C(("get", "k")), True, False),
            ("get via files", C(("get", "k")), True, True),
            ("export via env", C(("export",)), False, True),
            (
                "copy via files",
                C(("copy", "{url}", "{dst}", "{dst_pw}", "--security", "low")),
                True,
                True,
            ),
            ("wrong password", C(("get", "k"), 1, pw="wrong"), True, False),
            ("bad URL", C(("get", "k"), 2, url=f"redis://:{BADESC.text}@{here}/0"), False, True),
            ("unreachable", C(("ls",), 1, url=f"redis://:{enc}@127.0.0.1:{closed}/0"), False, True),
            (
                "unreachable",
                C(("get", "k"), 1, url=f"redis://:{enc}@127.0.0.1:{closed}/0"),
                True,
                False,
            ),
            (
                "refused",
                C(("get", "k"), 1, url=f"redis://:{WRONG.quoted}@{here}/0?prefix=x"),
                False,
                False,
            ),
        ]
    return cases


def test_subprocess_runs_print_no_secret_and_no_traceback(
    tier: str,
    tmp_path: Path,
    auth_redis: PrivateRedis,
    figure: Callable[..., None],
) -> None:
    """The real program (``python -m mappingstore``, and the same with every logger at
    DEBUG, warnings on and ``-X dev``) on a Redis store whose URL holds the server password:
    success and error runs print no secret and no traceback. The long tier also runs the
    whole command table and half the error paths in subprocesses (SQLite)."""
    store = _location("redis", tmp_path / "r", auth_redis)
    dst = _location("redis", tmp_path / "r2", auth_redis)
    world = CliWorld(store.url, dst.url, _files(tmp_path), tmp_path)
    scan = Scan()
    runs = 0
    try:
        populate(world.url)
        # The independent runs go in parallel.
        pending = []
        for where, call, via_files, logged in _subprocess_cases(auth_redis.port, free_port(), tier):
            args, env = world.expand(call, via_files)
            label = f"{where} [{'logged' if logged else 'plain'}]"
            pending.append(spawn(label, args, env, call.code, logged))
        for run in pending:
            finish(scan, run)
            runs += 1
        if tier == "long":
            runs += _long_subprocess_tables(scan, tmp_path / "long")
    finally:
        store.cleanup()
        dst.cleanup()
    figure("subprocess runs", runs, tier=tier)
    scan.check(figure, tier=tier)


def _long_subprocess_tables(scan: Scan, tmp: Path) -> int:
    """The command table as real processes with DEBUG logging (SQLite, passwords in env
    vars), alongside every other error path as plain processes (passwords in files)."""
    runs = 0
    worlds = []
    for via_files in (False, True):
        base = tmp / ("files" if via_files else "env")
        locs = [_location("sqlite", base / sub, None) for sub in ("s", "d")]
        world = CliWorld(locs[0].url, locs[1].url, _files(base), base)
        populate(world.url)
        todo = ERRORS[::2] if via_files else [c for cs in COMMANDS.values() for c in cs]
        worlds.append((via_files, world, iter(todo)))
    # Each world's calls run in order (they depend on each other); the two worlds overlap.
    active = list(worlds)
    while active:
        batch = []
        for entry in list(active):
            via_files, world, calls = entry
            call = next(calls, None)
            if call is None:
                active.remove(entry)
                continue
            args, env = world.expand(call, via_files)
            label = f"[{'files' if via_files else 'env'}] {call.category or 'command'} {args}"
            batch.append(spawn(label, args, env, call.code, logged=not via_files))
        for run in batch:
            finish(scan, run)
            runs += 1
    return runs


# -- the hidden prompt, on a real terminal -------------------------------------------------


_PROMPT = re.compile(rb"assword[^\r\n]*: ")

_TAKE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _on_a_terminal(
    args: Sequence[str], answers: Sequence[str], env: dict[str, str | None], timeout: float = 60
) -> tuple[int, bytes]:
    """Run the program with a pseudo-terminal as its controlling terminal and stdin; type
    each answer after the next prompt appears (so echo is already off); return everything
    the terminal showed."""
    import termios

    master, slave = os.openpty()
    # A new session (setsid, done by subprocess in C), then a small Python step takes the
    # terminal on stdin as its controlling terminal and execs the CLI. Not preexec_fn: it
    # runs Python between fork and exec, which can deadlock when the test process has other
    # threads (connection pools of earlier tests), and once hung a CI run for 60 s.
    command = _command(args, logged=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", _TAKE_TERMINAL, *command],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=_program_env(env),
        start_new_session=True,
    )
    os.close(slave)
    shown = b""
    todo = list(answers)
    deadline = time.monotonic() + timeout
    seen_prompts = 0
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            # A prompt is a line ending in ": " ("Password for URL: ", "New password: ",
            # "Repeat the new password: "), not the "Wrong password, try again." notice:
            # counting that too typed an answer early, while the previous prompt was still
            # reading, and getpass's TCSAFLUSH then discarded it (a CI run waited 60 s).
            prompts = len(_PROMPT.findall(shown))
            # getpass turns echo off before it reads; wait for that, then type.
            echo_off = not termios.tcgetattr(master)[3] & termios.ECHO
            if todo and prompts > seen_prompts and echo_off:
                seen_prompts = prompts
                os.write(master, todo.pop(0).encode() + b"\n")
            if proc.poll() is not None and not ready:
                break
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{list(args)} still running after {timeout} s; the terminal showed {shown!r}"
            ) from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return proc.returncode, shown


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_hidden_prompt_never_shows_the_password(
    tier: str, tmp_path: Path, figure: Callable[..., None]
) -> None:
    """On a real terminal the CLI asks for the password with echo off: a wrong answer then
    the right one (``get``), three wrong answers (exit 1), and ``passwd`` asking for the
    new password twice: the terminal shows no secret."""
    url = f"sqlite:///{tmp_path}/prompt.db"
    populate(url)
    scan = Scan()
    env = dict.fromkeys(CLI_ENV)
    cases: list[tuple[list[str], list[str], int]] = [
        (["--url", url, "get", "s"], [WRONG.text, STORE.text], 0),
        (["--url", url, "get", "s"], [WRONG.text] * 3, 1),
    ]
    if tier == "long":
        cases += [
            (["--url", url, "passwd"], [STORE.text, NEW.text, NEW.text], 0),
            (["--url", url, "passwd"], [NEW.text, STORE.text, STORE.text], 0),
            (["--url", url, "export"], [STORE.text], 0),
        ]
    for i, (args, answers, code) in enumerate(cases):
        got, shown = _on_a_terminal(args, answers, env)
        scan.text(f"terminal {args[2:]}", shown)
        if got != code:
            scan.fail(f"terminal {args[2:]}: exit status {got}, expected {code}: {shown!r}")
        if i == 0 and b'"plain text"' not in shown:
            scan.fail(f"the prompted password was not taken: {shown!r}")
    figure("terminal runs", len(cases), tier=tier)
    scan.check(figure, tier=tier)
