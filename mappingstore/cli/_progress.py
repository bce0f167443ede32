"""Progress bars and the one-line summary of long jobs (both on stderr only)."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

import click

from ._app import Settings

__all__ = ["Job", "human_bytes"]


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 kB'`` (decimal units, as ``ls -h --si`` and tqdm print them)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Job:
    """Counts the items and bytes of a long job; shows a tqdm bar when stderr is a terminal.

    Nothing is drawn when stderr is redirected or with ``--quiet``; the summary line
    (items, bytes, seconds) is printed on stderr unless ``--quiet``.
    """

    def __init__(
        self, settings: Settings, verb: str, *, total: int | None = None, unit: str = "item"
    ) -> None:
        self.items = 0
        self.bytes = 0
        self._settings = settings
        self._unit = unit
        self._start = time.perf_counter()
        self._bar: Any = None
        if not settings.quiet and _stderr_is_tty():
            try:
                from tqdm import tqdm
            except ImportError:  # the cli extra brings tqdm; without it, no bar
                return
            self._bar = tqdm(
                total=total,
                desc=verb,
                unit=unit,
                unit_scale=unit == "B",
                file=sys.stderr,
                leave=False,
                dynamic_ncols=True,
            )

    def add(self, items: int = 1, nbytes: int = 0, *, progress: int | None = None) -> None:
        """Count *items* and *nbytes*; the bar advances by *progress* (default: *items*)."""
        self.items += items
        self.bytes += nbytes
        if self._bar is not None:
            self._bar.update(items if progress is None else progress)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self._start

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(
        self, verb: str, details: str = "", *, what: str = "item", show_bytes: bool = True
    ) -> dict[str, Any]:
        """Print ``<verb> N items (B)[, details] in S s`` on stderr; return the numbers."""
        self.close()
        seconds = self.seconds
        if not self._settings.quiet:
            noun = what if self.items == 1 else what + "s"
            size = f" ({human_bytes(self.bytes)})" if show_bytes else ""
            extra = f", {details}" if details else ""
            click.echo(f"{verb} {self.items:,} {noun}{size}{extra} in {seconds:.2f} s", err=True)
        return {"items": self.items, "bytes": self.bytes, "seconds": round(seconds, 3)}

    def __enter__(self) -> Job:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
