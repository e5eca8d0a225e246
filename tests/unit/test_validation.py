"""Validation: the GE suite passes good transactions, names every broken expectation, and always
leaves its JSON and HTML reports behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import lineage
from flywheel.errors import ValidationFailed
from flywheel.ingest import ingest
from flywheel.lake import LakeSnapshot, publish_snapshot, read_snapshot
from flywheel.storage import Storage
from flywheel.validation import ValidationReport, build_suite, validate_frame, validate_snapshot
from tests import factories
from tests.factories import FRAUD_CONTRACT as CONTRACT
from tests.factories import FRAUD_SCHEMA as TRANSACTION_SCHEMA


def transactions(rows: int = 400, seed: int = 0) -> pd.DataFrame:
    """Rows matching TRANSACTION_SCHEMA over two days, with a 5% fraud rate."""
    return factories.make_transactions(rows, seed=seed, start="2026-04-01", days=2, cards=40, merchants=15)


def corrupted() -> pd.DataFrame:
    df = transactions()
    df.loc[[10, 11, 12], "amount"] = [-5.0, -12.5, 0.0]
    df.loc[21, "is_fraud"] = 7
    df.loc[30, "transaction_id"] = df.loc[31, "transaction_id"]
    df.loc[40, "channel"] = "telepathy"
    return df


def snapshot_of(storage: Storage, df: pd.DataFrame, tmp_path: Path) -> LakeSnapshot:
    if df["transaction_id"].duplicated().any():
        # ingest refuses an id that repeats with other content, so write the part by hand and publish
        # it: validation must still catch duplicates in a lake that was built by other means.
        part = tmp_path / "lake" / "transactions" / "date=2026-04-01" / "part-handwritten.parquet"
        part.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False).cast(TRANSACTION_SCHEMA), part)
        return publish_snapshot(storage, str(tmp_path / "lake"), run_id="ingest-1")
    raw = tmp_path / "raw" / "tx.parquet"
    raw.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), raw)
    return ingest(storage, str(raw.parent), str(tmp_path / "lake"), run_id="ingest-1", contract=CONTRACT)


@pytest.fixture()
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "root"))


def test_suite_covers_the_contract() -> None:
    suite = build_suite(CONTRACT)
    kinds = {(e.expectation_type, getattr(e, "column", None)) for e in suite.expectations}
    for expected in [
        ("expect_table_columns_to_match_set", None),
        ("expect_table_row_count_to_be_between", None),
        ("expect_column_values_to_be_unique", "transaction_id"),
        ("expect_column_values_to_not_be_null", "amount"),
        ("expect_column_values_to_be_between", "amount"),
        ("expect_column_values_to_be_between", "is_fraud"),  # int8 in [0, 1]: binary
        ("expect_column_values_to_be_between", "lat"),
        ("expect_column_mean_to_be_between", "is_fraud"),
        ("expect_column_values_to_be_in_set", "channel"),
        ("expect_column_values_to_be_in_set", "merchant_category"),
    ]:
        assert expected in kinds
    category = next(e for e in suite.expectations if getattr(e, "column", None) == "merchant_category"
                    and e.expectation_type == "expect_column_values_to_be_in_set")
    assert category.mostly == 0.99
    # Every column the contract says may not be null, and nothing the contract does not declare.
    not_null = {e.column for e in suite.expectations if e.expectation_type == "expect_column_values_to_not_be_null"}
    assert not_null == {name for name, c in CONTRACT.columns.items() if not c.nullable}
    assert {getattr(e, "column", None) for e in suite.expectations} - {None} <= set(CONTRACT.columns)
    amount = next(e for e in suite.expectations if e.expectation_type == "expect_column_values_to_be_between"
                  and e.column == "amount")
    assert (amount.min_value, amount.max_value, amount.strict_min) == (0, 1_000_000, True)


def test_good_snapshot_passes_and_writes_reports(storage: Storage, tmp_path: Path) -> None:
    snapshot = snapshot_of(storage, transactions(), tmp_path)

    report = validate_snapshot(storage, snapshot, str(tmp_path / "reports"), run_id="run-1", contract=CONTRACT)

    assert isinstance(report, ValidationReport)
    assert report.success and report.failed == [] and report.rows == 400 and report.evaluated >= 15
    assert report.report_uri == str(tmp_path / "reports" / "run-1" / "validation.json")
    document = json.loads(Path(report.report_uri).read_text())
    assert document["success"] is True and document["snapshot"]["sha256"] == snapshot.sha256
    assert Path(report.html_uri).read_text().lstrip().lower().startswith("<!doctype html")
    entry = lineage.lookup(storage, report.report_uri)
    assert entry["step"] == "validate" and entry["inputs"][0]["uri"] == snapshot.uri
    assert json.loads(json.dumps(report.to_dict()))["success"] is True


def test_corrupted_snapshot_fails_naming_each_expectation(storage: Storage, tmp_path: Path) -> None:
    snapshot = snapshot_of(storage, corrupted(), tmp_path)
    reports = tmp_path / "reports"

    with pytest.raises(ValidationFailed) as info:
        validate_snapshot(storage, snapshot, str(reports), run_id="run-2", contract=CONTRACT)

    message = str(info.value)
    assert "expect_column_values_to_be_between(amount): 3 unexpected values" in message
    assert "-5.0" in message
    assert "expect_column_values_to_be_between(is_fraud): 1 unexpected values" in message and "[7]" in message
    assert "expect_column_values_to_be_unique(transaction_id)" in message and "t00031" in message
    assert "expect_column_values_to_be_in_set(channel)" in message and "telepathy" in message
    assert "merchant_category" not in message and "(lat)" not in message
    # Reports exist even on failure, and the message says where.
    json_report, html_report = reports / "run-2" / "validation.json", reports / "run-2" / "validation.html"
    assert str(json_report) in message
    document = json.loads(json_report.read_text())
    assert document["success"] is False
    assert {f["expectation"] for f in document["failed"]} == {
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_unique",
    }
    html = html_report.read_text()
    assert "telepathy" in html and "run-2" in html


def test_failure_can_be_returned_instead_of_raised(storage: Storage, tmp_path: Path) -> None:
    snapshot = snapshot_of(storage, corrupted(), tmp_path)
    report = validate_snapshot(storage, snapshot, str(tmp_path / "reports"), "run-3", CONTRACT, raise_on_failure=False)
    assert not report.success
    assert {(f["expectation"], f["column"]) for f in report.failed} == {
        ("expect_column_values_to_be_between", "amount"),
        ("expect_column_values_to_be_between", "is_fraud"),
        ("expect_column_values_to_be_unique", "transaction_id"),
        ("expect_column_values_to_be_in_set", "channel"),
    }


def test_validate_frame_is_pure_and_checks_rates_and_tolerance() -> None:
    ok, failed, result = validate_frame(transactions(), build_suite(CONTRACT))
    assert ok and failed == [] and result["success"] is True

    df = transactions()
    df["is_fraud"] = np.int8(0)  # a fraud rate of 0: the labels went missing
    df.loc[:1, "merchant_category"] = "space_tourism"  # 2 of 400 = 0.5%, inside mostly=0.99
    ok, failed, _ = validate_frame(df, build_suite(CONTRACT))
    assert not ok
    assert [(f["expectation"], f["column"]) for f in failed] == [("expect_column_mean_to_be_between", "is_fraud")]
    assert "observed 0.0" in failed[0]["details"]


def test_missing_column_is_reported_not_crashed() -> None:
    df = transactions().drop(columns=["channel"])
    ok, failed, _ = validate_frame(df, build_suite(CONTRACT))
    assert not ok
    names = {(f["expectation"], f["column"]) for f in failed}
    assert ("expect_table_columns_to_match_set", None) in names
    assert ("expect_column_values_to_be_in_set", "channel") in names
    details = {f["expectation"]: f["details"] for f in failed}
    assert "missing columns ['channel']" in details["expect_table_columns_to_match_set"]
    assert "does not exist" in details["expect_column_values_to_be_in_set"]


def test_html_falls_back_to_a_plain_table_when_ge_cannot_render(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from great_expectations.render.renderer import ValidationResultsPageRenderer

    def broken(*args, **kwargs):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(ValidationResultsPageRenderer, "render", broken)
    snapshot = snapshot_of(storage, corrupted(), tmp_path)
    report = validate_snapshot(storage, snapshot, str(tmp_path / "reports"), "run-4", CONTRACT, raise_on_failure=False)
    html = Path(report.html_uri).read_text()
    assert "<table>" in html and "expect_column_values_to_be_unique" in html and "telepathy" in html


def test_lake_round_trip_keeps_the_schema(storage: Storage, tmp_path: Path) -> None:
    snapshot = snapshot_of(storage, transactions(50), tmp_path)
    assert read_snapshot(storage, snapshot, TRANSACTION_SCHEMA).schema.equals(TRANSACTION_SCHEMA, check_metadata=False)


def _gate_table(df: pd.DataFrame) -> pa.Table:
    """The batch columns as the gate reads them from the lake (the categorical ones dictionary-encoded)."""
    from flywheel.validation import batch_columns

    columns = batch_columns(CONTRACT)
    vocabularies = [c for c, how in CONTRACT.drift_checks().items() if how == "shares"]
    table = pa.Table.from_pandas(df[columns], preserve_index=False)
    return table.cast(pa.schema([
        pa.field(c, pa.dictionary(pa.int32(), pa.string()) if c in vocabularies else TRANSACTION_SCHEMA.field(c).type)
        for c in columns
    ]))


def _outcomes(result) -> dict:
    outcomes = {}
    for item in result.results:
        kwargs = {k: v for k, v in item.expectation_config.kwargs.items() if k != "batch_id"}
        key = (item.expectation_config.type, json.dumps(kwargs, sort_keys=True, default=str))
        found = item.result or {}
        outcomes[key] = (item.success, found.get("observed_value"), found.get("unexpected_count"),
                         found.get("partial_unexpected_list"))
    return outcomes


@pytest.mark.parametrize("corruption", ["none", "bad values in every column", "fraud rate out of its band"])
def test_the_batch_gate_decides_each_expectation_as_ge_does_on_the_whole_frame(corruption: str) -> None:
    """The gate runs GE a column at a time and takes column means straight from pandas; GE over the
    whole frame (the oracle) must reach the same verdict and observe the same values, expectation by
    expectation, with the drift gate's expectations included."""
    import datetime as dt

    import great_expectations as gx

    from flywheel.config import IngestSettings
    from flywheel.validation import (_run_batch_suite, _run_suite, baseline_profile, batch_expectations, batch_profile,
                                     drift_expectations)

    settings = IngestSettings()
    now = dt.datetime(2026, 4, 5, tzinfo=dt.timezone.utc)
    quantiles = [0.05, 0.5, 0.95]
    baseline = baseline_profile([batch_profile(transactions(2000, seed=1), CONTRACT, quantiles)], CONTRACT, quantiles)
    df = transactions(2000, seed=2)
    if corruption == "bad values in every column":
        df.loc[[3, 4], "amount"] = [-1.0, 5e7]
        df.loc[5, "is_fraud"] = 3
        df.loc[[6, 7], "merchant_category"] = "time_travel"
        df.loc[8, "channel"] = "telepathy"
        df.loc[9, "lat"], df.loc[10, "lon"] = 95.0, -200.0
        df.loc[11, "ts"] = pd.Timestamp("2030-01-01", tz="UTC")
    elif corruption == "fraud rate out of its band":
        df.loc[: len(df) // 2, "is_fraud"] = 1
    expectations = batch_expectations(CONTRACT, settings, now) + drift_expectations(baseline, settings.drift, len(df))
    table = _gate_table(df)

    ours = _run_batch_suite(table, expectations)
    oracle = _run_suite(table.to_pandas(), gx.ExpectationSuite(name="oracle", expectations=expectations))

    assert _outcomes(ours) == _outcomes(oracle)
    assert ours.success == oracle.success == (corruption == "none")
    assert ours.statistics == {k: oracle.statistics[k] for k in ours.statistics}
