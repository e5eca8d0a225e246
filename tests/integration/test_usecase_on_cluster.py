"""A team's use case reaches the pipeline's pods through storage, not through the image (issue 19):
`flywheel submit --usecase PATH` publishes the folder to S3 (SeaweedFS on loopback) and names it in
every task of the uploaded pipeline (the KFP stand-in); a step given that name fetches the folder,
checks its digest and runs it; an altered copy is refused."""

from __future__ import annotations

import shutil

import pytest

from flywheel import steps
from flywheel.config import load_settings
from flywheel.errors import UseCaseError
from flywheel.storage import Storage
from flywheel.usecase import load_usecase
from flywheel.usecase_store import fetch_usecase, publish_usecase
from tests.factories import REPO
from tests.integration.test_kfp_cli import TOKEN, flywheel, kfp_env, ok
from tests.kfp_standin import kfp_standin


@pytest.fixture
def flights_copy(tmp_path):
    """The flights use case copied outside the checkout: a team's folder that no image holds."""
    folder = tmp_path / "team" / "flights"
    shutil.copytree(REPO / "usecases" / "flights", folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def test_a_published_use_case_is_fetched_checked_and_published_once(s3_storage, flights_copy, tmp_path):
    usecase = load_usecase(flights_copy)
    uri = publish_usecase(s3_storage, usecase)
    assert uri.startswith("s3://") and uri.endswith(f"/usecases/{usecase.digest}/flights")
    objects = sorted(s3_storage.list(uri))
    assert publish_usecase(s3_storage, usecase) == uri and sorted(s3_storage.list(uri)) == objects  # nothing rewritten
    fetched = fetch_usecase(s3_storage, uri, tmp_path / "cache")
    assert fetched.digest == usecase.digest and fetched.name == "flights" and fetched.task == usecase.task
    assert (fetched.folder / "inputs.py").read_text() == (flights_copy / "inputs.py").read_text()

    # Someone edits the published copy in storage: a fresh pod refuses it rather than run it.
    s3_storage.write_bytes(f"{uri}/files/features.yaml", b"aggregations: {}\n")
    with pytest.raises(UseCaseError, match="altered after it was published"):
        fetch_usecase(s3_storage, uri, tmp_path / "another-pod")
    with pytest.raises(UseCaseError, match="no use case is published at"):
        fetch_usecase(s3_storage, uri.replace(usecase.digest, "0" * 64), tmp_path / "cache")


def test_a_step_given_the_published_use_case_runs_it_not_the_images(s3_storage, s3_env, flights_copy, tmp_path):
    """The pod's own FLYWHEEL_USECASE is the image's default (fraud); FLYWHEEL_USECASE_URI names the
    team's flights: the step works in flights' namespace with flights' contract."""
    uri = publish_usecase(s3_storage, load_usecase(flights_copy))
    env = s3_env(s3_storage.settings_root, FLYWHEEL_HOME=str(tmp_path / "pod"), FLYWHEEL_USECASE_URI=uri)
    settings, storage = steps._context(load_settings(env=env))
    assert settings.namespace == "flights" and settings.model_name == "flights"
    assert settings.usecase.is_relative_to(tmp_path / "pod" / "usecases")
    assert load_usecase(settings.usecase).contract.timestamp == "scheduled_departure"
    assert storage.root.endswith("/flights")


def test_submit_with_a_use_case_publishes_it_and_names_it_in_every_task(s3_storage, s3_env, flights_copy, tmp_path):
    env = kfp_env(tmp_path, "", FLYWHEEL_KFP_TOKEN=TOKEN)
    with kfp_standin(token=TOKEN) as api:
        env.update(s3_env(s3_storage.settings_root, FLYWHEEL_HOME=str(tmp_path / "fh")), FLYWHEEL_KFP__HOST=api.url)
        out = ok(flywheel("submit", "--usecase", str(flights_copy), "--param", "source_uri=s3://lake/flights",
                          "--run-name", "flights-1", env=env, timeout=300))
        [version] = [v for v in api.versions.values() if v["display_name"].startswith("flywheel-training-")]
    usecase = load_usecase(flights_copy)
    uri = f"{s3_storage.settings_root}/flights/usecases/{usecase.digest}/flights"
    assert f"published at {uri}" in out
    assert s3_storage.exists(f"{uri}/usecase.json")
    executors = version["spec"]["deploymentSpec"]["executors"]
    assert executors and all({"name": "FLYWHEEL_USECASE_URI", "value": uri} in executor["container"].get("env", [])
                             for executor in executors.values()), "every task fetches the published use case"
