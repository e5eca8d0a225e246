"""Feast's DuckDB offline store with its point-in-time join done as DuckDB's own ``ASOF JOIN``.

Feast 0.67's DuckDB (ibis) store joins each view by matching every entity row with every feature
row of its key, filtering on time and TTL, ranking the matches with a window function and joining
the winners back on a string id built from the keys: cost and memory grow with entity rows x
feature rows per key. Measured on this project's tables (benchmarks/features.py, same run, same
200k transactions): Feast's DuckDB store 15 s and a 1.9 GB peak, its file store 47 s, this store
0.7 s; Feast's DuckDB store took 50 s and 3.2 GB for 400k, where the goal is 1M in 20 s under 3 GB.
DuckDB's ``ASOF JOIN`` finds each entity row's latest feature row by sorting both sides once.

This store is Feast's own DuckDB store (materialization, pulls, writes and everything else are
inherited) with ``get_historical_features`` replaced for the case it is used for: feature views
over parquet ``FileSource``s and an entity DataFrame. Anything else (on-demand views, a SQL entity
query, other sources, field mappings) goes to Feast's own implementation. Semantics are Feast's:
per view, the row with the latest event time at or before the entity row's, a tie going to the
latest created time, nothing when that row is older than the view's TTL; every entity row is kept,
in its order. Selected with ``features.offline_store: duckdb-asof``; checked against a merge_asof
oracle in tests/unit/test_point_in_time.py and on a sample of every training set.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, List, Optional, Union

import duckdb
import pandas as pd
import pyarrow
from feast.feature_view import FeatureView
from feast.infra.offline_stores import offline_utils
from feast.infra.offline_stores.duckdb import DuckDBOfflineStore, DuckDBOfflineStoreConfig
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob, RetrievalMetadata
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from pydantic import StrictStr

STORE_TYPE = "flywheel.features.asof_store.AsofDuckDBOfflineStore"
ROW = "__flywheel_entity_row"


class AsofDuckDBOfflineStoreConfig(DuckDBOfflineStoreConfig):
    """Feast's DuckDB offline store settings; ``type`` names this store's class for Feast."""

    type: StrictStr = STORE_TYPE


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _supported(feature_views: List[Any], entity_df: Any) -> bool:
    return isinstance(entity_df, pd.DataFrame) and all(
        isinstance(view, FeatureView)
        and type(view.batch_source) is FileSource
        and not view.batch_source.field_mapping
        and str(view.batch_source.path).endswith(".parquet")
        and "://" not in str(view.batch_source.path)
        for view in feature_views
    )


class AsofRetrievalJob(RetrievalJob):
    """The joined rows, computed by DuckDB when asked for (``to_df`` / ``to_arrow``)."""

    def __init__(self, compute: Any, full_feature_names: bool, metadata: RetrievalMetadata) -> None:
        super().__init__()
        self._compute = compute
        self._full_feature_names = full_feature_names
        self._metadata = metadata

    def _to_arrow_internal(self, timeout: Optional[int] = None) -> pyarrow.Table:
        return self._compute()

    def _to_df_internal(self, timeout: Optional[int] = None) -> pd.DataFrame:
        return self._compute().to_pandas()

    @property
    def full_feature_names(self) -> bool:
        return self._full_feature_names

    @property
    def on_demand_feature_views(self) -> list:
        return []

    @property
    def metadata(self) -> Optional[RetrievalMetadata]:
        return self._metadata

    def persist(self, storage: Any, allow_overwrite: bool = False, timeout: Optional[int] = None) -> None:
        raise NotImplementedError("saved datasets are not supported by the as-of DuckDB store; use to_df() or to_arrow()")


class AsofDuckDBOfflineStore(DuckDBOfflineStore):
    """Feast's DuckDB offline store, its point-in-time join an ``ASOF JOIN`` per feature view."""

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: List[FeatureView],
        feature_refs: List[str],
        entity_df: Union[pd.DataFrame, str],
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        filter_by_created_timestamp: bool = False,
    ) -> RetrievalJob:
        if filter_by_created_timestamp or not _supported(feature_views, entity_df):
            return DuckDBOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project, full_feature_names,
                filter_by_created_timestamp,
            )
        assert isinstance(entity_df, pd.DataFrame)
        event_column = offline_utils.infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes)))
        entities = entity_df.copy()
        # DuckDB's timestamps are microseconds, as the feature tables' are: compare like with like.
        entities[event_column] = pd.to_datetime(entities[event_column], utc=True).astype("datetime64[us, UTC]")
        if entities[event_column].isna().any():
            raise ValueError(f"the entity DataFrame's {event_column} column has empty timestamps")
        queries = _asof_queries(feature_views, feature_refs, event_column, full_feature_names)

        def compute() -> pyarrow.Table:
            # Each view's join yields (entity row, its features) in entity row order; the columns
            # are appended to the entity rows as they are (joining views in one statement and
            # sorting the wide result back into order took twice as long).
            table = pyarrow.Table.from_pandas(entities.assign(**{ROW: range(len(entities))}), preserve_index=False)
            con = duckdb.connect()
            try:
                con.register("entities", table)
                for index, (view, query) in enumerate(zip(feature_views, queries)):
                    con.register(f"source_{index}", con.read_parquet(str(view.batch_source.path)))
                    part = con.sql(query).to_arrow_table()
                    if not part.column(ROW).equals(table.column(ROW)):
                        raise RuntimeError(f"the as-of join of {view.name} returned its rows out of entity order")
                    for name in part.column_names[1:]:
                        table = table.append_column(name, part.column(name))
            finally:
                con.close()
            return table.drop_columns([ROW])

        stamps = entities[event_column]
        metadata = RetrievalMetadata(
            features=feature_refs,
            keys=[c for c in entity_df.columns if c != event_column],
            min_event_timestamp=stamps.min().to_pydatetime() if len(stamps) else None,
            max_event_timestamp=stamps.max().to_pydatetime() if len(stamps) else None,
        )
        return AsofRetrievalJob(compute, full_feature_names, metadata)


def _asof_queries(feature_views: List[FeatureView], feature_refs: List[str], event_column: str, full_names: bool) -> list[str]:
    """Per view, one SQL statement: each entity row's ``ASOF LEFT JOIN`` on the view's keys and
    time, as (entity row number, the view's features), in entity row order."""
    queries = []
    event = f"e.{_quote(event_column)}"
    for index, view in enumerate(feature_views):
        prefix = view.projection.name_to_use()
        features = [ref.split(":", 1)[1] for ref in feature_refs if ref.startswith(f"{prefix}:")]
        keys = view.projection.join_key_map or {column.name: column.name for column in view.entity_columns}
        source = view.batch_source
        ts, created = _quote(source.timestamp_field), source.created_timestamp_column
        # One row per key and event time: on a tie the row created last (Feast's rule); the ASOF
        # join itself would pick any of them.
        order = f"ORDER BY {_quote(created)} DESC" if created else ""
        key_list = ", ".join(_quote(k) for k in keys)
        feature_list = ", ".join(_quote(f) for f in features)
        view_table = (
            f"(SELECT {key_list}, {ts} AS __ts, {feature_list} FROM source_{index} "
            f"QUALIFY row_number() OVER (PARTITION BY {key_list}, {ts} {order}) = 1)"
        )
        on = " AND ".join(f"f.{_quote(k)} = e.{_quote(v)}" for k, v in keys.items())
        ttl: timedelta | None = view.ttl
        selects = [f"e.{ROW}"]
        for feature in features:
            column = f"f.{_quote(feature)}"
            if ttl and ttl > timedelta(0):
                micros = int(ttl / timedelta(microseconds=1))
                column = f"CASE WHEN f.__ts >= {event} - to_microseconds({micros}) THEN {column} END"
            name = f"{view.projection.name_alias or view.name}__{feature}" if full_names else feature
            selects.append(f"{column} AS {_quote(name)}")
        queries.append(
            f"SELECT {', '.join(selects)} FROM entities AS e ASOF LEFT JOIN {view_table} AS f "
            f"ON {on} AND f.__ts <= {event} ORDER BY e.{ROW}"
        )
    return queries


__all__ = ["AsofDuckDBOfflineStore", "AsofDuckDBOfflineStoreConfig", "STORE_TYPE"]
