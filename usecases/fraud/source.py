"""The card-fraud use case's demo data: seeded synthetic card transactions (generator.py, beside this
file), with each row's true fraud probability under ``_truth/`` (never in the raw files), for
`flywheel run` without --source and for `flywheel generate`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from flywheel.usecase import load_module, load_usecase


def generator():
    """generator.py, imported as the platform imports a use case's modules (once per version of it)."""
    return load_module(load_usecase(Path(__file__).resolve().parent), "generator")


def write_demo(storage, out_uri: str, *, rows: int | None, data, start: str | None = None, format: str | None = None,
               options: dict | None = None, progress: Callable[[int], None] | None = None) -> str:
    """``rows`` transactions (default: the settings' ``data.rows``) over ``data.days`` days with
    ``data.seed``, from ``start`` (default 2026-10-01) as ``format`` files (parquet, csv or jsonl;
    default parquet). ``options`` (`flywheel generate --option KEY=VALUE`): a later period of the
    same world (``world_rows``) and drift (``drift_from``, ``amount_scale``, ``new_category``,
    ``new_category_share``, ``fraud_pattern``, ``fraud_pattern_share``), as generator.py's docstring
    says; the generator refuses any other. Returns what was written, in a line."""
    named = {name: value for name, value in (("start", start), ("fmt", format)) if value is not None}
    result = generator().generate(storage, out_uri, rows=rows or data.rows, days=data.days, seed=data.seed,
                                  progress=progress, options=options, **named)
    return (f"{result.rows:,} rows ({result.fraud_rate():.2%} fraud, {result.cards:,} cards, {result.merchants:,} merchants) "
            f"in {len(result.files)} file(s) under {out_uri}; true probabilities under {out_uri.rstrip('/')}/_truth/")
