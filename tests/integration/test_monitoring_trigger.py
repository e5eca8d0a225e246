"""The trigger (flywheel/monitoring/trigger.py): every decision recorded with its evidence; a crossing
submits the training pipeline on Kubeflow Pipelines (the KFP API stand-in on loopback, checking the
request bodies) at most once at a time and not again within the cool-down."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from flywheel.config import load_settings
from flywheel.kfp_client import KfpClient
from flywheel.monitoring.trigger import decide, lease_uri
from flywheel.storage import Storage
from pipelines.training import compile_pipeline
from tests.kfp_standin import kfp_standin

TOKEN = "trigger-test-token"
SOURCE = "s3://landing/fraud/raw"
FINDING = {"kind": "drift", "subject": "input.amount", "figure": "psi", "value": 1.43, "threshold": 0.2}


def result(run_id: str, findings: list[dict] | None = None, judged: bool = True) -> dict:
    return {"run_id": run_id, "since": "2026-10-20T00:00:00+00:00", "until": "2026-10-27T00:00:00+00:00", "rows": 9000,
            "model_version": "20261020-000000-abcdef12", "judged": judged, "findings": findings or [],
            "result_uri": f"/x/monitoring/runs/{run_id}/result.json", "report_uri": f"/x/monitoring/runs/{run_id}/report.html"}


@pytest.fixture
def api():
    with kfp_standin(token=TOKEN) as standin:
        yield standin


@pytest.fixture
def kfp_settings(api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # kfp.Client keeps a context file there
    env = {"FLYWHEEL_HOME": str(tmp_path / "fh"), "FLYWHEEL_KFP__HOST": api.url, "FLYWHEEL_KFP_TOKEN": TOKEN,
           "FLYWHEEL_KFP__TOKEN_PATH": str(tmp_path / "no-token-file"), "FLYWHEEL_MONITORING__TRIGGER_TARGET": "kfp",
           "FLYWHEEL_MONITORING__RETRAIN_SOURCE": SOURCE}
    return lambda **extra: load_settings(env={**env, **extra})


def upload_training(settings, tmp_path: Path) -> None:
    KfpClient(settings).upload(compile_pipeline(tmp_path / "compiled", settings), "flywheel-training")


def test_nothing_crossed_is_recorded_and_submits_nothing(kfp_settings, api):
    settings = kfp_settings()
    storage = Storage.from_settings(settings)
    decision = decide(storage, settings, result("mon-quiet"))
    assert decision["action"] == "none" and decision["reason"] == "nothing crossed a threshold"
    assert storage.read_json(decision["uri"]) == decision
    small = decide(storage, settings, result("mon-small", judged=False))
    assert small["reason"] == "the window was too small to judge"
    assert not api.runs and not storage.exists(lease_uri(storage))


def test_a_crossing_submits_the_newest_uploaded_training_pipeline_with_the_decision_as_its_trigger(kfp_settings, api, tmp_path):
    """Bug caught: a trigger that runs without the evidence (the model's lineage could not name why it
    was trained), or runs a pipeline nobody uploaded."""
    settings = kfp_settings()
    storage = Storage.from_settings(settings)
    upload_training(settings, tmp_path)
    decision = decide(storage, settings, result("mon-1", [FINDING]))
    assert decision["action"] == "submitted", decision
    assert decision["evidence"] == [FINDING] and "input.amount" in decision["reason"]
    [run] = api.runs.values()
    assert run["runtime_config"]["parameters"] == {"source_uri": SOURCE, "triggered_by": decision["uri"]}
    assert run["display_name"] == "triggered-mon-1"
    assert decision["training_run"]["run_id"] == run["run_id"]
    assert storage.read_json(lease_uri(storage))["run_id"] == run["run_id"]


def test_a_second_crossing_waits_for_the_run_in_flight_then_for_the_cool_down(kfp_settings, api, tmp_path):
    settings = kfp_settings()
    storage = Storage.from_settings(settings)
    upload_training(settings, tmp_path)
    first = decide(storage, settings, result("mon-1", [FINDING]))
    run_id = first["training_run"]["run_id"]
    api.set_state(run_id, "RUNNING")
    held = decide(storage, settings, result("mon-2", [FINDING]))
    assert held["action"] == "held" and f"{run_id}" in held["reason"] and "still running" in held["reason"]
    api.set_state(run_id, "SUCCEEDED")
    cooling = decide(storage, settings, result("mon-3", [FINDING]))
    assert cooling["action"] == "held" and "cool-down" in cooling["reason"], cooling
    assert not storage.exists(lease_uri(storage))  # the ended run's lease was released
    no_cool_down = kfp_settings(FLYWHEEL_MONITORING__COOLDOWN_H="0")
    again = decide(storage, no_cool_down, result("mon-4", [FINDING]))
    assert again["action"] == "submitted"
    assert len(api.runs) == 2


def test_two_monitors_crossing_at_the_same_moment_submit_one_run(kfp_settings, api, tmp_path):
    """Bug caught: a check-then-act race (both see no run in flight, both submit)."""
    settings = kfp_settings()
    storage = Storage.from_settings(settings)
    upload_training(settings, tmp_path)
    decisions: list[dict] = []
    barrier = threading.Barrier(4)

    def one(index: int) -> None:
        barrier.wait()
        decisions.append(decide(storage, settings, result(f"mon-race-{index}", [FINDING])))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(d["action"] for d in decisions) == ["held", "held", "held", "submitted"], decisions
    assert len(api.runs) == 1


def test_a_failed_submission_is_recorded_with_its_cause_and_frees_the_slot(kfp_settings, api):
    settings = kfp_settings()  # nothing uploaded: the trigger has no pipeline to run
    storage = Storage.from_settings(settings)
    decision = decide(storage, settings, result("mon-1", [FINDING]))
    assert decision["action"] == "failed"
    assert "no pipeline 'flywheel-training'" in decision["reason"] and "flywheel upload" in decision["reason"]
    assert not storage.exists(lease_uri(storage))
    missing = kfp_settings(FLYWHEEL_MONITORING__RETRAIN_SOURCE="")
    assert "monitoring.retrain_source is empty" in decide(storage, missing, result("mon-2", [FINDING]))["reason"]


def test_the_readmes_schedule_command_verbatim_makes_an_hourly_recurring_monitoring_run(api, tmp_path):
    from tests.integration.test_monitoring_fraud import readme_monitoring_lines, run_line

    schedule = readme_monitoring_lines()[-1]
    env = {"HOME": str(tmp_path / "home"), "FLYWHEEL_HOME": str(tmp_path / "fh"), "FLYWHEEL_KFP__HOST": api.url,
           "FLYWHEEL_KFP_TOKEN": TOKEN, "FLYWHEEL_KFP__TOKEN_PATH": str(tmp_path / "no-token-file")}
    done = run_line(schedule, env)
    assert done.returncode == 0, done.stdout + done.stderr
    [call] = api.calls("POST", "/recurringruns")
    body = call["body"]
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 * * * *"}}  # monitoring.schedule: hourly
    assert body["max_concurrency"] in ("1", 1) and body["no_catchup"] is True
    [pipeline] = api.pipelines.values()
    assert pipeline["display_name"] == "flywheel-monitoring"


@pytest.mark.parametrize("args,said", [
    (["--since", "garbage"], "'garbage' is not a time: give an ISO 8601 date or time"),
    (["--since", "2026-13-45"], "'2026-13-45' is not a time"),
    (["--since", "2026-10-20", "--until", "2026-10-19"], "is not before the window's end"),
    ([], "nothing was captured yet under"),
])
def test_bad_monitor_input_is_one_clear_line_and_a_failure(args, said, tmp_path):
    from tests.monitoring_scenarios import flywheel

    done = flywheel("monitor", *args, env={"FLYWHEEL_HOME": str(tmp_path)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and said in done.stderr, done.stderr


def test_talking_to_kfp_in_process_leaves_feasts_sqlite_converters_alone(api, tmp_path):
    """Bug caught: kfp.Client imports IPython (to ask whether it runs in a notebook), whose history
    module registers sqlite3's "timestamp" converter over Feast's; every Feast SQLite read later in
    the process then failed. Found when the feature tests failed only after the trigger tests ran.
    In a fresh process, so that IPython is imported here for the first time."""
    import subprocess
    import sys

    script = f"""
import sqlite3
import feast.infra.online_stores.sqlite  # registers Feast's converters
before = dict(sqlite3.converters)
from flywheel.config import load_settings
from flywheel.kfp_client import KfpClient
settings = load_settings(env={{"FLYWHEEL_HOME": {str(tmp_path / 'fh')!r}, "FLYWHEEL_KFP__HOST": {api.url!r},
                              "FLYWHEEL_KFP_TOKEN": {TOKEN!r}, "FLYWHEEL_KFP__TOKEN_PATH": {str(tmp_path / 'none')!r}}})
KfpClient(settings).experiment_id()
import sys
assert "IPython" in sys.modules, "kfp no longer imports IPython: this test checks nothing"
assert dict(sqlite3.converters) == before, "a KFP call changed sqlite3's converters"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "HOME": str(tmp_path / "home")}, cwd=str(tmp_path))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
