"""Fraud's synthetic transaction generator (usecases/fraud/generator.py): exact counts, the data
contract, determinism, truth kept apart, and fraud that is rare (1-2%) yet learnable."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score

from flywheel.errors import DataError
from flywheel.geo import haversine_km
from flywheel.storage import Storage
from tests.factories import FRAUD_GENERATOR, FRAUD_SCHEMA

# usecases/fraud/generator.py, imported as the platform imports a use case's modules.
CATEGORY_AMOUNT_SCALE = FRAUD_GENERATOR.CATEGORY_AMOUNT_SCALE
FRAUD_INTERCEPT = FRAUD_GENERATOR.FRAUD_INTERCEPT
burst_positions = FRAUD_GENERATOR.burst_positions
fraud_logit = FRAUD_GENERATOR.fraud_logit
generate = FRAUD_GENERATOR.generate
plan_chunks = FRAUD_GENERATOR.plan_chunks
split_into_sessions = FRAUD_GENERATOR.split_into_sessions
TRUTH_SCHEMA = pa.schema([pa.field("transaction_id", pa.string(), nullable=False),
                          pa.field("fraud_probability", pa.float64(), nullable=False)])

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
RISKY = {"gift_cards", "crypto", "electronics", "jewelry"}


def read_raw(files: list[str]) -> pd.DataFrame:
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """50k rows in 3+ parquet chunks, with the truth joined on."""
    root = tmp_path_factory.mktemp("datagen")
    result = generate(Storage(str(root)), str(root / "raw"), rows=50_000, seed=11, chunk_rows=20_000)
    raw = read_raw(result.files)
    truth = pa.concat_tables([pq.read_table(f) for f in result.truth_files]).to_pandas()
    return result, raw, truth, root


# --- counts, files, contract -----------------------------------------------------------------


def test_exact_row_count_across_several_chunks(tmp_path):
    seen: list[int] = []
    result = generate(Storage(str(tmp_path)), str(tmp_path / "raw"), rows=5_003, chunk_rows=1_000, progress=seen.append)
    assert len(result.files) >= 5
    assert [f.rsplit("/", 1)[-1] for f in result.files][:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert sum(pq.read_metadata(f).num_rows for f in result.files) == result.rows == 5_003
    assert seen == sorted(seen) and seen[-1] == 5_003 and len(seen) == len(result.files)


def test_parquet_schema_is_the_transaction_schema(dataset):
    result, _, _, _ = dataset
    for uri in result.files:
        assert pq.read_schema(uri).remove_metadata() == FRAUD_SCHEMA
    for uri in result.truth_files:
        assert pq.read_schema(uri).remove_metadata() == TRUTH_SCHEMA


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_are_readable_with_iso_timestamps(tmp_path, fmt):
    storage = Storage(str(tmp_path))
    text = generate(storage, str(tmp_path / fmt), rows=3_000, chunk_rows=1_000, fmt=fmt)
    parquet = generate(storage, str(tmp_path / "parquet"), rows=3_000, chunk_rows=1_000)
    assert all(f.endswith(f".{fmt}") for f in text.files)
    reader = pa_csv.read_csv if fmt == "csv" else pa_json.read_json
    options = pa_csv.ConvertOptions(column_types={"ts": pa.string()}) if fmt == "csv" else None
    table = pa.concat_tables([reader(f, convert_options=options) if options else reader(f) for f in text.files])
    assert table.column_names == FRAUD_SCHEMA.names
    ts = table["ts"].to_pylist()
    assert all(ISO_Z.match(value) for value in ts)
    # the format changes only the encoding, never the data
    expected = read_raw(parquet.files)
    got = table.to_pandas()
    assert pd.to_datetime(got["ts"], utc=True).tolist() == expected["ts"].tolist()
    assert got["transaction_id"].tolist() == expected["transaction_id"].tolist()
    assert np.allclose(got["amount"], expected["amount"]) and np.allclose(got["lat"], expected["lat"])
    assert got["is_fraud"].tolist() == expected["is_fraud"].tolist()


def test_truth_lives_only_under_truth_folder(dataset):
    result, raw, _, root = dataset
    storage = Storage(str(root))
    assert sorted(storage.iter_objects(str(root / "raw"))) == sorted(result.files)  # what ingest sees
    assert all("/_truth/" in f for f in result.truth_files)
    assert "fraud_probability" not in raw.columns
    generation = json.loads((root / "raw" / "_generation.json").read_text())
    assert generation["rows"] == 50_000 and generation["parameters"]["seed"] == 11


def test_truth_joins_one_to_one_with_raw_rows(dataset):
    _, raw, truth, _ = dataset
    assert len(truth) == len(raw)
    joined = raw.merge(truth, on="transaction_id", how="inner", validate="one_to_one")
    assert len(joined) == len(raw)
    assert joined["fraud_probability"].between(0, 1).all()


def test_transaction_ids_are_unique_across_chunks(dataset):
    result, raw, _, _ = dataset
    assert len(result.files) >= 3
    assert raw["transaction_id"].is_unique


def test_merchant_category_is_fixed_per_merchant(dataset):
    _, raw, _, _ = dataset
    assert raw.groupby("merchant_id")["merchant_category"].nunique().max() == 1


def test_timestamps_fall_in_the_window_and_each_card_is_in_time_order(dataset):
    result, raw, _, _ = dataset
    assert raw["ts"].min() >= result.start and raw["ts"].max() < result.end
    assert result.end - result.start == dt.timedelta(days=30)
    assert raw.groupby("card_id", sort=False)["ts"].apply(lambda s: s.is_monotonic_increasing).all()
    assert re.fullmatch(r"c\d{7}", raw["card_id"].iloc[0]) and re.fullmatch(r"m\d{6}", raw["merchant_id"].iloc[0])


def test_nights_are_quieter(dataset):
    _, raw, _, _ = dataset
    per_hour = raw["ts"].dt.hour.value_counts()
    assert per_hour[per_hour.index < 6].mean() < 0.4 * per_hour[per_hour.index >= 6].mean()


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    storage = Storage(str(tmp_path))
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        generate(storage, str(tmp_path / name), rows=4_000, chunk_rows=1_500, seed=seed)
    a, b, c = (digests(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.startswith("part-"))


def test_rerun_into_the_same_folder_leaves_no_stale_parts(tmp_path):
    storage = Storage(str(tmp_path))
    generate(storage, str(tmp_path / "raw"), rows=4_000, chunk_rows=1_000)
    result = generate(storage, str(tmp_path / "raw"), rows=500, chunk_rows=1_000)
    assert len(result.files) == 1
    assert sorted(storage.iter_objects(str(tmp_path / "raw"))) == result.files
    assert storage.list(str(tmp_path / "raw" / "_truth")) == result.truth_files


# --- fraud: rare, calibrated, learnable ------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_fraud_rate_is_between_one_and_two_percent(tmp_path, seed):
    result = generate(Storage(str(tmp_path)), str(tmp_path / "raw"), rows=50_000, seed=seed)
    assert 0.01 <= result.fraud_rate() <= 0.02
    assert result.fraud_rows == int(read_raw(result.files)["is_fraud"].sum())


def test_fraud_is_learnable_from_observable_risk_factors(dataset):
    _, raw, truth, _ = dataset
    df = raw.merge(truth, on="transaction_id")
    p = df["fraud_probability"]
    # what a model could see: the card's usual amount and place, from its own history
    relative_amount = df["amount"] / df["merchant_category"].map(CATEGORY_AMOUNT_SCALE)
    spike = relative_amount > 4 * relative_amount.groupby(df["card_id"]).transform("median")
    home_lat = df.groupby("card_id")["lat"].transform("median")
    home_lon = df.groupby("card_id")["lon"].transform("median")
    far = haversine_km(home_lat.to_numpy(), home_lon.to_numpy(), df["lat"].to_numpy(), df["lon"].to_numpy()) > 300
    night = df["ts"].dt.hour < 6
    risky = df["merchant_category"].isin(RISKY)
    online = df["channel"] == "online"
    factors = {"spike": (spike, 3.0), "far": (far, 2.0), "night": (night, 1.5), "risky": (risky, 2.0), "online": (online, 1.2)}
    for name, (mask, lift) in factors.items():
        mask = np.asarray(mask)
        assert mask.sum() > 100, name
        assert p[mask].mean() > lift * p[~mask].mean(), name
    base_rate = df["is_fraud"].mean()
    assert average_precision_score(df["is_fraud"], p) > 10 * base_rate
    # labels follow the truth: the mean probability matches the observed rate
    assert abs(p.mean() - base_rate) < 0.003


def test_fraud_logit_rises_with_every_risk_factor():
    base = dict(
        amount=np.array([40.0]),
        expected_amount=np.array([40.0]),
        burst_position=np.array([0]),
        category_risk=np.array([0.0]),
        hour=np.array([12]),
        distance_km=np.array([5.0]),
        online=np.array([False]),
    )
    z0 = fraud_logit(**base)[0]
    assert z0 == pytest.approx(FRAUD_INTERCEPT)
    changes = {
        "amount": np.array([400.0]),
        "burst_position": np.array([2]),
        "category_risk": np.array([1.8]),
        "hour": np.array([3]),
        "distance_km": np.array([800.0]),
        "online": np.array([True]),
    }
    for name, value in changes.items():
        assert fraud_logit(**{**base, name: value})[0] > z0, name
    assert fraud_logit(**{**base, "amount": np.array([10.0])})[0] == pytest.approx(z0)  # cheap is not risky


# --- pure pieces -----------------------------------------------------------------------------


def test_sessions_fill_each_card_exactly():
    counts = np.array([3, 0, 1, 7])
    candidates = np.array([1, 5, 1, 4, 1, 1, 6, 1, 1, 1, 1])
    card, size = split_into_sessions(counts, candidates)
    # card 0 uses [1, 5, 1]: 1, then 5 capped at 2; card 2 uses [4] capped at 1; card 3 uses
    # [1, 1, 6, ...]: 1, 1, then 6 capped at 5
    assert card.tolist() == [0, 0, 2, 3, 3, 3]
    assert size.tolist() == [1, 2, 1, 1, 1, 5]
    assert np.bincount(card, weights=size, minlength=4).tolist() == counts.tolist()
    assert burst_positions(np.array([1, 3, 1])).tolist() == [0, 1, 2, 3, 0]


def test_chunks_never_split_a_card():
    assert plan_chunks(np.array([3, 3, 3, 10, 1]), 6) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert plan_chunks(np.array([2, 2]), 100) == [(0, 2)]
    assert plan_chunks(np.array([0, 9, 0, 0]), 5) == [(0, 4)]  # empty cards never make an empty chunk


def test_start_accepts_datetimes_and_strings(tmp_path):
    storage = Storage(str(tmp_path))
    naive = generate(storage, str(tmp_path / "a"), rows=100, days=2, start=dt.datetime(2026, 1, 5))
    text = generate(storage, str(tmp_path / "b"), rows=100, days=2, start="2026-01-05T00:00:00Z")
    assert naive.start == text.start == dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert generate(storage, str(tmp_path / "c"), rows=1).rows == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"rows": 0}, "rows"),
        ({"rows": 2.5}, "rows"),
        ({"days": 0}, "days"),
        ({"fmt": "xml"}, "format"),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"seed": -1}, "seed"),
        ({"start": "first of october"}, "start"),
    ],
)
def test_bad_arguments_raise_data_error(tmp_path, bad, message):
    arguments = {"rows": 100, **bad}
    with pytest.raises(DataError, match=message):
        generate(Storage(str(tmp_path)), str(tmp_path / "raw"), **arguments)
    assert not (tmp_path / "raw").exists()


def test_the_generator_writes_the_contract_and_refuses_a_vocabulary_it_has_no_rates_for(tmp_path):
    """The schema and vocabularies come from contract.yaml, not a second copy: a channel declared
    there that the generative model has no rate for is named when the generator is loaded.
    Bug caught: a hand-kept schema beside the contract, drifting from it unnoticed."""
    import shutil

    from flywheel.errors import UseCaseError
    from flywheel.usecase import load_module, load_usecase
    from tests.factories import FRAUD

    assert FRAUD_GENERATOR.TRANSACTION_SCHEMA.equals(FRAUD.contract.arrow_schema())
    assert FRAUD_GENERATOR.LABEL == FRAUD.task.label
    folder = tmp_path / "fraud"
    shutil.copytree(FRAUD.folder, folder, ignore=shutil.ignore_patterns("__pycache__"))
    contract = folder / "contract.yaml"
    contract.write_text(contract.read_text().replace("categories: [chip, contactless, swipe, online]",
                                                     "categories: [chip, contactless, swipe, online, atm]"))
    with pytest.raises(UseCaseError, match=r"generator.py failed to import: .*channel categories .*'atm'"):
        load_module(load_usecase(folder), "generator")
