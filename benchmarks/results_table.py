"""What every benchmark ends with: goals judged against the figures, JSON written, a table printed.

Benchmarks run as `python benchmarks/NAME.py`, so this module is imported by its plain name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def judge(figures: dict[str, float], targets: dict[str, tuple[float, str]]) -> dict[str, dict[str, Any]]:
    """``{name: (target, "min" | "max")}`` → ``{name: {"target", "value", "met"}}`` from the figures."""
    goals = {}
    for name, (target, kind) in targets.items():
        value = figures[name]
        goals[name] = {"target": target, "value": value, "met": value >= target if kind == "min" else value <= target}
    return goals


def write_results(path: Path, figures: dict[str, float], goals: dict[str, dict[str, Any]], **extra: Any) -> None:
    """Write ``{"figures", "goals", **extra}`` as JSON and print the figures and each goal's verdict."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"figures": figures, "goals": goals, **extra}, indent=2) + "\n")
    width = max(map(len, figures))
    for name, value in figures.items():
        print(f"{name:<{width}}  {value}")
    for name, goal in goals.items():
        print(f"goal {name}: {goal['value']} vs {goal['target']} -> {'met' if goal['met'] else 'NOT met'}")
    print(f"wrote {path}")
