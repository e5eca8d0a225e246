"""Releasing a candidate on this machine: two `flywheel serve` processes behind the splitting proxy.

1. Stable is the production version, the candidate the new one, each pinned (`flywheel serve
   --version V`) on a free loopback port, with the caller's settings. The registry marks the
   candidate ``canary``. A candidate server that does not come up (a version that cannot load or
   fails its warm-up prediction) is rolled back before any traffic reaches it.
2. The splitting proxy (:mod:`flywheel.deploy.traffic`) sends the candidate its share, ramped through
   ``deploy.canary.steps``; the load is a replay of the candidate's held-out rows (transactions
   neither model trained on) as scoring requests. Every window is judged by the same function as on
   KServe (:func:`flywheel.deploy.canary.analyse`); a canary failure is answered from stable, so no
   client request fails during the rollout.
3. Promote: the proxy sends everything to the candidate, and the registry makes it production
   (refused if another promotion landed meanwhile). Rollback: the canary gets 0% at once and the
   registry archives it; production is unchanged.
4. The servers and the proxy stop; the decision record is written to
   ``reports/canary/<run>/decision.json`` (and ``.md``), the servers' logs are kept under
   ``$FLYWHEEL_HOME/runs/<run>/deploy/``.

The release is a bounded rehearsal, not a long-lived deployment: once it is decided, the servers it
started stop. What keeps serving is `flywheel serve` (which follows the registry's production version,
so a promotion reaches it within ``serving.reload_interval_s``, and a rollback never does).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from flywheel.config import KFP_TOKEN_ENV, NOT_SETTINGS_ENV, SECRET_ENV, Settings, write_settings
from flywheel.deploy import canary
from flywheel.deploy.analysis import thresholds_for
from flywheel.deploy.ramp import ramp_canary
from flywheel.deploy.replay import ReplayPlan, plan_replay, remove_replay, requests_needed
from flywheel.deploy.traffic import start_proxy
from flywheel.errors import CanaryError, DeployError, FlywheelError, RegistryConflict, first_line
from flywheel.registry import Registry
from flywheel.storage import Storage
from flywheel.usecase import load_usecase

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ServeProcess:
    """One `flywheel serve --version V` process and where its output goes."""

    role: str  # stable | candidate
    version: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def server_env(settings: Settings) -> dict[str, str]:
    """This process's environment without its ``FLYWHEEL_*`` settings (the servers get exactly the
    caller's settings object, as a file), but with the settings' S3 credentials, which never go in a
    file."""
    keep = {name for names in SECRET_ENV.values() for name in names} | {KFP_TOKEN_ENV} | NOT_SETTINGS_ENV
    keep.discard("FLYWHEEL_CONFIG")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_") or k in keep}
    for field, (name, _) in SECRET_ENV.items():
        secret = getattr(settings.storage, field)
        if secret is not None:
            env[name] = secret.get_secret_value()
    return env


def start_server(settings_file: Path, settings: Settings, role: str, version: str, logs: Path) -> ServeProcess:
    """`flywheel --config FILE serve --version V` on a free loopback port (its output to a log file)."""
    host = settings.serving.host
    port = _free_port(host)
    log_path = logs / f"{role}.log"
    with open(log_path, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "flywheel.cli", "--config", str(settings_file), "serve", "--version", version,
             "--host", host, "--port", str(port), "--grpc-port", "0"],  # replayed over HTTP, through the splitting proxy
            stdout=sink, stderr=subprocess.STDOUT, env=server_env(settings),
        )
    return ServeProcess(role, version, process, f"http://{host}:{port}", log_path)


def wait_ready(servers: Sequence[ServeProcess], model_name: str, timeout_s: float) -> dict[str, str]:
    """Wait until each server's model answers ready; returns, per role, why it did not (empty: all
    up). A candidate that fails ends the wait at once: there is nothing to judge."""
    import httpx

    waiting = {server.role: server for server in servers}
    failed: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while waiting and "candidate" not in failed and time.monotonic() < deadline:
        for role, server in list(waiting.items()):
            if server.process.poll() is not None:
                failed[role] = f"exited with code {server.process.returncode}: {server.tail()}"
                del waiting[role]
                continue
            try:
                if httpx.get(f"{server.url}/v1/models/{model_name}", timeout=2).status_code == 200:
                    del waiting[role]
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    for role, server in waiting.items():
        if "candidate" in failed:
            break
        failed[role] = f"not ready after {timeout_s:g}s (deploy.canary.server_start_timeout_s): {server.tail()}"
    return failed


@contextmanager
def _servers(settings: Settings, stable: str, candidate: str, folder: Path,
             own: dict[str, Settings] | None = None) -> Iterator[list[ServeProcess]]:
    """The two servers; ``own``: a role's settings where they differ from ``settings`` (a replay's)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flywheel-deploy-") as tmp:
        started: list[ServeProcess] = []
        try:
            for role, version in (("stable", stable), ("candidate", candidate)):
                mine = (own or {}).get(role, settings)
                settings_file = write_settings(mine, Path(tmp) / f"{role}.yaml")
                started.append(start_server(settings_file, mine, role, version, folder))
            yield started
        finally:
            for server in started:
                server.stop()


def release_locally(storage: Storage, settings: Settings, candidate_version: str, run_id: str,
                    replay: Sequence[dict[str, Any]] | None = None) -> canary.DecisionRecord:
    """Roll ``candidate_version`` out against production behind the splitting proxy, then promote or
    roll it back; returns the decision record (written to storage). ``replay``: v1 bodies to send
    instead of the candidate's holdout."""
    cfg = settings.deploy.canary
    registry = Registry(storage, settings.model_name)
    candidate = registry.get(candidate_version)
    stable = registry.production()
    thresholds = thresholds_for(cfg, candidate.meta)  # agreement in the candidate's own output units
    record = canary.DecisionRecord(
        model_name=settings.model_name, candidate=candidate.version, stable=stable.version if stable else None,
        target="local", run_id=run_id, thresholds=thresholds.to_dict(), steps=list(cfg.steps),
        meta={"window_requests": cfg.window_requests, "concurrency": cfg.concurrency},
    )
    clock = time.perf_counter()

    def finish(verdict: str, reasons: list[str], percent: int) -> canary.DecisionRecord:
        record.verdict, record.reasons, record.final_canary_percent = verdict, reasons, percent
        record.decided_at, record.duration_s = canary.now(), round(time.perf_counter() - clock, 3)
        canary.write_record(storage, record)
        log.info("deploy: %s %s (%s); record %s", verdict, candidate.version, "; ".join(reasons), record.uri)
        return record

    if stable is None:
        registry.promote(candidate.version, run_id=run_id, reason="first version: nothing to compare a canary with",
                         expected_production=None)
        record.events.append(f"registry: {candidate.version} is production (the first version)")
        return finish(canary.PROMOTE, ["no production version yet: the first version is promoted without a canary"], 100)
    if stable.version == candidate.version:
        return finish(canary.PROMOTE, [f"{candidate.version} is already production"], 100)

    contract = canary.model_contract(candidate, load_usecase(settings.usecase).contract)
    plan = ReplayPlan(bodies=[])
    if replay is not None:
        bodies: list[Any] = list(replay)
    else:  # the held-out rows, read as of their own times, with the difference the gate accepted
        plan = plan_replay(storage, settings, stable, candidate, contract, run_id,
                           requests_needed(cfg.steps, cfg.window_requests))
        bodies = list(plan.bodies)
        record.events.extend(plan.events)
    registry.start_canary(candidate.version, run_id=run_id, reason=f"local canary through {cfg.steps}%")
    record.events.append(f"registry: {candidate.version} is canary")
    logs = Path(settings.home) / "runs" / run_id / "deploy"
    try:
        with ExitStack() as stack:
            stack.callback(remove_replay, storage, plan)
            servers = stack.enter_context(_servers(settings, stable.version, candidate.version, logs, plan.settings))
            record.events.append(f"started `flywheel serve --version` for stable {stable.version} ({servers[0].url}) "
                                 f"and candidate {candidate.version} ({servers[1].url}); logs in {logs}")
            failed = wait_ready(servers, settings.model_name, cfg.server_start_timeout_s)
            if "stable" in failed:
                raise DeployError(f"the stable version {stable.version} did not start serving, so the canary cannot be "
                                  f"judged: {failed['stable']}")
            if "candidate" in failed:
                why = f"the candidate's server did not start: {failed['candidate']}"
                registry.abort_canary(candidate.version, run_id=run_id, reason=why.splitlines()[0])
                record.events.append(f"registry: canary {candidate.version} archived; production unchanged")
                return finish(canary.ROLLBACK, [why], 0)
            record.events.append("both servers ready")
            proxy = stack.enter_context(start_proxy(servers[0].url, servers[1].url, thresholds=thresholds,
                                                    score_field=canary.model_output(candidate), expected=plan.expected))
            record.events.append(f"splitting proxy on {proxy.url}")
            ramp_canary(proxy, bodies, f"/v1/models/{settings.model_name}:predict", steps=cfg.steps,
                        canary_window_requests=cfg.window_requests, thresholds=thresholds, concurrency=cfg.concurrency,
                        record=record)
    except FlywheelError:
        _abort_quietly(registry, candidate.version, run_id, "the local release failed before a verdict", record)
        raise
    except Exception as exc:
        _abort_quietly(registry, candidate.version, run_id, "the local release failed before a verdict", record)
        raise CanaryError(f"the local release of {candidate.version} failed: {first_line(exc)} (logs in {logs})") from exc
    record.events.append("servers and proxy stopped")
    if record.verdict == canary.PROMOTE:
        try:
            registry.promote(candidate.version, run_id=run_id, reason="canary analysis passed: " + "; ".join(record.reasons),
                             expected_production=stable.version)
        except RegistryConflict as exc:  # another promotion landed while this one was judged: it stands
            registry.abort_canary(candidate.version, run_id=run_id, reason=str(exc))
            record.events.append(f"registry: promotion refused ({exc}); canary {candidate.version} archived")
            return finish(canary.ROLLBACK, [*record.reasons, f"but the promotion was refused: {exc}"], 0)
        record.events.append(f"registry: {candidate.version} is production; {stable.version} archived")
    else:
        registry.abort_canary(candidate.version, run_id=run_id, reason="; ".join(record.reasons))
        record.events.append(f"registry: canary {candidate.version} archived; production {stable.version} unchanged")
    return finish(record.verdict, record.reasons, record.final_canary_percent or 0)


def _abort_quietly(registry: Registry, version: str, run_id: str, reason: str, record: canary.DecisionRecord) -> None:
    """Archive the canary after a failure of the release itself (the failure is what gets raised)."""
    try:
        if registry.stage(version) == "canary":
            registry.abort_canary(version, run_id=run_id, reason=reason)
            record.events.append(f"registry: canary {version} archived ({reason})")
    except FlywheelError as exc:
        log.warning("could not archive canary %s: %s", version, exc)
