"""Feast's Ray offline store and Ray compute engine, with the point-in-time rules flywheel relies on.

The cluster path of the features step (``features.offline_store: ray``): training sets are joined and
the online store is materialized by Ray tasks, locally (``ray.init`` on 127.0.0.1, ``ray_address``
empty) or on a Ray cluster (``features.ray_address``, e.g. ``ray://raycluster-head:10001`` of a
KubeRay ``RayCluster``). Everything else (reading sources, pulls, writes) is Feast's own Ray code.

Feast 0.67's Ray store and engine get three of flywheel's point-in-time cases wrong (measured on
tests/unit/test_point_in_time.py's tables; tests/integration/test_ray_engine.py checks the fixes):

- its ``get_historical_features`` ignores the view's TTL: a feature row 31 days older than the
  transaction is still joined (the TTL cases ``ttl-2``, ``ttl-3`` get 3.0 where Feast's other stores
  give null);
- on an event-time tie it does not take the row created last (``tie-1`` got 7, the row created
  second, not 6, the one created last);
- its compute engine's materialization filters rows older than *now* minus the TTL (so data whose
  latest row is older than 30 days materializes nothing, silently) and deduplicates per block on
  event time alone, leaving a cross-block tie to whichever write lands last;
- its distributed online write converts only the first chunk of each Arrow batch (Feast's
  ``_convert_arrow_to_proto`` takes ``to_batches()[0]``; after Ray's groupby a batch has a chunk per
  group: 1 of 5 cards was written), cannot ship a SQLite store that holds a connection, and logs a
  failed write while reporting success.

So :class:`FlywheelRayOfflineStore` replaces ``get_historical_features`` for what flywheel asks of it
(feature views over parquet ``FileSource``s, an entity DataFrame): per view, entity rows and feature
rows are grouped by the join key in Ray (``groupby().map_groups()``, a distributed shuffle) and each
group is joined with pandas ``merge_asof`` (latest event time at or before the entity row's, ties to
the latest created time, nothing beyond the TTL). :class:`FlywheelRayComputeEngine` materializes
through Feast's own ``pull_latest_from_table_or_query`` (a grouped latest-row pick that honours the
created-time tie) and Feast's distributed online write, which every Ray worker does for its shard.
The join's features come back as float64 (NaN where a view has no row), in the entity rows' order,
collected on the driver (the features step writes the training set from there).
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import numpy as np
import pandas as pd
import pyarrow as pa
from feast.feature_view import FeatureView
from feast.infra.compute_engines.ray.compute import RayComputeEngine
from feast.infra.common.materialization_job import MaterializationJobStatus
from feast.infra.compute_engines.ray.config import RayComputeEngineConfig
from feast.infra.compute_engines.ray.job import RayMaterializationJob
from feast.infra.offline_stores import offline_utils
from feast.infra.offline_stores.contrib.ray_offline_store.ray import (
    RayOfflineStore,
    RayOfflineStoreConfig,
    RayRetrievalJob,
)
from feast.infra.offline_stores.file_source import FileSource
from feast.infra.offline_stores.offline_store import RetrievalJob
from feast.infra.registry.base_registry import BaseRegistry
from feast.repo_config import RepoConfig
from feast.utils import _convert_arrow_to_proto, _get_column_names
from pydantic import StrictStr

STORE_TYPE = "flywheel.features.ray_store.FlywheelRayOfflineStore"
ENGINE_TYPE = "flywheel.features.ray_store.FlywheelRayComputeEngine"
ROW = "__flywheel_entity_row"  # the entity row's position; -1 on a feature row
TIME = "__flywheel_time"
CREATED = "__flywheel_created"
KEY = "__flywheel_key"


class FlywheelRayOfflineStoreConfig(RayOfflineStoreConfig):
    """Feast's Ray offline store settings; ``type`` names this store's class for Feast."""

    type: StrictStr = STORE_TYPE  # type: ignore[assignment]


class FlywheelRayComputeEngineConfig(RayComputeEngineConfig):
    """Feast's Ray compute engine settings; ``type`` names this engine's class for Feast."""

    type: StrictStr = ENGINE_TYPE  # type: ignore[assignment]


def _supported(feature_views: List[Any], entity_df: Any, full_feature_names: bool) -> bool:
    return not full_feature_names and isinstance(entity_df, pd.DataFrame) and all(
        isinstance(view, FeatureView)
        and type(view.batch_source) is FileSource
        and not view.batch_source.field_mapping
        and len(view.entity_columns) == 1
        for view in feature_views
    )


def _asof_group(ttl: Optional[pd.Timedelta], names: List[str]):
    """The per-key join: every entity row of one key with that key's latest feature row."""

    def join(group: pd.DataFrame) -> pd.DataFrame:
        entities = group[group[ROW] >= 0].sort_values(TIME, kind="stable")
        features = group[group[ROW] < 0].sort_values([TIME, CREATED], kind="stable")
        # merge_asof takes the last of equal times on the right: sorted by created time, the row
        # created last wins a tie on event time (Feast's rule).
        joined = pd.merge_asof(entities[[ROW, TIME]], features[[TIME, *names]], on=TIME,
                               direction="backward", allow_exact_matches=True, tolerance=ttl)
        return joined[[ROW, *names]]

    return join


class FlywheelRayOfflineStore(RayOfflineStore):
    """Feast's Ray offline store; its point-in-time join grouped by key in Ray, per feature view."""

    @staticmethod
    def get_historical_features(
        config: RepoConfig,
        feature_views: List[FeatureView],
        feature_refs: List[str],
        entity_df: Optional[Union[pd.DataFrame, str]],
        registry: BaseRegistry,
        project: str,
        full_feature_names: bool = False,
        **kwargs: Any,
    ) -> RetrievalJob:
        if not _supported(feature_views, entity_df, full_feature_names):
            return RayOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project, full_feature_names, **kwargs
            )
        import ray.data

        assert isinstance(entity_df, pd.DataFrame)
        RayOfflineStore()._init_ray(config)
        event_column = offline_utils.infer_event_timestamp_from_entity_df(dict(zip(entity_df.columns, entity_df.dtypes)))
        entities = entity_df.reset_index(drop=True)
        when = pd.to_datetime(entities[event_column], utc=True).astype("datetime64[ns, UTC]")
        if when.isna().any():
            raise ValueError(f"the entity DataFrame's {event_column} column has empty timestamps")
        wanted = {view.projection.name_to_use(): view for view in feature_views}
        by_view: dict[str, List[str]] = {}
        for ref in feature_refs:
            view_name, feature = ref.split(":", 1)
            if view_name in wanted:
                by_view.setdefault(view_name, []).append(feature)

        def compute() -> pd.DataFrame:
            out = entities.copy()
            for view_name, names in by_view.items():
                view = wanted[view_name]
                join_key = view.entity_columns[0].name
                key = view.projection.join_key_map.get(join_key, join_key)
                source = view.batch_source
                ttl = pd.Timedelta(view.ttl) if view.ttl else None
                left = pd.DataFrame({KEY: entities[key].astype(str), ROW: np.arange(len(entities), dtype="int64"),
                                     TIME: when, CREATED: when})
                for name in names:
                    left[name] = np.nan
                # Both sides as Arrow blocks of one schema, so Ray can union them.
                schema = pa.schema([(KEY, pa.string()), (ROW, pa.int64()), (TIME, pa.timestamp("ns", tz="UTC")),
                                    (CREATED, pa.timestamp("ns", tz="UTC")), *[(name, pa.float64()) for name in names]])

                def as_rows(batch: pd.DataFrame, source: Any = source, join_key: str = join_key,
                            names: List[str] = names, schema: pa.Schema = schema) -> pa.Table:
                    times = pd.to_datetime(batch[source.timestamp_field], utc=True).astype("datetime64[ns, UTC]")
                    created = (pd.to_datetime(batch[source.created_timestamp_column], utc=True).astype("datetime64[ns, UTC]")
                               if source.created_timestamp_column else times)
                    rows = pd.DataFrame({KEY: batch[join_key].astype(str), ROW: np.full(len(batch), -1, dtype="int64"),
                                         TIME: times, CREATED: created})
                    for name in names:
                        rows[name] = batch[name].astype("float64")
                    return pa.Table.from_pandas(rows, schema=schema, preserve_index=False)

                columns = [join_key, source.timestamp_field, *names]
                if source.created_timestamp_column:
                    columns.append(source.created_timestamp_column)
                features = ray.data.read_parquet(str(source.path)).select_columns(columns).map_batches(
                    as_rows, batch_format="pandas")
                joined = (
                    features.union(ray.data.from_arrow(pa.Table.from_pandas(left, schema=schema, preserve_index=False)))
                    .groupby(KEY)
                    .map_groups(_asof_group(ttl, names), batch_format="pandas")
                    .to_pandas()
                )
                if len(joined) != len(entities):
                    raise RuntimeError(f"the Ray join of {view.name} returned {len(joined)} rows for {len(entities)} entity rows")
                joined = joined.sort_values(ROW)
                for name in names:
                    out[name] = joined[name].to_numpy(dtype="float64", na_value=np.nan)
            return out

        return RayRetrievalJob(compute, config=config.offline_store)


class FlywheelRayComputeEngine(RayComputeEngine):
    """Feast's Ray compute engine, materializing each view as the latest row per entity in the
    window (Feast's ``pull_latest_from_table_or_query`` on the Ray store: grouped, the created-time
    tie honoured, no "now minus TTL" filter), written to the online store by the Ray workers, each
    its shard. A failed write fails the materialization (Feast's own distributed write logs it and
    reports success), and each worker opens the online store afresh (the driver's store holds a
    connection that cannot be shipped: Feast's write failed on it for SQLite)."""

    def _materialize_one(self, registry: BaseRegistry, task: Any, from_offline_store: bool = False, **kwargs: Any) -> Any:
        view = task.feature_view
        job_id = f"{view.name}-{task.start_time}-{task.end_time}"
        try:
            written = self._write_latest(registry, view, task.start_time, task.end_time, task.project)
        except Exception as exc:  # the provider raises it again
            return RayMaterializationJob(job_id=job_id, status=MaterializationJobStatus.ERROR, error=exc)
        return RayMaterializationJob(job_id=job_id, status=MaterializationJobStatus.SUCCEEDED, result=written)

    def _write_latest(self, registry: BaseRegistry, view: FeatureView, start: Any, end: Any, project: str) -> int:
        entities = [registry.get_entity(name, project) for name in view.entities]
        join_keys, features, timestamp_field, created_column = _get_column_names(view, entities)
        latest = self.offline_store.pull_latest_from_table_or_query(
            config=self.repo_config, data_source=view.batch_source, join_key_columns=join_keys,
            feature_name_columns=features, timestamp_field=timestamp_field,
            created_timestamp_column=created_column, start_date=start, end_date=end,
        )
        store_class, config = type(self.online_store), self.repo_config
        key_types = {column.name: column.dtype.to_value_type() for column in view.entity_columns}

        def write(batch: pa.Table) -> pa.Table:
            # Feast converts only the first chunk of a Table (its ``to_batches()[0]``; a grouped
            # Ray batch has one chunk per group): hand it the record batches one by one.
            rows = [row for chunk in batch.to_batches() for row in _convert_arrow_to_proto(chunk, view, key_types)]
            if rows:
                store_class().online_write_batch(config=config, table=view, data=rows, progress=None)
            return pa.table({"written": [len(rows)]})

        written = latest.to_ray_dataset().map_batches(write, batch_format="pyarrow", zero_copy_batch=True).to_pandas()
        return int(written["written"].sum())
