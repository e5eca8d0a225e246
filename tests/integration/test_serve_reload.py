"""The model lifecycle of a running server: a promotion in the registry is picked up without a
restart and without a failed request; a version that cannot load never replaces the one serving;
``--version`` pins a version. Each test works on its own copy of the trained loop's home, so the
promotions here never change what the other serving tests see."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from flywheel.config import load_settings
from flywheel.registry import Registry
from flywheel.storage import Storage
from tests.conftest import small_env
from tests.servers import flywheel_server

V1 = "/v1/models/fraud:predict"
V2 = "/v2/models/fraud/infer"
GOOD = {"card_id": "c0000001", "merchant_id": "m000001", "amount": 12.5, "ts": "2026-11-01T12:00:00Z"}
V2_GOOD = {"inputs": [
    {"name": name, "shape": [1], "datatype": "BYTES" if isinstance(value, str) else "FP64", "data": [value]}
    for name, value in GOOD.items()
]}


@pytest.fixture
def home(trained_loop, tmp_path):
    """A copy of the trained loop's home (registry, models, feature worlds), polled every 0.3 s."""
    copy = tmp_path / "home"
    shutil.copytree(trained_loop["home"], copy)
    env = dict(small_env(copy), FLYWHEEL_SERVING__RELOAD_INTERVAL_S="0.3")
    registry = Registry(Storage.from_settings(load_settings(env=env)), "fraud")
    assert registry.production().version == trained_loop["model"]["version"]
    return env, registry, trained_loop["model"]["version"]


def publish_copy(registry: Registry, version: str, folder, *, corrupt: bool = False) -> str:
    """Publish a version's files again as a new version (optionally with a corrupt model card)."""
    model, files = registry.download(version, folder / uuid.uuid4().hex)
    if corrupt:
        (files / "model.json").write_text("{this is not a model card")
    return registry.publish(files, training_key=uuid.uuid4().hex, run_id="reload-test", inputs=[], meta=model.meta).version


class Traffic:
    """Requests in a loop from a thread (v1 and v2 in turn), every answer recorded."""

    def __init__(self, base: str) -> None:
        self.base, self.answers, self._stop = base, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                try:
                    if n % 2:
                        response = client.post(V2, json=V2_GOOD)
                        version = response.json().get("model_version") if response.status_code == 200 else None
                    else:
                        response = client.post(V1, json={"instances": [GOOD]})
                        version = response.json()["predictions"][0]["model_version"] if response.status_code == 200 else None
                    self.answers.append((response.status_code, version))
                except httpx.HTTPError as exc:
                    self.answers.append((type(exc).__name__, None))

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_for(self, version: str, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            recent = self.answers[-20:]
            if len(recent) == 20 and all(v == version for _, v in recent):
                return
            time.sleep(0.1)
        pytest.fail(f"the server never switched to {version}: last answers {self.answers[-10:]}")


def test_a_promotion_is_picked_up_by_every_worker_without_a_failed_request(home, tmp_path):
    env, registry, first = home
    with flywheel_server(dict(env, FLYWHEEL_SERVING__WORKERS="2"), tmp_path / "server.log", seconds=300) as server:
        with Traffic(server.base) as traffic:
            time.sleep(1.0)
            broken = publish_copy(registry, first, tmp_path, corrupt=True)
            registry.promote(broken, run_id="reload-test")
            time.sleep(2.0)  # several polls: both workers try it, fail, and keep serving the first
            assert {v for _, v in traffic.answers[-20:]} == {first}
            second = publish_copy(registry, first, tmp_path)
            registry.promote(second, run_id="reload-test")
            traffic.wait_for(second)
        answers = traffic.answers
        assert len(answers) > 100
        assert [a for a in answers if a[0] != 200] == [], "a request failed during the reloads"
        assert {v for _, v in answers} == {first, second}
        # Traffic on one keep-alive connection reaches one worker; the other swaps on its own poll.
        deadline = time.monotonic() + 30
        while server.output().count(f"now serving fraud version {second}") < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        log = server.output()
        assert f"could not load fraud version {broken}" in log and "cannot be loaded" in log
        # The two REST workers and their parent, which serves gRPC with a model of its own.
        assert log.count(f"now serving fraud version {second}") == 3, "each of the two workers, and the gRPC server, swaps on its own"


def test_a_pinned_version_is_never_replaced(home, tmp_path):
    env, registry, first = home
    with flywheel_server(env, tmp_path / "server.log", "--version", first) as server:
        second = publish_copy(registry, first, tmp_path)
        registry.promote(second, run_id="reload-test")
        time.sleep(1.5)  # five polling intervals, had it been polling
        with httpx.Client(base_url=server.base, timeout=10) as client:
            assert client.post(V1, json={"instances": [GOOD]}).json()["predictions"][0]["model_version"] == first
            assert client.post(V2, json=V2_GOOD).json()["model_version"] == first
        assert "now serving" not in server.output()
    # ...while a server that follows production starts with the new one.
    with flywheel_server(env, tmp_path / "server2.log") as server:
        assert httpx.post(f"{server.base}{V1}", json={"instances": [GOOD]}).json()["predictions"][0]["model_version"] == second


def test_a_server_whose_model_cannot_load_never_becomes_ready_and_says_why(home, tmp_path):
    env, registry, first = home
    broken = publish_copy(registry, first, tmp_path, corrupt=True)
    registry.promote(broken, run_id="reload-test")
    result = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--port", "1"], env=env | {"PATH": ""},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"version {broken} cannot be loaded" in result.stderr and "Traceback" not in result.stderr, result.stderr
    missing = subprocess.run([sys.executable, "-m", "flywheel.cli", "serve", "--port", "1", "--version", "no-such-version"],
                             env=env | {"PATH": ""}, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no version 'no-such-version'" in missing.stderr, missing.stderr
