"""The harness itself: every backend's target opens, is private, and is cleaned up."""

from __future__ import annotations

import pytest

from tests.torture.harness import PERSISTENT, Target


@pytest.mark.parametrize("backend", PERSISTENT)
def test_target_round_trip_in_a_forked_child(backend: str, target: Target) -> None:
    from tests.torture.harness import FORK

    with target.open() as store:
        store["k"] = 1

    def child() -> None:
        with target.open() as s:
            s["k"] = s["k"] + 1

    proc = FORK.Process(target=child)
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    with target.open() as store:
        assert dict(store) == {"k": 2}
