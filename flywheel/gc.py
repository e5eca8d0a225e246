"""`flywheel gc`: remove what no kept model, canary or recent run of a use case needs.

Every training set brings a feature world (a Feast registry and a SQLite online store, or a Redis
project), its offline tables and the training set itself; the features step keeps day tables for
incremental builds. They pile up. What is kept, in the use case's namespace:

- the **kept model versions**: production, the canary, the ``gc.keep_previous`` versions that were
  production last (what a rollback returns to) and the ``gc.keep_newest`` newest versions (candidates
  a person may still promote); for each, its training set, its offline tables and its feature world;
- whatever a kept version's **lineage** names, whatever else this policy says (never deleted);
- the **latest features step** (what `flywheel features` and the Feast CLI read) and everything
  made within the last ``gc.keep_days`` days (a run in progress, or one a person is looking at);
- the day tables a next build of the lake's latest snapshot would reuse.

Everything else of those kinds goes: training sets, offline tables, day tables and feature worlds
(their folder, and in Redis their project's keys). Model versions, the lake, reports, runs and the
registry's event log are never touched. ``--dry-run`` lists what would go, and why the rest stays.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass, field
from typing import Any

from flywheel import lineage
from flywheel.config import Settings
from flywheel.errors import ArtifactNotFound, StorageError
from flywheel.features import store as feast_store
from flywheel.registry import Registry
from flywheel.storage import Storage, join

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What gc keeps (with why) and removes."""

    keep: dict[str, str] = field(default_factory=dict)  # key16 -> why it stays
    remove_sets: list[str] = field(default_factory=list)  # training sets and offline tables (folders)
    remove_days: list[str] = field(default_factory=list)  # day-table folders
    remove_worlds: list[str] = field(default_factory=list)  # feature worlds (names)
    protected: set[str] = field(default_factory=set)  # URIs a kept version's lineage names

    def to_dict(self) -> dict[str, Any]:
        return {"keep": self.keep, "remove_sets": self.remove_sets, "remove_days": self.remove_days,
                "remove_worlds": self.remove_worlds}


def kept_versions(registry: Registry, keep_previous: int, keep_newest: int) -> dict[str, str]:
    """version -> why it is kept."""
    state = registry.state()
    kept: dict[str, str] = {}
    if state.production:
        kept[state.production] = "production"
    if state.canary:
        kept.setdefault(state.canary, "canary")
    previous = [e.previous_production for e in reversed(registry.events())
                if e.action in ("promote", "rollback") and e.previous_production]
    for version in list(dict.fromkeys(previous))[:keep_previous]:
        kept.setdefault(version, "a recent production (rollback target)")
    for version in registry.versions()[-keep_newest:] if keep_newest else []:
        kept.setdefault(version, "one of the newest versions")
    return kept


def _key_of(storage: Storage, version_meta: dict[str, Any]) -> str:
    uri = (version_meta.get("training_set") or {}).get("uri")
    if not uri:
        return ""
    try:
        return str(storage.read_json(f"{uri}/manifest.json").get("key", ""))[:16]
    except ArtifactNotFound:
        return ""


def _folders(storage: Storage, prefix: str) -> set[str]:
    """The first-level folder names below ``prefix``."""
    names = set()
    for uri in storage.list(prefix):
        rest = uri[len(prefix):].lstrip("/")
        if "/" in rest:
            names.add(rest.split("/", 1)[0])
    return names


def _recent(storage: Storage, uri: str, since: dt.datetime) -> bool:
    """Whether the artifact's lineage record was written after ``since``."""
    entry = lineage.lookup(storage, uri)
    when = (entry or {}).get("time") or (entry or {}).get("created_at") or ""
    try:
        return bool(when) and dt.datetime.fromisoformat(str(when).replace("Z", "+00:00")) >= since
    except ValueError:
        return False


def plan(storage: Storage, settings: Settings, now: dt.datetime | None = None) -> Plan:
    """What gc would keep and remove now (nothing is changed)."""
    from flywheel.features import incremental
    from flywheel.lake import latest_snapshot
    from flywheel.usecase import load_usecase

    cfg = settings.gc
    now = now or dt.datetime.now(dt.timezone.utc)
    since = now - dt.timedelta(days=cfg.keep_days)
    result = Plan()
    registry = Registry(storage, settings.model_name)
    for version, why in kept_versions(registry, cfg.keep_previous, cfg.keep_newest).items():
        model = registry.get(version)
        key = _key_of(storage, model.meta)
        if key:
            result.keep[key] = f"model {version}: {why}"
        tree = lineage.trace(storage, model.manifest_uri)
        stack = [tree]
        while stack:
            node = stack.pop()
            if node.get("uri"):
                result.protected.add(node["uri"])
            stack.extend(node.get("inputs", []))
    try:
        latest = storage.read_json(storage.uri("features", "offline", "latest.json"))
        result.keep.setdefault(str(latest.get("key", ""))[:16], "the latest features step")
    except ArtifactNotFound:
        pass
    sets_root, tables_root = storage.uri("datasets", "training"), storage.uri("features", "offline")
    candidates = _folders(storage, sets_root) | (_folders(storage, tables_root) - {"days"})
    for key in sorted(candidates - set(result.keep)):
        manifest = join(sets_root, key, "manifest.json")
        if storage.exists(manifest) and _recent(storage, manifest, since):
            result.keep[key] = f"made within the last {cfg.keep_days:g} days"
            continue
        for root in (sets_root, tables_root):
            folder = join(root, key)
            if storage.list(folder):
                result.remove_sets.append(folder)
    worlds_dir = feast_store.feast_home(settings) / "worlds"
    worlds = {p.name for p in worlds_dir.iterdir() if p.is_dir()} if worlds_dir.is_dir() else set()
    result.remove_worlds = sorted(w for w in worlds if w not in result.keep)
    # Day tables: those a next build of the latest snapshot would reuse stay.
    usecase = load_usecase(settings.usecase)
    lake_uri = storage.uri("lake")
    snapshot = latest_snapshot(storage, lake_uri)
    wanted = {key[:16] for key in incremental.day_keys(snapshot, usecase).values()} if snapshot else set()
    days_root = join(tables_root, "days")
    result.remove_days = [join(days_root, key) for key in sorted(_folders(storage, days_root) - wanted)]
    # Never what a kept version's lineage names (a policy that disagreed would be a bug: keep it).
    result.remove_sets = [f for f in result.remove_sets if not any(uri.startswith(f + "/") for uri in result.protected)]
    result.remove_days = [f for f in result.remove_days if not any(uri.startswith(f + "/") for uri in result.protected)]
    return result


def collect(storage: Storage, settings: Settings, dry_run: bool = False, now: dt.datetime | None = None) -> Plan:
    """Carry out :func:`plan` (unless ``dry_run``): folders of storage, world folders, Redis projects."""
    result = plan(storage, settings, now)
    if dry_run:
        return result
    for folder in result.remove_sets + result.remove_days:
        storage.delete_tree(folder)
    for world in result.remove_worlds:
        _remove_world(settings, world)
    log.info("gc: removed %d training sets or tables, %d day tables, %d feature worlds",
             len(result.remove_sets), len(result.remove_days), len(result.remove_worlds))
    return result


def _remove_world(settings: Settings, world: str) -> None:
    """A feature world's folder, and (with Redis online stores) its project's keys."""
    shutil.rmtree(feast_store.world_dir(settings, world), ignore_errors=True)
    if settings.features.online_store == "redis":
        project = feast_store.feast_project(settings, world)
        try:
            client = feast_store.redis_client(settings.features.redis_connection)
            keys = list(client.scan_iter(match=f"*{project}".encode(), count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start:start + 1000])
        except Exception as exc:  # the server's error, named
            raise StorageError(f"gc could not remove feature world {world}'s keys from Redis: {type(exc).__name__}: {exc}") from exc
