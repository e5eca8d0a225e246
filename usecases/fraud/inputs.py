"""Card fraud's request-time inputs: from a transaction joined with its card's and merchant's features
to the model's numeric inputs (flywheel/features/transform.py says the contract of this file).

The same function runs on a training set and on the one to few transactions of a serving pass, so
it stays with numpy. Missing features (a new card, a new merchant) get neutral values: the
transaction is compared with itself.
"""

import numpy as np

from flywheel.features.transform import between, epoch_seconds, fill, number, text
from flywheel.geo import haversine_km

CATEGORIES = ["merchant_category", "channel"]  # one-hot blocks, vocabularies from contract.yaml

MAX_GAP_S = 30 * 24 * 3600.0  # "never seen before" is treated as a 30-day gap
RAPID_REPEAT_S = 600.0  # a transaction within 10 minutes of the card's previous one: part of a burst
FAR_FROM_USUAL_KM = 300.0  # farther than this from where the card is usually used: out of its region
# A merchant's fraud rate is shrunk towards this prior with the weight of this many labelled
# transactions: a merchant with 3 known labels, one of them fraud, is not a 33% merchant.
PRIOR_FRAUD_RATE = 0.02
PRIOR_LABELS = 50.0
MIN_ROWS_FOR_OFFSET = 20  # fewer rows of a category with card history: no offset (0) for it


def fit(columns):
    """Per merchant category, the median of ``log1p(amount) - log1p(card mean)`` over rows whose card
    has history: a card spends more at a jeweller than at a pharmacy, so an amount is an outlier for
    its card only above the card's normal for that category (pairs sorted by category)."""
    card_mean = number(columns, "card_amount_mean_30d")
    known = ~np.isnan(card_mean)
    ratio = np.log1p(number(columns, "amount")[known]) - np.log1p(card_mean[known])
    category = text(columns, "merchant_category")[known].astype(str)
    offsets = []
    for value in sorted(set(category.tolist())):
        mine = ratio[category == value]
        if len(mine) >= MIN_ROWS_FOR_OFFSET:
            offsets.append([value, float(np.median(mine))])
    return {"category_offsets": offsets}


def derive(columns, fitted):
    """The numeric inputs, one float64 array each, in the model's input order."""
    rows = len(columns["ts"])
    amount = number(columns, "amount", rows)
    card_mean = number(columns, "card_amount_mean_30d", rows)
    card_mean = np.where(np.isnan(card_mean), amount, card_mean)
    card_std = fill(number(columns, "card_amount_std_30d", rows), 0.0)
    now, whole_seconds = epoch_seconds(columns["ts"])
    gap = between(fill(now - number(columns, "card_last_txn_unix", rows), MAX_GAP_S), 0, MAX_GAP_S)
    second_of_day = whole_seconds % 86_400
    hour = (second_of_day // 3_600) + (second_of_day % 3_600 // 60) / 60.0
    hour_angle = 2 * np.pi * hour / 24
    lat, lon = number(columns, "lat", rows, 0.0), number(columns, "lon", rows, 0.0)
    usual_lat, usual_lon = number(columns, "card_lat_mean_30d", rows), number(columns, "card_lon_mean_30d", rows)
    distance = fill(haversine_km(lat, lon, usual_lat, usual_lon), 0.0)
    merchant_mean = number(columns, "merchant_amount_mean_30d", rows)
    merchant_mean = np.where(np.isnan(merchant_mean), amount, merchant_mean)
    log_amount = np.log1p(amount)
    amount_vs_card = log_amount - np.log1p(card_mean)
    offsets = dict(fitted.get("category_offsets", ()))
    category_offset = np.array([offsets.get(c, 0.0) for c in text(columns, "merchant_category", rows)], dtype="float64")
    rapid = (gap < RAPID_REPEAT_S).astype("float64")
    count_1h = fill(number(columns, "card_txn_count_1h", rows), 0.0)
    labelled = fill(number(columns, "merchant_labelled_count_30d", rows), 0.0)
    frauds = fill(number(columns, "merchant_fraud_rate_30d", rows), 0.0) * labelled
    fraud_rate = (frauds + PRIOR_FRAUD_RATE * PRIOR_LABELS) / (labelled + PRIOR_LABELS)
    return {
        "log_amount": log_amount,
        "amount_vs_card_log": amount_vs_card,  # how far the amount is from the card's own normal
        "amount_z_card": between((amount - card_mean) / (card_std + 1.0), -10, 50),
        # above the card's normal for this kind of merchant (0 if below)
        "amount_excess_for_category_log": np.maximum(0.0, amount_vs_card - category_offset),
        "card_count_1h_log": np.log1p(count_1h),  # velocity
        "card_count_24h_log": np.log1p(fill(number(columns, "card_txn_count_24h", rows), 0.0)),
        "card_count_7d_log": np.log1p(fill(number(columns, "card_txn_count_7d", rows), 0.0)),
        # how many different merchants the card paid in the last 24 hours
        "card_merchants_24h_log": np.log1p(fill(number(columns, "card_distinct_merchants_24h", rows), 0.0)),
        "seconds_since_last_log": np.log1p(gap),
        "rapid_repeat": rapid,  # within minutes of the card's previous transaction
        "burst_count": rapid * np.minimum(count_1h, 5.0),  # the card's last hour, when this one is a rapid repeat
        "hour_sin": np.sin(hour_angle),
        "hour_cos": np.cos(hour_angle),
        "is_night": (hour < 6).astype("float64"),
        "distance_from_usual_km_log": np.log1p(distance),  # how far from where the card is usually used
        "far_from_usual": (distance > FAR_FROM_USUAL_KM).astype("float64"),
        "merchant_count_24h_log": np.log1p(fill(number(columns, "merchant_txn_count_24h", rows), 0.0)),
        "amount_vs_merchant_log": log_amount - np.log1p(merchant_mean),
        # the merchant's known fraud rate (labels older than the label delay), shrunk towards the prior
        "merchant_fraud_logit": np.log(fraud_rate / (1.0 - fraud_rate)),
    }
