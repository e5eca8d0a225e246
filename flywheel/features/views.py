"""A use case's Feast feature views, generated from its declaration (:mod:`flywheel.aggregations`):
one view per entity it declares aggregations for, named ``<entity>_features``, keyed by the entity's
join key, holding the entity's aggregations in declaration order, with a TTL of its longest window
(a row older than every window of its view holds nothing a request may use)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from flywheel.aggregations import Aggregation
from flywheel.usecase import UseCase

VIEW_SUFFIX = "_features"


@dataclass(frozen=True)
class View:
    """One entity's feature view."""

    name: str
    entity: str
    join_key: str
    key_type: str  # the join key's contract type (string, int64, ...); the feature store holds it as text
    features: dict[str, str]  # feature name -> Feast type name (Int64, Float64, String), in order
    aggregations: tuple[tuple[str, Aggregation], ...]
    ttl: dt.timedelta

    def refs(self) -> list[str]:
        """Its features as ``view:feature``, as Feast's retrieval calls want them."""
        return [f"{self.name}:{name}" for name in self.features]


def feast_type(usecase: UseCase, aggregation: Aggregation) -> str:
    """The Feast type of an aggregation's values: whole numbers for counts, text for the last value
    of a text column, else a float (means, spreads, times, and numbers that may be null)."""
    if aggregation.is_integer():
        return "Int64"
    contract = usecase.contract
    columns = contract.sources[aggregation.source].columns if aggregation.source else contract.columns
    column = columns.get(aggregation.column or "")
    if aggregation.op == "last" and column is not None and column.type == "string":
        return "String"
    return "Float64"


def views_of(usecase: UseCase) -> list[View]:
    """The feature views of ``usecase``, in the order its declaration names its entities."""
    views = []
    for entity, named in usecase.features.named().items():
        key = usecase.contract.entities[entity]
        views.append(View(
            name=f"{entity}{VIEW_SUFFIX}", entity=entity, join_key=key, key_type=usecase.contract.columns[key].type,
            features={name: feast_type(usecase, a) for name, a in named}, aggregations=tuple(named),
            ttl=max(a.window for _, a in named),
        ))
    return views


def views_of_model(meta: dict) -> list[View] | None:
    """The feature views a model version was trained with, as its card records them (None for a
    version from before they were recorded). A version from before the TTL and the aggregations
    were recorded: TTL 0 (not checked) and no aggregations (no live updates)."""
    if meta.get("views") is None:
        return None
    return [View(v["name"], v["entity"], v["join_key"], v["key_type"], dict(v["features"]),
                 tuple((name, Aggregation.model_validate(a)) for name, a in v.get("aggregations", [])),
                 dt.timedelta(seconds=v.get("ttl_s", 0)))
            for v in meta["views"]]


def feature_refs(views: list[View]) -> list[str]:
    """Every feature of every view as ``view:feature``."""
    return [ref for view in views for ref in view.refs()]


def feature_names(views: list[View]) -> list[str]:
    return [name for view in views for name in view.features]
