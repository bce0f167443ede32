"""Sphinx configuration for the mappingstore documentation (MyST Markdown + furo).

Build exactly as CI does (warnings are errors)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Two small source filters keep the build green while parts of the project land at
different times; both are documented in DEVELOPERS.md:

* A toctree line ``?PATTERN`` lists the pages matching the glob *PATTERN* (relative to
  the page) that exist and are not already named in that page. No match: the line
  disappears. Sphinx's own ``:glob:`` warns on an empty match, which ``-W`` turns into an
  error, and a top-level page nobody listed would be an "orphan" warning.
* ``<!-- if-exists: PATH -->`` ... ``<!-- end-if -->`` keeps the text between the markers
  only if *PATH* (relative to the repository root) exists, so the API page documents a
  backend exactly when its module is there (autodoc of a missing module is a warning).
"""

from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # autodoc imports the package from this checkout

import mappingstore  # noqa: E402

project = "mappingstore"
author = "mappingstore developers"
copyright = "mappingstore developers"
release = mappingstore.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_click",  # docs/cli.md: the CLI reference comes from the click commands themselves
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3  # [text](page.md#some-heading) links work for h1-h3

autodoc_member_order = "bysource"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"mappingstore {release}"
html_static_path: list[str] = []

# -- backend status, from the files that exist (used by choose-a-backend.md) ---------------

# name -> (module file, candidate page names under docs/backends/, display name)
_BACKENDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "memory": ("_memory.py", ("memory",), "Memory"),
    "sqlite": ("_sqlite.py", ("sqlite",), "SQLite"),
    "shm": ("_shm.py", ("shm", "shared-memory", "sharedmemory"), "Shared memory"),
    "dir": ("_directory.py", ("directory", "dir"), "Directory"),
    "ini": ("_ini.py", ("ini",), "INI file"),
    "redis": ("_redis.py", ("redis",), "Redis"),
    "cluster": ("_redis.py", ("redis-cluster", "redis"), "Redis Cluster"),
    "postgres": ("_postgres.py", ("postgresql", "postgres"), "PostgreSQL"),
}


def _backend_substitutions() -> dict[str, str]:
    """``{{ name_X }}`` (linked when its page exists) and ``{{ status_X }}`` per backend.

    The docs then never claim a backend that is not in this checkout, and never link a
    page that is not written yet (a broken link is a warning, so an error here).
    """
    subs = {}
    for name, (module, pages, title) in _BACKENDS.items():
        source = ROOT / "mappingstore" / module
        built = source.exists()
        if name == "cluster":  # the Redis module exists before its cluster support does
            built = built and "RedisCluster" in source.read_text(encoding="utf-8")
        page = next((p for p in pages if (DOCS / "backends" / f"{p}.md").exists()), None)
        subs[f"name_{name}"] = f"[{title}](backends/{page}.md)" if page else title
        subs[f"status_{name}"] = "available" if built else "planned"
    return subs


myst_substitutions = _backend_substitutions()

# -- the two source filters (see the module docstring) -------------------------------------

_OPTIONAL_ENTRY = re.compile(r"^\?(?P<pattern>\S+)[ \t]*$", re.MULTILINE)
_IF_EXISTS = re.compile(
    r"<!-- if-exists: (?P<path>\S+) -->\n(?P<body>.*?)<!-- end-if -->\n?", re.DOTALL
)
_TOCTREE = re.compile(
    r"(?P<open>^```\{toctree\}[^\n]*\n)(?P<body>.*?)(?P<close>^```)", re.DOTALL | re.MULTILINE
)
_TOCTREE_LINE = re.compile(r"^(?P<name>[\w./-]+)[ \t]*$", re.MULTILINE)


def _expand(docname: str, text: str, all_docs: set[str]) -> str:
    text = _IF_EXISTS.sub(
        lambda m: m.group("body") if (ROOT / m.group("path")).exists() else "", text
    )
    trees = list(_TOCTREE.finditer(text))
    if not any(_OPTIONAL_ENTRY.search(t.group("body")) for t in trees):
        return text
    base = docname.rpartition("/")[0]
    here = f"{base}/" if base else ""
    named = {here + m.group("name") for t in trees for m in _TOCTREE_LINE.finditer(t.group("body"))}
    docs = [d for d in sorted(all_docs) if d != docname and d not in named]

    def entries(match: re.Match[str]) -> str:
        pattern = here + match.group("pattern")
        # fnmatch's "*" crosses "/"; a toctree glob's does not: compare depth too.
        depth = pattern.count("/")
        hits = [d for d in docs if d.count("/") == depth and fnmatch.fnmatchcase(d, pattern)]
        for d in hits:
            docs.remove(d)  # listed once, by the first pattern that matches it
        return "\n".join(d[len(here) :] for d in hits)

    def tree(match: re.Match[str]) -> str:
        return (
            match.group("open")
            + _OPTIONAL_ENTRY.sub(entries, match.group("body"))
            + match.group("close")
        )

    return _TOCTREE.sub(tree, text)


def _source_read(app: Any, docname: str, source: list[str]) -> None:
    # env.found_docs: the pages Sphinx itself will build (exclude_patterns applied).
    source[0] = _expand(docname, source[0], set(app.env.found_docs))


def _always_reread(
    app: Any, env: Any, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    # Pages with filtered sources depend on which other files exist: re-read them on
    # every incremental build, so a page added or removed elsewhere is never missed.
    return [d for d in env.found_docs if d.endswith("index") or d == "api"]


def setup(app: Any) -> dict[str, Any]:
    app.connect("source-read", _source_read)
    app.connect("env-get-outdated", _always_reread)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# Sphinx would turn the "--" of command-line options in the generated CLI reference into
# en dashes ("-url"); keep quotes and dashes as written.
smartquotes_action = "qe"
