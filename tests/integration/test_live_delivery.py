"""Delivering live events: `flywheel events push|apply|dead`, the predictor's write-through under
`flywheel serve`, the Redis Streams log on a real redis-server, retries and dead letters.

Each test works on a copy of the session's trained loop (its home: lake, registry, worlds), so that
what it writes into the production world's online store reaches no other test.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from flywheel.cli import main
from flywheel.config import load_settings
from flywheel.errors import FeatureStoreError
from flywheel.features.build import world_of_model
from flywheel.features.engine import entity_table
from flywheel.features.events import RedisEventLog, SqliteEventLog, Updater, open_event_log, parse_events
from flywheel.features.live import LiveFeatures
from flywheel.features.store import decode_value, entity_key_bytes, feast_project, redis_client, world_dir
from flywheel.lake import latest_snapshot, read_snapshot
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS
from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"


@pytest.fixture
def loop(trained_loop, tmp_path, monkeypatch):
    """A copy of the trained loop's home, the environment pointing at it."""
    home = tmp_path / "home"
    shutil.copytree(trained_loop["home"], home, ignore=shutil.ignore_patterns("*.log"))
    # The demo's transactions are October 2026's: the worlds move with the events' own times (on the
    # wall clock, every window would have emptied since; tests/unit/test_events.py tests that clock).
    env = dict(trained_loop["env"], FLYWHEEL_HOME=str(home), FLYWHEEL_LIVE__CLOCK="events")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(env=env)
    storage = Storage.from_settings(settings)
    production = Registry(storage, settings.model_name).production()
    lake_rows = read_snapshot(trained_loop["storage"], latest_snapshot(trained_loop["storage"], trained_loop["snapshot"]["lake_uri"]),
                              FRAUD_CONTRACT.arrow_schema()).to_pandas()
    return {"home": home, "env": env, "settings": settings, "world": world_of_model(storage, production.meta), "lake_rows": lake_rows}


def online_row(settings, world: str, view: str, key_column: str, key: str) -> dict[str, float]:
    """An entity's row as the world's SQLite online store holds it (feature -> value)."""
    with sqlite3.connect(world_dir(settings, world) / "online.db") as connection:
        rows = connection.execute(f'SELECT feature_name, value FROM "{feast_project(settings, world)}_{view}" WHERE entity_key = ?',
                                  (entity_key_bytes(key_column, key),)).fetchall()
    return {name: decode_value(raw) for name, raw in rows}


def transactions(card: str, merchant: str, start: pd.Timestamp, minutes: list[float], prefix: str) -> list[dict]:
    return [{"transaction_id": f"{prefix}-{i}", "card_id": card, "merchant_id": merchant, "merchant_category": "grocery",
             "amount": 20.0 + i, "ts": (start + pd.Timedelta(minutes=m)).isoformat(), "channel": "chip", "lat": 40.0, "lon": -73.0}
            for i, m in enumerate(minutes)]


def write_events(path, events: list[dict]) -> None:
    path.write_text("".join(json.dumps(event) + "\n" for event in events))


def test_pushed_events_move_the_production_worlds_rows_as_the_offline_engine_computes_them(loop, tmp_path, capsys):
    settings, world, lake_rows = loop["settings"], loop["world"], loop["lake_rows"]
    card, merchant = lake_rows["card_id"].iloc[-1], lake_rows["merchant_id"].iloc[-1]
    end = lake_rows["ts"].max()
    burst = transactions(card, merchant, end + pd.Timedelta(hours=2), [0, 1.5, 3], "push")
    events = tmp_path / "events.jsonl"
    write_events(events, [{"row": row} for row in burst])
    assert main(["events", "push", str(events)]) == 0
    assert main(["events", "apply"]) == 0
    applied = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert applied["applied"] == 3 and applied["dead"] == 0
    # The oracle: the offline engine over the lake's rows and the new ones.
    new = pd.DataFrame(burst).assign(ts=lambda f: pd.to_datetime(f["ts"], utc=True).astype("datetime64[us, UTC]"), is_fraud=None)
    everything = pd.concat([lake_rows, new], ignore_index=True)
    card_view = FRAUD_VIEWS[0]
    # Its row at the watermark (the last event's time), not at the expiries still to come.
    until = everything["ts"].max() + pd.Timedelta(microseconds=1)
    expected = entity_table(everything[everything["card_id"] == card], FRAUD_CONTRACT, "card", list(card_view.aggregations),
                            until=until).iloc[-1]
    found = online_row(settings, world, card_view.name, "card_id", card)
    assert found["card_txn_count_1h"] == 3 == expected["card_txn_count_1h"]
    for name in card_view.features:
        assert found[name] == pytest.approx(float(expected[name]), rel=1e-12, nan_ok=True), name
    # The same file again: nothing changes; a label pushed now counts only three days after its row.
    assert main(["events", "push", str(events)]) == 0
    label = tmp_path / "label.jsonl"
    write_events(label, [{"label": {"transaction_id": "push-0", "is_fraud": 1}}])
    assert main(["events", "push", str(label)]) == 0
    merchant_before = online_row(settings, world, "merchant_features", "merchant_id", merchant)
    assert main(["events", "apply"]) == 0
    assert online_row(settings, world, card_view.name, "card_id", card) == found
    assert online_row(settings, world, "merchant_features", "merchant_id", merchant) == merchant_before
    later = tmp_path / "later.jsonl"
    write_events(later, [{"row": row} for row in transactions(card, merchant, end + pd.Timedelta(days=3, hours=3), [0], "later")])
    assert main(["events", "push", str(later)]) == 0 and main(["events", "apply"]) == 0
    merchant_after = online_row(settings, world, "merchant_features", "merchant_id", merchant)
    labelled = everything.assign(is_fraud=everything["is_fraud"].astype("float64"))
    labelled.loc[labelled["transaction_id"] == "push-0", "is_fraud"] = 1.0
    later_rows = pd.DataFrame(transactions(card, merchant, end + pd.Timedelta(days=3, hours=3), [0], "later")).assign(
        ts=lambda f: pd.to_datetime(f["ts"], utc=True).astype("datetime64[us, UTC]"), is_fraud=None)
    labelled = pd.concat([labelled, later_rows], ignore_index=True)
    merchant_view = FRAUD_VIEWS[1]
    want = entity_table(labelled[labelled["merchant_id"] == merchant], FRAUD_CONTRACT, "merchant", list(merchant_view.aggregations),
                        until=labelled["ts"].max() + pd.Timedelta(microseconds=1)).iloc[-1]
    for name in merchant_view.features:
        assert merchant_after[name] == pytest.approx(float(want[name]), rel=1e-12, nan_ok=True), name


def test_a_file_with_a_bad_event_pushes_nothing_and_names_the_line(loop, tmp_path, capsys):
    events = tmp_path / "bad.jsonl"
    good = transactions("c1", "m1", pd.Timestamp("2026-01-01", tz="UTC"), [0], "ok")[0]
    lines = [{"row": good}, {"row": {**good, "transaction_id": "x", "amount": "lots"}}, {"label": {"is_fraud": 1}},
             {"source": "weather", "row": {}}, {"row": {**good, "transaction_id": "y", "colour": "red"}}]
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    assert main(["events", "push", str(events)]) != 0
    err = capsys.readouterr().err
    assert "5 of 6 events do not fit" in err and "nothing was pushed" in err
    for said in ("bad.jsonl:2: row: amount = 'lots' is not a finite number", "bad.jsonl:3: label: transaction_id missing",
                 "source 'weather' is not a source", "bad.jsonl:5: row: 'colour' is not a column", "bad.jsonl:6: not JSON"):
        assert said in err, said
    assert open_event_log(loop["settings"]).backlog() == 0
    assert main(["events", "push", str(tmp_path / "missing.jsonl")]) != 0
    assert "cannot read events file" in capsys.readouterr().err


def test_the_served_predictor_writes_each_scored_row_through_and_the_next_request_sees_it(loop, tmp_path):
    settings, world, lake_rows = loop["settings"], loop["world"], loop["lake_rows"]
    merchant = lake_rows["merchant_id"].iloc[-1]
    start = lake_rows["ts"].max() + pd.Timedelta(hours=1)
    burst = transactions("live-card", merchant, start, [0, 0.5, 1.0], "served")
    env = dict(loop["env"], FLYWHEEL_LIVE__ENABLED="true", FLYWHEEL_LIVE__REFRESH_S="0.5")
    with flywheel_server(env, tmp_path / "server.log") as running:
        for count, row in enumerate(burst, 1):
            request = urllib.request.Request(running.base + V1, data=json.dumps({"instances": [row]}).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as answer:
                prediction = json.loads(answer.read())["predictions"][0]
            assert prediction["unknown_entities"] == (["card"] if count == 1 else []), (count, prediction)
            deadline = time.monotonic() + 20
            while online_row(settings, world, "card_features", "card_id", "live-card").get("card_txn_count_1h") != count:
                assert time.monotonic() < deadline, f"row {count} never reached the online store:\n{running.output()[-3000:]}"
                time.sleep(0.05)
        assert "live features: on" in running.output()
    assert open_event_log(settings).backlog() == 0


def test_the_redis_stream_redelivers_what_a_dead_updater_claimed_and_keeps_dead_letters(redis_server):
    client = redis_client(redis_server.connection)
    stream = f"test:{time.time_ns()}:events"
    first = RedisEventLog(client, stream, consumer="a", claim_idle_s=0.2)
    second = RedisEventLog(client, stream, consumer="b", claim_idle_s=0.2)
    good = json.dumps({"row": transactions("c9", "m9", pd.Timestamp("2026-01-01", tz="UTC"), [0], "r")[0]}).encode()
    first.append([good, b'{"row": {"transaction_id": "x"}}'])
    claimed = first.claim(10)
    assert len(claimed) == 2 and second.claim(10, block_s=0.05) == []  # claimed by a, not acknowledged
    time.sleep(0.3)  # a died: b claims them once idle
    again = second.claim(10)
    assert [body for _, body in again] == [good, b'{"row": {"transaction_id": "x"}}']
    _, dead = parse_events(again, FRAUD_CONTRACT)
    second.ack([where for where, _ in again], dead)
    assert second.backlog() == 0 and [d.reason for d in second.dead_letters()] == ["row: ts missing"]
    # Retention: entries added before the cut go (XTRIM MINID), later ones and the dead letters stay.
    cut = time.time()
    time.sleep(0.01)
    second.append([b'{"row": {"later": 1}}'])
    assert second.trim(cut) == 2
    assert [body for _, body in second.history()] == [b'{"row": {"later": 1}}']
    assert [d.reason for d in second.dead_letters()] == ["row: ts missing"]


class Flaky:
    """The real rows, written to a real store only after ``failures`` failed writes (a store that is down)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.rows: dict = {}

    def write(self, view, frame) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise FeatureStoreError("the online store is down")
        self.rows.setdefault(view.name, {}).update({row[view.join_key]: row for row in frame.to_dict("records")})


def test_a_failed_update_is_retried_and_one_that_keeps_failing_stays_in_the_log(tmp_path):
    event_log = SqliteEventLog(tmp_path / "events.db")
    rows = transactions("c1", "m1", pd.Timestamp("2026-01-01", tz="UTC"), [0, 1], "f")
    event_log.append([json.dumps({"row": row}).encode() for row in rows])
    flaky = Flaky(failures=2)
    updater = Updater(event_log, FRAUD_CONTRACT, lambda: {"w": LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, flaky)},
                      attempts=3, backoff_s=0.001)
    assert updater.step() == 2 and event_log.backlog() == 0
    assert flaky.rows["card_features"]["c1"]["card_txn_count_1h"] == 2
    event_log.append([json.dumps({"row": transactions("c2", "m1", pd.Timestamp("2026-01-02", tz="UTC"), [0], "g")[0]}).encode()])
    down = Updater(event_log, FRAUD_CONTRACT, lambda: {"w": LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, Flaky(failures=99))},
                   attempts=3, backoff_s=0.001)
    with pytest.raises(FeatureStoreError, match="failed after 3 attempts: FeatureStoreError: the online store is down"):
        down.step()
    assert event_log.backlog() == 1 and down.stats.failed_batches == 1


def readme_section() -> tuple[str, list[str]]:
    from tests.factories import REPO
    import re

    text = (REPO / "README.md").read_text()
    section = re.search(r"^## Real-time features\n(.*?)^## ", text, re.S | re.M).group(1)
    [events] = re.findall(r"^```jsonl\n(.*?)^```", section, re.S | re.M)
    [block] = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)
    return events, [line for line in block.splitlines() if line.strip()]


def test_the_readme_events_commands_verbatim(loop, tmp_path):
    import os
    import subprocess
    import sys

    from tests.factories import REPO

    events, lines = readme_section()
    assert [" ".join(line.split()[:3]).rsplit("/", 1)[-1] for line in lines] == ["flywheel events push", "flywheel events apply",
                                                                                   "flywheel events dead"]
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (checkout / "events.jsonl").write_text(events)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(loop["env"], PYTHONPATH=str(REPO))
    outputs = []
    for line in lines:
        done = subprocess.run(["bash", "-c", line], cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    assert "pushed 2 events" in outputs[0]
    assert json.loads(outputs[1].strip().splitlines()[-1])["applied"] == 2
    assert outputs[2].strip() == ""  # nothing dead
    row = online_row(loop["settings"], loop["world"], "card_features", "card_id", "card-42")
    assert row["card_txn_count_1h"] == 1
