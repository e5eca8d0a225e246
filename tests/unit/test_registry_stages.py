"""Registry stages from an append-only event log: transitions, rollback, concurrent writers, the CLI."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.errors import IntegrityError, RegistryConflict, RegistryError
from flywheel.registry import Registry
from flywheel.storage import Storage


def publish(registry: Registry, folder: Path, n: int) -> str:
    """A version with one small file (the registry stores files; it does not read weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(f"weights {n}".encode())
    return registry.publish(folder, training_key=f"{n:08d}".ljust(64, "a"), run_id=f"train-{n}", inputs=[], meta={}).version


@pytest.fixture
def registry(tmp_path):
    return Registry(Storage(str(tmp_path / "store")), "fraud")


@pytest.fixture
def versions(registry, tmp_path):
    return [publish(registry, tmp_path / f"m{n}", n) for n in range(4)]


def test_stages_follow_candidate_canary_production_archived(registry, versions):
    v0, v1, v2, _ = versions
    assert all(registry.stage(v) == "candidate" for v in versions)
    registry.promote(v0, run_id="r0", reason="first")
    registry.start_canary(v1, run_id="r1", reason="blessed")
    assert (registry.stage(v1), registry.canary().version, registry.production().version) == ("canary", v1, v0)
    registry.promote(v1, run_id="r1", reason="canary passed")
    assert (registry.stage(v0), registry.stage(v1), registry.canary()) == ("archived", "production", None)
    registry.start_canary(v2, run_id="r2")
    registry.abort_canary(v2, run_id="r2", reason="error rate 0.2 > 0.01")
    assert registry.stage(v2) == "archived" and registry.production().version == v1
    events = registry.events()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    last = events[-1]
    assert (last.action, last.version, last.run_id, last.reason) == ("abort_canary", v2, "r2", "error rate 0.2 > 0.01")
    assert last.user and last.at and last.previous_production == v1


def test_rollback_returns_to_the_previous_production_version(registry, versions):
    v0, v1, v2, _ = versions
    for version in (v0, v1, v2):
        registry.promote(version, run_id="r")
    assert registry.rollback(run_id="r", reason="bad").version == v1
    assert registry.production().version == v1 and registry.stage(v2) == "archived"
    assert registry.rollback(run_id="r").version == v0  # a second rollback: the one before
    with pytest.raises(RegistryError, match="no previous production version"):
        registry.rollback(run_id="r")
    # The history keeps every change: three promotions, two rollbacks.
    assert [e.action for e in registry.events() if e.action != "publish"] == ["promote"] * 3 + ["rollback"] * 2


def test_refused_transitions_are_clear_errors(registry, versions):
    v0, v1, v2, _ = versions
    registry.promote(v0, run_id="r")
    with pytest.raises(RegistryError, match="already production"):
        registry.promote(v0, run_id="r")
    registry.start_canary(v1, run_id="r")
    with pytest.raises(RegistryError, match="already has a canary"):
        registry.start_canary(v2, run_id="r")
    with pytest.raises(RegistryError, match="is candidate; it cannot abort canary"):
        registry.abort_canary(v2, run_id="r", reason="x")
    with pytest.raises(RegistryConflict, match="another promotion landed first"):
        registry.promote(v2, run_id="r", expected_production="someone-else")
    with pytest.raises(RegistryError, match="has no version 'nope'"):
        registry.promote("nope", run_id="r")


def test_an_edited_event_log_is_refused(registry, versions):
    registry.promote(versions[0], run_id="r")
    registry.storage.delete(f"{registry.root}/events/{1:010d}.json")
    with pytest.raises(IntegrityError, match="missing event 1"):
        registry.production()


# ------------------------------------------------------------------ two processes at once
def _promote_at_barrier(root: str, version: str, expected: str, barrier, results) -> None:
    registry = Registry(Storage(root), "fraud")
    barrier.wait()
    try:
        registry.promote(version, run_id=f"proc-{os.getpid()}", reason="race", expected_production=expected)
        results.put(("won", version))
    except RegistryConflict as exc:
        results.put(("lost", str(exc)))


def _promote_many(root: str, versions: list[str], barrier, results) -> None:
    registry = Registry(Storage(root), "fraud")
    barrier.wait()
    done = 0
    for version in versions:
        registry.promote(version, run_id=f"proc-{os.getpid()}", reason="stress")
        done += 1
    results.put(done)


def test_two_processes_promoting_at_once_one_wins_and_the_history_is_intact(registry, versions):
    """Both decided against production v0 and race: exactly one promotion lands, the other is refused,
    no event is lost or overwritten (with a read-modify-write of one state file, both 'succeed')."""
    v0, v1, v2, _ = versions
    registry.promote(v0, run_id="r0")
    context = multiprocessing.get_context("spawn")
    for attempt in range(3):  # each round: a fresh race from the same start
        barrier, results = context.Barrier(2), context.Queue()
        procs = [context.Process(target=_promote_at_barrier, args=(registry.storage.root, v, registry.production().version, barrier, results))
                 for v in (v1, v2)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
            assert proc.exitcode == 0
        won = [o[1] for o in outcomes if o[0] == "won"]
        assert len(won) == 1, outcomes
        assert registry.production().version == won[0]
        registry.rollback(run_id="reset")  # back to v0 for the next round
    events = registry.events()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.action for e in events if e.action != "publish"] == ["promote"] + ["promote", "rollback"] * 3


def test_concurrent_promotions_never_lose_an_event(registry, versions):
    """Four processes promote ten times each with no expectation (each retries a lost sequence
    number): all 40 promotions are in the log, and each one's previous production is the one before."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    tmp = Path(registry.storage.root).parent
    plan = [[publish(registry, tmp / f"p{p}-{k}", 100 + p * 10 + k) for k in range(10)] for p in range(4)]
    procs = [context.Process(target=_promote_many, args=(registry.storage.root, plan[p], barrier, results)) for p in range(4)]
    for proc in procs:
        proc.start()
    done = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert done == [10] * 4
    promotions = [e for e in registry.events() if e.action == "promote"]
    assert len(promotions) == 40 and sorted(e.version for e in promotions) == sorted(sum(plan, []))
    for before, after in zip(promotions, promotions[1:]):
        assert after.previous_production == before.version
    assert registry.production().version == promotions[-1].version


# ------------------------------------------------------------------ the CLI
def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLYWHEEL_HOME=str(home), FLYWHEEL_ACTOR="alice")
    return subprocess.run([sys.executable, "-m", "flywheel.cli", "models", *args], capture_output=True, text=True, env=env, timeout=120)


def test_models_cli_lists_shows_promotes_and_rolls_back(tmp_path):
    home = tmp_path / "home"
    registry = Registry(Storage(str(home / "store" / "fraud")), "fraud")
    v0, v1 = (publish(registry, tmp_path / f"m{n}", n) for n in range(2))
    assert cli(home, "promote", v0, "--reason", "first").returncode == 0
    result = cli(home, "promote", v1, "--reason", "better")
    assert result.returncode == 0 and f"{v1} is production (was {v0})" in result.stdout
    listing = cli(home, "list").stdout
    assert v0 in listing and v1 in listing and "archived" in listing and "production" in listing
    shown = json.loads(cli(home, "show", v1).stdout)
    assert shown["stage"] == "production" and shown["history"][-1]["user"] == "alice" and shown["history"][-1]["reason"] == "better"
    result = cli(home, "rollback", "--reason", "alerts")
    assert result.returncode == 0 and f"{v0} is production again (was {v1})" in result.stdout
    assert registry.production().version == v0
    result = cli(home, "rollback")
    assert result.returncode != 0 and "no previous production version" in result.stderr and "Traceback" not in result.stderr
    result = cli(home, "show", "nope")
    assert result.returncode != 0 and "has no version 'nope'" in result.stderr


def test_a_registry_from_before_the_event_log_keeps_its_production_version(registry, versions):
    """Stores written by the old registry kept state.json: its promotions become the first events."""
    v0, v1, _, _ = versions
    for uri in registry.storage.list(f"{registry.root}/events"):
        registry.storage.delete(uri)
    registry.storage.write_json(f"{registry.root}/state.json", {"production": v1, "history": [
        {"version": v0, "stage": "production", "previous": None, "run_id": "old-1", "reason": "", "at": "2026-11-01T00:00:00+00:00"},
        {"version": v1, "stage": "production", "previous": v0, "run_id": "old-2", "reason": "", "at": "2026-11-02T00:00:00+00:00"}]})
    assert registry.production().version == v1 and registry.stage(v0) == "archived"
    assert registry.rollback(run_id="r").version == v0
    assert [e.action for e in registry.events()] == ["promote", "promote", "rollback"]
