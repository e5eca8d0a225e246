"""The registry: versions, reuse by training key, production stage, integrity on load."""

import pandas as pd
import pytest

from flywheel.errors import RegistryError
from flywheel.features.transform import FeatureSpec
from flywheel.registry import Registry
from flywheel.storage import Storage
from flywheel.training.model import FraudMLP, FraudModel
from tests.unit.test_transform import frame


@pytest.fixture
def saved_model(tmp_path):
    spec = FeatureSpec.fit(pd.concat([frame(), frame(amount=90.0)], ignore_index=True))
    model = FraudModel(FraudMLP(spec.width, [8]), spec, {"hidden": [8]})
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
    loaded = registry.load(v1.version, cache_dir=tmp_path / "cache")
    assert loaded.score(frame()) == pytest.approx(model.score(frame()))


def test_a_corrupt_version_is_refused_on_load(tmp_path, saved_model):
    folder, _ = saved_model
    storage = Storage(str(tmp_path / "store"))
    registry = Registry(storage, "fraud")
    version = registry.publish(folder, training_key="c" * 64, run_id="r1", inputs=[], meta={"hidden": [8]})
    storage.write_bytes(f"{version.uri}/model.pt", b"not the weights")
    with pytest.raises(RegistryError, match="does not match its recorded sha256"):
        registry.load(version.version, cache_dir=tmp_path / "cache")


def test_unknown_version_and_bad_names_are_clear_errors(tmp_path):
    registry = Registry(Storage(str(tmp_path)), "fraud")
    with pytest.raises(RegistryError, match="has no version 'nope'"):
        registry.promote("nope", run_id="r")
    with pytest.raises(RegistryError, match="invalid model name"):
        Registry(Storage(str(tmp_path)), "../etc")
