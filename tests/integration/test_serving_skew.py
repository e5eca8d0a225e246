"""No training/serving skew: the serving path (request -> schema-checked columns -> online store ->
transform -> forward) gives the model exactly the inputs the training path (frame -> Feast
point-in-time join -> FeatureSpec.transform) gives it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.fraud_tables import CARD_FEATURES, MERCHANT_FEATURES
from flywheel.features.store import historical_features, open_served_store
from tests.factories import FRAUD_CONTRACT, FRAUD_VIEWS
from serving.predictor import load_bundle, score

FEATURES = [*CARD_FEATURES, *MERCHANT_FEATURES]


@pytest.fixture(scope="module")
def bundle(trained_loop):
    return load_bundle(trained_loop["settings"])


@pytest.fixture(scope="module")
def holdout(trained_loop):
    return trained_loop["storage"].read_parquet(trained_loop["training_set"]["holdout_uri"]).to_pandas()


def request_of(frame: pd.DataFrame) -> dict:
    """The v1 body a client would send for these transactions (times as ISO-8601 strings)."""
    return {"instances": [
        {"transaction_id": row.transaction_id, "card_id": row.card_id, "merchant_id": row.merchant_id,
         "merchant_category": row.merchant_category, "amount": float(row.amount), "ts": row.ts.isoformat(),
         "channel": row.channel, "lat": float(row.lat), "lon": float(row.lon)}
        for row in frame.itertuples()
    ]}


def test_serving_inputs_equal_training_inputs_on_sampled_holdout_rows(bundle, holdout):
    sample = holdout.sample(300, random_state=3).reset_index(drop=True)
    # The sample exercises every feature, the label-delayed fraud rate included (not only nulls).
    assert (sample[FEATURES].notna().mean() > 0.9).all(), sample[FEATURES].notna().mean()
    sample.loc[:29, FEATURES] = None  # cold start: a new card and merchant, no history in the store
    sample.loc[30:59, "card_last_txn_unix"] = None
    parsed = bundle.schema.v1(request_of(sample), 1000)
    # The features the training set joined to each row, handed over as the online store hands them.
    looked_up = {name: pd.to_numeric(sample[name]).to_numpy(dtype="float64", na_value=np.nan) for name in FEATURES}
    serving = bundle.model.spec.transform_columns({**parsed.columns, **looked_up})
    training = bundle.model.spec.transform(sample)
    np.testing.assert_array_equal(serving, training)
    np.testing.assert_array_equal(bundle.model.predict(serving), bundle.model.score(sample))


def test_online_features_and_scores_equal_the_point_in_time_join_after_the_last_event(bundle, holdout, trained_loop):
    """A transaction after everything in the store: the online store must hold what the training
    join (Feast's point-in-time join, the training path) gives for that moment."""
    pairs = holdout.sample(60, random_state=5)
    after = holdout["ts"].max() + pd.Timedelta(hours=1)
    frame = pd.DataFrame({
        "transaction_id": [f"after-{i}" for i in range(len(pairs))] + ["after-new"],
        "card_id": [*pairs["card_id"], "card-never-seen"],
        "merchant_id": [*pairs["merchant_id"], "merchant-never-seen"],
        "merchant_category": [*pairs["merchant_category"], "grocery"],
        "amount": [*pairs["amount"], 20.0],
        # Distinct times: Feast's file store keeps one entity row per (key, time).
        "ts": [after + pd.Timedelta(seconds=i) for i in range(len(pairs) + 1)],
        "channel": [*pairs["channel"], "chip"],
        "lat": [*pairs["lat"], 40.0],
        "lon": [*pairs["lon"], -74.0],
    })
    feast = open_served_store(trained_loop["settings"], bundle.world)  # Feast's SDK: the oracle of the reader's layout
    joined = historical_features(feast, frame, FRAUD_VIEWS, FRAUD_CONTRACT).set_index("transaction_id").loc[frame["transaction_id"]].reset_index()

    features, known = bundle.reader.read({"card_id": list(frame["card_id"]), "merchant_id": list(frame["merchant_id"])})
    for name in FEATURES:
        np.testing.assert_array_equal(features[name], pd.to_numeric(joined[name]).to_numpy(dtype="float64", na_value=np.nan), err_msg=name)
    assert known["card_id"].tolist() == [True] * len(pairs) + [False]
    assert known["merchant_id"].tolist() == [True] * len(pairs) + [False]

    scored = score(bundle, bundle.schema.v1(request_of(frame), 1000), record=False)
    np.testing.assert_allclose(scored.predictions, bundle.model.score(joined), rtol=1e-6)
    assert scored.unknown[-1] == ["card", "merchant"] and scored.unknown[0] == []


def count_passes(monkeypatch) -> list[int]:
    """Record the number of transactions of each scoring pass (the real scoring still runs)."""
    import serving.predictor as predictor_module

    passes_made: list[int] = []
    real_score = predictor_module.score

    def counting_score(scored_bundle, transactions, **options):
        passes_made.append(transactions.count)
        return real_score(scored_bundle, transactions, **options)

    monkeypatch.setattr(predictor_module, "score", counting_score)
    return passes_made


def test_requests_that_arrive_together_are_scored_in_one_pass_each_getting_its_own_rows(bundle, holdout, monkeypatch):
    """Bug caught: a scoring pass that hands a request another request's rows (an offset error when
    splitting the pass), drops one, or scores each request alone (no pass shared under load)."""
    import asyncio

    import serving.predictor as predictor_module
    from flywheel.errors import FeatureStoreError
    from serving.predictor import ScoringPasses

    sizes = [1, 3, 2, 1]
    frames, start = [], 0
    for size in sizes:
        frames.append(holdout.iloc[start:start + size])
        start += size
    requests = [bundle.schema.v1(request_of(frame), 1000) for frame in frames]
    alone = [score(bundle, request, record=False).predictions for request in requests]
    passes_made = count_passes(monkeypatch)
    passes = ScoringPasses()

    async def together(batch):
        return await asyncio.gather(*(passes.score(bundle, request) for request in batch), return_exceptions=True)

    results = asyncio.run(together(requests))
    assert passes_made == [sum(sizes)]
    for result, want, frame in zip(results, alone, frames):
        # The same as scored alone, to float32 rounding (a matrix product rounds by its row count).
        np.testing.assert_allclose(result.predictions, want, rtol=1e-6)
        assert len(result.unknown) == len(frame)

    def failing_score(*_, **__):
        raise FeatureStoreError("online read from SQLite failed: disk I/O error")

    monkeypatch.setattr(predictor_module, "score", failing_score)
    assert [type(error) for error in asyncio.run(together(requests[:2]))] == [FeatureStoreError, FeatureStoreError]


def test_requests_still_coming_in_join_the_pass_a_lone_one_does_not_wait_long(bundle, holdout, monkeypatch):
    """Bug caught: a pass that starts before the requests right behind it (received, still a turn of
    the loop away from it) have joined: under load each pass then scores a request or two, and its
    fixed cost (the online read, the transform, the forward pass) is paid again for each."""
    import asyncio

    from serving.predictor import GATHER_TURNS, ScoringPasses

    requests = [bundle.schema.v1(request_of(holdout.iloc[k:k + 1]), 1000) for k in range(4)]
    passes_made = count_passes(monkeypatch)
    passes = ScoringPasses()

    async def arriving(turns_behind: int, request):
        for _ in range(turns_behind):  # a request still being parsed: it reaches the pass this many turns later
            await asyncio.sleep(0)
        return await passes.score(bundle, request)

    async def staggered(lags):
        return await asyncio.gather(*(arriving(lag, request) for lag, request in zip(lags, requests)))

    asyncio.run(staggered([0, 1, 2, 2]))
    assert passes_made == [4]  # one pass, though they came in over three turns
    passes_made.clear()
    asyncio.run(staggered([0, GATHER_TURNS + 2, GATHER_TURNS + 2, GATHER_TURNS + 2]))
    assert passes_made == [1, 3]  # a pass waits a few turns, not for ever

    async def lone():
        loop = asyncio.get_running_loop()
        turns = 0

        def tick():
            nonlocal turns
            turns += 1
            if not done.is_set():
                loop.call_soon(tick)

        done = asyncio.Event()
        loop.call_soon(tick)
        await passes.score(bundle, requests[0])
        done.set()
        return turns

    assert asyncio.run(lone()) <= 3  # a request alone is scored within a turn or two of the loop


def test_a_read_larger_than_one_sqlite_statement_allows_is_split_without_losing_rows(bundle, holdout, monkeypatch):
    """Bug caught: a batch with more entities than SQLite takes parameters in one statement
    ("too many SQL variables": a 503 for every large batch), or a split that drops the rows of a piece."""
    from flywheel.features import store as feast_store

    cards, merchants = list(holdout["card_id"].iloc[:60]), list(holdout["merchant_id"].iloc[:60])
    whole_features, whole_known = bundle.reader.read({"card_id": cards, "merchant_id": merchants})
    monkeypatch.setattr(feast_store, "MAX_SQL_PARAMETERS", 7)
    features, known = bundle.reader.read({"card_id": cards, "merchant_id": merchants})
    for name in FEATURES:
        np.testing.assert_array_equal(features[name], whole_features[name], err_msg=name)
    assert all((known[key] == whole_known[key]).all() for key in known) and whole_known["card_id"].all()
