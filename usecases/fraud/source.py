"""The card-fraud use case's demo data: seeded synthetic card transactions (flywheel/datagen.py),
with each row's true fraud probability under ``_truth/`` (never in the raw files), for `flywheel run`
without --source."""

from __future__ import annotations

from flywheel.datagen import generate


def write_demo(storage, out_uri: str, *, rows: int | None, data) -> None:
    """``rows`` transactions (default: the settings' ``data.rows``) over ``data.days`` days."""
    generate(storage, out_uri, rows=rows or data.rows, days=data.days, seed=data.seed)
