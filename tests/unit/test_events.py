"""Live-feature events as JSON lines: what serving writes through is what the updater reads back, and
any line at all is either an event of the contract or a dead letter with a reason, never an error."""

from __future__ import annotations

import json

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.features.events import SqliteEventLog, encode_rows, parse_events
from serving.requests import RequestSchema
from tests.factories import FRAUD_CONTRACT

SCHEMA = RequestSchema(FRAUD_CONTRACT)
FIELDS = [spec.name for spec in SCHEMA.fields]


def test_a_scored_row_written_through_reads_back_as_the_row_the_client_sent():
    instances = [
        {"transaction_id": "t1", "card_id": "c1", "merchant_id": "m1", "amount": 12.5, "ts": "2026-10-01T10:00:00.123456Z",
         "merchant_category": "grocery", "channel": "chip", "lat": 40.5, "lon": -73.25},
        {"card_id": "c2", "merchant_id": "m2", "amount": 3.0, "ts": "2026-10-01T10:00:01Z"},  # no id, optional fields absent
    ]
    rows = SCHEMA.v1({"instances": instances}, 10)
    bodies = encode_rows(rows.columns, rows.count, FRAUD_CONTRACT, FIELDS)
    events, dead = parse_events([(str(i), body) for i, body in enumerate(bodies)], FRAUD_CONTRACT)
    assert dead == []
    back = events.rows
    assert back.loc[0, "transaction_id"] == "t1" and back.loc[0, "amount"] == 12.5 and back.loc[0, "lat"] == 40.5
    assert back.loc[0, "ts"] == pd.Timestamp("2026-10-01T10:00:00.123456Z")
    assert back.loc[1, "transaction_id"].startswith("sha1:")  # an id of its own, the same for the same row
    again = encode_rows(rows.columns, rows.count, FRAUD_CONTRACT, FIELDS)
    assert again == bodies
    assert pd.isna(back.loc[1, "merchant_category"]) and pd.isna(back.loc[1, "lat"])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                           max_leaves=12)
field_values = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=30) \
    | st.sampled_from(["2026-10-01T10:00:00Z", "yesterday", "1e400", "2026-13-45"])
rows = st.dictionaries(st.sampled_from([*FRAUD_CONTRACT.columns, "colour"]), field_values, max_size=8)
events = st.one_of(
    json_values.map(json.dumps),
    rows.map(lambda row: json.dumps({"row": row})),
    rows.map(lambda row: json.dumps({"label": row})),
    st.tuples(st.sampled_from(["weather", 7, None]), rows).map(lambda pair: json.dumps({"source": pair[0], "row": pair[1]})),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(events, min_size=1, max_size=6))
def test_any_line_is_an_event_of_the_contract_or_a_dead_letter_with_a_reason(lines):
    parsed, dead = parse_events([(str(i), line) for i, line in enumerate(lines)], FRAUD_CONTRACT)
    assert all(letter.reason for letter in dead)
    assert parsed.count() + len(dead) == len(lines)
    if parsed.rows is not None:  # what passed holds the fields a row event must have, typed
        assert parsed.rows["ts"].notna().all() and parsed.rows["transaction_id"].notna().all()


def test_the_sqlite_log_keeps_its_position_and_its_history(tmp_path):
    log = SqliteEventLog(tmp_path / "events.db")
    log.append([b"a", b"b", b"c"])
    first = log.claim(2)
    assert [body for _, body in first] == [b"a", b"b"] and log.backlog() == 3
    log.ack([where for where, _ in first])
    assert [body for _, body in log.claim(10)] == [b"c"] and log.backlog() == 1
    reopened = SqliteEventLog(tmp_path / "events.db")  # another process: the same position
    assert [body for _, body in reopened.claim(10)] == [b"c"]
    assert [body for _, body in reopened.history()] == [b"a", b"b", b"c"]


def test_a_second_updater_of_the_same_worlds_is_refused_and_a_pinned_one_has_its_own_position(flywheel_home, tmp_path):
    """Two updaters of one world would each buffer half of the events and write wrong rows; a
    release's pinned servers (stable and candidate) each read every event from a position of their own."""
    import pytest

    from flywheel.features.events import GROUP, UpdaterBusy, hold_updater_lock, open_event_log

    held = hold_updater_lock(flywheel_home, GROUP)
    with pytest.raises(UpdaterBusy, match=r"already applying this log .*pid \d+"):
        hold_updater_lock(flywheel_home, GROUP)
    pinned = hold_updater_lock(flywheel_home, f"{GROUP}@v1")  # another position: not refused
    held.close()
    hold_updater_lock(flywheel_home, GROUP).close()  # released with its holder
    pinned.close()
    serving, stable = open_event_log(flywheel_home), open_event_log(flywheel_home, f"{GROUP}@v1")
    serving.append([b"e1", b"e2"])
    serving.ack([where for where, _ in serving.claim(10)])
    assert serving.backlog() == 0 and [body for _, body in stable.claim(10)] == [b"e1", b"e2"]


def test_the_log_keeps_events_for_their_retention_then_trims_them_and_keeps_dead_letters(tmp_path):
    """Bug caught: an event log that grows for ever (and a world seeded from all of its history), or
    a trim that removes what is still within the retention or deletes the dead letters that say
    why an event failed."""
    import time as clock

    from flywheel.features.events import DeadEvent, SqliteEventLog, Updater

    event_log = SqliteEventLog(tmp_path / "events.db")
    event_log.append([b'{"row": {"old": 1}}', b'{"row": {"old": 2}}'])
    cut = clock.time()
    clock.sleep(0.01)
    event_log.append([b'{"row": {"new": 3}}'])
    event_log.ack(["1"], [DeadEvent("1", '{"row": {"old": 1}}', "a reason")])
    assert event_log.trim(cut) == 2
    assert [body for _, body in event_log.history()] == [b'{"row": {"new": 3}}']
    assert [d.reason for d in event_log.dead_letters()] == ["a reason"]

    class World:  # the reach of a world's windows decides the default retention
        reach = __import__("pandas").Timedelta(hours=1)

    updater = Updater(event_log, FRAUD_CONTRACT, lambda: {"w": World()}, trim_every_s=3600)
    assert updater.trim() == 0  # arrived within an hour and a day: kept
    assert updater.trim() == 0 and updater._trimmed_at > 0  # and not asked again within trim_every_s
    gone = Updater(event_log, FRAUD_CONTRACT, lambda: {"w": World()}, retention_s=0.0)
    assert gone.trim(force=True) == 1 and gone.stats.trimmed == 1 and event_log.history() == []
