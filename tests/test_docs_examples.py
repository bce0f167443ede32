"""Every ```python example in the README and the docs runs here, so the docs never drift.

Rules (also in DEVELOPERS.md):

* One test per page. The page's ``python`` blocks run in order in one namespace (a
  later block may use names an earlier one defined), in a fresh temporary directory, so
  relative paths such as ``sqlite:///example.db`` land there.
* A block containing ``>>>`` lines is a doctest (``ELLIPSIS`` and
  ``NORMALIZE_WHITESPACE`` on); any other block is executed and must not raise.
* ``<!-- no-test -->`` on the line before a block skips it (for fragments that cannot
  run on their own: say why in the text around it).
* ``<!-- requires: redis -->`` (or ``postgres``, or both, space-separated) on the line
  before a block says it needs that server; the page then runs only when the server
  answers, with the rules of ``tests/servers.py``: skipped on a laptop without it, a
  failure in CI. Inside such a block every ``redis://...`` / ``postgresql://...`` URL
  literal is replaced by the test server's URL (``$MAPPINGSTORE_TEST_REDIS_URL`` /
  ``$MAPPINGSTORE_TEST_POSTGRES_URL``), keeping the example's query options, so
  examples can show the usual URLs. PostgreSQL tables (and schemas) get names unique to
  the run, and whatever the page created on the servers (Redis keys, tables, schemas)
  is removed afterwards.
"""

from __future__ import annotations

import contextlib
import doctest
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import servers

ROOT = Path(__file__).resolve().parent.parent
ALL_PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*/*.md")]
)
ALL_PAGES = [p for p in ALL_PAGES if p.is_file() and "_build" not in p.parts]

# An opening code fence (three or more backticks or tildes) and its info string.
_FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
_MARKER = re.compile(r"^<!--\s*(?P<what>no-test|requires:\s*(?P<servers>[\w\s]+?))\s*-->$")
# URL literals a `requires:` block may use; each is rewritten to the test server's URL.
# "redis://" only: rediss:// (TLS) and redis+cluster:// need servers the suite lacks.
_SERVER_URL = {
    "redis": re.compile(r"redis://[^\s\"']*"),
    "postgres": re.compile(r"postgres(?:ql)?://[^\s\"']*"),
}
_FIX_HINT = (
    "if the block cannot run as is, mark it with <!-- no-test --> or "
    "<!-- requires: redis|postgres --> on the line before it (see DEVELOPERS.md)"
)


@dataclass
class Block:
    """One fenced ``python`` block of a page."""

    page: Path
    line: int  # 1-based line of the first code line
    code: str
    skip: bool
    requires: tuple[str, ...]


def blocks_of(page: Path) -> Iterator[Block]:
    """The python blocks of *page*, with the marker comment that precedes each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group("fence"), match.group("info").strip()
        indent = len(match.group("indent"))
        start = i + 1
        end = start
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and not lines[end].strip().strip(fence[0])
        ):
            end += 1
        language = info.split()[0].lower() if info else ""
        if language in ("python", "py", "pycon"):
            marker = _preceding_marker(lines, i)
            code = "\n".join(line[indent:] for line in lines[start:end]) + "\n"
            skip = marker is not None and marker.group("what") == "no-test"
            requires: tuple[str, ...] = ()
            if marker is not None and marker.group("servers"):
                requires = tuple(marker.group("servers").split())
                unknown = set(requires) - set(_SERVER_URL)
                if unknown:
                    raise ValueError(f"{page}:{i + 1}: unknown server(s) {sorted(unknown)}")
            yield Block(page, start + 1, code, skip, requires)
        i = end + 1


def _preceding_marker(lines: list[str], fence_index: int) -> re.Match[str] | None:
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    return _MARKER.match(lines[j].strip()) if j >= 0 else None


def _server_ready(name: str) -> None:
    """Return if *name* answers; otherwise skip (laptop) or fail (CI)."""
    if name == "redis":
        try:
            import redis

            client = redis.Redis.from_url(servers.REDIS_URL, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
        except Exception as exc:  # any failure to reach it means "unavailable"
            servers.unavailable("Redis", exc)
    elif name == "postgres":
        try:
            import psycopg

            psycopg.connect(servers.POSTGRES_URL, connect_timeout=2).close()
        except Exception as exc:
            servers.unavailable("PostgreSQL", exc)


def _test_url(name: str, example: str, token: str) -> str:
    """The test server's URL for the URL literal *example* of a docs block.

    Query options of the example are kept. For PostgreSQL its ``table``/``schema`` (the
    default table when none is given) get a name unique to this run, so an example
    always starts from an empty table, and two tables of one page stay two tables.
    """
    base = urllib.parse.urlsplit(servers.REDIS_URL if name == "redis" else servers.POSTGRES_URL)
    options = dict(urllib.parse.parse_qsl(base.query))
    options.update(urllib.parse.parse_qsl(urllib.parse.urlsplit(example).query))
    if name == "postgres":
        options["table"] = f"docs_{token}_{options.get('table', 'mappingstore')}"[:63]
        if "schema" in options:
            options["schema"] = f"docs_{token}_{options['schema']}"[:63]
    else:
        options["prefix"] = f"docs{token}.{options.get('prefix', 'ms')}"[:64]
    return urllib.parse.urlunsplit(base._replace(query=urllib.parse.urlencode(options)))


@contextlib.contextmanager
def _server_cleanup(names: set[str], token: str) -> Iterator[None]:
    """Remove what a page's examples created on the test servers: the Redis keys under
    the page's prefix, the PostgreSQL tables and schemas named with its *token* (see
    :func:`_test_url`). Nothing else is touched, so other test runs may share the
    servers."""
    try:
        yield
    finally:
        if "redis" in names:
            import redis

            with redis.Redis.from_url(servers.REDIS_URL) as client:
                servers.drop_redis_keys(client, f"docs{token}.")
        if "postgres" in names:
            import psycopg
            from psycopg import sql

            with psycopg.connect(servers.POSTGRES_URL, autocommit=True) as conn:
                schemas, tables = _pg_objects(conn)
                mine = f"docs_{token}_"
                for schema, table in sorted(tables):
                    if table.startswith(mine) or schema.startswith(mine):
                        drop = sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE")
                        conn.execute(drop.format(sql.Identifier(schema), sql.Identifier(table)))
                for schema in sorted(schemas):
                    if schema.startswith(mine):
                        drop = sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE")
                        conn.execute(drop.format(sql.Identifier(schema)))


def _pg_objects(conn: Any) -> tuple[set[str], set[tuple[str, str]]]:
    system = "('pg_catalog', 'information_schema', 'pg_toast')"
    schemas = {
        r[0]
        for r in conn.execute(f"SELECT nspname FROM pg_namespace WHERE nspname NOT IN {system}")
    }
    tables = {
        (r[0], r[1])
        for r in conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            f"WHERE table_schema NOT IN {system}"
        )
    }
    return schemas, tables


def _run_block(block: Block, namespace: dict[str, Any], token: str = "t") -> None:
    code = block.code
    for name in block.requires:
        _server_ready(name)
        code = _SERVER_URL[name].sub(lambda m, n=name: _test_url(n, m.group(), token), code)
    page = block.page.relative_to(ROOT) if block.page.is_relative_to(ROOT) else block.page
    where = f"{page}:{block.line}"
    if re.search(r"^\s*>>>", code, re.MULTILINE):
        parser = doctest.DocTestParser()
        test = parser.get_doctest(code, namespace, where, str(block.page), block.line - 1)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        namespace.update(test.globs)  # DocTest works on a copy; later blocks need the names
        if runner.failures:
            pytest.fail(
                f"doctest failed in {where} ({_FIX_HINT}):\n" + "".join(report), pytrace=False
            )
        return
    try:
        exec(compile(code, where, "exec"), namespace)  # the docs' own examples
    except Exception as exc:
        raise AssertionError(
            f"example at {where} raised {type(exc).__name__}: {exc}\n({_FIX_HINT})"
        ) from exc


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# Only pages with something to run become tests (no "skipped: no examples" noise).
PAGES = [p for p in ALL_PAGES if any(not b.skip for b in blocks_of(p))]


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [b for b in blocks_of(page) if not b.skip]
    monkeypatch.chdir(tmp_path)
    for var in ("MAPPINGSTORE_URL", "MAPPINGSTORE_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    from mappingstore import _memory

    # Named memory stores live as long as the process: forget the ones this page made,
    # so two pages that both use memory://demo cannot see each other's data.
    before = set(_memory._NAMED)
    namespace: dict[str, Any] = {"__name__": "__docs_example__"}
    needs = {name for b in blocks for name in b.requires}
    for name in sorted(needs):  # skip (laptop) or fail (CI) before running anything
        _server_ready(name)
    token = uuid.uuid4().hex[:8]
    try:
        with _server_cleanup(needs, token):
            try:
                for block in blocks:
                    _run_block(block, namespace, token)
            finally:
                # Before the cleanup: an open store may hold a server-side cursor or lock
                # that a DROP TABLE would wait for.
                for value in namespace.values():
                    close = getattr(value, "close", None)
                    if callable(close) and getattr(value, "closed", True) is False:
                        close()
    finally:
        for name in set(_memory._NAMED) - before:
            _memory.MemoryStore.drop(name)


def test_the_block_parser_sees_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text\n\n```python\nx = 1\n```\n\n<!-- no-test -->\n```python\nraise SystemExit\n```\n"
        "<!-- requires: redis postgres -->\n\n````python\n>>> 1 + 1\n2\n````\n"
        "```console\n$ not python\n```\n",
        encoding="utf-8",
    )
    found = list(blocks_of(page))
    assert [(b.line, b.skip, b.requires) for b in found] == [
        (4, False, ()),
        (9, True, ()),
        (14, False, ("redis", "postgres")),
    ]
    assert found[2].code == ">>> 1 + 1\n2\n"


def test_a_wrong_example_fails(tmp_path: Path) -> None:
    page = tmp_path / "wrong.md"
    page.write_text("```python\n>>> 1 + 1\n3\n```\n\n```python\nassert 1 + 1 == 3\n```\n")
    doctest_block, plain_block = blocks_of(page)
    with pytest.raises(pytest.fail.Exception, match="Expected:\n    3\nGot:\n    2"):
        _run_block(doctest_block, {})
    with pytest.raises(AssertionError, match="raised AssertionError"):
        _run_block(plain_block, {})


def test_server_blocks_get_the_test_servers_urls(tmp_path: Path) -> None:
    page = tmp_path / "servers.md"
    page.write_text(
        "<!-- requires: redis -->\n```python\nr = 'redis://localhost:6379/0?namespace=x'\n```\n"
        "<!-- requires: postgres -->\n```python\n"
        "p = 'postgresql://me:pw@db.example/app?table=kv'\nq = 'postgres://db.example/app'\n```\n"
    )
    namespace: dict[str, Any] = {}
    for block in blocks_of(page):
        _run_block(block, namespace, "tok")
    assert namespace["r"] == servers.REDIS_URL + "?namespace=x&prefix=docstok.ms"
    assert namespace["p"] == servers.POSTGRES_URL + "?table=docs_tok_kv"
    assert namespace["q"] == servers.POSTGRES_URL + "?table=docs_tok_mappingstore"


def test_cleanup_removes_only_what_the_page_made() -> None:
    """Other test runs may share the servers: the clean-up after a page removes the keys
    and tables named with the page's token, never what appeared meanwhile elsewhere (it
    once deleted every key created on the server while a page ran)."""
    _server_ready("redis")
    _server_ready("postgres")
    import psycopg
    import redis
    from psycopg import sql

    token, other = uuid.uuid4().hex[:8], f"other{uuid.uuid4().hex[:8]}"
    with (
        redis.Redis.from_url(servers.REDIS_URL) as client,
        psycopg.connect(servers.POSTGRES_URL, autocommit=True) as conn,
    ):
        try:
            with _server_cleanup({"redis", "postgres"}, token):
                client.set(f"docs{token}.ms:k", 1)
                client.set(f"{other}:k", 1)  # another run's key, written meanwhile
                for table in (f"docs_{token}_kv", other):
                    conn.execute(sql.SQL("CREATE TABLE {} (k int)").format(sql.Identifier(table)))
            assert client.exists(f"docs{token}.ms:k") == 0
            assert client.exists(f"{other}:k") == 1
            _, tables = _pg_objects(conn)
            names = {table for _, table in tables}
            assert f"docs_{token}_kv" not in names and other in names
        finally:
            client.delete(f"{other}:k")
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(other)))


def test_every_docs_page_was_collected() -> None:
    # A page under a new docs/ subdirectory would silently escape the examples test.
    deeper = [p for p in (ROOT / "docs").glob("*/*/*.md") if "_build" not in p.parts]
    assert deeper == [], f"examples in {deeper} are not tested: extend PAGES"
