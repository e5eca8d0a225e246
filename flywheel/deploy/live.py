"""The live feature worlds of what is served: production's and the canary's, each kept current by
the events of the log (:mod:`flywheel.features.events`), whatever the gate decided.

A world is brought live once: its contract and feature views (with their aggregations) are the ones
its model version recorded when it was trained (a world never gets features computed from another
declaration); its buffer is seeded from the newest snapshot of the lake its training set came from,
and every entity within reach is rewritten at the snapshot's end (a production world built from an
older snapshot thereby gets the batches published since: "production stays fresh whatever the gate
decides"). From then on the updater applies each event batch to every live world.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

import pandas as pd

from flywheel import lake as lakes
from flywheel import lineage
from flywheel.config import Settings
from flywheel.contract import parse_contract
from flywheel.errors import DataError, FeatureStoreError
from flywheel.features.build import TrainingSet, world_of_model
from flywheel.features.events import GROUP, Updater, hold_updater_lock, open_event_log, parse_events
from flywheel.features.incremental import source_rows
from flywheel.features.live import LiveFeatures
from flywheel.features.online_write import OnlineWriter
from flywheel.features.views import views_of_model
from flywheel.fingerprint import code_fingerprint
from flywheel.registry import ModelVersion, Registry
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)


def served_versions(registry: Registry) -> list[ModelVersion]:
    """Production and, during a release, the canary: the versions whose worlds serve requests."""
    state = registry.state()
    versions = [state.production] if state.production else []
    versions += [version for version, stage in state.stages.items() if stage == "canary" and version not in versions]
    return [registry.get(version) for version in versions]


def lake_of(storage: Storage, meta: dict[str, Any]) -> str:
    """The lake a model version's training set was built from (its lineage names the snapshot)."""
    training_set = TrainingSet.from_dict(storage.read_json(f"{meta['training_set']['uri']}/manifest.json")) \
        if storage.exists(f"{meta['training_set']['uri']}/manifest.json") else None
    train_uri = training_set.train_uri if training_set else f"{meta['training_set']['uri']}/train.parquet"
    record = lineage.lookup(storage, train_uri) or {}
    for item in record.get("inputs", []):
        if f"/{lakes.SNAPSHOTS}/" in item.get("uri", ""):
            return lakes.load_snapshot(storage, item["uri"]).lake_uri
    raise DataError(f"the training set {meta['training_set']['uri']} names no lake snapshot in its lineage: "
                    "cannot seed live features")


def bring_live(settings: Settings, storage: Storage, version: ModelVersion, event_log: Any = None) -> LiveFeatures | None:
    """The live state of a version's world, seeded from its lake's newest snapshot and the events
    the log holds (applied before, by this updater or an earlier one), and written (None for a
    version that recorded no aggregations: trained before live features existed)."""
    meta = version.meta
    views = views_of_model(meta)
    if not meta.get("contract") or views is None or not any(view.aggregations for view in views):
        log.warning("live: version %s recorded no feature aggregations; its world is not updated live", version.version)
        return None
    engine = code_fingerprint("flywheel.features.engine")
    if meta.get("engine_code") and meta["engine_code"] != engine:
        # A world never serves features computed by other code than the one that built it.
        log.error("live: version %s was trained with other aggregation code (%s, here %s); its world is not "
                  "updated live: retrain it with this code", version.version, meta["engine_code"][:12], engine[:12])
        return None
    contract = parse_contract(meta["contract"], "the model's recorded contract")
    world = world_of_model(storage, meta)
    live = LiveFeatures(contract, views, OnlineWriter(settings, world, views))
    lake_uri = lake_of(storage, meta)
    snapshot = lakes.latest_snapshot(storage, lake_uri)
    live.lake = (lake_uri, snapshot.sha256 if snapshot else "")  # a newer snapshot brings the world live again
    if snapshot is None or not snapshot.parts:
        if event_log is not None:
            live.apply(parse_events(event_log.history(), contract)[0])
        return live
    first_day = (pd.Timestamp(max(p.get("date", "") for p in snapshot.parts)) - live.reach).strftime("%Y-%m-%d")
    recent = [part for part in snapshot.parts if part.get("date", "9999") >= first_day]
    rows = lakes.read_snapshot(storage, dataclasses.replace(snapshot, parts=recent), contract.arrow_schema()).to_pandas()
    usecase = load_usecase(settings.usecase)
    sources = source_rows(storage, snapshot, usecase, first=first_day) if contract.sources else {}
    live.seed(rows, sources)
    if event_log is not None:
        events, _ = parse_events(event_log.history(), contract)  # repeats of lake rows are skipped by id
        live.apply(events)
    written = live.rebuild()
    log.info("live: world %s of version %s seeded with %d rows; %s entity rows written in %.1fs",
             world, version.version, len(live.rows), sum(written.written.values()), written.seconds)
    return live


class LiveWorlds:
    """The live states of the served worlds, refreshed from the registry at most every ``refresh_s``."""

    def __init__(self, settings: Settings, refresh_s: float = 10.0, pinned: str | None = None, event_log: Any = None) -> None:
        self.settings = settings
        self.event_log = event_log  # whose history a world brought live starts from
        self.pinned = pinned  # a server pinned to a version: only that version's world
        self.storage = Storage.from_settings(settings)
        self.registry = Registry(self.storage, settings.model_name)
        self.refresh_s = refresh_s
        self._worlds: dict[str, LiveFeatures] = {}
        self._checked = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, LiveFeatures]:
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            self._checked = now
            with self._lock:
                self._refresh()
        return dict(self._worlds)

    def _lake_moved(self, live: LiveFeatures) -> bool:
        lake_uri, sha = getattr(live, "lake", ("", ""))
        if not lake_uri:
            return False
        try:
            return _lake_snapshot_sha(self.storage, lake_uri) != sha
        except Exception as exc:  # unreadable now: keep the world as it is
            log.warning("live: cannot read the lake %s (%s)", lake_uri, exc)
            return False

    def _refresh(self) -> None:
        try:
            versions = [self.registry.get(self.pinned)] if self.pinned else served_versions(self.registry)
        except Exception as exc:  # the registry is unreachable: keep updating what is live
            log.warning("live: cannot read the served versions (%s); updating %d world(s)", exc, len(self._worlds))
            return
        wanted: dict[str, ModelVersion] = {}
        for version in versions:
            wanted.setdefault(world_of_model(self.storage, version.meta), version)
        for world in list(self._worlds):
            if world not in wanted:
                self._worlds.pop(world).writer.close()
            elif self._lake_moved(self._worlds[world]):
                # A batch was published since the world was brought live (a pipeline run, whatever its
                # gate decided): bring it live again from the new snapshot, so production stays fresh.
                log.info("live: the lake of world %s has a new snapshot; bringing it live again", world)
                self._worlds.pop(world).writer.close()
        for world, version in wanted.items():
            if world not in self._worlds:
                try:
                    live = bring_live(self.settings, self.storage, version, self.event_log)
                except (DataError, FeatureStoreError) as exc:
                    log.error("live: world %s of version %s cannot be brought live: %s", world, version.version, exc)
                    continue
                if live is not None:
                    self._worlds[world] = live


def _lake_snapshot_sha(storage: Storage, lake_uri: str) -> str:
    snapshot = lakes.latest_snapshot(storage, lake_uri)
    return snapshot.sha256 if snapshot else ""


def wall_clock() -> pd.Timestamp:
    """Now, in UTC: the watermark of a live world under ``live.clock: wall``."""
    return pd.Timestamp.now(tz="UTC")


def updater_for(settings: Settings, pinned: str | None = None) -> Updater:
    """The updater of the settings' use case: its event log, its served worlds (or a pinned version's)."""
    usecase = load_usecase(settings.usecase)
    live = settings.live
    # A server pinned to a version (a release's stable and candidate servers) updates that version's
    # world from a position of its own in the log: both see every event.
    group = GROUP if not pinned else f"{GROUP}@{pinned}"
    lock = hold_updater_lock(settings, group)
    event_log = open_event_log(settings, group)
    clock = wall_clock if live.clock == "wall" else None
    updater = Updater(event_log, usecase.contract, LiveWorlds(settings, live.refresh_s, pinned, event_log),
                      batch_max=live.batch_max, attempts=live.attempts, clock=clock,
                      retention_s=live.retention_days * 86_400 if live.retention_days is not None else None)
    updater.lock = lock  # held as long as the updater lives
    return updater


def start_updater(settings: Settings, pinned: str | None = None) -> tuple[threading.Thread, threading.Event]:
    """The updater in a background thread (``flywheel serve`` with ``live.enabled``)."""
    stop = threading.Event()
    updater = updater_for(settings, pinned)
    thread = threading.Thread(target=updater.run, args=(stop, settings.live.poll_ms / 1000), name="flywheel-live-updater", daemon=True)
    thread.start()
    return thread, stop
