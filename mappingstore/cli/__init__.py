"""The ``mappingstore`` command line tool (needs the ``cli`` extra: click and tqdm).

``main`` is the console-script entry point; :data:`cli` is the click group (for
``sphinx-click``, tests and embedding). Commands live in one module per family and are
attached in :func:`_build`; a new family (``series``, ``events``) is one more module
with a ``COMMANDS`` list (or a ``click.Group``) added there.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click

__all__ = ["cli", "main"]

_MISSING_EXTRA = "the mappingstore command line needs its extra: pip install 'mappingstore[cli]'"


def _build() -> click.Group:
    from . import _admin, _items, _timeseries, _transfer, _treeview
    from ._app import cli

    if not cli.commands:
        for module in (_items, _treeview, _admin, _transfer, _timeseries):
            for command in module.COMMANDS:
                cli.add_command(command)
    return cli


def main(argv: list[str] | None = None) -> None:
    """Run the command line (``argv`` defaults to ``sys.argv[1:]``); exits the process."""
    try:
        group = _build()
    except ModuleNotFoundError as exc:
        if exc.name in ("click", "tqdm"):
            sys.exit(f"error: {_MISSING_EXTRA}")
        raise
    try:
        group.main(args=argv, prog_name="mappingstore")
    except BrokenPipeError:
        # The reader went away (`mappingstore export | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)


def __getattr__(name: str) -> Any:
    if name == "cli":
        try:
            return _build()
        except ModuleNotFoundError as exc:
            if exc.name in ("click", "tqdm"):
                raise ModuleNotFoundError(_MISSING_EXTRA, name=exc.name) from exc
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
