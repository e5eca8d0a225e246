"""Issue 22's fraud scenarios, the ingest half: a base period, then the following week generated on
its own (`flywheel generate --option world_rows=N`), stable or drifted, delivered with `flywheel
ingest` into the base period's lake. What ingest does with each, and the settings a scenario needs to
ingest a drifted week so that it can retrain on it (each measured here, with the real defaults):

- a stable week: accepted (the drift gate against the base batch passes);
- amounts x3 (``amount_scale=3``): refused by the drift gate, amount quantiles
  (``ingest.drift.quantile_tolerance`` 0.5); accepted with ``ingest.drift.enabled: false``;
- card testing (``fraud_pattern=card_testing``, 3% of rows): accepted as it is (the fraud rate
  moves by less than ``ingest.drift.max_rate_change``): ingest does not see a new fraud pattern;
- a new merchant category at 20%: refused by the contract's row check (``categories_mostly: 0.99``)
  even with the drift gate off; policy quarantine would keep the new category's rows out of the lake;
- a new category below 1% of rows: the row check passes, but the drift gate refuses any value its
  baseline never saw (KL divergence infinite, reported as None); accepted with the gate off.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.cli import main

BASE = ["--rows", "8000", "--days", "14", "--start", "2026-10-01"]
WEEK = ["--rows", "2000", "--days", "7", "--start", "2026-10-15", "--option", "world_rows=8000"]


def generate(tmp_path: Path, name: str, *options: str) -> str:
    out = tmp_path / "deliveries" / name
    assert main(["generate", *(BASE if name == "base" else WEEK), *options, "--out", str(out)]) == 0
    return str(out)


def ingest(capsys, source: str, lake: Path, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["ingest", source, "--lake", str(lake), *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out + out.err


@pytest.fixture()
def lake(flywheel_home, tmp_path: Path, capsys) -> Path:
    """A lake holding the base period: two weeks, 8,000 transactions."""
    path = tmp_path / "lake"
    code, said = ingest(capsys, generate(tmp_path, "base"), path)
    assert code == 0 and "8,000 rows accepted" in said, said
    return path


def test_a_stable_week_of_the_same_world_is_accepted_by_default(lake: Path, tmp_path: Path, capsys) -> None:
    code, said = ingest(capsys, generate(tmp_path, "stable"), lake)
    assert code == 0 and "2,000 rows accepted" in said and "10,000 rows" in said, said


def test_amounts_x3_are_refused_by_the_drift_gate_and_accepted_with_it_off(lake: Path, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    week = generate(tmp_path, "x3", "--option", "amount_scale=3", "--option", "drift_from=2026-10-15")
    code, said = ingest(capsys, week, lake)
    assert code == 1 and "1 of " in said and "expect_column_quantile_values_to_be_between(amount): quantile 0.05" in said, said
    monkeypatch.setenv("FLYWHEEL_INGEST__DRIFT__ENABLED", "false")
    code, said = ingest(capsys, week, lake)
    assert code == 0 and "2,000 rows accepted" in said, said


def test_a_card_testing_week_passes_ingest_unnoticed(lake: Path, tmp_path: Path, capsys) -> None:
    code, said = ingest(capsys, generate(tmp_path, "card-testing", "--option", "fraud_pattern=card_testing"), lake)
    assert code == 0 and "2,000 rows accepted" in said, said


def test_a_new_category_at_20_percent_breaks_the_contract_even_with_the_drift_gate_off(
        lake: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_INGEST__DRIFT__ENABLED", "false")
    week = generate(tmp_path, "atm", "--option", "new_category=crypto_atm", "--option", "new_category_share=0.2")
    code, said = ingest(capsys, week, lake)
    assert code == 1 and "expect_column_values_to_be_in_set(merchant_category)" in said and "allowed 1.00%" in said, said
    assert "crypto_atm" in said
    # Quarantine accepts the batch only by setting the new category's rows aside: the lake never sees them.
    monkeypatch.setenv("FLYWHEEL_INGEST__MAX_QUARANTINE_FRACTION", "0.3")
    code, said = ingest(capsys, week, lake, "--policy", "quarantine")
    assert code == 0 and "quarantined" in said and ", 0 quarantined" not in said, said


def test_a_new_category_below_one_percent_passes_the_contract_but_not_the_drift_gate(
        lake: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    week = generate(tmp_path, "atm", "--option", "new_category=crypto_atm", "--option", "new_category_share=0.005")
    code, said = ingest(capsys, week, lake)
    assert code == 1 and "expect_column_kl_divergence_to_be_less_than(merchant_category): KL divergence observed None" in said
    assert "expect_column_values_to_be_in_set" not in said, said
    monkeypatch.setenv("FLYWHEEL_INGEST__DRIFT__ENABLED", "false")
    code, said = ingest(capsys, week, lake)
    assert code == 0 and "2,000 rows accepted" in said, said
