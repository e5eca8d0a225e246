"""Lineage: records, lookups, and walking from a model back to the raw files it was trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel import lineage
from flywheel.config import Settings
from flywheel.errors import LineageError
from flywheel.storage import ObjectRef, Storage, sha256_file


@pytest.fixture
def storage(flywheel_home: Settings) -> Storage:
    return Storage.from_settings(flywheel_home)


def write(storage: Storage, name: str, content: bytes) -> ObjectRef:
    return storage.write_bytes(storage.uri(name), content)


def build_chain(storage: Storage, tmp_path: Path) -> dict[str, ObjectRef]:
    """raw -> part -> manifest -> dataset -> model, each step recorded; raw lives outside the store."""
    raw_path = tmp_path / "incoming" / "transactions.csv"
    raw_path.parent.mkdir(parents=True)
    raw_path.write_text("card_id,amount\n1,9.5\n2,3.0\n")
    raw = storage.stat(str(raw_path))

    part = write(storage, "lake/transactions/date=2026-01-01/part-0.parquet", b"parquet bytes")
    lineage.record(storage, part, step="ingest", run_id="run-1", inputs=[raw], params={"schema": "v1"})
    manifest = storage.write_json(storage.uri("lake/transactions/_manifest.json"), {"parts": [part.to_dict()]})
    lineage.record(storage, manifest, step="ingest", run_id="run-1", inputs=[part])
    dataset = write(storage, "datasets/training/abc123/train.parquet", b"training rows")
    lineage.record(storage, dataset, step="training_set", run_id="run-1", inputs=[manifest.to_dict()])
    model = write(storage, "models/fraud/1/model.pt", b"weights")
    lineage.record(storage, model, step="train", run_id="run-2", inputs=[dataset], params={"epochs": 3})
    return {"raw": raw, "part": part, "manifest": manifest, "dataset": dataset, "model": model}


def test_record_and_lookup(storage: Storage) -> None:
    source = write(storage, "in.csv", b"a,b\n")
    out = write(storage, "out.parquet", b"xyz")
    entry = lineage.record(storage, out, step="ingest", run_id="r1", inputs=[source], params={"k": 1})
    assert entry["artifact"] == out.to_dict()
    assert entry["inputs"] == [source.to_dict()]
    assert entry["params"] == {"k": 1}
    assert entry["code_version"] == lineage.code_version()
    assert entry["created_at"].endswith("+00:00")
    assert lineage.lookup(storage, out.uri) == json.loads(json.dumps(entry))
    assert lineage.lookup(storage, source.uri) is None


def test_record_lives_under_the_storage_root(storage: Storage) -> None:
    out = write(storage, "o.bin", b"o")
    lineage.record(storage, out, step="s", run_id="r")
    uri = lineage.record_uri(storage, out.uri)
    assert uri.startswith(storage.uri("lineage") + "/") and uri.endswith(".json")
    assert storage.exists(uri)


def test_file_uri_and_path_share_one_record(storage: Storage) -> None:
    out = write(storage, "o.bin", b"o")
    lineage.record(storage, out, step="s", run_id="r")
    assert lineage.lookup(storage, Path(out.uri).as_uri())["step"] == "s"


def test_input_without_uri_is_refused(storage: Storage) -> None:
    out = write(storage, "o.bin", b"o")
    with pytest.raises(LineageError, match="uri"):
        lineage.record(storage, out, step="s", run_id="r", inputs=[{"sha256": "abc"}])


def test_trace_from_model_back_to_the_raw_file(storage: Storage, tmp_path: Path) -> None:
    refs = build_chain(storage, tmp_path)
    tree = lineage.trace(storage, refs["model"].uri)

    assert tree["uri"] == refs["model"].uri
    assert tree["sha256"] == refs["model"].sha256
    assert (tree["step"], tree["run_id"]) == ("train", "run-2")
    steps = []
    node = tree
    while node.get("inputs"):
        steps.append(node["step"])
        (node,) = node["inputs"]
    assert steps == ["train", "training_set", "ingest", "ingest"]
    assert node == {"uri": refs["raw"].uri, "sha256": refs["raw"].sha256}

    found = lineage.leaves(tree)
    assert found == [{"uri": refs["raw"].uri, "sha256": refs["raw"].sha256}]
    assert found[0]["sha256"] == sha256_file(refs["raw"].uri)


def test_trace_keeps_the_sha256_an_input_had_when_used(storage: Storage, tmp_path: Path) -> None:
    refs = build_chain(storage, tmp_path)
    Path(refs["raw"].uri).write_text("changed after ingest\n")
    (leaf,) = lineage.leaves(lineage.trace(storage, refs["model"].uri))
    assert leaf["sha256"] == refs["raw"].sha256 != sha256_file(refs["raw"].uri)


def test_trace_of_an_unrecorded_artifact_is_itself(storage: Storage) -> None:
    raw = write(storage, "raw.csv", b"x")
    tree = lineage.trace(storage, raw.uri)
    assert tree == {"uri": raw.uri, "sha256": None}
    assert lineage.leaves(tree) == [tree]


def test_diamond_is_traced_in_full_on_both_sides(storage: Storage) -> None:
    # raw -> lake -> features ─┐
    #            └────────────-┴-> dataset : the lake must not look like a raw file the second time.
    raw = write(storage, "raw.csv", b"raw")
    lake = write(storage, "lake.parquet", b"lake")
    lineage.record(storage, lake, step="ingest", run_id="r", inputs=[raw])
    features = write(storage, "features.parquet", b"features")
    lineage.record(storage, features, step="features", run_id="r", inputs=[lake])
    dataset = write(storage, "dataset.parquet", b"dataset")
    lineage.record(storage, dataset, step="training_set", run_id="r", inputs=[features, lake])

    tree = lineage.trace(storage, dataset.uri)
    via_features, direct = tree["inputs"]
    assert via_features["inputs"][0]["step"] == "ingest"
    assert direct["step"] == "ingest" and direct["inputs"][0]["uri"] == raw.uri
    assert lineage.leaves(tree) == [{"uri": raw.uri, "sha256": raw.sha256}]  # once, not twice


def test_a_cycle_does_not_loop_forever(storage: Storage) -> None:
    a = write(storage, "a.bin", b"a")
    b = write(storage, "b.bin", b"b")
    raw = write(storage, "raw.bin", b"raw")
    lineage.record(storage, a, step="make_a", run_id="r", inputs=[b, raw])
    lineage.record(storage, b, step="make_b", run_id="r", inputs=[a])

    tree = lineage.trace(storage, a.uri)
    back_to_a = tree["inputs"][0]["inputs"][0]
    assert back_to_a["uri"] == a.uri and back_to_a["cycle"] is True and "inputs" not in back_to_a
    assert lineage.leaves(tree) == [{"uri": raw.uri, "sha256": raw.sha256}]


def test_a_self_loop_does_not_loop_forever(storage: Storage) -> None:
    a = write(storage, "a.bin", b"a")
    lineage.record(storage, a, step="s", run_id="r", inputs=[a])
    tree = lineage.trace(storage, a.uri)
    assert tree["inputs"][0]["cycle"] is True
    assert lineage.leaves(tree) == []


def test_max_depth_stops_the_walk(storage: Storage) -> None:
    previous = write(storage, "n0", b"0")
    for i in range(1, 6):
        current = write(storage, f"n{i}", str(i).encode())
        lineage.record(storage, current, step=f"s{i}", run_id="r", inputs=[previous])
        previous = current
    tree = lineage.trace(storage, previous.uri, max_depth=2)
    assert tree["inputs"][0]["inputs"][0]["truncated"] is True
    assert len(lineage.trace(storage, previous.uri)["inputs"][0]["inputs"][0]["inputs"]) == 1


def test_generated_data_with_no_inputs_is_a_leaf(storage: Storage) -> None:
    generated = write(storage, "synthetic.csv", b"rows")
    lineage.record(storage, generated, step="datagen", run_id="r", params={"seed": 7})
    lake = write(storage, "lake.parquet", b"lake")
    lineage.record(storage, lake, step="ingest", run_id="r", inputs=[generated])
    (leaf,) = lineage.leaves(lineage.trace(storage, lake.uri))
    assert leaf["uri"] == generated.uri and leaf["step"] == "datagen" and leaf["inputs"] == []


def _code_version_in_subprocess(env: dict[str, str], cwd: Path) -> str:
    import subprocess
    import sys

    code = "from flywheel.lineage import code_version; print(code_version())"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_code_version_names_the_git_commit_or_the_image_version(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    from flywheel import __version__

    root = Path(lineage.__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_CODE_VERSION"}
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()  # noqa: E731
    expected = f"{__version__}+g{git('rev-parse', '--short=12', 'HEAD')}"
    if git("status", "--porcelain", "--untracked-files=no"):
        expected += ".dirty"
    assert _code_version_in_subprocess(env, root) == expected
    # In the image the version is set explicitly; outside any git checkout it is the package version.
    assert _code_version_in_subprocess(dict(env, FLYWHEEL_CODE_VERSION="image-2026.11"), root) == "image-2026.11"
    shutil.copytree(root / "flywheel", tmp_path / "flywheel", ignore=shutil.ignore_patterns("__pycache__"))
    assert _code_version_in_subprocess(dict(env, PYTHONPATH=str(tmp_path), GIT_CEILING_DIRECTORIES=str(tmp_path.parent)), tmp_path) == __version__
