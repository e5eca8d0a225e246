"""flywheel.contract: a use case's data contract, declared in its folder, and inferred from a sample.

The fraud use case's declaration (usecases/fraud/contract.yaml) is checked against a schema written
out here (what the lake held before the contract was declared), the serving request schema and the
label delay, so an edit to the declaration that changes what the loop stores or accepts is caught.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from flywheel.contract import Contract, dump_contract, infer_contract, load_contract, parse_contract
from flywheel.errors import UseCaseError
from flywheel.storage import Storage
from tests.factories import generate

REPO = Path(__file__).resolve().parents[2]
FRAUD = REPO / "usecases" / "fraud"
# The raw card transaction as the lake stored it before contract.yaml declared it (flywheel/schema.py
# of old): the oracle the declaration is held to.
TRANSACTION_SCHEMA = pa.schema([
    pa.field("transaction_id", pa.string(), nullable=False),
    pa.field("card_id", pa.string(), nullable=False),
    pa.field("merchant_id", pa.string(), nullable=False),
    pa.field("merchant_category", pa.string(), nullable=False),
    pa.field("amount", pa.float64(), nullable=False),
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("channel", pa.string(), nullable=False),
    pa.field("lat", pa.float64(), nullable=False),
    pa.field("lon", pa.float64(), nullable=False),
    pa.field("is_fraud", pa.int8(), nullable=False),
])
MERCHANT_CATEGORIES = ["grocery", "restaurant", "gas", "pharmacy", "retail", "online_retail", "entertainment", "travel",
                       "electronics", "jewelry", "gift_cards", "crypto"]
CHANNELS = ["chip", "contactless", "swipe", "online"]
REQUEST_FIELDS = [name for name in TRANSACTION_SCHEMA.names if name != "is_fraud"]


@pytest.fixture(scope="module")
def fraud() -> Contract:
    return load_contract(FRAUD)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> pa.Table:
    root = tmp_path_factory.mktemp("contract")
    files = generate(Storage(str(root)), str(root / "raw"), rows=5_000, seed=3, chunk_rows=5_000).files
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_the_fraud_contract_declares_the_schema_the_lake_enforces(fraud):
    """Bug caught: a declared type, nullability or column order that differs from the lake's schema."""
    assert fraud.arrow_schema().equals(TRANSACTION_SCHEMA, check_metadata=False), fraud.arrow_schema()
    assert (fraud.id, fraud.timestamp, fraud.labels) == ("transaction_id", "ts", ["is_fraud"])
    assert fraud.columns["channel"].categories == CHANNELS
    assert fraud.columns["merchant_category"].categories == MERCHANT_CATEGORIES
    assert fraud.entities == {"card": "card_id", "merchant": "merchant_id"} and fraud.label_known.delay == dt.timedelta(days=3)


def test_the_fraud_contract_declares_the_request_serving_accepts(fraud):
    """Bug caught: a field the predictor requires that the contract makes optional, or the reverse,
    or a label that a request could carry."""
    from serving.requests import RequestSchema

    REQUEST_SCHEMA = RequestSchema(fraud).fields

    assert fraud.request_fields() == {spec.name: spec.required for spec in REQUEST_SCHEMA}
    assert list(fraud.request_fields()) == REQUEST_FIELDS
    for spec in REQUEST_SCHEMA:
        column = fraud.columns[spec.name]
        if column.min is not None:  # serving never refuses a value the lake accepts
            assert column.min == spec.low and (column.max if column.max is not None else spec.high) <= spec.high, spec.name


def test_a_contract_survives_being_written_and_read_back(fraud, sample, tmp_path):
    """Bug caught: a field dump_contract leaves out (a changed default dropped as if it were one)."""
    inferred = infer_contract(sample, label="is_fraud", timestamp="ts", id="transaction_id")
    for contract in (fraud, inferred):
        (tmp_path / "contract.yaml").write_text(dump_contract(contract))
        assert load_contract(tmp_path) == contract


def test_inference_from_a_sample_finds_types_nullability_ranges_and_vocabularies(fraud, sample):
    """The oracle is the fraud declaration and the sample itself (pyarrow), not the inference code."""
    inferred = infer_contract(sample, label="is_fraud", timestamp="ts", id="transaction_id",
                              entities={"card": "card_id", "merchant": "merchant_id"})
    assert inferred.arrow_schema().equals(fraud.arrow_schema(), check_metadata=False)
    assert set(inferred.columns["channel"].categories) == set(sample.column("channel").unique().to_pylist())
    assert set(inferred.columns["merchant_category"].categories) <= set(MERCHANT_CATEGORIES)
    for key in ("transaction_id", "card_id", "merchant_id"):  # ids are never a vocabulary
        assert inferred.columns[key].categories is None, key
    amounts = sample.column("amount").to_numpy()
    assert (inferred.columns["amount"].min, inferred.columns["amount"].max) == (amounts.min(), amounts.max())
    assert (inferred.columns["is_fraud"].min, inferred.columns["is_fraud"].max) == (0, 1)
    assert inferred.unlabelled == "reject" and inferred.label_known.delay == dt.timedelta(0)
    assert inferred.request_fields() == {name: name != "transaction_id" for name in REQUEST_FIELDS}


def test_a_sample_with_missing_labels_and_odd_types_gives_a_reviewable_contract():
    """A nullable label makes unlabelled rows kept (not rejected); dictionary strings are strings;
    a numeric column with only nulls gets no range; unsigned integers widen to int64."""
    table = pa.table({
        "when": pa.array([dt.datetime(2024, 1, d, tzinfo=dt.timezone.utc) for d in (1, 2, 3, 4)], pa.timestamp("ns", tz="UTC")),
        "delay": pa.array([3.0, None, -2.5, 10.0]),
        "carrier": pa.array(["AA", "UA", "AA", "AA"]).dictionary_encode(),
        "seats": pa.array([100, 150, 120, 90], pa.uint16()),
        "empty": pa.array([None, None, None, None], pa.float64()),
    })
    contract = infer_contract(table, label="delay", timestamp="when")
    assert contract.unlabelled == "keep" and contract.columns["delay"].nullable
    assert contract.columns["carrier"].type == "string"
    assert contract.columns["seats"].type == "int64" and (contract.columns["seats"].min, contract.columns["seats"].max) == (90, 150)
    assert contract.columns["empty"].min is None
    assert "delay" not in contract.request_fields()


@pytest.mark.parametrize("change, message", [
    ({"labels": ["fraud"]}, "label 'fraud' is not a column"),
    ({"timestamp": "amount"}, "timestamp 'amount' must be of type timestamp, not float64"),
    ({"entities": {"card": "lat"}}, "join key 'lat' must be of type"),
    ({"label_known": {"delay": "P3D", "column": "ts"}}, "exactly one of delay"),
    ({"label_known": {}}, "exactly one of delay"),
    ({"label_known": {"delay": "-P1D"}}, "label_known.delay"),
    ({"labels": ["is_fraud", "is_fraud"]}, "named twice"),
    ({"labels": ["card_id"]}, "card_id is also the id, the timestamp or a join key"),
    ({"unlabelled": "ignore"}, "unlabelled"),
    ({"colour": "blue"}, "colour is not a field of a contract"),
    ({"columns": {}}, "declares no column"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_an_invalid_contract_is_refused_naming_the_problem(change, message):
    data = {**yaml.safe_load((FRAUD / "contract.yaml").read_text()), **change}
    with pytest.raises(UseCaseError, match="invalid contract") as info:
        parse_contract(data, "contract.yaml")
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("column, message", [
    ({"type": "float64", "min": 5, "max": 1}, "min 5.0 is above max 1.0"),
    ({"type": "string", "min": 0}, "min/max bound numbers"),
    ({"type": "int8", "categories": ["a"]}, "categories are a string column's vocabulary"),
    ({"type": "string", "categories": ["a", "a"]}, "without repeats"),
    ({"type": "decimal"}, "columns.amount.type"),
    ({"type": "float64", "nullable": True, "request": "required", "categories_mostly": 0}, "categories_mostly"),
    ({"type": "string", "mean": [0, 1]}, "mean bounds a number's average"),
    ({"type": "float64", "mean": [2, 1]}, "mean: 2.0 is above 1.0"),
    ({"type": "float64", "min": 0, "max": 5, "drift": "rate"}, "drift: rate compares the share of 1s"),
    ({"type": "string", "drift": "quantiles"}, "drift: quantiles compares numbers"),
    ({"type": "float64", "drift": "shares"}, "drift: shares compares a string column's values"),
])
def test_an_invalid_column_is_refused_naming_it(column, message):
    data = yaml.safe_load((FRAUD / "contract.yaml").read_text())
    data["columns"]["amount"] = column
    with pytest.raises(UseCaseError) as info:
        parse_contract(data, "contract.yaml")
    assert message in str(info.value) and "amount" in str(info.value), str(info.value)


def test_a_label_cannot_be_nullable_when_unlabelled_rows_are_rejected_nor_be_sent_in_a_request():
    data = yaml.safe_load((FRAUD / "contract.yaml").read_text())
    data["columns"]["is_fraud"] = {"type": "int8", "nullable": True, "request": "optional"}
    with pytest.raises(UseCaseError) as info:
        parse_contract(data, "contract.yaml")
    assert "nullable, but unlabelled is reject" in str(info.value)
    assert "not known when a row is scored" in str(info.value)


def test_a_missing_unreadable_or_malformed_contract_file_is_a_clear_error(tmp_path):
    with pytest.raises(UseCaseError, match="does not exist: a use case folder holds its contract.yaml"):
        load_contract(tmp_path)
    (tmp_path / "contract.yaml").write_text("columns: [unclosed\n")
    with pytest.raises(UseCaseError, match="is not valid YAML"):
        load_contract(tmp_path)
    (tmp_path / "contract.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UseCaseError, match="must hold a mapping"):
        load_contract(tmp_path)


def test_a_sample_that_lacks_a_named_column_or_has_an_unusable_type_is_refused():
    table = pa.table({"t": pa.array([dt.datetime(2024, 1, 1)]), "y": [1.0], "blob": pa.array([b"x"])})
    with pytest.raises(UseCaseError, match="the sample has no column 'label'"):
        infer_contract(table, label="label", timestamp="t")
    with pytest.raises(UseCaseError, match="column 'blob' has type binary"):
        infer_contract(table, label="y", timestamp="t")
    with pytest.raises(UseCaseError, match="no rows"):
        infer_contract(table.slice(0, 0), label="y", timestamp="t")


def test_the_drift_gate_compares_what_the_contract_says(fraud):
    """Bug caught: a drift check on an id or a coordinate (relative quantiles of a number that may be
    negative), or a vocabulary or label left unchecked."""
    assert fraud.drift_checks() == {"merchant_category": "shares", "amount": "quantiles", "channel": "shares",
                                    "is_fraud": "rate"}
    data = yaml.safe_load((FRAUD / "contract.yaml").read_text())
    data["columns"]["amount"]["drift"] = "none"
    data["columns"]["lat"]["drift"] = "quantiles"
    assert set(parse_contract(data, "contract.yaml").drift_checks()) == {"merchant_category", "channel", "is_fraud", "lat"}
