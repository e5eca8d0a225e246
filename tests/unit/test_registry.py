"""The registry: versions, reuse by training key, production stage, integrity on load."""

import pandas as pd
import pytest

from flywheel.errors import IntegrityError, RegistryError
from flywheel.features.transform import FeatureSpec
from tests.factories import FRAUD
from flywheel.registry import Registry
from flywheel.storage import Storage
from flywheel.training.model import TabularMLP, Model, load_version
from tests.unit.test_transform import frame


@pytest.fixture
def saved_model(tmp_path):
    spec = FeatureSpec.fit(pd.concat([frame(), frame(amount=90.0)], ignore_index=True), FRAUD)
    model = Model(TabularMLP(spec.width, [8]), spec, {"hidden": [8]})
    model.save(tmp_path / "model")
    return tmp_path / "model", model


def test_publish_promote_load(tmp_path, saved_model):
    folder, model = saved_model
    registry = Registry(Storage(str(tmp_path / "store")), "fraud")
    assert registry.production() is None
    v1 = registry.publish(folder, training_key="a" * 64, run_id="r1", inputs=[], meta={"hidden": [8]})
    assert registry.versions() == [v1.version]
    assert registry.find_by_key("a" * 64).version == v1.version
    assert registry.find_by_key("b" * 64) is None
    registry.promote(v1.version, run_id="r1")
    assert registry.production().version == v1.version
    loaded = load_version(registry, v1.version, cache_dir=tmp_path / "cache")
    assert loaded.score(frame()) == pytest.approx(model.score(frame()))


def test_a_corrupt_version_is_refused_on_load(tmp_path, saved_model):
    folder, _ = saved_model
    storage = Storage(str(tmp_path / "store"))
    registry = Registry(storage, "fraud")
    version = registry.publish(folder, training_key="c" * 64, run_id="r1", inputs=[], meta={"hidden": [8]})
    storage.write_bytes(f"{version.uri}/model.pt", b"not the weights")
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        load_version(registry, version.version, cache_dir=tmp_path / "cache")


def test_a_tampered_version_is_refused_not_reused(tmp_path, saved_model):
    """A rerun with the same training key must not silently reuse a model whose files changed."""
    folder, _ = saved_model
    storage = Storage(str(tmp_path / "store"))
    registry = Registry(storage, "fraud")
    version = registry.publish(folder, training_key="d" * 64, run_id="r1", inputs=[], meta={"hidden": [8]})
    weights = f"{version.uri}/model.pt"
    storage.write_bytes(weights, storage.read_bytes(weights) + b"\0")
    with pytest.raises(IntegrityError, match="model.pt does not match the sha256 recorded"):
        registry.find_by_key("d" * 64)


def test_the_registry_needs_no_torch():
    """The registry stores and verifies files; importing it must not import torch (nor training)."""
    import subprocess
    import sys

    code = "import sys, flywheel.registry; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('flywheel.training')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_version_and_bad_names_are_clear_errors(tmp_path):
    registry = Registry(Storage(str(tmp_path)), "fraud")
    with pytest.raises(RegistryError, match="has no version 'nope'"):
        registry.promote("nope", run_id="r")
    with pytest.raises(RegistryError, match="invalid model name"):
        Registry(Storage(str(tmp_path)), "../etc")
