"""`flywheel gc` (flywheel/gc.py): what no kept model, canary or recent run needs goes; what they need,
and anything a kept model's lineage names, stays; model versions are never touched."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from flywheel import lineage
from flywheel.cli import main
from flywheel.config import load_settings
from flywheel.features import store as feast_store
from flywheel.gc import collect, plan
from flywheel.registry import Registry
from flywheel.storage import Storage

LATER = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=30)  # everything made now is old by then


def key(n: int) -> str:
    return f"{n:02d}" * 32


@pytest.fixture
def loop(tmp_path, monkeypatch):
    """Seven features builds (training set, offline tables, feature world); six became model
    versions: v0..v3 were production in turn (v3 now), v4 is the canary, v5 the newest candidate,
    build 6 trained nothing. v3's lineage names build 0's training set."""
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_GC__KEEP_PREVIOUS": "2", "FLYWHEEL_GC__KEEP_NEWEST": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    storage = Storage.from_settings(settings)
    registry = Registry(storage, settings.model_name)
    versions = []
    for n in range(7):
        folder = storage.uri("datasets", "training", key(n)[:16])
        train = storage.write_bytes(f"{folder}/train.parquet", f"rows {n}".encode())
        manifest = storage.write_json(f"{folder}/manifest.json", {"key": key(n), "uri": folder})
        lineage.record(storage, manifest, step="features", run_id=f"run-{n}", inputs=[train])
        storage.write_bytes(storage.uri("features", "offline", key(n)[:16], "card_features.parquet"), b"table")
        world = feast_store.world_dir(settings, key(n)[:16])
        world.mkdir(parents=True)
        (world / "registry.db").write_bytes(b"feast")
        if n == 6:
            continue
        model = tmp_path / f"m{n}"
        model.mkdir()
        (model / "model.bin").write_bytes(f"weights {n}".encode())
        inputs = [storage.stat(storage.uri("datasets", "training", key(0)[:16], "train.parquet")).to_dict()] if n == 3 else []
        versions.append(registry.publish(model, training_key=key(n), run_id=f"train-{n}", inputs=inputs,
                                         meta={"training_set": {"uri": folder}}).version)
    for version in versions[:4]:
        registry.promote(version, run_id="r", reason="better")
    registry.start_canary(versions[4], run_id="r", reason="trying")
    storage.write_json(storage.uri("features", "offline", "latest.json"), {"key": key(5)})
    storage.write_bytes(storage.uri("features", "offline", "days", "feedfacefeedface", "card_features.parquet"), b"day")
    return settings, storage, registry, versions


def test_the_plan_keeps_what_kept_versions_need_and_removes_the_rest(loop):
    settings, storage, registry, versions = loop
    result = plan(storage, settings, now=LATER)
    kept = {k: why for k, why in result.keep.items()}
    assert kept[key(3)[:16]].endswith("production") and kept[key(4)[:16]].endswith("canary")
    assert "rollback target" in kept[key(2)[:16]] and "rollback target" in kept[key(1)[:16]]
    assert "newest" in kept[key(5)[:16]] or "latest features step" in kept[key(5)[:16]]
    removed = set(result.remove_sets)
    assert storage.uri("datasets", "training", key(6)[:16]) in removed  # a build that trained nothing
    assert storage.uri("features", "offline", key(6)[:16]) in removed
    assert storage.uri("features", "offline", key(0)[:16]) in removed  # v0 is too old a production...
    assert storage.uri("datasets", "training", key(0)[:16]) not in removed  # ...but v3's lineage names its training set
    assert set(result.remove_worlds) == {key(0)[:16], key(6)[:16]}
    assert result.remove_days == [storage.uri("features", "offline", "days", "feedfacefeedface")]  # no lake: nothing reuses it


def test_collect_removes_only_what_the_plan_says_and_never_a_model(loop):
    settings, storage, registry, versions = loop
    before = registry.versions()
    assert collect(storage, settings, dry_run=True, now=LATER).remove_worlds  # a dry run...
    assert feast_store.world_dir(settings, key(6)[:16]).exists()  # ...changes nothing
    collect(storage, settings, now=LATER)
    assert not feast_store.world_dir(settings, key(6)[:16]).exists() and not feast_store.world_dir(settings, key(0)[:16]).exists()
    for n in (1, 2, 3, 4, 5):
        assert feast_store.world_dir(settings, key(n)[:16]).exists()
        assert storage.exists(storage.uri("datasets", "training", key(n)[:16], "manifest.json"))
    assert storage.exists(storage.uri("datasets", "training", key(0)[:16], "train.parquet"))
    assert not storage.list(storage.uri("datasets", "training", key(6)[:16]))
    assert registry.versions() == before and registry.production().version == versions[3]
    assert collect(storage, settings, now=LATER).remove_sets == []  # run again: nothing left to do


def test_what_was_made_recently_stays(loop):
    settings, storage, _, _ = loop
    result = plan(storage, settings)  # now: build 6 was made moments ago, by a run that may still be going
    assert "made within the last 7 days" in result.keep[key(6)[:16]]
    assert storage.uri("datasets", "training", key(6)[:16]) not in result.remove_sets


def test_the_command_prints_the_plan(loop, capsys):
    assert main(["gc", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 0 training sets and tables" in out  # everything is recent
    assert f"keep {key(3)[:16]}: model" in out and "production" in out
