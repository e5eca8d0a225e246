"""Closing the loop on fraud, end to end: a model trained on 40 days, then a stable week and a
drifted week of the same world (usecases/fraud/generator.py's options: amounts x3 and a new merchant
category), each ingested, served by the real server with capture on, and monitored with
`flywheel monitor --trigger`.

The stable week crosses nothing and triggers nothing (exit 0). The drifted week crosses (exit 4,
naming the amount and the model's output with their PSI), the trigger submits `flywheel run`, and
the retrained model is blessed, promoted, and names the decision in its lineage.

Forty days, not the usual fourteen: a 30-day window over a younger history grows every day, so a
short base period would make every later week "drift" (the monitor would be right to say so)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from flywheel import lineage
from flywheel.config import load_settings
from flywheel.monitoring.capture import read_capture
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.browser import open_offline
from tests.conftest import run_loop, small_env
from tests.factories import generate
from tests.monitoring_scenarios import REPO, flywheel, ingest, lake_rows, monitor_json, serve_period

BASE_START, BASE_DAYS, BASE_ROWS = "2026-09-01", 40, 30_000
WEEK_ROWS = 5_250  # the base period's density: 750 transactions a day
STABLE, DRIFTED = "2026-10-11", "2026-10-18"
DRIFT = {"amount_scale": 3, "new_category": "crypto_atm", "new_category_share": 0.008}


def week(storage: Storage, settings, name: str, start: str, options: dict) -> pd.DataFrame:
    source = storage.uri("raw", name)
    generate(storage, source, rows=WEEK_ROWS, days=7, seed=11, start=start, options={"world_rows": BASE_ROWS, **options})
    ingest(settings, source, f"ingest-{name}")
    last = (pd.Timestamp(start) + pd.Timedelta(days=6)).strftime("%Y-%m-%d")
    return lake_rows(storage, settings, start, last)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("monitoring-fraud")
    env = {**small_env(home),
           # Amounts x3 is what the ingest drift gate exists to stop; here the monitor is the judge.
           "FLYWHEEL_INGEST__DRIFT__ENABLED": "false"}
    settings = load_settings(env=env)
    storage = Storage.from_settings(settings)
    env["FLYWHEEL_MONITORING__RETRAIN_SOURCE"] = storage.uri("raw")  # every period's raw files
    generate(storage, storage.uri("raw", "base"), rows=BASE_ROWS, days=BASE_DAYS, seed=11, start=BASE_START)
    base = run_loop(settings, storage.uri("raw", "base"), "base")
    return {"home": home, "env": env, "settings": settings, "storage": storage, "base": base}


@pytest.fixture(scope="module")
def stable(loop) -> dict:
    frame = week(loop["storage"], loop["settings"], "stable", STABLE, {})
    served = serve_period(loop["settings"], loop["env"], frame, loop["home"] / "serve-stable.log")
    done = flywheel("monitor", "--since", STABLE, "--trigger", "--json", env=loop["env"])
    return {"frame": frame, "served": served, "done": done, "out": monitor_json(done)}


@pytest.fixture(scope="module")
def drifted(loop, stable) -> dict:
    frame = week(loop["storage"], loop["settings"], "drifted", DRIFTED, DRIFT)
    served = serve_period(loop["settings"], loop["env"], frame, loop["home"] / "serve-drifted.log")
    done = flywheel("monitor", "--since", DRIFTED, "--trigger", "--wait", "--json", env=loop["env"])
    return {"frame": frame, "served": served, "done": done, "out": monitor_json(done)}


def test_every_served_row_was_captured_with_what_the_model_saw(loop, stable):
    captured = read_capture(loop["storage"], pd.Timestamp(STABLE, tz="UTC").to_pydatetime()).to_pandas()
    assert len(captured) == stable["served"] == len(stable["frame"])
    assert sorted(captured["input.transaction_id"]) == sorted(stable["frame"]["transaction_id"])
    production = loop["base"]["model"]["version"]
    assert set(captured["model_version"]) == {production}


def test_a_stable_week_crosses_nothing_and_triggers_nothing(stable):
    """Bug caught: thresholds (or a baseline) so tight that ordinary week-to-week variation retrains."""
    result, decision = stable["out"]["result"], stable["out"]["decision"]
    assert stable["done"].returncode == 0, result["findings"]
    assert result["judged"] and result["findings"] == []
    assert decision["action"] == "none" and decision["reason"] == "nothing crossed a threshold"
    # The skew replay found serving's features equal to the offline path's (a replay reads them as of
    # each request's time, as the training set does).
    assert result["skew"]["compared"] > 1000
    assert all(f["inconsistent_rate"] == 0 for f in result["skew"]["features"])
    # Labels are known three days after a transaction: the week's first days are realised.
    assert [d["labelled"] > 0 for d in result["days"]] == [True] * 4 + [False] * 3


def test_the_monitoring_pipeline_under_kfp_local_judges_the_stable_week_and_skips_the_trigger(loop, stable):
    """The same steps as a KFP DAG (pipelines/monitoring.py): the monitor component's result, figures
    and report, and no trigger task when nothing crossed."""
    from pipelines.monitoring import run_locally

    storage = loop["storage"]
    run_locally(loop["settings"], "pipe-stable", since=STABLE, until=DRIFTED)
    result = storage.read_json(storage.uri("monitoring", "runs", "pipe-stable", "result.json"))
    assert result["crossed"] is False and result["rows"] == stable["served"]
    assert result["figures"]["rows"] == stable["served"] and "drift.input.amount" in result["figures"]
    assert not storage.exists(storage.uri("monitoring", "decisions", "pipe-stable.json"))  # the trigger never ran


def test_a_drifted_week_crosses_names_what_moved_and_exits_4(drifted):
    result = drifted["out"]["result"]
    assert drifted["done"].returncode == 4
    crossed = {(f["kind"], f["subject"]): f for f in result["findings"]}
    assert ("drift", "input.amount") in crossed and crossed[("drift", "input.amount")]["value"] > 0.2
    assert ("drift", "output.fraud_probability") in crossed
    # The new category is seen as values the baseline never held.
    category = next(d for d in result["drift"] if d["column"] == "input.merchant_category")
    assert 0.003 < category["unseen_rate"] < 0.015


def test_the_crossing_retrains_and_the_new_model_is_blessed_promoted_and_names_its_evidence(loop, drifted):
    storage, settings = loop["storage"], loop["settings"]
    decision = drifted["out"]["decision"]
    assert decision["action"] == "submitted", decision
    assert decision["training_run"]["exit_code"] == 0
    stored = storage.read_json(decision["uri"])
    assert stored["evidence"] and {f["subject"] for f in stored["evidence"]} >= {"input.amount"}
    summary = storage.read_json(storage.uri("runs", decision["training_run"]["run_id"], "summary.json"))
    assert summary["blessed"], summary.get("reasons")
    production = Registry(storage, settings.model_name).production()
    assert production.version != loop["base"]["model"]["version"]
    assert production.version == summary["deployed"]
    assert production.meta["triggered_by"] == decision["uri"]
    # From the model back to the evidence: the decision is among its lineage's inputs, and its card says so.
    tree = lineage.trace(storage, production.manifest_uri)
    assert decision["uri"] in json.dumps(tree)
    evaluate = next(step for step in summary["steps"] if step["step"] == "evaluate")
    card = storage.read_bytes(evaluate["artifacts"]["report"]).decode()
    assert f"the monitor&#x27;s decision {decision['uri']}" in card


def readme_monitoring_lines() -> list[str]:
    """The README's monitoring commands (comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Closing the loop.*?```sh\n(.*?)```", text, re.S)
    assert block, "README.md has no monitoring example"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def run_line(line: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return subprocess.run(["bash", "-c", line], env={**full, **env}, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_readme_commands_verbatim_name_the_crossings_and_the_cool_down_holds_a_second_trigger(loop, drifted):
    monitor, trigger, schedule = readme_monitoring_lines()
    assert DRIFTED in monitor and schedule.endswith("schedule --pipeline monitoring")  # run in test_monitoring_trigger.py
    # The window was scored by the old production version: judged on its own baseline again.
    done = run_line(monitor, loop["env"])
    assert done.returncode == 4, done.stdout + done.stderr
    assert re.search(r"crossed: drift: input\.amount: psi [0-9.]+ \(threshold 0\.2\)", done.stdout), done.stdout
    assert "trigger: none: something crossed, but triggering is off" in done.stdout
    held = run_line(trigger, loop["env"])
    assert held.returncode == 4 and "Traceback" not in held.stderr
    assert re.search(r"trigger: held: cool-down: the last triggered run \(triggered-run-[0-9a-z-]+\) started", held.stdout), held.stdout


def test_the_report_is_self_contained_and_shows_what_crossed(drifted, browser):
    report = Path(drifted["out"]["result"]["report_uri"])
    opened = open_offline(browser, report)
    assert opened.left == [] and opened.failed == [] and opened.console_errors == []
    assert opened.broken_images() == []
    text = opened.page.inner_text("body")
    assert "✘ Crossed" in text
    assert re.search(r"drift: input\.amount: psi [0-9.]+ \(threshold 0\.2\)", text)
    images = opened.page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.naturalWidth])")
    alts = {alt for alt, width in images if width > 100}
    assert {"drift", "performance by day", "input.amount"} <= alts
    # Each table's cells read as their column says: a verdict only under "crossed", yes/no under "judged".
    cells = opened.page.eval_on_selector_all("table", """tables => tables.flatMap(t => {
        const head = [...t.rows[0].cells].map(c => c.innerText.trim());
        return [...t.rows].slice(1).flatMap(r => [...r.cells].map((c, i) => [head[i], c.innerText.trim()]));
    })""")
    assert {text for column, text in cells if column == "crossed"} <= {"✘ crossed", "✔ within", "—"}
    assert {text for column, text in cells if column == "judged"} <= {"yes", "no", "—"}
    assert any(column == "crossed" and text == "✘ crossed" for column, text in cells)
    opened.page.context.close()


CARD_TESTING, STALE_DAY = "2026-10-25", "2026-11-01"


def test_a_new_fraud_pattern_shows_in_the_realised_performance_once_its_labels_arrive(loop, drifted):
    """Card testing (small online payments, most of them fraud) that no model has seen: the inputs
    barely move, but once the chargebacks are known the realised PR-AUC falls past its threshold."""
    frame = week(loop["storage"], loop["settings"], "card-testing", CARD_TESTING,
                 {"fraud_pattern": "card_testing", "fraud_pattern_share": 0.05})
    serve_period(loop["settings"], loop["env"], frame, loop["home"] / "serve-card-testing.log")
    until = (pd.Timestamp(CARD_TESTING) + pd.Timedelta(days=7)).strftime("%Y-%m-%d")
    done = flywheel("monitor", "--since", CARD_TESTING, "--until", until, "--json", env=loop["env"])
    result = monitor_json(done)["result"]
    realised = [f for f in result["findings"] if f["kind"] == "realised"]
    assert done.returncode == 4 and realised, result["findings"]
    assert result["realised"]["judged"] and result["realised"]["interval"][1] < realised[0]["threshold"]


def test_a_stale_online_store_is_skew_the_replay_finds_feature_by_feature(loop, drifted):
    """A day served from the online store as the last run left it (no live updates): serving reads
    the entities' rows as of that run, the offline path as of each request. The windowed features
    differ, and the monitor names them with their rates and examples."""
    storage, settings = loop["storage"], loop["settings"]
    source = storage.uri("raw", "stale-day")
    generate(storage, source, rows=750, days=1, seed=11, start=STALE_DAY, options={"world_rows": BASE_ROWS})
    ingest(settings, source, "ingest-stale-day")
    frame = lake_rows(storage, settings, STALE_DAY, STALE_DAY)
    serve_period(settings, loop["env"], frame, loop["home"] / "serve-stale.log", replay=False)
    done = flywheel("monitor", "--since", STALE_DAY, "--json", env=loop["env"])
    result = monitor_json(done)["result"]
    skew = {f["feature"]: f for f in result["skew"]["features"]}
    assert result["skew"]["compared"] == len(frame)
    crossed = {f["subject"] for f in result["findings"] if f["kind"] == "skew"}
    assert "card_txn_count_24h" in crossed, skew
    stale = skew["card_txn_count_24h"]
    assert stale["inconsistent_rate"] > 0.05 and stale["examples"]
    example = stale["examples"][0]
    assert example["online"] != example["offline"]
