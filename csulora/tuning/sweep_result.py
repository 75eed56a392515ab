"""The record of a sweep: its points, the rules that pick one, and the pick (DESIGN.md §8).

``sweep.py`` runs a sweep and ``sweep_render.py`` draws it; both read this record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CsuloraError

SCHEMA_VERSION = 1
_RULE = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


@dataclass(frozen=True)
class Rule:
    metric: str
    op: str  # ">=" or "<="
    value: float

    def holds(self, metrics: dict[str, float]) -> bool:
        x = metrics[self.metric]
        return x >= self.value if self.op == ">=" else x <= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_rule(text: str) -> Rule:
    """``METRIC>=X`` or ``METRIC<=X``."""
    m = _RULE.fullmatch(text)
    if m is None:
        raise CsuloraError(f"--pick {text!r}: expected METRIC>=X or METRIC<=X, e.g. 'utility>=0.8'")
    return Rule(m[1], m[2], float(m[3]))


@dataclass
class SweepResult:
    out: Path
    points: list[dict]
    picked: str | None = None
    rules: list[Rule] = field(default_factory=list)
    maximize: str | None = None
    notes: list[str] = field(default_factory=list)  # what could not be drawn, and why

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "points": self.points,
            "picked": self.picked,
            "rules": [str(r) for r in self.rules],
            "maximize": self.maximize,
        }

    def point(self, point_id: str | None) -> dict | None:
        return next((p for p in self.points if p["id"] == point_id), None)


def candidates(point: dict) -> dict[str, float]:
    """What a rule may name: the evaluation's metrics, and the report's numeric totals (metrics win a clash)."""
    totals = {k: float(v) for k, v in (point.get("totals") or {}).items()
              if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
    return {**totals, **point.get("metrics", {})}


def measured(points: list[dict]) -> list[str]:
    """The evaluation's metric names the points have, in order of first appearance."""
    return list(dict.fromkeys(k for p in points for k in p["metrics"]))


def shown(points: list[dict]) -> list[str]:
    """The metrics a table shows: all but counts (``n_harmful``, ``n_utility``: how many prompts ``csulora eval``
    measured on), which rules may still name but are not a result of the point."""
    return [m for m in measured(points) if not m.startswith("n_")]


def require_measured(points: list[dict], names: list[str], what: str) -> None:
    """Bad input when a name is neither a metric nor a total of any successful point (no check without one)."""
    ok = [p for p in points if p["status"] == "ok"]
    known = set().union(*(candidates(p) for p in ok)) if ok else set()
    for name in names:
        if ok and name not in known:
            raise CsuloraError(f"{what} {name!r} is not measured: the points have {', '.join(sorted(known))}")


def pick(points: list[dict], rules: list[Rule], maximize: str) -> str | None:
    """The point with the largest ``maximize`` among those that meet every rule (ties: the first in the ladder);
    ``None`` when none does. A metric no successful point has is bad input."""
    require_measured(points, [maximize, *(r.metric for r in rules)], "metric")
    ok = [p for p in points if p["status"] == "ok"]
    qualified = [p for p in ok if all(r.holds(candidates(p)) for r in rules)]
    best = max(qualified, key=lambda p: candidates(p)[maximize], default=None)
    return best["id"] if best else None
