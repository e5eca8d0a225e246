"""Feast definitions: the use case's entities and feature views (:mod:`flywheel.features.views`).

They are built by a function, not at import time, because the offline tables' location changes with
every lake snapshot (the tables are content-addressed). `feature_repo/features.py` calls this for the `feast` CLI.
"""

from __future__ import annotations

from typing import Any

from flywheel.features.views import View

# Each feature row's creation time: a tie on event time goes to the row created last (a recomputed
# row appended beside the one it corrects wins, in training sets and online alike).
CREATED_COLUMN = "created_timestamp"


def build_definitions(views: list[View], tables: dict[str, str]) -> list[Any]:
    """The Feast objects to apply: each view's entity and feature view, reading the offline table at
    ``tables[view.name]``."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast import types as feast_types

    objects: list[Any] = []
    entities: dict[str, Any] = {}
    for view in views:
        if view.entity not in entities:
            # Join keys are text in the feature store, whatever their type in the contract (engine.join_key_text).
            entities[view.entity] = Entity(name=view.entity, join_keys=[view.join_key], value_type=ValueType.STRING,
                                           description=f"the use case's {view.entity} (join key {view.join_key})")
            objects.append(entities[view.entity])
    for view in views:
        source = FileSource(name=f"{view.name}_source", path=tables[view.name], timestamp_field="event_timestamp",
                            created_timestamp_column=CREATED_COLUMN)
        objects.append(FeatureView(
            name=view.name,
            entities=[entities[view.entity]],
            ttl=view.ttl,
            schema=[Field(name=name, dtype=getattr(feast_types, kind)) for name, kind in view.features.items()],
            source=source,
            online=True,
            description=f"windowed aggregations of each {view.entity}'s events (the use case's features.yaml)",
        ))
    return objects
