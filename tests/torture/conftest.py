"""The reliability and security torture suite (issue 8): tiers, figures, shared fixtures.

Two tiers share one set of tests. The *fast* tier runs in the normal test command (CI);
the *long* tier runs the same tests with the repetition counts of the pass figures, and
is selected with ``-m torture`` or ``--torture``::

    python -m pytest -m torture -p no:cacheprovider          # long tier only
    python -m pytest --torture -p no:cacheprovider           # both tiers

A test asks :func:`reps` for its repetition count and records what it reached with the
``figure`` fixture; the figures are printed at the end of the run (long tier, or ``-v``)
and, when
``MAPPINGSTORE_TORTURE_REPORT`` names a file, written there as JSON (the numbers in
``docs/reliability.md`` come from that file).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.torture.harness import FIGURES, Target, make_target


@pytest.fixture(params=["fast", pytest.param("long", marks=pytest.mark.torture)])
def tier(request: pytest.FixtureRequest) -> str:
    """``"fast"`` (the CI tier) or ``"long"`` (``-m torture``: the issue's pass figures)."""
    return str(request.param)


_lock = threading.Lock()


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``figure(what, value, **detail)``: record a figure this test reached.

    *what* names the measured quantity ("kills", "lost acknowledged writes", ...);
    figures are keyed by the test's node id so both tiers and every backend keep theirs.
    """

    def record(what: str, value: Any, **detail: Any) -> None:
        with _lock:
            FIGURES.append({"test": request.node.nodeid, "what": what, "value": value, **detail})

    return record


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Target]:
    """A fresh, private location on the backend named by the ``backend`` parameter.

    Use with ``@pytest.mark.parametrize("backend", PERSISTENT)`` (or a subset).
    """
    made = make_target(request.getfixturevalue("backend"), tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not FIGURES:
        return
    path = os.environ.get("MAPPINGSTORE_TORTURE_REPORT")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(FIGURES, out, indent=1, default=str)
    long_tier = config.getoption("--torture") or "torture" in (config.getoption("markexpr") or "")
    if not (long_tier or config.getoption("verbose") > 0):
        return  # the normal run stays quiet: -v (or the long tier) prints the figures
    terminalreporter.section("torture figures")
    for row in FIGURES:
        extra = {k: v for k, v in row.items() if k not in ("test", "what", "value")}
        terminalreporter.write_line(
            f"{row['test']}: {row['what']} = {row['value']}" + (f" {extra}" if extra else "")
        )
