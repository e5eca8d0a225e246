"""Flight delays' request-time inputs: from a flight about to depart, joined with its aircraft's,
airports', carrier's and route's features, to the model's numeric inputs (flywheel/features/transform.py
says the contract of this file). Only what is known at the scheduled departure: the features
already hold only flights that had landed by then.

Times are UTC (source.py converts New York's local times); the schedule's rhythm is in local time,
so the hour and the day are taken in New York's standard time (UTC-5): a one-hour shift in summer
moves a cycle, it does not break it.
"""

import numpy as np

from flywheel.features.transform import between, epoch_seconds, fill, number

CATEGORIES = ["carrier", "origin"]  # one-hot blocks (their vocabularies are in contract.yaml)

NEW_YORK_OFFSET_S = -5 * 3600  # standard time
MAX_TURN_S = 24 * 3600.0  # no earlier leg today: a day since the aircraft last left
DELAY_FEATURES = [
    "tail_arr_delay_last_24h", "tail_arr_delay_mean_24h",
    "origin_arr_delay_mean_1h", "origin_arr_delay_mean_3h",
    "dest_arr_delay_mean_3h", "dest_arr_delay_mean_24h",
    "carrier_arr_delay_mean_24h", "carrier_arr_delay_mean_7d",
    "route_arr_delay_mean_7d",
]
COUNT_FEATURES = ["tail_count_24h", "origin_count_1h", "origin_count_3h", "origin_arr_delay_count_3h",
                  "dest_arr_delay_count_3h"]


def signed_log(values):
    """A delay on a log scale that keeps its sign: minutes late spread over three orders of magnitude."""
    return np.sign(values) * np.log1p(np.abs(values))


def derive(columns, fitted):
    """The numeric inputs, one float64 array each, in the model's input order."""
    rows = len(columns["scheduled_departure"])
    now, whole = epoch_seconds(columns["scheduled_departure"])
    local = whole + NEW_YORK_OFFSET_S
    hour = (local % 86_400) / 3_600.0
    day_of_week = ((local // 86_400) + 3) % 7  # 1970-01-01 was a Thursday: Monday is 0
    day_of_year = (local % (365.25 * 86_400)) / (365.25 * 86_400)
    arrival, _ = epoch_seconds(columns["scheduled_arrival"]) if "scheduled_arrival" in columns else (np.full(rows, np.nan), None)
    block_hours = fill((arrival - now) / 3600.0, 0.0)
    turn = between(fill(now - number(columns, "tail_last_time_24h", rows), MAX_TURN_S), 0, MAX_TURN_S)
    derived = {
        "log_distance": np.log1p(fill(number(columns, "distance", rows), 0.0)),
        "block_hours": block_hours,  # scheduled time in the air and on the ground, across time zones
        "hour_sin": np.sin(2 * np.pi * hour / 24),
        "hour_cos": np.cos(2 * np.pi * hour / 24),
        "hour": hour,  # delays build up through the day: not only a cycle
        "weekend": (day_of_week >= 5).astype("float64"),
        "season_sin": np.sin(2 * np.pi * day_of_year),
        "season_cos": np.cos(2 * np.pi * day_of_year),
        "aircraft_turn_log": np.log1p(turn),  # how long since the aircraft's previous scheduled departure
        "aircraft_seen_today": (~np.isnan(number(columns, "tail_last_time_24h", rows))).astype("float64"),
    }
    for name in DELAY_FEATURES:
        values = number(columns, name, rows)
        derived[f"{name}_log"] = fill(signed_log(values), 0.0)  # none known: no news (0 minutes)
        derived[f"{name}_known"] = (~np.isnan(values)).astype("float64")
    for name in COUNT_FEATURES:
        derived[f"{name}_log"] = np.log1p(fill(number(columns, name, rows), 0.0))
    derived["route_arr_delay_std_7d_log"] = np.log1p(fill(number(columns, "route_arr_delay_std_7d", rows), 0.0))
    # The origin's weather (the contract's weather source). No observation in the last hours: fair
    # weather's typical values, and a flag that says so.
    visibility = number(columns, "origin_visib_last_3h", rows)
    derived["weather_known"] = (~np.isnan(visibility)).astype("float64")
    derived["visibility"] = fill(visibility, 10.0)
    derived["visibility_worst_3h"] = fill(number(columns, "origin_visib_min_3h", rows), 10.0)
    derived["low_visibility"] = (derived["visibility_worst_3h"] < 3.0).astype("float64")  # instrument conditions
    derived["precip_3h_log"] = np.log1p(10 * fill(number(columns, "origin_precip_sum_3h", rows), 0.0))
    derived["precip_24h_log"] = np.log1p(10 * fill(number(columns, "origin_precip_sum_24h", rows), 0.0))
    wind = fill(number(columns, "origin_wind_speed_last_3h", rows), 10.0)
    derived["wind_speed"] = wind
    derived["wind_gust"] = fill(number(columns, "origin_wind_gust_max_3h", rows), wind)  # no gust reported: the wind
    derived["temperature"] = fill(number(columns, "origin_temp_last_3h", rows), 55.0)
    derived["humidity"] = fill(number(columns, "origin_humid_last_3h", rows), 60.0)
    derived["pressure"] = fill(number(columns, "origin_pressure_last_3h", rows), 1018.0)
    return derived
