"""The live state's bookkeeping (flywheel.features.live): whatever the batching, order, repeats and
timing of events, each entity's written row is the offline engine's row for that entity at its
latest instant before the watermark.

The oracle is the offline engine over every row at once (the replay against Feast's training set
is tests/integration/test_live_features.py); here what can go wrong is the live path's own: its
buffer, eviction, waiting labels, idempotency and the rows it chooses to write.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flywheel.errors import DataError
from flywheel.features.engine import entity_table
from flywheel.features.live import Events, LiveFeatures
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS, make_transactions

DELAY = pd.Timedelta(FRAUD_CONTRACT.label_known.delay)


class Captured:
    """The rows LiveFeatures writes, kept as an online store keeps them: the latest per entity."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, dict]] = {}
        self.writes = 0

    def write(self, view, frame: pd.DataFrame) -> None:
        self.writes += 1
        for record in frame.to_dict("records"):
            self.rows.setdefault(view.name, {})[record[view.join_key]] = record


def offline_latest(rows: pd.DataFrame, view, watermark: pd.Timestamp) -> dict[str, dict]:
    """Each entity's row at its latest instant at or before ``watermark``, by the engine over all rows."""
    table = entity_table(rows, FRAUD_CONTRACT, view.entity, list(view.aggregations), until=watermark + pd.Timedelta(microseconds=1))
    table = table.drop_duplicates(view.join_key, keep="last")
    return {record[view.join_key]: record for record in table.to_dict("records")}


def assert_rows_equal(written: dict[str, dict], expected: dict[str, dict], what: str) -> None:
    assert set(written) == set(expected), (what, sorted(set(written) ^ set(expected))[:5])
    for key, record in expected.items():
        for name, value in record.items():
            got = written[key][name]
            if isinstance(value, float) and np.isnan(value):
                assert isinstance(got, float) and np.isnan(got), (what, key, name, got)
            elif isinstance(value, (float, np.floating)):
                assert got == pytest.approx(value, rel=1e-12, abs=1e-12), (what, key, name, got, value)
            else:
                assert got == value, (what, key, name, got, value)


def bare(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows as requests bring them: no label."""
    return rows.assign(is_fraud=None)


def labels_of(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[["transaction_id", "is_fraud"]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), batches=st.integers(1, 12), shuffle=st.booleans())
def test_written_rows_equal_the_engines_rows_whatever_the_batching_and_order(seed, batches, shuffle):
    """Events in batches of any size, out of order within a batch and across batches (a late event),
    labels delivered with their rows: the rows written are the engine's, after every batch."""
    rows = make_transactions(120, seed=seed, days=6, cards=6, merchants=4)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows)) if shuffle else np.argsort(rows["ts"].to_numpy(), kind="stable")
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    seen = []
    for part in np.array_split(order, batches):
        if not len(part):
            continue
        live.apply(Events(rows=rows.iloc[part]))
        seen.extend(part.tolist())
        so_far = rows.iloc[sorted(seen)]
        for view in FRAUD_VIEWS:
            assert_rows_equal(store.rows.get(view.name, {}), offline_latest(so_far, view, live.watermark), view.name)


def test_replaying_the_same_events_changes_nothing_and_counts_them():
    rows = make_transactions(80, seed=3, days=2, cards=5, merchants=3, in_time_order=True)
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    first = live.apply(Events(rows=bare(rows)))
    before = {view: dict(found) for view, found in store.rows.items()}
    again = live.apply(Events(rows=bare(rows)))
    assert first.rows == 80 and first.duplicates == 0
    assert again.rows == 0 and again.duplicates == 80 and again.written == {}
    assert store.rows == before
    late = rows["ts"].max() + DELAY + pd.Timedelta(hours=1)
    live.apply(Events(labels=labels_of(rows)), now=late)
    labelled = {view: dict(found) for view, found in store.rows.items()}
    repeat = live.apply(Events(labels=labels_of(rows)), now=late)
    assert repeat.labels == 0 and repeat.duplicates == 80 and store.rows == labelled


def test_a_label_delivered_early_counts_only_from_when_the_contract_says_it_is_known():
    """A chargeback pushed one day after its transaction moves the merchant's fraud rate three days
    after it (the contract's delay), as the offline path has it, not at once."""
    rows = make_transactions(40, seed=4, days=1, cards=4, merchants=1, in_time_order=True, fraud_every=4)
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    live.apply(Events(rows=bare(rows)))
    last = rows["ts"].max()
    live.apply(Events(labels=labels_of(rows)), now=last + pd.Timedelta(days=1))
    merchant = store.rows["merchant_features"]["m000"]
    assert merchant["merchant_labelled_count_30d"] == 0 and np.isnan(merchant["merchant_fraud_rate_30d"])
    first_known = rows["ts"].min() + DELAY
    live.advance(first_known)
    assert store.rows["merchant_features"]["m000"]["merchant_labelled_count_30d"] == 1
    live.advance(last + DELAY)
    merchant = store.rows["merchant_features"]["m000"]
    assert merchant["merchant_labelled_count_30d"] == 40 and merchant["merchant_fraud_rate_30d"] == pytest.approx(0.25)
    assert_rows_equal(store.rows["merchant_features"], offline_latest(rows, FRAUD_VIEWS[1], live.watermark), "merchant")


def test_rows_beyond_every_window_are_evicted_and_an_event_that_old_is_ignored():
    rows = make_transactions(60, seed=5, days=1, cards=3, merchants=2, in_time_order=True)
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    live.apply(Events(rows=rows))
    much_later = rows["ts"].max() + live.reach + pd.Timedelta(days=1)
    live.advance(much_later)
    live.evict()
    assert len(live.rows) == 0
    applied = live.apply(Events(rows=make_transactions(5, seed=6, days=1, id_prefix="old")))
    assert applied.stale == 5 and applied.rows == 0


def test_events_that_do_not_fit_the_contract_are_clear_errors():
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, Captured())
    with pytest.raises(DataError, match="source 'weather'"):
        live.apply(Events(sources={"weather": pd.DataFrame({"x": [1]})}))
    with pytest.raises(DataError, match="transaction_id"):
        live.apply(Events(labels=pd.DataFrame({"is_fraud": [1]})))


def test_a_cards_1h_count_falls_to_zero_an_hour_after_its_only_transaction_with_no_new_events():
    """Bug caught: a live row that keeps an event after it left the window (the online store
    serving a count of 1 forever after a card's last transaction), or that drops it a microsecond
    early; the offline table has a row at that moment (the event's expiry), and so must the store."""
    rows = make_transactions(1, seed=7, days=1, cards=1, merchants=1)
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    live.apply(Events(rows=bare(rows)))
    card = lambda: store.rows["card_features"]["c000"]  # noqa: E731
    assert card()["card_txn_count_1h"] == 1 and card()["card_txn_count_24h"] == 1
    at = rows["ts"].iloc[0]
    for later, count_1h, count_24h in [(pd.Timedelta(hours=1) - pd.Timedelta(microseconds=1), 1, 1),
                                       (pd.Timedelta(hours=1), 0, 1), (pd.Timedelta(hours=30), 0, 0)]:
        live.advance(at + later)
        assert (card()["card_txn_count_1h"], card()["card_txn_count_24h"]) == (count_1h, count_24h), later
        assert_rows_equal(store.rows["card_features"], offline_latest(rows, FRAUD_VIEWS[0], live.watermark), str(later))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), steps=st.integers(2, 25))
def test_the_clock_alone_moves_every_written_row_as_the_offline_table_has_it(seed, steps):
    """Events, then labels delivered early, then only the clock: through every window's expiry, the
    label delay, and beyond the buffer's reach (evicting as it goes), each written row is the
    engine's row at the watermark. Bug caught: an expiry not written (or written late), an event
    evicted before its last expiry was written."""
    rows = make_transactions(60, seed=seed, days=2, cards=4, merchants=3, fraud_every=5)
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    live.apply(Events(rows=bare(rows)))
    live.apply(Events(labels=labels_of(rows)))
    rng = np.random.default_rng(seed)
    start, end = rows["ts"].max(), rows["ts"].max() + live.reach + pd.Timedelta(days=2)
    moments = [start + (end - start) * share for share in rng.random(steps)] + [end]
    moments += [rows["ts"].iloc[i] + pd.Timedelta(w) for i, w in zip(rng.integers(0, len(rows), 5), ["1h", "24h", "7d", "30d", "33d"])]
    for moment in sorted(m for m in moments if m > start):
        live.advance(moment)
        live.evict()
        for view in FRAUD_VIEWS:
            assert_rows_equal(store.rows.get(view.name, {}), offline_latest(rows, view, live.watermark), f"{view.name} at {moment}")
    assert len(live.rows) == 0
    assert all(r["card_txn_count_7d"] == 0 for r in store.rows["card_features"].values())


def test_an_expiry_whose_write_failed_is_written_by_the_next_try():
    """All or nothing: a batch that fails to write leaves the pending expiries pending (bug caught:
    taken out of the pending instants before the write, so a retry of the same moment writes nothing
    and the store serves the stale count)."""
    rows = make_transactions(1, seed=8, days=1, cards=1, merchants=1)
    store = Captured()
    live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
    live.apply(Events(rows=bare(rows)))
    later = rows["ts"].iloc[0] + pd.Timedelta(hours=2)

    def broken(view, frame):
        raise OSError("the online store is down")

    live.writer = type("Broken", (), {"write": staticmethod(broken)})()
    with pytest.raises(OSError):
        live.advance(later)
    assert store.rows["card_features"]["c000"]["card_txn_count_1h"] == 1
    live.writer = store
    assert live.advance(later).written == {"card_features": 1}
    assert store.rows["card_features"]["c000"]["card_txn_count_1h"] == 0
    assert live.advance(later).written == {}  # idempotent: nothing new is due


def test_the_updater_on_the_wall_clock_writes_an_expiry_with_no_event_and_on_event_time_does_not(tmp_path):
    """``live.clock: wall``: between batches the updater moves each world's watermark to now, so a
    card's 1h count falls to 0 an hour after its transaction though no event came. ``events``: the
    watermark stays at the last event's time. Bug caught: an updater that only moves with events
    (the store serving a count of 1 forever after a card's last transaction)."""
    import json

    from flywheel.features.events import SqliteEventLog, Updater

    rows = make_transactions(1, seed=3, days=1, cards=1, merchants=1)
    at = rows["ts"].iloc[0]
    for clock, hours, count in (("wall", 2, 0), ("wall", 0.5, 1), ("events", 2, 1)):
        store = Captured()
        live = LiveFeatures(FRAUD_CONTRACT, FRAUD_VIEWS, store)
        event_log = SqliteEventLog(tmp_path / f"{clock}-{hours}.db")
        event_log.append([json.dumps({"row": {name: (value.isoformat() if isinstance(value, pd.Timestamp) else value)
                                              for name, value in row.items() if value == value and value is not None}},
                                     default=str).encode() for row in bare(rows).to_dict(orient="records")])
        now = at + pd.Timedelta(minutes=1)
        updater = Updater(event_log, FRAUD_CONTRACT, lambda: {"world": live},
                          clock=(lambda: now) if clock == "wall" else None)
        assert updater.step() == 1 and store.rows["card_features"]["c000"]["card_txn_count_1h"] == 1
        now = at + pd.Timedelta(hours=hours)  # time passes; no event comes
        assert updater.step() == 0  # an idle step ticks
        assert store.rows["card_features"]["c000"]["card_txn_count_1h"] == count, (clock, hours)
        assert live.watermark == (now if clock == "wall" else at)
