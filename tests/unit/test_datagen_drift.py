"""Fraud's generator options (usecases/fraud/generator.py): a later period of the same world
(world_rows) and drift from a day on (amount_scale, new_category, fraud_pattern), each doing what it
says from drift_from on and nothing before; unknown options and bad values refused by name."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.errors import DataError
from flywheel.storage import Storage
from tests.factories import FRAUD, FRAUD_GENERATOR

generate = FRAUD_GENERATOR.generate
CONTRACT_CATEGORIES = set(FRAUD.contract.columns["merchant_category"].categories)
ROWS, DAYS, SEED, START = 20_000, 10, 5, "2026-10-01"
DRIFT_FROM = "2026-10-06"
DRIFT_FROM_TS = pd.Timestamp(DRIFT_FROM, tz="UTC")


def read(result) -> pd.DataFrame:
    """The raw rows with their true probability, by transaction id."""
    raw = pa.concat_tables([pq.read_table(f) for f in result.files]).to_pandas()
    truth = pa.concat_tables([pq.read_table(f) for f in result.truth_files]).to_pandas()
    return raw.merge(truth, on="transaction_id", validate="one_to_one").set_index("transaction_id")


def run(tmp_path, name: str, **arguments) -> pd.DataFrame:
    arguments = {"rows": ROWS, "days": DAYS, "seed": SEED, "start": START, "chunk_rows": 8_000, **arguments}
    return read(generate(Storage(str(tmp_path)), str(tmp_path / name), **arguments))


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> pd.DataFrame:
    return run(tmp_path_factory.mktemp("plain"), "plain")


def split(drifted: pd.DataFrame, plain: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(drifted rows before the day, the same rows without drift, drifted rows from the day, the same
    rows without drift); the two runs hold the same transaction ids at the same times."""
    assert drifted.index.equals(plain.index) and drifted["ts"].equals(plain["ts"])
    before = plain["ts"] < DRIFT_FROM_TS
    assert 0.3 < before.mean() < 0.7
    return drifted[before], plain[before], drifted[~before], plain[~before]


def test_amount_scale_multiplies_amounts_from_drift_from_on_and_keeps_the_labels(tmp_path, plain):
    """Bug caught: drift leaking into the days before drift_from, or scaling amounts without the card's
    typical amount (which would turn every drifted row into an amount spike and change the labels)."""
    drifted = run(tmp_path, "x3", options={"amount_scale": "3", "drift_from": DRIFT_FROM})
    before, plain_before, after, plain_after = split(drifted, plain)
    pd.testing.assert_frame_equal(before, plain_before)
    np.testing.assert_allclose(after["amount"], np.round(plain_after["amount"] * 3, 2))
    pd.testing.assert_frame_equal(after.drop(columns="amount"), plain_after.drop(columns="amount"))


def test_a_drift_without_drift_from_starts_on_the_first_day(tmp_path, plain):
    drifted = run(tmp_path, "x3", options={"amount_scale": 3})
    np.testing.assert_allclose(drifted["amount"], np.round(plain["amount"] * 3, 2))


def test_amount_scale_keeps_amounts_inside_the_contract(tmp_path):
    drifted = run(tmp_path, "huge", rows=2_000, options={"amount_scale": 1e9})
    tiny = run(tmp_path, "tiny", rows=2_000, options={"amount_scale": 1e-9})
    assert drifted["amount"].max() == FRAUD.contract.columns["amount"].max == 1_000_000
    assert tiny["amount"].min() > 0


def test_new_category_takes_its_share_of_transactions_at_new_merchants_from_drift_from_on(tmp_path, plain):
    """Bug caught: the new category on existing merchants (a merchant's category must stay fixed, and
    the online store's merchant rows would lie), or before the day."""
    drifted = run(tmp_path, "atm", options={"new_category": "crypto_atm", "new_category_share": "0.2", "drift_from": DRIFT_FROM})
    before, plain_before, after, plain_after = split(drifted, plain)
    pd.testing.assert_frame_equal(before, plain_before)
    moved = after["merchant_category"] == "crypto_atm"
    assert 0.18 < moved.mean() < 0.22
    world_merchants = set(plain["merchant_id"])
    assert not set(after.loc[moved, "merchant_id"]) & world_merchants  # merchants of its own, numbered after the world's
    assert set(after.loc[~moved, "merchant_id"]) <= world_merchants
    assert drifted.groupby("merchant_id")["merchant_category"].nunique().max() == 1
    assert set(drifted["merchant_category"]) == CONTRACT_CATEGORIES | {"crypto_atm"}
    pd.testing.assert_frame_equal(after[~moved], plain_after[~moved])
    # The same cards, times and places: only where the money went changed.
    columns = ["card_id", "ts", "channel", "lat", "lon"]
    pd.testing.assert_frame_equal(after.loc[moved, columns], plain_after.loc[moved, columns])


def test_new_category_share_defaults_to_a_tenth(tmp_path):
    drifted = run(tmp_path, "atm", options={"new_category": "crypto_atm"})
    assert 0.08 < (drifted["merchant_category"] == "crypto_atm").mean() < 0.12


def test_card_testing_is_new_fraud_on_small_online_payments_from_drift_from_on(tmp_path, plain):
    """The pattern a model trained before the day misses: small amounts carry no risk in the old world
    (the old world's smallest 5% of payments, all above 2.00, are almost never fraud), and from the day about 3% of rows are card tests,
    60% of them fraud. The fraud rate stays inside the contract's band."""
    drifted = run(tmp_path, "tests", options={"fraud_pattern": "card_testing", "drift_from": DRIFT_FROM})
    before, plain_before, after, plain_after = split(drifted, plain)
    pd.testing.assert_frame_equal(before, plain_before)
    tests = after["fraud_probability"] == FRAUD_GENERATOR.CARD_TEST_FRAUD_PROBABILITY
    assert 0.02 < tests.mean() < 0.04
    assert after.loc[tests, "amount"].between(0.5, 2.0).all() and (after.loc[tests, "channel"] == "online").all()
    assert 0.5 < after.loc[tests, "is_fraud"].mean() < 0.7
    small = plain["amount"] <= plain["amount"].quantile(0.05)  # before: a small payment is safe
    assert plain.loc[small, "is_fraud"].mean() < 0.01 and plain.loc[small, "amount"].min() > 2.0
    pd.testing.assert_frame_equal(after[~tests], plain_after[~tests])
    low, high = FRAUD.contract.columns["is_fraud"].mean
    assert low < plain_after["is_fraud"].mean() < after["is_fraud"].mean() < high


def test_the_drifts_combine_and_each_picks_the_same_rows_as_alone(tmp_path, plain):
    both = run(tmp_path, "both", options={"amount_scale": 3, "fraud_pattern": "card_testing", "new_category": "crypto_atm"})
    alone = run(tmp_path, "alone", options={"fraud_pattern": "card_testing"})
    tests = alone["fraud_probability"] == FRAUD_GENERATOR.CARD_TEST_FRAUD_PROBABILITY
    assert (both["fraud_probability"] == FRAUD_GENERATOR.CARD_TEST_FRAUD_PROBABILITY).equals(tests)
    np.testing.assert_allclose(both.loc[tests, "amount"], np.round(alone.loc[tests, "amount"] * 3, 2))


def test_world_rows_continues_the_same_world_on_a_later_day(tmp_path):
    """A following week, generated on its own, continues the base period's world: the same cards
    (homes) and merchants (categories), so the online store knows them, and ids of its own.
    Bug caught: the same seed with fewer rows drew another world (other merchants' categories) whose
    transaction ids collided with the base period's, which ingest refuses as conflicting rows."""
    base = run(tmp_path, "base", rows=20_000, days=28, start="2026-10-01")
    week = run(tmp_path, "week", rows=5_000, days=7, start="2026-10-29", options={"world_rows": "20000"})
    assert len(week) == 5_000 and week["ts"].min() >= pd.Timestamp("2026-10-29", tz="UTC")
    assert week["ts"].max() < pd.Timestamp("2026-11-05", tz="UTC")
    assert not set(week.index) & set(base.index) and week.index.str.startswith("t5-20261029-").all()
    # A card that happened to buy nothing in the base period is new to the store, as in life: rare.
    known = week["card_id"].isin(set(base["card_id"]))
    assert known.mean() > 0.99 and set(week["merchant_id"]) <= set(base["merchant_id"])
    category = base.groupby("merchant_id")["merchant_category"].first()
    assert (week["merchant_category"] == category[week["merchant_id"]].to_numpy()).all()
    home = base.groupby("card_id")[["lat", "lon"]].median()
    near = (week.loc[known, ["lat", "lon"]] - home.loc[week.loc[known, "card_id"]].to_numpy()).abs().max(axis=1) < 1.0
    assert near.mean() > 0.9  # a card shops around the same home (3% of transactions are far away)
    low, high = FRAUD.contract.columns["is_fraud"].mean
    assert low < week["is_fraud"].mean() < high
    other = run(tmp_path, "other", rows=5_000, days=7, start="2026-10-29")  # without world_rows: another world
    other_category = category.reindex(other["merchant_id"]).to_numpy()
    assert (other["merchant_category"] != other_category).mean() > 0.3
    assert set(other.index) & set(base.index)


def test_the_same_options_give_the_same_bytes(tmp_path):
    options = {"world_rows": 4_000, "amount_scale": 2, "new_category": "crypto_atm", "fraud_pattern": "card_testing"}
    a = generate(Storage(str(tmp_path)), str(tmp_path / "a"), rows=1_000, days=3, options=options)
    b = generate(Storage(str(tmp_path)), str(tmp_path / "b"), rows=1_000, days=3, options=dict(options))
    assert [open(f, "rb").read() for f in a.files + a.truth_files] == [open(f, "rb").read() for f in b.files + b.truth_files]
    summary = (tmp_path / "a" / "_generation.json").read_text()
    assert '"amount_scale": 2.0' in summary and '"world_rows": 4000' in summary


@pytest.mark.parametrize(
    "options, message",
    [
        ({"amount_scal": "3"}, r"no option 'amount_scal': the known options are world_rows, drift_from, amount_scale, new_category"),
        ({"amount_scale": "three"}, r"option amount_scale='three': must be a number above 0"),
        ({"amount_scale": "0"}, r"option amount_scale='0': must be a number above 0"),
        ({"amount_scale": "nan"}, r"option amount_scale='nan': must be a number above 0"),
        ({"amount_scale": 3, "drift_from": "the 20th"}, r"option drift_from='the 20th': must be an ISO-8601 date"),
        ({"amount_scale": 3, "drift_from": "2026-11-01"}, r"option drift_from=2026-11-01 is not before the end"),
        ({"drift_from": "2026-10-03"}, r"option drift_from is the day a drift starts: give a drift too"),
        ({"new_category": "grocery"}, r"option new_category='grocery': is already one of the contract's merchant categories"),
        ({"new_category": "Crypto ATM"}, r"option new_category='Crypto ATM': must be a category name"),
        ({"new_category": "crypto_atm", "new_category_share": "1.5"}, r"option new_category_share='1.5': must be a share"),
        ({"new_category_share": "0.2"}, r"option new_category_share is the share of new_category's rows: give new_category too"),
        ({"fraud_pattern": "skimming"}, r"option fraud_pattern='skimming': unknown fraud pattern: choose one of card_testing"),
        ({"fraud_pattern_share": "0.1"}, r"give fraud_pattern too"),
        ({"world_rows": "many"}, r"option world_rows='many': must be a whole number >= 1"),
    ],
)
def test_unknown_options_and_bad_values_are_refused_by_name_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(DataError, match=message):
        generate(Storage(str(tmp_path)), str(tmp_path / "raw"), rows=100, days=10, start=START, options=options)
    assert not (tmp_path / "raw").exists()


def test_drift_from_accepts_dates_and_times(tmp_path):
    day = run(tmp_path, "a", rows=1_000, options={"amount_scale": 2, "drift_from": dt.date(2026, 10, 6)})
    text = run(tmp_path, "b", rows=1_000, options={"amount_scale": 2, "drift_from": "2026-10-06T00:00:00Z"})
    pd.testing.assert_frame_equal(day, text)
