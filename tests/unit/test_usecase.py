"""A use case is a folder the platform reads (flywheel/usecase.py): chosen by settings, environment or
--usecase; its files part of the content keys they shape; and ingest and validation held to ITS
contract, whatever its columns (a contract unlike fraud's: no id, nullable columns, a number label)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.cli import main
from flywheel.config import load_settings
from flywheel.demo import demo_base, demo_dataset, write_demo_files
from flywheel.errors import ConfigError, DataError, UseCaseError
from flywheel.ingest import ingest
from flywheel.lake import publish_staged, read_snapshot
from flywheel.storage import Storage
from flywheel.usecase import load_module, load_usecase
from flywheel.validation import build_suite, validate_batch, validate_frame
from tests.factories import FRAUD, REPO

# A second use case, unlike fraud in every way the platform must not assume: no id column, a
# nullable number, an integer join key, a number label that may be missing, a time its label is
# known at, and a vocabulary that is checked with a tolerance.
READINGS = """
columns:
  station: {type: int64, doc: "the weather station"}
  kind: {type: string, categories: [rain, snow, hail], categories_mostly: 0.9}
  observed_at: {type: timestamp}
  humidity: {type: float64, nullable: true, min: 0, max: 100}
  settled_at: {type: timestamp, nullable: true}
  rainfall_mm: {type: float64, nullable: true, min: 0}
timestamp: observed_at
labels: [rainfall_mm]
label_known: {column: settled_at}
entities: {station: station}
unlabelled: keep
"""


def readings_usecase(root: Path, name: str = "readings") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "contract.yaml").write_text(READINGS)
    return folder


def readings(rows: int, seed: int = 0, start: str = "2026-03-01") -> pd.DataFrame:
    import numpy as np

    rng = np.random.default_rng(seed)
    observed = pd.Timestamp(start, tz="UTC") + pd.to_timedelta(rng.integers(0, 2 * 86_400, rows), unit="s")
    rain = rng.gamma(1.0, 3.0, rows).round(2)
    missing = rng.random(rows) < 0.2
    return pd.DataFrame({
        "station": rng.integers(1, 6, rows),
        "kind": rng.choice(["rain", "snow", "hail"], rows),
        "observed_at": observed,
        "humidity": np.where(rng.random(rows) < 0.1, np.nan, rng.uniform(20, 99, rows)),
        "settled_at": pd.Series(observed + pd.Timedelta(hours=1)).where(~missing),
        "rainfall_mm": np.where(missing, np.nan, rain),
    })


# --- loading ---------------------------------------------------------------------------------------

def test_the_repositorys_use_case_loads_with_its_contract_and_a_digest_of_its_files():
    assert FRAUD.name == "fraud" and FRAUD.folder == REPO / "usecases" / "fraud"
    assert "contract.yaml" in FRAUD.files and len(FRAUD.digest) == 64
    assert load_usecase(REPO / "usecases" / "fraud") == FRAUD


def test_the_digest_follows_every_file_of_the_folder_and_nothing_else(tmp_path):
    """Bug caught: a use case edit (a new feature module, a renamed file) that leaves its digest, and
    so every content key it shapes, unchanged; or a cache file that changes it for nothing."""
    folder = readings_usecase(tmp_path)
    first = load_usecase(folder).digest
    (folder / "features.py").write_text("WINDOWS = ['1h']\n")
    added = load_usecase(folder).digest
    (folder / "features.py").write_text("WINDOWS = ['1h', '24h']\n")
    edited = load_usecase(folder).digest
    (folder / "features.py").rename(folder / "inputs.py")
    renamed = load_usecase(folder).digest
    assert len({first, added, edited, renamed}) == 4
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "inputs.cpython-311.pyc").write_bytes(b"\0" * 8)
    (folder / ".DS_Store").write_bytes(b"x")
    assert load_usecase(folder).digest == renamed
    # Another use case beside it changes nothing of this one.
    other = readings_usecase(tmp_path, "other")
    (other / "features.py").write_text("X = 1\n")
    assert load_usecase(folder).digest == renamed


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "absent", "does not exist"),
    (lambda root: (root / "file.yaml").write_text("x: 1") and root / "file.yaml", "is a file"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "contract.yaml does not exist"),
    (lambda root: readings_usecase(root, "Bad Name"), "must be lower-case letters"),
    (lambda root: (readings_usecase(root, "broken") / "contract.yaml").write_text("columns: [") and root / "broken",
     "is not valid YAML"),
])
def test_a_folder_that_is_not_a_use_case_is_refused_with_what_to_do(tmp_path, make, expected):
    with pytest.raises(UseCaseError, match=expected):
        load_usecase(make(tmp_path))


def test_the_use_case_is_chosen_by_settings_environment_or_option(tmp_path, monkeypatch, capsys):
    """Bug caught: --usecase ignored after the command name, a relative path resolved against the
    wrong folder, or an option that outlives its command (main() also runs in process)."""
    folder = readings_usecase(tmp_path)
    monkeypatch.chdir(tmp_path)
    # The default: usecases/fraud here when there is one, else the checkout's.
    assert load_settings(env={}).usecase == REPO / "usecases" / "fraud"
    shutil.copytree(REPO / "usecases" / "fraud", tmp_path / "usecases" / "fraud")
    assert load_settings(env={}).usecase == tmp_path / "usecases" / "fraud"
    assert load_settings(env={"FLYWHEEL_USECASE": "readings"}).usecase == folder
    monkeypatch.delenv("FLYWHEEL_USECASE", raising=False)
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    source = tmp_path / "raw" / "r.parquet"
    source.parent.mkdir()
    pq.write_table(pa.Table.from_pandas(readings(300), preserve_index=False), source)
    for argv in (["ingest", str(source), "--usecase", "readings"], ["--usecase", str(folder), "ingest", str(source)]):
        assert main(argv) == 0, capsys.readouterr().err
        assert "FLYWHEEL_USECASE" not in os.environ
    lake = tmp_path / "home" / "store" / "readings" / "lake"  # the use case's namespace
    latest = json.loads((lake / "_snapshots" / "latest.json").read_text())
    assert latest["rows"] == 300  # the second ingest found the file already in the lake
    # Without the option, the default (fraud) use case, in the same storage root: its own lake (the
    # file is new to it), whose contract refuses these rows, naming the columns.
    monkeypatch.chdir(REPO)
    assert main(["ingest", str(source)]) == 1
    assert "missing required columns" in capsys.readouterr().err
    assert not (tmp_path / "home" / "store" / "fraud" / "lake" / "_snapshots").exists()
    assert json.loads((lake / "_snapshots" / "latest.json").read_text())["rows"] == 300


def test_an_unknown_use_case_is_a_clear_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    assert main(["ingest", str(tmp_path), "--usecase", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no use case at") and "--usecase" in err and "Traceback" not in err


# --- content keys ----------------------------------------------------------------------------------

def test_a_use_case_edit_changes_the_keys_it_shapes_and_another_use_case_does_not(tmp_path):
    """Bug caught: a feature table, training set or model reused after the use case's files changed
    (stale reuse), or retrained because some other use case changed."""
    from flywheel.features.build import features_key
    from flywheel.features.incremental import day_keys
    from flywheel.lake import LakeSnapshot

    mine = tmp_path / "fraud"
    shutil.copytree(REPO / "usecases" / "fraud", mine)
    other = readings_usecase(tmp_path)
    snapshot = LakeSnapshot(uri="x", sha256="ab" * 32, rows=1,
                            parts=[{"uri": "p", "sha256": "cd" * 32, "rows": 1, "date": "2026-03-01"}])

    def keys() -> tuple:
        settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(mine)})
        return features_key(snapshot.sha256, settings), day_keys(snapshot, load_usecase(settings.usecase))["2026-03-01"]

    before = keys()
    (other / "features.py").write_text("X = 2\n")
    assert keys() == before
    with (mine / "contract.yaml").open("a") as f:
        f.write("# a comment is a change: the key does not guess what matters\n")
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]


def test_the_model_key_covers_the_use_case(tmp_path):
    from flywheel.features.build import TrainingSet
    from flywheel.training.train import training_key

    mine = tmp_path / "fraud"
    shutil.copytree(REPO / "usecases" / "fraud", mine)
    training_set = TrainingSet(uri="s", key="k", sha256="ef" * 32, train_uri="t", holdout_uri="h", rows=10,
                               train_rows=8, holdout_rows=2, positives=1, holdout_positives=0,
                               cutoff="2026-03-01", snapshot_sha256="ab" * 32)

    def key() -> str:
        return training_key(training_set, load_settings(env={"FLYWHEEL_HOME": str(tmp_path), "FLYWHEEL_USECASE": str(mine)}))

    before = key()
    (mine / "model.py").write_text("HIDDEN = 64\n")
    assert key() != before


# --- ingest and validation held to the use case's own contract -------------------------------------

def test_a_contract_unlike_frauds_is_ingested_validated_and_read_back(tmp_path):
    """Bug caught: the lake or the suite assuming fraud's columns, an id, non-null values or a 0/1
    label; identical re-deliveries with nulls refused as conflicts; time columns other than the event
    time left as text."""
    contract = load_usecase(readings_usecase(tmp_path)).contract
    storage = Storage(str(tmp_path / "root"))
    lake = str(tmp_path / "lake")
    df = readings(800)
    raw = tmp_path / "raw"
    raw.mkdir()
    text = df.assign(observed_at=df.observed_at.dt.strftime("%Y-%m-%dT%H:%M:%S+00:00"))
    text.to_csv(raw / "first.csv", index=False)
    staged = ingest(storage, str(raw), lake, "r1", contract=contract)
    report = validate_batch(storage, staged, str(tmp_path / "reports"), "r1", contract, load_settings(env={}).ingest)
    assert report.success, report.failed
    published = publish_staged(storage, staged, "r1", {"success": True}, profile=report.profile)
    back = read_snapshot(storage, published, contract.arrow_schema()).to_pandas()
    assert list(back.columns) == list(contract.columns) and len(back) == 800
    assert back.settled_at.isna().sum() == df.settled_at.isna().sum() > 0
    assert str(back.settled_at.dtype) == "datetime64[us, UTC]"
    assert back.rainfall_mm.isna().sum() == df.rainfall_mm.isna().sum()
    assert set(report.profile["quantiles"]) == {"humidity", "rainfall_mm"} and set(report.profile["shares"]) == {"kind"}
    assert not (tmp_path / "lake" / "_index").exists()  # no id: no index
    # The same bytes again under another name: known by their sha256, even without an id.
    shutil.copy(raw / "first.csv", raw / "again.csv")
    again = ingest(storage, str(raw / "again.csv"), lake, "r2", contract=contract)
    assert again.rows == 800 and again.new_parts == [] and again.source_files[0]["skipped"] == "already ingested"
    # A value out of the contract's range, a vocabulary broken beyond its tolerance: named.
    bad = df.copy()
    bad.loc[3, "humidity"] = 140.0
    bad.loc[:200, "kind"] = "fog"  # a quarter of the rows: beyond categories_mostly 0.9
    ok, failed, _ = validate_frame(bad, build_suite(contract))
    assert not ok and {(f["expectation"], f["column"]) for f in failed} == {
        ("expect_column_values_to_be_between", "humidity"), ("expect_column_values_to_be_in_set", "kind")}


def test_a_missing_non_nullable_value_of_another_contract_is_refused_at_ingest(tmp_path):
    contract = load_usecase(readings_usecase(tmp_path)).contract
    storage = Storage(str(tmp_path / "root"))
    df = readings(50)
    df.loc[4, "station"] = None
    raw = tmp_path / "raw" / "r.parquet"
    raw.parent.mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), raw)
    with pytest.raises(DataError, match="column 'station' has 1 null values"):
        ingest(storage, str(raw), str(tmp_path / "lake"), "r1", contract=contract)
    assert not (tmp_path / "lake").exists() or not any((tmp_path / "lake").rglob("*.parquet"))


def test_an_identical_redelivery_with_missing_values_is_dropped_not_refused(tmp_path):
    """Bug caught: comparing rows with ``==``, for which two nulls differ, so a re-sent row with a
    missing value looks like a conflicting one and the whole batch is refused."""
    folder = readings_usecase(tmp_path)
    text = READINGS.replace("columns:\n", "columns:\n  reading_id: {type: string}\n") + "id: reading_id\n"
    (folder / "contract.yaml").write_text(text)
    contract = load_usecase(folder).contract
    storage = Storage(str(tmp_path / "root"))
    lake = str(tmp_path / "lake")
    df = readings(200).assign(reading_id=[f"r{i}" for i in range(200)])[list(contract.columns)]
    assert df.humidity.isna().any() and df.rainfall_mm.isna().any()
    for name, rows in (("a", df.iloc[:120]), ("b", df.iloc[80:])):  # 40 rows in both, nulls among them
        path = tmp_path / name / "r.parquet"
        path.parent.mkdir()
        pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), path)
        staged = ingest(storage, str(path.parent), lake, f"run-{name}", contract=contract)
        publish_staged(storage, staged, f"run-{name}", {"success": True})
    assert staged.rows == 200 and staged.source_files[0]["duplicates"] == 40
    changed = df.iloc[100:110].copy()
    changed.loc[105, "humidity"] = 1.0 if pd.isna(df.loc[105, "humidity"]) else None
    path = tmp_path / "c" / "r.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pandas(changed, preserve_index=False), path)
    with pytest.raises(DataError, match="1 reading_id value"):
        ingest(storage, str(path.parent), lake, "run-c", contract=contract)


# --- a use case's own settings, modules and demo data ------------------------------------------------

def test_a_use_cases_settings_sit_under_the_users(tmp_path):
    """Bug caught: a use case that cannot say what its loop needs (historical data outside the
    default event-time window), or one that overrides what the user set or where things are stored."""
    folder = readings_usecase(tmp_path)
    (folder / "settings.yaml").write_text("ingest: {max_age_days: 40000}\ntraining: {epochs: 2}\n")
    env = {"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)}
    settings = load_settings(env=env)
    assert settings.ingest.max_age_days == 40000 and settings.training.epochs == 2
    assert load_settings(env={**env, "FLYWHEEL_TRAINING__EPOCHS": "5"}).training.epochs == 5
    user = tmp_path / "mine.yaml"
    user.write_text("ingest: {max_age_days: 100}\n")
    assert load_settings(user, env=env).ingest.max_age_days == 100
    (folder / "settings.yaml").write_text("storage: {root: /elsewhere}\n")
    with pytest.raises(ConfigError, match="sets storage"):
        load_settings(env=env)
    (folder / "settings.yaml").write_text("ingest: {max_age_dayz: 1}\n")
    with pytest.raises(ConfigError, match="ingest.max_age_dayz is not a setting"):
        load_settings(env=env)


def test_a_use_cases_module_is_its_own_and_a_broken_one_is_named(tmp_path):
    first, second = readings_usecase(tmp_path, "first"), readings_usecase(tmp_path, "second")
    (first / "source.py").write_text("WHO = 'first'\n")
    (second / "source.py").write_text("WHO = 'second'\n")
    assert load_module(load_usecase(first), "source").WHO == "first"
    assert load_module(load_usecase(second), "source").WHO == "second"
    assert load_module(load_usecase(first), "model") is None
    (first / "source.py").write_text("WHO = 'edited'\n")  # a new version of the file is a new module
    assert load_module(load_usecase(first), "source").WHO == "edited"
    (second / "source.py").write_text("import a_package_that_is_not_there\n")
    with pytest.raises(UseCaseError, match=r"second/source.py failed to import: ModuleNotFoundError"):
        load_module(load_usecase(second), "source")


def test_demo_data_comes_from_the_use_cases_source_once_and_without_one_the_run_says_what_to_do(tmp_path):
    folder = readings_usecase(tmp_path)
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)})
    storage = Storage.from_settings(settings)
    with pytest.raises(UseCaseError, match="has no demo data.*--source"):
        demo_dataset(storage, load_usecase(folder), None, settings.data)
    (folder / "source.py").write_text(
        "import pyarrow as pa, pyarrow.parquet as pq, io\n"
        "CALLS = []\n"
        "def write_demo(storage, out_uri, *, rows, data):\n"
        "    CALLS.append(rows)\n"
        "    storage.write_bytes(out_uri + '/x.txt', b'made')\n")
    usecase = load_usecase(folder)
    source, lake, seconds = demo_dataset(storage, usecase, 10, settings.data)
    again = demo_dataset(storage, usecase, 10, settings.data)
    assert again == (source, lake, 0.0) and load_module(usecase, "source").CALLS == [10]
    assert storage.read_bytes(source + "/x.txt") == b"made" and lake.endswith("/lake") and source.endswith("/raw")
    assert demo_dataset(storage, usecase, 20, settings.data)[0] != source  # another size, another dataset


def test_demo_data_is_keyed_by_every_python_file_of_the_use_case(tmp_path):
    """Bug caught: a generator in a module of its own (loaded by source.py) edited, and `flywheel run`
    still ingesting the data the old one wrote."""
    folder = readings_usecase(tmp_path)
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)})
    storage = Storage.from_settings(settings)
    (folder / "source.py").write_text(
        "from pathlib import Path\n"
        "from flywheel.usecase import load_module, load_usecase\n"
        "def write_demo(storage, out_uri, *, rows, data):\n"
        "    maker = load_module(load_usecase(Path(__file__).parent), 'maker')\n"
        "    storage.write_bytes(out_uri + '/x.txt', maker.MADE)\n")
    (folder / "maker.py").write_text("MADE = b'first'\n")
    first = demo_dataset(storage, load_usecase(folder), 10, settings.data)[0]
    assert storage.read_bytes(first + "/x.txt") == b"first"
    (folder / "maker.py").write_text("MADE = b'second one'\n")
    second = demo_dataset(storage, load_usecase(folder), 10, settings.data)[0]
    assert second != first and storage.read_bytes(second + "/x.txt") == b"second one"
    (folder / "contract.yaml").write_text(READINGS + "# a comment: the data is the same\n")
    assert demo_base(storage, load_usecase(folder), 10, settings.data) + "/raw" == second


def test_flywheel_generate_passes_on_the_options_given_and_refuses_one_the_use_case_does_not_take(tmp_path):
    folder = readings_usecase(tmp_path)
    settings = load_settings(env={"FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_USECASE": str(folder)})
    storage = Storage.from_settings(settings)
    (folder / "source.py").write_text(
        "def write_demo(storage, out_uri, *, rows, data, start=None):\n"
        "    storage.write_bytes(out_uri + '/x.txt', f'{rows} {data.seed} {start}'.encode())\n"
        "    storage.write_bytes(out_uri + '/_notes.txt', b'not data')\n")
    usecase, out = load_usecase(folder), str(tmp_path / "out")
    data = settings.data.model_copy(update={"seed": 3})
    said = write_demo_files(storage, usecase, out, rows=5, data=data, options={"start": "2026-01-02", "format": None},
                            progress=lambda n: None)  # no progress parameter: not passed
    assert said == f"1 file(s) under {out}" and storage.read_bytes(out + "/x.txt") == b"5 3 2026-01-02"
    with pytest.raises(UseCaseError, match=r"readings's demo data takes no --format: .*has no parameter format"):
        write_demo_files(storage, usecase, str(tmp_path / "other"), rows=5, data=data, options={"format": "csv"})
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_rows_without_a_label_are_dropped_when_the_contract_says_drop_and_counted(tmp_path):
    """Bug caught: unlabelled: drop accepted by the contract but ignored, so unlabelled rows reach
    the lake and the training set as NaN targets."""
    folder = readings_usecase(tmp_path)
    (folder / "contract.yaml").write_text(READINGS.replace("unlabelled: keep", "unlabelled: drop"))
    contract = load_usecase(folder).contract
    storage = Storage(str(tmp_path / "root"))
    df = readings(400)
    missing = int(df["rainfall_mm"].isna().sum())
    raw = tmp_path / "raw" / "r.parquet"
    raw.parent.mkdir()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), raw)
    staged = ingest(storage, str(raw), str(tmp_path / "lake"), "r1", contract=contract)
    assert missing > 0 and staged.rows == 400 - missing
    assert staged.source_files[0]["unlabelled_dropped"] == missing
    lake = read_snapshot(storage, staged, contract.arrow_schema()).to_pandas()
    assert lake["rainfall_mm"].notna().all()


def test_a_label_known_outside_its_bound_fails_validation_naming_it(tmp_path):
    """Bug caught: a label time later than label_known.within (or before its event) accepted, so a
    day of features computed from its lookback silently misses that label."""
    folder = readings_usecase(tmp_path)
    (folder / "contract.yaml").write_text(READINGS.replace("label_known: {column: settled_at}",
                                                           "label_known: {column: settled_at, within: PT2H}"))
    contract = load_usecase(folder).contract
    settings = load_settings(env={}).ingest
    for name, shift, ok in (("fine", pd.Timedelta(hours=1), True), ("late", pd.Timedelta(hours=5), False)):
        df = readings(300)
        df.loc[7, "settled_at"] = df.loc[7, "observed_at"] + shift
        storage = Storage(str(tmp_path / name))
        raw = tmp_path / name / "raw" / "r.parquet"
        raw.parent.mkdir(parents=True)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), raw)
        staged = ingest(storage, str(raw), str(tmp_path / name / "lake"), "r1", contract=contract)
        report = validate_batch(storage, staged, str(tmp_path / name / "reports"), "r1", contract, settings)
        assert report.success is ok, report.failed
        if not ok:
            [failure] = report.failed
            assert failure["column"] == "settled_at" and "1 rows outside" in failure["details"] and "2:00:00" in failure["details"]
