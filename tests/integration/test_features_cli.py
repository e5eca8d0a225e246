"""`flywheel features training-set | apply | materialize` on a small lake, in process."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from flywheel import cli
from flywheel.config import Settings
from tests.factories import generate
from tests.fraud_tables import CARD_FEATURES
from flywheel.features.store import open_online_reader
from flywheel.storage import Storage


@pytest.fixture()
def small_lake(flywheel_home: Settings, tmp_path: Path) -> Settings:
    storage = Storage.from_settings(flywheel_home)
    generate(storage, str(tmp_path / "raw"), rows=4_000, days=6, seed=4)
    assert cli.main(["ingest", str(tmp_path / "raw")]) == 0
    return flywheel_home


def test_features_commands_build_the_training_set_and_materialize_its_world(small_lake: Settings, tmp_path: Path, capsys):
    """Bugs caught: a training set written somewhere else than --out, or not the one the pipeline
    would train on; apply/materialize on tables of another snapshot; a materialize that loads no row."""
    settings, storage = small_lake, Storage.from_settings(small_lake)
    assert cli.main(["features", "apply"]) == 2  # no feature tables of this snapshot yet
    assert "run `flywheel features training-set --out URI`" in capsys.readouterr().err

    out = tmp_path / "exported"
    assert cli.main(["features", "training-set", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "built in" in said and str(out / "train.parquet") in said
    train, holdout = pd.read_parquet(out / "train.parquet"), pd.read_parquet(out / "holdout.parquet")
    assert len(train) + len(holdout) == 4_000 and set(CARD_FEATURES) <= set(train.columns)
    assert train.ts.max() < holdout.ts.min()
    # A second call reuses the same training set: the same bytes.
    assert cli.main(["features", "training-set", "--out", str(tmp_path / "again")]) == 0
    assert "reused" in capsys.readouterr().out
    assert (tmp_path / "again" / "train.parquet").read_bytes() == (out / "train.parquet").read_bytes()

    assert cli.main(["features", "apply"]) == 0
    assert cli.main(["features", "materialize"]) == 0
    said = capsys.readouterr().out
    assert "materialized world" in said and "flywheel's streaming engine" in said
    # A second run has nothing new to load: it continues from where the first ended.
    assert cli.main(["features", "materialize"]) == 0
    assert "card_features 0 entities from 0 rows" in capsys.readouterr().out
    assert cli.main(["features", "materialize", "--engine", "feast"]) == 0
    assert "with Feast's own materialize" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["features", "materialize", "--engine", "spark"])
    assert exit_code.value.code == 2 and "invalid choice: 'spark'" in capsys.readouterr().err
    latest = storage.read_json(storage.uri("features", "offline", "latest.json"))
    cards = pd.read_parquet(latest["feast"]["card_features"]).sort_values("event_timestamp").groupby("card_id").tail(1).set_index("card_id")
    features, known = open_online_reader(settings, latest["key"][:16]).read({"card_id": list(cards.index[:50]), "merchant_id": ["nobody"] * 50})
    assert known["card_id"].all()
    assert list(features["card_txn_count_24h"]) == list(cards["card_txn_count_24h"].iloc[:50].astype("float64"))


def test_features_commands_on_an_empty_lake_say_so(flywheel_home: Settings, tmp_path: Path, capsys):
    assert cli.main(["features", "training-set", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "holds no published snapshot" in err and "Traceback" not in err
