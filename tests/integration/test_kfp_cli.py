"""`flywheel upload | submit | schedule | runs` through the real kfp.Client against a stand-in of the
KFP v2beta1 REST API on loopback that checks the request bodies (tests/kfp_standin.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.kfp_standin import API, kfp_standin

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-5f1c"  # a made-up bearer token: the stand-in requires exactly this one
SOURCE = "s3://lake/raw/2026-11"


def flywheel(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flywheel.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def kfp_env(tmp_path: Path, host: str, **extra: str) -> dict[str, str]:
    # HOME too: kfp.Client reads and writes ~/.config/kfp/context.json.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "KF_PIPELINES"))}
    env.update(HOME=str(tmp_path / "home"), FLYWHEEL_HOME=str(tmp_path / "fh"), FLYWHEEL_KFP__HOST=host,
               FLYWHEEL_KFP__TOKEN_PATH=str(tmp_path / "no-token-file"), PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    return result.stderr


@pytest.fixture
def api():
    with kfp_standin(token=TOKEN) as standin:
        yield standin


def test_submit_uploads_the_compiled_pipeline_once_and_runs_it_with_its_parameters(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN, FLYWHEEL_KFP__EXPERIMENT="fraud-retraining")
    out = ok(flywheel("submit", "--param", f"source_uri={SOURCE}", "--run-name", "first", env=env))
    assert "new pipeline" in out and "fraud-retraining" in out
    ok(flywheel("submit", "--param", f"source_uri={SOURCE}", "--param", "truth_uri=s3://lake/truth", "--run-name", "second",
                env=env))

    # Every request carried the bearer token (the stand-in refuses any other).
    assert api.requests and all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    # One pipeline; its content-named version was uploaded once and reused by the second submit.
    assert len(api.calls("POST", "/pipelines/upload")) == 1
    assert len(api.calls("POST", "/pipelines/upload_version")) == 1
    [pipeline] = api.pipelines.values()
    assert pipeline["display_name"] == "flywheel-training"
    content_version = next(v for v in api.versions.values() if v["display_name"].startswith("flywheel-training-"))
    assert content_version["spec"]["pipelineInfo"]["name"] == "flywheel-training"
    # One experiment, made by the first submit, found by the second.
    assert len(api.calls("POST", "/experiments")) == 1
    [experiment] = api.experiments.values()
    assert experiment["display_name"] == "fraud-retraining"
    runs = [c["body"] for c in api.calls("POST", "/runs")]
    assert [r["display_name"] for r in runs] == ["first", "second"]
    assert runs[1]["runtime_config"]["parameters"] == {"source_uri": SOURCE, "truth_uri": "s3://lake/truth"}
    assert all(r["experiment_id"] == experiment["experiment_id"] for r in runs)
    # The run's service account: the one manifests/ lets create training jobs and InferenceServices.
    assert all(r["service_account"] == "flywheel-pipeline" for r in runs)
    assert all(r["pipeline_version_reference"] == {"pipeline_id": pipeline["pipeline_id"],
                                                   "pipeline_version_id": content_version["pipeline_version_id"]} for r in runs)


def test_a_changed_pipeline_becomes_a_new_version_of_the_same_pipeline(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN)
    first = ok(flywheel("upload", env=env))
    again = ok(flywheel("upload", env=env))
    changed = ok(flywheel("upload", env=dict(env, FLYWHEEL_IMAGE="registry.example/flywheel:0.2.0")))
    assert "new pipeline" in first and "already uploaded" in again and "new version" in changed
    assert len(api.pipelines) == 1
    images = {v["display_name"]: {e["container"]["image"] for e in v["spec"]["deploymentSpec"]["executors"].values()}
              for v in api.versions.values()}
    assert {"registry.example/flywheel:0.2.0"} in images.values()
    assert len({name for name in images if name.startswith("flywheel-training-")}) == 2


def test_schedule_creates_a_cron_recurring_run_one_at_a_time_without_catch_up(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN)
    out = ok(flywheel("schedule", "--param", f"source_uri={SOURCE}", "--cron", "0 30 3 * * 1", "--name", "weekly", env=env))
    assert "weekly" in out
    [call] = api.calls("POST", "/recurringruns")
    body = call["body"]
    assert body["display_name"] == "weekly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 30 3 * * 1"}}
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["runtime_config"]["parameters"] == {"source_uri": SOURCE}
    assert body["service_account"] == "flywheel-pipeline"
    # Without --cron, the settings' schedule.
    ok(flywheel("schedule", "--param", f"source_uri={SOURCE}", env=env))
    assert api.calls("POST", "/recurringruns")[1]["body"]["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"


def test_runs_lists_the_experiments_runs_newest_first_with_their_state(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN)
    assert "no runs" in ok(flywheel("runs", env=env))
    for name in ("older", "newer"):
        ok(flywheel("submit", "--param", f"source_uri={SOURCE}", "--run-name", name, env=env))
        time.sleep(0.01)
    older, newer = (next(r for r in api.runs.values() if r["display_name"] == n) for n in ("older", "newer"))
    api.set_state(older["run_id"], "SUCCEEDED")
    api.set_state(newer["run_id"], "RUNNING")
    lines = [line for line in ok(flywheel("runs", env=env)).splitlines() if re.match(r"^[0-9a-f-]{36} ", line)]
    assert [line.split()[0] for line in lines] == [newer["run_id"], older["run_id"]]
    assert lines[0].split()[1] == "RUNNING" and lines[1].split()[1] == "SUCCEEDED"
    assert "finished -" in lines[0] and "finished -" not in lines[1]


def test_the_in_cluster_service_account_token_and_namespace_are_used(tmp_path):
    """Multi-user Kubeflow: no FLYWHEEL_KFP_TOKEN, the projected token file instead, and every call in
    the profile's namespace (the stand-in refuses experiment and pipeline calls without it)."""
    token_file = tmp_path / "token"
    token_file.write_text("projected-sa-token\n")
    with kfp_standin(token="projected-sa-token", namespace="team-fraud") as api:
        env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP__TOKEN_PATH=str(token_file), FLYWHEEL_KFP__NAMESPACE="team-fraud")
        ok(flywheel("submit", "--param", f"source_uri={SOURCE}", env=env))
        ok(flywheel("runs", env=env))
        assert all(r["headers"]["authorization"] == "Bearer projected-sa-token" for r in api.requests)
        assert api.calls("POST", "/pipelines/upload")[0]["query"]["namespace"] == "team-fraud"
        assert api.calls("POST", "/experiments")[0]["body"]["namespace"] == "team-fraud"
        # Without the namespace the same commands are refused by name.
        err = refused(flywheel("submit", "--param", f"source_uri={SOURCE}", env=dict(env, FLYWHEEL_KFP__NAMESPACE="")))
        assert "team-fraud" in err or "namespace" in err


def test_a_wrong_token_is_one_clear_error(api, tmp_path):
    err = refused(flywheel("upload", env=kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN="not-the-token")))
    assert "HTTP 401" in err and "FLYWHEEL_KFP_TOKEN" in err and "not-the-token" not in err


def test_without_a_host_the_commands_say_how_to_set_one(tmp_path):
    err = refused(flywheel("runs", env=kfp_env(tmp_path, "")))
    assert "kfp.host is not set" in err and "FLYWHEEL_KFP__HOST" in err


def test_an_unreachable_host_is_one_clear_error(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    err = refused(flywheel("runs", env=kfp_env(tmp_path, f"http://127.0.0.1:{port}", FLYWHEEL_KFP_TOKEN=TOKEN)))
    assert "cannot reach the KFP API" in err and str(port) in err
    assert time.monotonic() - started < 60


def test_parameters_are_checked_against_the_pipeline_before_anything_is_sent(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN)
    assert "--param source_uri=..." in refused(flywheel("submit", env=env))
    assert "no parameter sorce_uri" in refused(flywheel("submit", "--param", "sorce_uri=x", env=env))
    assert "NAME=VALUE" in refused(flywheel("submit", "--param", "source_uri", env=env))
    assert "six fields" in refused(flywheel("schedule", "--param", f"source_uri={SOURCE}", "--cron", "0 2 * * *", env=env))
    assert not api.calls("POST", "/runs") and not api.calls("POST", "/recurringruns")


def test_a_package_file_is_uploaded_as_given(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN)
    ok(flywheel("compile", "--out", str(tmp_path / "build"), env=env))
    package = tmp_path / "build" / "flywheel-training.yaml"
    ok(flywheel("upload", "--package", str(package), "--pipeline-name", "fraud-training", env=env))
    [pipeline] = api.pipelines.values()
    assert pipeline["display_name"] == "fraud-training"
    uploaded = [v["spec"] for v in api.versions.values()]
    assert all(spec == next(yaml.safe_load_all(package.read_text())) for spec in uploaded)
    assert "not a compiled KFP pipeline" in refused(flywheel("upload", "--package", str(REPO / "pyproject.toml"), env=env))
    assert "does not exist" in refused(flywheel("upload", "--package", str(tmp_path / "nope.yaml"), env=env))


# ---------------------------------------------------------------- the stand-in itself must be able to refuse
def test_the_standin_refuses_bodies_the_api_would_refuse(api):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    experiment = httpx.post(f"{api.url}{API}/experiments", json={"display_name": "e"}, headers=headers).json()
    assert httpx.post(f"{api.url}{API}/experiments", json={"display_name": "x", "state": "on"}, headers=headers).status_code == 400
    spec = {"pipelineInfo": {"name": "p"}, "root": {"inputDefinitions": {"parameters": {"a": {"parameterType": "STRING"}}}},
            "deploymentSpec": {}, "schemaVersion": "2.1.0"}
    base = {"display_name": "r", "experiment_id": experiment["experiment_id"], "pipeline_spec": spec}
    good = dict(base, runtime_config={"parameters": {"a": "1"}})
    assert httpx.post(f"{api.url}{API}/runs", json=good, headers=headers).status_code == 200
    for bad in (dict(good, run_id="mine"),  # output-only field
                dict(good, runtime_config={"parameters": {"b": "1"}}),  # undeclared parameter
                base,  # a required parameter missing
                {k: v for k, v in good.items() if k != "pipeline_spec"}):  # no pipeline source
        answer = httpx.post(f"{api.url}{API}/runs", json=bad, headers=headers)
        assert answer.status_code in (400, 404) and answer.json()["message"], bad
    recurring = dict(good, mode="ENABLE", max_concurrency="1", trigger={"cron_schedule": {"cron": "0 0 2 * * *"}})
    assert httpx.post(f"{api.url}{API}/recurringruns", json=recurring, headers=headers).status_code == 200
    for bad in (dict(recurring, max_concurrency="11"), dict(recurring, mode="ON"),
                dict(recurring, trigger={"cron_schedule": {"cron": "0 2 * * *"}})):
        assert httpx.post(f"{api.url}{API}/recurringruns", json=bad, headers=headers).status_code == 400, bad
    assert httpx.get(f"{api.url}{API}/runs").status_code == 401


def test_the_scoring_pipeline_is_submitted_with_its_own_parameters(api, tmp_path):
    env = kfp_env(tmp_path, api.url, FLYWHEEL_KFP_TOKEN=TOKEN)
    assert "--param end_date=... --param start_date=..." in refused(flywheel("submit", "--pipeline", "scoring", env=env))
    ok(flywheel("submit", "--pipeline", "scoring", "--param", "start_date=2026-11-01", "--param", "end_date=2026-11-07",
                "--run-name", "weekly-scores", env=env))
    [pipeline] = api.pipelines.values()
    assert pipeline["display_name"] == "flywheel-scoring"
    [run] = [c["body"] for c in api.calls("POST", "/runs")]
    assert run["runtime_config"]["parameters"] == {"start_date": "2026-11-01", "end_date": "2026-11-07"}
