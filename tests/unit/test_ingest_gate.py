"""`flywheel ingest`: one delivery through ingest and the validation gate, without training.

Every corruption is delivered into a lake that already holds two accepted batches (the drift gate's
baseline), must exit 1 naming the expectation and the column, and must leave every file of the lake
with the same bytes (all files hashed before and after). Batches are 1,000 rows, as deliveries come."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import lake as lake_module
from flywheel.cli import main
from flywheel.config import Settings
from tests import factories

ROWS = 1000
START = "2026-10-01"


def batch(seed: int, prefix: str, rows: int = ROWS) -> pd.DataFrame:
    return factories.make_transactions(rows, seed=seed, id_prefix=prefix, start=START, days=5, cards=200, merchants=60)


def write(df: pd.DataFrame, path: Path) -> Path:
    """Write a delivery by suffix: parquet, csv (ts as ISO text) or jsonl."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path)
    else:
        out = df.copy()
        if "ts" in out and pd.api.types.is_datetime64_any_dtype(out["ts"]):
            out["ts"] = out["ts"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if path.suffix == ".csv":
            out.to_csv(path, index=False)
        else:
            out.to_json(path, orient="records", lines=True)
    return path


def lake_bytes(lake: Path) -> dict[str, str]:
    """Every file under the lake and the sha256 of its bytes (independent of flywheel's own hashing)."""
    return {str(p.relative_to(lake)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(lake.rglob("*")) if p.is_file()}


def ingest(*args: str) -> int:
    return main(["ingest", *args])


@pytest.fixture()
def lake(flywheel_home: Settings, tmp_path: Path) -> Path:
    """A lake holding two accepted batches of 1,000 rows (ids a*, b*)."""
    for seed, prefix in [(1, "a"), (2, "b")]:
        assert ingest(str(write(batch(seed, prefix), tmp_path / "deliveries" / prefix / "tx.parquet"))) == 0
    path = Path(_storage(flywheel_home).root) / "lake"
    assert lake_module.load_snapshot(_storage(flywheel_home), str(path / "_snapshots" / "latest.json")).rows == 2000
    return path


def _storage(settings: Settings):
    from flywheel.storage import Storage

    return Storage.from_settings(settings)


def rejected(capsys, lake: Path, source: Path, *fragments: str, policy: str = "fail") -> str:
    """Ingest ``source``: exit 1, every fragment in the message, the lake's files unchanged."""
    before = lake_bytes(lake)
    capsys.readouterr()
    assert ingest(str(source), "--policy", policy) == 1
    out = capsys.readouterr()
    message = out.out + out.err
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in message
    assert lake_bytes(lake) == before, "a rejected batch must leave the lake byte for byte as it was"
    return message


# ---------------------------------------------------------------- item 5: each corruption, by name


def test_nulls_in_a_required_column(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[[5, 50, 500], "card_id"] = None
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.csv"), "expect_column_values_to_not_be_null", "'card_id'", "3 null")


def test_negative_amounts(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[[7, 8], "amount"] = [-12.5, -0.01]
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"),
             "expect_column_values_to_be_between(amount)", "2 unexpected values", "-12.5")


def test_absurd_amounts(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[9, "amount"] = 5e9
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"), "expect_column_values_to_be_between(amount)", "5000000000")


def test_unknown_merchant_category(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[:49, "merchant_category"] = "space_tourism"  # 5%: beyond the 1% the suite tolerates
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"),
             "expect_column_values_to_be_in_set(merchant_category)", "space_tourism")


def test_duplicate_transaction_ids_in_the_batch(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[11, "transaction_id"] = df.loc[10, "transaction_id"]  # same id, other content
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"),
             "expect_column_values_to_be_unique(transaction_id)", "'c00010'", "within the file")


def test_duplicate_transaction_ids_against_the_lake(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[12, "transaction_id"] = "a00042"  # an id the lake holds, with other content
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"),
             "expect_column_values_to_be_unique(transaction_id)", "'a00042'", "already in the lake")


def test_text_in_a_numeric_column(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df["lat"] = df["lat"].astype(str)
    df.loc[13, "lat"] = "north-ish"
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.csv"), "expect_column_values_to_be_of_type", "'lat'", "'north-ish'")


def test_missing_column(lake: Path, tmp_path: Path, capsys) -> None:
    rejected(capsys, lake, write(batch(3, "c").drop(columns=["channel"]), tmp_path / "bad" / "tx.jsonl"),
             "expect_table_columns_to_match_set", "['channel']")


def test_renamed_column(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c").rename(columns={"amount": "amount_usd"})
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"),
             "expect_table_columns_to_match_set", "['amount']", "'amount_usd'")


def test_timestamps_in_the_future(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[[1, 2], "ts"] = pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=3)
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"), "expect_column_values_to_be_between(ts)", "2 unexpected values")


def test_timestamps_far_in_the_past(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[[3], "ts"] = pd.Timestamp("1970-01-01", tz="UTC")  # an epoch-zero default
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.csv"), "expect_column_values_to_be_between(ts)", "1970-01-01")


def test_empty_file(lake: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "bad" / "tx.csv"
    empty.parent.mkdir(parents=True)
    empty.write_bytes(b"")
    rejected(capsys, lake, empty, "expect_table_row_count_to_be_between", "empty")
    header_only = write(batch(3, "c").iloc[:0], tmp_path / "bad2" / "tx.csv")
    rejected(capsys, lake, header_only, "expect_table_row_count_to_be_between", "no rows")


def test_truncated_parquet_file(lake: Path, tmp_path: Path, capsys) -> None:
    whole = write(batch(3, "c"), tmp_path / "whole.parquet").read_bytes()
    cut = tmp_path / "bad" / "tx.parquet"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    rejected(capsys, lake, cut, "could not be read as parquet", "expect_file_to_be_readable", "tx.parquet")


def test_csv_with_a_broken_quote(lake: Path, tmp_path: Path, capsys) -> None:
    lines = write(batch(3, "c"), tmp_path / "good.csv").read_text().splitlines()
    lines[400] = lines[400].replace(",", ',"', 1)  # a quote opened and never closed
    broken = tmp_path / "bad" / "tx.csv"
    broken.parent.mkdir(parents=True)
    broken.write_text("\n".join(lines) + "\n")
    rejected(capsys, lake, broken, "could not be read as csv", "expect_file_to_be_readable")


def test_shifted_distribution_every_amount_x100(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df["amount"] = df["amount"] * 100
    message = rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"), "expect_column_quantile_values_to_be_between(amount)")
    assert "quantile 0.5: observed" in message and "expected between" in message


# ---------------------------------------------------------------- the class, not the instance


@pytest.mark.parametrize("column,value", [("lon", "far-east"), ("is_fraud", "yes"), ("ts", "last tuesday")])
def test_any_value_that_does_not_cast_is_named_with_its_column(lake: Path, tmp_path: Path, capsys, column, value) -> None:
    df = batch(3, "c")
    df[column] = df[column].astype(str)
    df.loc[21, column] = value
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.csv"), f"'{column}'", repr(value))


@pytest.mark.parametrize("column,value", [("lat", 123.0), ("lon", -500.0), ("channel", "telepathy"), ("is_fraud", 3)])
def test_any_row_level_expectation_rejects_under_fail_and_quarantines_under_quarantine(
    lake: Path, tmp_path: Path, capsys, column, value
) -> None:
    df = batch(3, "c")
    df[column] = df[column].astype(object)
    df.loc[[30, 31], column] = value
    source = write(df, tmp_path / "bad" / "tx.csv")
    rejected(capsys, lake, source, f"({column})")
    assert ingest(str(source), "--policy", "quarantine") == 0
    assert "998 rows accepted, 2 quarantined" in capsys.readouterr().out


def test_a_shifted_category_mix_is_drift(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df["merchant_category"] = np.where(np.arange(ROWS) % 2 == 0, "crypto", df["merchant_category"])
    message = rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"), "(merchant_category)", "'crypto'")
    assert "expect_column_kl_divergence_to_be_less_than(merchant_category)" in message


# ---------------------------------------------------------------- item 4: policy quarantine


def test_quarantine_accepts_997_of_1000_and_says_so(lake: Path, flywheel_home: Settings, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df["amount"] = df["amount"].astype(object)
    df.loc[100, "amount"] = -3.0
    df.loc[200, "amount"] = "about 5"
    df.loc[300, "channel"] = "fax"
    source = write(df, tmp_path / "delivery" / "tx.csv")
    capsys.readouterr()

    assert ingest(str(source), "--policy", "quarantine") == 0

    out = capsys.readouterr().out
    assert "997 rows accepted, 3 quarantined, 0 rejected" in out, out
    latest = json.loads((lake / "_snapshots" / "latest.json").read_text())
    assert latest["rows"] == 2997
    [kept] = latest["quarantine"]["files"]
    assert kept["uri"].startswith(str(lake / "quarantine" / "ingest-"))
    rows = pq.read_table(kept["uri"]).to_pandas().sort_values("source_row")
    assert rows["transaction_id"].tolist() == ["c00100", "c00200", "c00300"]
    assert rows["source_row"].tolist() == [100, 200, 300]
    reasons = rows["reason"].tolist()
    assert reasons[0].startswith("expect_column_values_to_be_between(amount)")
    assert reasons[1].startswith("expect_column_values_to_be_of_type(amount)") and "'about 5'" in reasons[1]
    assert reasons[2].startswith("expect_column_values_to_be_in_set(channel)") and "'fax'" in reasons[2]
    ids = set(pq.read_table([p["uri"] for p in latest["parts"]][0]).column("transaction_id").to_pylist())
    assert not ids & {"c00100", "c00200", "c00300"}


def test_quarantine_rejects_when_too_many_rows_are_bad(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df.loc[:19, "amount"] = -1.0  # 2% > the 1% default
    message = rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"), "20 of 1000 rows", "max_quarantine_fraction",
                       "expect_column_values_to_be_between(amount): 20 rows", policy="quarantine")
    assert not (lake / "quarantine").exists()


def test_batch_level_failures_still_reject_under_quarantine(lake: Path, tmp_path: Path, capsys) -> None:
    df = batch(3, "c")
    df["amount"] = df["amount"] * 100
    rejected(capsys, lake, write(df, tmp_path / "bad" / "tx.parquet"), "expect_column_quantile_values_to_be_between(amount)",
             policy="quarantine")
    rejected(capsys, lake, write(batch(3, "c").drop(columns=["lat"]), tmp_path / "bad2" / "tx.parquet"),
             "expect_table_columns_to_match_set", policy="quarantine")


# ---------------------------------------------------------------- items 1-3: the command and the gate


def test_accepted_batch_prints_what_it_did_and_reports_drift(lake: Path, flywheel_home: Settings, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "delivery"
    write(batch(3, "c"), folder / "one.parquet")
    write(batch(4, "d"), folder / "two.jsonl")
    capsys.readouterr()

    assert ingest(str(folder)) == 0

    out = capsys.readouterr().out
    assert "accepted: 2 file(s) seen, 0 skipped as already ingested, 2,000 rows accepted, 0 quarantined, 0 rejected" in out
    report_path = max((Path(_storage(flywheel_home).root) / "reports" / "validation").glob("ingest-*/validation.json"),
                      key=lambda p: p.stat().st_mtime)
    report = json.loads(report_path.read_text())
    assert report["success"] and report["rows"] == 2000 and report["baseline"]["batches"] == 2
    checks = {(d["expectation"], d["column"]) for d in report["drift"]}
    assert ("expect_column_quantile_values_to_be_between", "amount") in checks
    assert ("expect_table_row_count_to_be_between", None) in checks
    assert ("expect_column_kl_divergence_to_be_less_than", "channel") in checks
    assert all("observed" in d and "expected" in d for d in report["drift"])
    quantiles = next(d for d in report["drift"] if d["expectation"] == "expect_column_quantile_values_to_be_between")
    observed_median = quantiles["observed"]["values"][1]
    want = pd.concat([batch(3, "c"), batch(4, "d")])["amount"].quantile(0.5)
    assert observed_median == pytest.approx(want, rel=0.02)


def test_a_file_already_ingested_is_skipped_by_content(lake: Path, tmp_path: Path, capsys) -> None:
    source = write(batch(3, "c"), tmp_path / "delivery" / "tx.parquet")
    assert ingest(str(source)) == 0
    before = lake_bytes(lake)
    copy = tmp_path / "resent" / "renamed.parquet"
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    capsys.readouterr()

    assert ingest(str(tmp_path / "*" / "*.parquet")) == 0  # a glob: both the file and its renamed copy

    out = capsys.readouterr().out
    assert "2 file(s) seen, 2 skipped as already ingested, 0 rows accepted" in out, out
    assert lake_bytes(lake) == before


def test_uniqueness_is_checked_against_the_index_without_reading_the_lake(
    lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    original = lake_module.read_part
    monkeypatch.setattr(lake_module, "read_part", lambda storage, part, *a, **k: reads.append(part["uri"]) or original(storage, part, *a, **k))
    assert ingest(str(write(batch(3, "c"), tmp_path / "delivery" / "tx.parquet"))) == 0
    assert reads == [], "a batch without a repeated id must not read the lake's parts"
    # A re-delivered row is found through the index and read back from the one part holding it.
    again = batch(3, "c").iloc[[5]]
    assert ingest(str(write(pd.concat([again, batch(5, "e")]), tmp_path / "delivery2" / "tx.parquet"))) == 0
    assert 0 < len(set(reads)) <= 2


def test_a_big_file_is_read_a_chunk_at_a_time(flywheel_home: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flywheel.ingest as ingest_module

    monkeypatch.setenv("FLYWHEEL_INGEST__CHUNK_ROWS", "1000")
    seen: list[int] = []
    original = ingest_module.conform
    monkeypatch.setattr(ingest_module, "conform", lambda uri, table, schema: seen.append(table.num_rows) or original(uri, table, schema))
    source = tmp_path / "big" / "tx.parquet"
    source.parent.mkdir()
    pq.write_table(pa.Table.from_pandas(batch(6, "f", rows=12_000), preserve_index=False), source, row_group_size=4000)

    assert ingest(str(source)) == 0

    assert sum(seen) == 12_000 and max(seen) <= 1000 and len(seen) >= 12


def test_usage_errors_exit_2(flywheel_home: Settings, tmp_path: Path, capsys) -> None:
    assert ingest(str(tmp_path / "nothing-here")) == 2
    assert "no csv/parquet/jsonl files" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        ingest(str(tmp_path), "--policy", "maybe")
    assert info.value.code == 2


def test_the_pipeline_steps_and_the_command_share_one_code_path() -> None:
    """`flywheel ingest` is the pipeline's ingest step followed by its validate step, not a copy."""
    import inspect

    from flywheel import cli, steps

    assert "steps.ingest_and_validate" in inspect.getsource(cli.cmd_ingest)
    source = inspect.getsource(steps.ingest_and_validate)
    assert "ingest_step(" in source and "validate_step(" in source


def test_timestamp_window_follows_the_settings() -> None:
    from flywheel.config import IngestSettings
    from flywheel.validation import ts_window

    now = dt.datetime(2026, 11, 23, 12, tzinfo=dt.timezone.utc)
    earliest, latest = ts_window(IngestSettings(max_age_days=10, max_future_minutes=30), now)
    assert earliest == dt.datetime(2026, 11, 13, 12, tzinfo=dt.timezone.utc)
    assert latest == dt.datetime(2026, 11, 23, 12, 30, tzinfo=dt.timezone.utc)


# ---------------------------------------------------------------- item 8: what the Kubeflow UI shows


def test_validate_component_emits_data_docs_a_markdown_summary_and_the_counts_as_metrics(
    lake: Path, flywheel_home: Settings, tmp_path: Path
) -> None:
    """The validate component itself (its Python function, as KFP runs it), on a batch checked
    against the lake's two accepted batches: GE's HTML data docs, a Markdown summary and the counts
    as KFP Metrics, agreeing with the JSON report the step wrote."""
    from kfp import dsl

    from components import steps as components
    from flywheel.steps import ingest_step

    staged = ingest_step(str(write(batch(5, "e"), tmp_path / "delivery" / "tx.parquet")), "ui-run")
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "staged").write_text(json.dumps(staged))
    report, summary = dsl.HTML(uri=str(outputs / "report")), dsl.Markdown(uri=str(outputs / "summary"))
    metrics, snapshot = dsl.Metrics(uri=str(outputs / "metrics")), dsl.Dataset(uri=str(outputs / "snapshot"))

    components.validate.python_func(staged=dsl.Dataset(uri=str(outputs / "staged")), run_id="ui-run",
                                    report=report, summary=summary, metrics=metrics, snapshot=snapshot)

    document = json.loads((Path(_storage(flywheel_home).root) / "reports" / "validation" / "ui-run" / "validation.json").read_text())
    ge_results = document["result"]["results"]
    share_checks = [d for d in document["drift"] if d["expectation"] == "share_of_each_value_close_to_baseline"]
    assert len(ge_results) + len(share_checks) == document["evaluated"] > 20
    page = (outputs / "report").read_text()
    assert "<title>Data documentation compiled by Great Expectations</title>" in page  # GE's page, not the fallback
    assert page == Path(document["html_uri"]).read_text()
    assert report.metadata["success"] is True and report.metadata["report_uri"].endswith("ui-run/validation.json")
    text = (outputs / "summary").read_text()
    assert text.startswith(f"# Validation passed: {document['evaluated']} of {document['evaluated']} checks on 1,000 new rows")
    assert "| ✔ | `expect_column_quantile_values_to_be_between` | amount |" in text
    assert text.count("| ✔ |") == len(document["drift"]) and "| ✘ |" not in text
    assert metrics.metadata == {
        "passed": 1.0, "rows_validated": 1000.0, "checks_evaluated": float(document["evaluated"]),
        "checks_passed": float(document["evaluated"]), "checks_failed": 0.0,
        "drift_checks": float(len(document["drift"])), "drift_checks_failed": 0.0,
    }
    assert json.loads((outputs / "snapshot").read_text())["rows"] == 3000


def test_a_failed_validation_is_summarized_with_each_failed_check(lake: Path, tmp_path: Path, capsys) -> None:
    """The summary and counts of a rejected batch (the report the step leaves behind) name the failure."""
    from flywheel.steps import validation_outputs

    shifted = batch(5, "e").assign(amount=lambda df: df["amount"] * 100)
    rejected(capsys, lake, write(shifted, tmp_path / "delivery" / "tx.parquet"), "expect_column_quantile_values_to_be_between(amount)")
    run_id = max((lake.parent / "reports" / "validation").glob("ingest-*"), key=lambda p: p.stat().st_mtime).name

    shown = validation_outputs(run_id)

    assert shown["metrics"]["passed"] == 0.0 and shown["metrics"]["checks_failed"] >= 1
    assert shown["metrics"]["drift_checks_failed"] >= 1
    assert shown["markdown"].startswith("# Validation FAILED")
    assert "| `expect_column_quantile_values_to_be_between` | amount | quantile 0.05: observed" in shown["markdown"]
    assert "| ✘ | `expect_column_quantile_values_to_be_between` | amount |" in shown["markdown"]
