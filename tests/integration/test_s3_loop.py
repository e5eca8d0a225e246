"""The same loop with every artifact in S3 (SeaweedFS over HTTP): one code path for both object stores."""

from __future__ import annotations

import asyncio

import uuid

from flywheel import lineage
from flywheel.config import load_settings
from tests.factories import generate
from flywheel.registry import Registry
from flywheel.storage import Storage
from serving.predictor import Predictor
from tests.conftest import SMALL_DAYS, SMALL_ROWS, run_loop


def test_the_loop_trains_deploys_and_serves_from_s3(s3_env, aws_env, tmp_path):
    bucket = f"flywheel-loop-{uuid.uuid4().hex[:10]}"
    # The small loop's data and epochs, at the gate's real default floors.
    env = s3_env(f"s3://{bucket}/flywheel", FLYWHEEL_TRAINING__EPOCHS="3")
    settings = load_settings(env=env)
    storage = Storage.from_settings(settings)
    storage.s3.ensure_bucket(bucket)
    source = storage.uri("raw", "small")
    generate(storage, source, rows=SMALL_ROWS, days=SMALL_DAYS, seed=11)

    loop = run_loop(settings, source, "s3-run")
    snapshot, training_set, model, evaluation = (loop[k] for k in ("snapshot", "training_set", "model", "evaluation"))

    for uri in (snapshot["uri"], training_set["train_uri"], model["uri"], evaluation["report_uri"]):
        assert uri.startswith(f"s3://{bucket}/flywheel/"), uri
    assert not (tmp_path / "home" / "store").exists()  # nothing fell back to the local folder
    production = Registry(storage, "fraud").production()
    assert production.version == model["version"]
    raw = {leaf["uri"] for leaf in lineage.leaves(lineage.trace(storage, production.manifest_uri))}
    assert raw & set(storage.iter_objects(source, (".parquet",)))

    predictor = Predictor("fraud", settings)
    predictor.load()
    holdout = storage.read_parquet(training_set["holdout_uri"]).to_pandas().iloc[-1]
    answer = asyncio.run(predictor.predict({"instances": [{
        "card_id": holdout.card_id, "merchant_id": holdout.merchant_id, "amount": float(holdout.amount),
        "ts": holdout.ts.isoformat(), "merchant_category": holdout.merchant_category, "channel": holdout.channel,
    }]}))
    assert 0.0 <= answer["predictions"][0]["fraud_probability"] <= 1.0
