"""A contract's further sources (flywheel/contract.py ``Source``): a second table, such as hourly
weather per airport, ingested into a lake of its own beside the main rows' files, staged and
published with the main batch, and part of the main snapshot's identity, so that every content key
downstream (feature days, training sets, models) follows a change in it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel import lake, steps
from flywheel.config import load_settings
from flywheel.errors import DataError, ValidationFailed
from flywheel.features.incremental import day_keys
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

CONTRACT = """
columns:
  leg: {type: string}
  origin: {type: string}
  departs: {type: timestamp}
  delay: {type: float64, min: -100, max: 1000}
id: leg
timestamp: departs
labels: [delay]
entities: {origin: origin}
sources:
  weather:
    columns:
      airport: {type: string}
      observed: {type: timestamp}
      visib: {type: float64, min: 0, max: 100}
    timestamp: observed
    delay: PT30M
    entities: {origin: airport}
"""
FEATURES = """
aggregations:
  origin:
    - {op: count, window: 1h}
    - {op: last, column: visib, window: 3h, source: weather}
"""


@pytest.fixture()
def usecase_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = tmp_path / "legs"
    folder.mkdir()
    (folder / "contract.yaml").write_text(CONTRACT)
    (folder / "features.yaml").write_text(FEATURES)
    (folder / "settings.yaml").write_text("ingest:\n  max_age_days: 36500\n")
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)})
    return settings, Storage.from_settings(settings), tmp_path


def legs(prefix: str, day: str, n: int = 40) -> pd.DataFrame:
    departs = pd.date_range(f"{day}T06:00", periods=n, freq="20min", tz="UTC").astype("datetime64[us, UTC]")
    return pd.DataFrame({"leg": [f"{prefix}{i}" for i in range(n)], "origin": ["EWR", "JFK"] * (n // 2),
                         "departs": departs, "delay": [float(i % 7) for i in range(n)]})


def hours(day: str, visib: float = 10.0) -> pd.DataFrame:
    observed = pd.date_range(f"{day}T00:00", periods=24, freq="h", tz="UTC").astype("datetime64[us, UTC]")
    frame = pd.DataFrame({"airport": ["EWR"] * 24 + ["JFK"] * 24, "observed": list(observed) * 2})
    frame["visib"] = visib
    return frame


def write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def deliver(folder: Path, rows: pd.DataFrame | None, weather: pd.DataFrame | None, name: str) -> str:
    if rows is not None:
        write(rows, folder / f"legs-{name}.parquet")
    if weather is not None:
        write(weather, folder / "_sources" / "weather" / f"weather-{name}.parquet")
    return str(folder)


def run(settings, source: str, run_id: str) -> dict:
    return steps.validate_step(steps.ingest_step(source, run_id, settings), run_id, settings)


def test_a_source_is_ingested_into_its_own_lake_and_published_with_the_batch(usecase_home):
    settings, storage, tmp = usecase_home
    source = deliver(tmp / "in", legs("a", "2026-05-01"), hours("2026-05-01"), "1")
    staged = steps.ingest_step(source, "run-1", settings)
    weather_lake = lake.source_lake_uri(storage.uri("lake"), "weather")
    assert staged["sources"]["weather"]["staging_uri"]  # staged with the batch...
    assert lake.latest_snapshot(storage, weather_lake) is None  # ...and nothing published before validation
    published = steps.validate_step(staged, "run-1", settings)
    assert published["rows"] == 40  # the weather's files are not read as legs
    weather = lake.latest_snapshot(storage, weather_lake)
    assert weather is not None and weather.rows == 48 and published["sources"]["weather"]["sha256"] == weather.sha256
    # The main snapshot's identity covers the source: the same legs without it would be another state.
    assert published["sha256"] != lake.snapshot_sha256([p["sha256"] for p in published["parts"]])
    assert lake.load_snapshot(storage, lake.latest_snapshot_uri(storage.uri("lake"))).sources["weather"]["sha256"] == weather.sha256


def test_new_source_files_alone_make_a_new_snapshot_and_new_feature_days(usecase_home):
    """Bug caught: a batch whose only news is the weather reusing the feature days computed without it."""
    settings, storage, tmp = usecase_home
    first = run(settings, deliver(tmp / "in", legs("a", "2026-05-01"), hours("2026-05-01"), "1"), "run-1")
    # Corrected weather for the same day arrives, and no new legs (the legs file is delivered again).
    second = run(settings, deliver(tmp / "in", None, hours("2026-05-01", visib=0.5).assign(
        observed=lambda f: f["observed"] + pd.Timedelta(minutes=10)), "2"), "run-2")
    assert second["parts"] == first["parts"] and second["sha256"] != first["sha256"]
    assert second["sources"]["weather"]["rows"] == 96
    usecase = load_usecase(settings.usecase)
    before = day_keys(lake.LakeSnapshot.from_dict(first), usecase)
    after = day_keys(lake.LakeSnapshot.from_dict(second), usecase)
    assert before.keys() == after.keys() and all(before[d] != after[d] for d in before)


def test_a_batch_without_source_files_keeps_the_sources_lake(usecase_home):
    settings, storage, tmp = usecase_home
    first = run(settings, deliver(tmp / "in", legs("a", "2026-05-01"), hours("2026-05-01"), "1"), "run-1")
    second = run(settings, deliver(tmp / "later", legs("b", "2026-05-02"), None, "2"), "run-2")
    assert second["rows"] == 80 and second["sources"]["weather"]["sha256"] == first["sources"]["weather"]["sha256"]


def test_a_declared_source_with_no_files_and_an_empty_lake_is_a_clear_error(usecase_home):
    settings, storage, tmp = usecase_home
    source = deliver(tmp / "in", legs("a", "2026-05-01"), None, "1")
    with pytest.raises(DataError, match=r"source 'weather' has no files at .*_sources/weather .*sources\.weather\.files"):
        steps.ingest_step(source, "run-1", settings)
    assert lake.latest_snapshot(storage, storage.uri("lake")) is None


def test_a_source_row_that_breaks_its_contract_rejects_the_batch_and_nothing_is_published(usecase_home):
    settings, storage, tmp = usecase_home
    bad = hours("2026-05-01")
    bad.loc[5, "visib"] = -3.0  # below the source's min of 0
    source = deliver(tmp / "in", legs("a", "2026-05-01"), bad, "1")
    with pytest.raises(ValidationFailed, match=r"(?s)source weather's batch failed.*visib"):
        run(settings, source, "run-1")
    assert lake.latest_snapshot(storage, storage.uri("lake")) is None
    assert lake.latest_snapshot(storage, lake.source_lake_uri(storage.uri("lake"), "weather")) is None


def test_a_discarded_batch_discards_its_sources_staging_too(usecase_home):
    settings, storage, tmp = usecase_home
    staged = lake.LakeSnapshot.from_dict(
        steps.ingest_step(deliver(tmp / "in", legs("a", "2026-05-01"), hours("2026-05-01"), "1"), "run-1", settings))
    weather_stage = staged.sources["weather"]["staging_uri"]
    assert storage.exists(f"{weather_stage}/staging.json")
    lake.discard_staged(storage, staged)
    assert not storage.exists(f"{weather_stage}/staging.json") and not storage.exists(f"{staged.staging_uri}/staging.json")


def test_the_source_folder_of_a_file_a_glob_and_a_folder():
    from flywheel.ingest import further_source_uri

    assert further_source_uri("/data/in", "weather", "") == "/data/in/_sources/weather"
    assert further_source_uri("/data/in/legs.csv", "weather", "") == "/data/in/_sources/weather"
    assert further_source_uri("s3://b/in/2026-*/legs*.parquet", "weather", "") == "s3://b/in/_sources/weather"
    assert further_source_uri("/data/in", "weather", "../wx") == "/data/in/../wx"
    assert further_source_uri("/data/in", "weather", "s3://b/wx/") == "s3://b/wx/"


def test_a_new_day_reads_only_the_source_partitions_its_windows_reach_and_equals_a_whole_computation(usecase_home, monkeypatch):
    """Bug caught: the features step reading a source whole on every run (a large source would cost
    its whole history each day), or a bounded read that misses a row a window reaches."""
    from flywheel.features import engine, incremental
    from flywheel.features.views import views_of

    settings, storage, tmp = usecase_home
    days = [f"2026-05-{d:02d}" for d in range(1, 9)]
    for day in days[:7]:
        deliver(tmp / "in", legs(f"{day}-", day), hours(day, visib=float(int(day[-2:]))), day)
    usecase = load_usecase(settings.usecase)
    first = lake.LakeSnapshot.from_dict(run(settings, str(tmp / "in"), "run-1"))
    rows = lake.read_snapshot(storage, first, usecase.contract.arrow_schema()).to_pandas()
    incremental.feature_tables(storage, rows, first, usecase, "run-1")

    deliver(tmp / "in", legs(f"{days[7]}-", days[7]), hours(days[7], visib=8.0), days[7])
    second = lake.LakeSnapshot.from_dict(run(settings, str(tmp / "in"), "run-2"))
    read: list[str] = []
    real = incremental.read_snapshot

    def recording(storage_, snapshot, schema):
        read.extend(part.get("date", "") for part in snapshot.parts)
        return real(storage_, snapshot, schema)

    monkeypatch.setattr(incremental, "read_snapshot", recording)
    rows = lake.read_snapshot(storage, second, usecase.contract.arrow_schema()).to_pandas()
    built = incremental.feature_tables(storage, rows, second, usecase, "run-2")
    assert built.computed == [days[7]]
    reach = incremental.lookback_days(usecase)  # 3h windows and a 30-minute delay: one day back
    assert sorted(set(read)) == days[7 - reach:]  # not the whole week of weather

    weather = lake.read_snapshot(storage, lake.source_snapshots(second)["weather"],
                                 usecase.contract.sources["weather"].contract().arrow_schema()).to_pandas()
    view = views_of(usecase)[0]
    whole = engine.entity_table(rows, usecase.contract, view.entity, list(view.aggregations),
                                until=pd.Timestamp(days[7], tz="UTC") + pd.Timedelta(days=1), sources={"weather": weather})
    pd.testing.assert_frame_equal(built.tables[view.name].reset_index(drop=True), whole.reset_index(drop=True))
