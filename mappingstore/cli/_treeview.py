"""The ``tree`` command: the dot-name hierarchy drawn as a tree."""

from __future__ import annotations

import sys
from typing import Any

import click

from . import _raw
from ._app import CLIError, Settings, dumps, echo_json, open_store, show_key, store_options
from ._items import complete_keys, typed_value

__all__ = ["COMMANDS"]


class _Node:
    __slots__ = ("children", "leaf", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.leaf = False
        self.value: Any = None


def _glyphs() -> tuple[str, str, str, str]:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "├└│─".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "|-- ", "`-- ", "|   ", "    "
    return "├── ", "└── ", "│   ", "    "


def _draw(
    node: _Node, indent: str, depth: int, max_depth: int | None, show_values: bool, out: list[str]
) -> None:
    if max_depth is not None and depth > max_depth:
        return
    tee, corner, pipe, blank = _glyphs()
    names = sorted(node.children)
    for i, name in enumerate(names):
        child = node.children[name]
        last = i == len(names) - 1
        label = show_key(name)
        if child.leaf and show_values:
            label += " = " + dumps(typed_value(child.value))
        elif child.leaf and child.children:
            label += " (also a value)"
        if child.children and (max_depth is not None and depth == max_depth):
            label += " ..."
        out.append(indent + (corner if last else tee) + label)
        _draw(child, indent + (blank if last else pipe), depth + 1, max_depth, show_values, out)


def _as_json(node: _Node, show_values: bool) -> Any:
    if not node.children:
        return typed_value(node.value) if show_values else None
    return {name: _as_json(child, show_values) for name, child in sorted(node.children.items())}


@click.command("tree")
@click.argument("branch", default="", required=False, shell_complete=complete_keys)
@click.option(
    "--values",
    "show_values",
    is_flag=True,
    help="Show each leaf's value (needs the password of an encrypted store).",
)
@click.option(
    "--max-depth",
    "-L",
    type=click.IntRange(min=1),
    metavar="N",
    default=None,
    help="Draw at most N levels.",
)
@store_options
def tree_cmd(settings: Settings, branch: str, show_values: bool, max_depth: int | None) -> None:
    """Draw the dot-name hierarchy under BRANCH (default: the whole namespace) as a tree.

    Names are split at '.', whether or not the store is usually opened with
    --dot-names. With --json, print the tree as nested objects whose leaves are null
    (or their typed values with --values).
    """
    branch = branch.rstrip(".")
    with open_store(settings, readonly=True, values=show_values, dot_names=True) as store:
        root = _Node()
        ns = store.namespace
        found = False
        for name in store.names(branch):
            found = True
            rel = name[len(branch) + 1 :] if branch else name
            node = root
            if rel and name != branch:
                for part in rel.split("."):
                    node = node.children.setdefault(part, _Node())
            node.leaf = True
            if show_values:
                rec = _raw.record(store, ns, name)
                node.value = None if rec is None else _raw.decode(store, ns, name, rec[0])
        if branch and not found:
            raise CLIError(f"not found: {branch!r}")
    if settings.json:
        echo_json(
            _as_json(root, show_values)
            if root.children
            else (typed_value(root.value) if show_values else None),
            settings,
        )
        return
    label = show_key(branch) if branch else "."
    if root.leaf and show_values:
        label += " = " + dumps(typed_value(root.value))
    lines = [label]
    _draw(root, "", 1, max_depth, show_values, lines)
    click.echo("\n".join(lines))


COMMANDS = [tree_cmd]
