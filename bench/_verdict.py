"""The verdict a benchmark prints beside a target: ``ok`` or ``**MISSED**``.

Targets are written as the issues state them: ``">= 0.9x"``, ``"> 1x"``,
``">= 0.77x (<= 1.3x cost)"``, ``">= 0.7x or >= 30,000 keys/s"``, ``">= 100,000 points/s"``.
A ratio target is judged on *ratio* (ours / peer), a rate target on *rate* (ours); with
``or``, meeting either is enough. A target this cannot read gives ``""`` (no verdict),
never a guess.
"""

from __future__ import annotations

import math
import re

_RATIO = re.compile(r"(>=|>)\s*([\d.]+)x")
_RATE = re.compile(r"(>=|>)\s*([\d,]+(?:\.\d+)?)\s*[a-z]+/s")


def _meets(op: str, value: float, bound: float) -> bool:
    return value >= bound if op == ">=" else value > bound


def verdict(target: str, ratio: float | None, rate: float | None = None) -> str:
    checks: list[bool] = []
    for part in target.split(" or "):
        m = _RATIO.search(part)
        if m and ratio is not None and not math.isnan(ratio):
            checks.append(_meets(m.group(1), ratio, float(m.group(2))))
            continue
        m = _RATE.search(part)
        if m and rate is not None:
            checks.append(_meets(m.group(1), rate, float(m.group(2).replace(",", ""))))
    if not checks:
        return ""
    return "ok" if any(checks) else "**MISSED**"
