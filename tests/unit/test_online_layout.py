"""Serving reads Feast's online store without the Feast SDK (flywheel.features.store.OnlineReader):
every piece of Feast's layout it relies on is checked here against Feast's own functions, the
oracle. (tests/integration/test_serving_skew.py and test_redis_online.py read Feast-materialized
worlds through it end to end.)"""

from __future__ import annotations

import math
import sqlite3

import pytest

from flywheel.config import load_settings
from flywheel.errors import FeatureStoreError
from flywheel.features import store as feast_store


@pytest.mark.parametrize("entity_id", ["c0000001", "m000150", "", "ünïcødé-卡", "x" * 300])
def test_entity_keys_are_serialized_as_feast_does(entity_id):
    """Bug caught: a key layout that differs from Feast's by one byte finds no row, and every card
    would be scored as a new customer."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    for join_key in ("card_id", "merchant_id"):
        want = serialize_entity_key(EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity_id)]), 3)
        assert feast_store.entity_key_bytes(join_key, entity_id) == want


@pytest.mark.parametrize(
    "field, value",
    [("double_val", 1.5), ("double_val", -0.0), ("double_val", 1e308), ("double_val", -2.5e-300),
     ("double_val", math.inf), ("double_val", math.nan), ("int64_val", 0), ("int64_val", 1), ("int64_val", -1),
     ("int64_val", 2**63 - 1), ("int64_val", -(2**63)), ("int64_val", 300), ("int32_val", -5), ("int32_val", 2**31 - 1),
     ("float_val", 0.25), ("bool_val", True), ("bool_val", False)],
)
def test_feature_values_decode_as_feasts_protobuf_does(field, value):
    """Bug caught: a hand-read value that differs from what Feast wrote (sign of a negative int64,
    byte order of a double)."""
    from feast.protos.feast.types.Value_pb2 import Value

    raw = Value(**{field: value}).SerializeToString()
    want = float(getattr(Value.FromString(raw), field))
    got = feast_store.decode_value(raw)
    assert (math.isnan(got) and math.isnan(want)) or got == want, (raw, got, want)


def test_a_missing_value_is_nan_and_another_kind_of_value_is_refused():
    from feast.protos.feast.types.Value_pb2 import Null, Value

    assert math.isnan(feast_store.decode_value(None))
    assert math.isnan(feast_store.decode_value(Value().SerializeToString()))
    assert math.isnan(feast_store.decode_value(Value(null_val=Null.NULL).SerializeToString()))
    with pytest.raises(FeatureStoreError, match="cannot read"):
        feast_store.decode_value(Value(string_val="12.5").SerializeToString())


def test_redis_hash_fields_are_feasts():
    from feast.infra.online_stores.helpers import _mmh3

    for name in ("card_txn_count_1h", "merchant_amount_mean_30d"):
        assert feast_store.feature_hash_key("card_features", name) == _mmh3(f"card_features:{name}")


def test_the_redis_connection_string_is_read_as_feast_reads_it():
    client = feast_store.redis_client("10.0.0.7:6390,db=2,password=secret,ssl=false")
    options = client.connection_pool.connection_kwargs
    assert (options["host"], options["port"], options["db"], options["password"]) == ("10.0.0.7", 6390, 2, "secret")
    with pytest.raises(FeatureStoreError, match="must be host:port"):
        feast_store.redis_client("db=2")


def test_a_world_whose_online_tables_were_never_materialized_is_refused(tmp_path):
    """Bug caught: an online.db without the views' tables answering "no features" for every card."""
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path)})
    folder = feast_store.world_dir(settings, "abc123")
    folder.mkdir(parents=True)
    (folder / "registry.db").touch()
    sqlite3.connect(folder / "online.db").close()
    with pytest.raises(FeatureStoreError, match="has no online table for card_features, merchant_features"):
        feast_store.open_online_reader(settings, "abc123")


# ---------------------------------------------------------------- the writer's side (flywheel.features.online_write)
@pytest.mark.parametrize(
    "feast_type, field, values",
    [("Int64", "int64_val", [0, 1, -1, 127, 128, 300, 2**63 - 1, -(2**63), None, 16384, -300]),
     ("Int32", "int32_val", [0, -5, 2**31 - 1, -(2**31), None]),
     ("Float64", "double_val", [0.0, -0.0, 1.5, 1e308, -2.5e-300, math.inf, -math.inf, math.nan, None, 0.1]),
     ("Float32", "float_val", [0.0, 0.25, -3.5, 0.1, None, math.nan]),
     ("Bool", "bool_val", [True, False, None])],
)
def test_values_are_encoded_as_feasts_protobuf_and_value_text(feast_type, field, values):
    """Bug caught: a value encoded column-wise that differs from Feast's message by one byte (a
    negative int64's ten-byte varint, a float's width, a zero left out) or a NaN/null written as a
    number; the SQLite value_text not ``str`` of the value (Feast's extract_text_and_num)."""
    import pyarrow as pa
    from feast.infra.online_stores.helpers import extract_text_and_num
    from feast.protos.feast.types.Value_pb2 import Value

    from flywheel.features import online_write

    kind = {"Int64": pa.int64(), "Int32": pa.int32(), "Float64": pa.float64(), "Float32": pa.float32(), "Bool": pa.bool_()}
    encoded, texts = online_write.encode_values(pa.array(values, type=kind[feast_type]), feast_type)
    for value, raw, text in zip(values, encoded, texts):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            want = Value()  # Feast writes a missing value as an empty message
        else:
            want = Value(**{field: value})
        assert raw == want.SerializeToString(), (value, raw)
        assert text == extract_text_and_num(want, False)[0], (value, text)


def test_event_times_are_encoded_as_feasts_redis_timestamps():
    """Bug caught: the ``_ts:<view>`` field written differently from Feast's Timestamp, so Feast's
    staleness check (and its reads of event times) would misread it."""
    import numpy as np
    from google.protobuf.timestamp_pb2 import Timestamp

    from flywheel.features import online_write

    micros = np.array([0, 1, 999_999, 1_000_000, 1_790_812_800_123_456, 1_790_812_800_000_000, 4_102_444_800_000_001])
    for instant, raw in zip(micros.tolist(), online_write.timestamp_bytes(micros)):
        want = Timestamp(seconds=instant // 1_000_000, nanos=(instant % 1_000_000) * 1000)
        assert raw == want.SerializeToString(), (instant, raw)


def test_a_feature_type_the_writer_cannot_encode_is_refused():
    import pyarrow as pa

    from flywheel.features import online_write

    with pytest.raises(FeatureStoreError, match="use --engine feast"):
        online_write.encode_values(pa.array(["a"]), "String")


@pytest.mark.parametrize("micros", [0, 1, 999_999, 1_357_000_000_123_456, -1_500_000, 4_102_444_800_000_000])
def test_the_redis_row_time_decodes_as_protobufs_own_timestamp(micros):
    """The served TTL check reads Feast's ``_ts:<view>`` field: decoded as protobuf writes it."""
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    assert feast_store.timestamp_micros(stamp.SerializeToString()) == micros
