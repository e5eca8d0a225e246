"""The model's input vector: one code path for training and serving."""

import json

import numpy as np
import pandas as pd

from flywheel.features.transform import FeatureSpec
from flywheel.usecase import load_module
from tests.factories import FRAUD

INPUTS = load_module(FRAUD, "inputs")  # usecases/fraud/inputs.py


def frame(**overrides):
    row = {
        "transaction_id": "t1", "card_id": "c1", "merchant_id": "m1", "merchant_category": "grocery",
        "amount": 50.0, "ts": pd.Timestamp("2026-10-05T03:00:00Z"), "channel": "chip", "lat": 40.0, "lon": -100.0,
        "card_txn_count_1h": 1, "card_txn_count_24h": 3, "card_amount_mean_30d": 40.0, "card_amount_std_30d": 10.0,
        "card_lat_mean_30d": 40.0, "card_lon_mean_30d": -100.0,
        "card_last_txn_unix": pd.Timestamp("2026-10-05T02:00:00Z").timestamp(),
        "merchant_txn_count_24h": 100, "merchant_amount_mean_30d": 45.0,
        "card_txn_count_7d": 9, "card_distinct_merchants_24h": 2,
        "merchant_labelled_count_30d": 400, "merchant_fraud_rate_30d": 0.01,
    }
    row.update(overrides)
    return pd.DataFrame([row])


def derive_inputs(df, fitted=None):
    """The fraud use case's derived inputs for a frame, with what fit() learnt (none by default)."""
    spec = FeatureSpec.fit(frame(), FRAUD)
    return pd.DataFrame(INPUTS.derive(spec.columns_of(df), fitted or {}), index=df.index)


def derive_inputs(df, fitted=None):
    """The fraud use case's derived inputs for a frame, with what fit() learnt (none by default)."""
    spec = FeatureSpec.fit(frame(), FRAUD)
    return pd.DataFrame(INPUTS.derive(spec.columns_of(df), fitted or {}), index=df.index)


def test_spec_round_trips_through_json_and_gives_the_same_inputs():
    data = pd.concat([frame(amount=a) for a in (10.0, 50.0, 500.0)], ignore_index=True)
    spec = FeatureSpec.fit(data, FRAUD)
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    np.testing.assert_array_equal(spec.transform(data), again.transform(data))
    assert spec.transform(data).shape == (3, spec.width)
    assert spec.transform(data).dtype == np.float32


def test_a_new_card_without_features_gets_finite_neutral_inputs():
    spec = FeatureSpec.fit(pd.concat([frame(), frame(amount=80.0)], ignore_index=True), FRAUD)
    new_card = frame()
    for column in [c for c in new_card.columns if c.startswith(("card_", "merchant_"))]:
        new_card[column] = np.nan
    inputs = spec.transform(new_card)
    assert np.isfinite(inputs).all()
    derived = derive_inputs(new_card)
    assert derived["amount_vs_card_log"].iloc[0] == 0.0  # compared with itself
    assert derived["distance_from_usual_km_log"].iloc[0] == 0.0


def test_unknown_category_and_channel_fall_into_other():
    spec = FeatureSpec.fit(pd.concat([frame(), frame(amount=80.0)], ignore_index=True), FRAUD)
    inputs = spec.transform(frame(merchant_category="spaceships", channel=None))
    names = spec.input_names
    assert inputs[0, names.index("merchant_category=<other>")] == 1.0
    assert inputs[0, names.index("channel=<other>")] == 1.0
    assert inputs[0, names.index("merchant_category=grocery")] == 0.0


def test_derived_inputs_capture_the_fraud_signals():
    base = derive_inputs(frame()).iloc[0]
    spike = derive_inputs(frame(amount=800.0)).iloc[0]
    far = derive_inputs(frame(lat=25.0, lon=-70.0)).iloc[0]
    assert spike["amount_vs_card_log"] > base["amount_vs_card_log"] + 2
    assert far["distance_from_usual_km_log"] > np.log1p(1000)
    assert base["is_night"] == 1.0  # 03:00 UTC
    assert base["seconds_since_last_log"] == np.log1p(3600)


def test_an_amount_is_an_outlier_only_above_the_cards_normal_for_its_category():
    """Catches an excess measured against the card's mean alone (a card spends more on jewellery)."""
    rows = [frame(merchant_category="jewelry", amount=160.0), frame(merchant_category="grocery", amount=40.0)]
    spec = FeatureSpec.fit(pd.concat(rows * 20, ignore_index=True), FRAUD)  # jewelry: 4x the card's mean
    names = spec.numeric
    usual_jewel = derive_inputs(frame(merchant_category="jewelry", amount=160.0), spec.fitted).iloc[0]
    spiked_grocery = derive_inputs(frame(merchant_category="grocery", amount=160.0), spec.fitted).iloc[0]
    assert "amount_excess_for_category_log" in names
    assert usual_jewel["amount_excess_for_category_log"] == 0.0
    assert spiked_grocery["amount_excess_for_category_log"] > 1.0


def test_a_repeat_within_minutes_counts_as_a_burst():
    quick = derive_inputs(frame(card_last_txn_unix=pd.Timestamp("2026-10-05T02:59:00Z").timestamp(), card_txn_count_1h=3)).iloc[0]
    slow = derive_inputs(frame()).iloc[0]  # an hour after the previous one
    assert quick["rapid_repeat"] == 1.0 and quick["burst_count"] == 3.0
    assert slow["rapid_repeat"] == 0.0 and slow["burst_count"] == 0.0


def test_a_merchants_fraud_rate_is_shrunk_towards_the_prior_by_how_many_labels_back_it():
    """Bug caught: a merchant with one known label, a fraud, read as a 100% fraud merchant (or an
    unknown merchant as a 0% one): the raw rate is only as good as the labels behind it."""
    PRIOR_FRAUD_RATE = INPUTS.PRIOR_FRAUD_RATE

    def logit(p):
        return np.log(p / (1 - p))

    def seen(**overrides):
        return derive_inputs(frame(**overrides))["merchant_fraud_logit"].iloc[0]

    assert seen(merchant_labelled_count_30d=np.nan, merchant_fraud_rate_30d=np.nan) == logit(PRIOR_FRAUD_RATE)
    one_fraud = seen(merchant_labelled_count_30d=1, merchant_fraud_rate_30d=1.0)
    assert logit(PRIOR_FRAUD_RATE) < one_fraud < logit(0.05)
    risky = seen(merchant_labelled_count_30d=1000, merchant_fraud_rate_30d=0.2)
    assert logit(0.18) < risky < logit(0.2)
