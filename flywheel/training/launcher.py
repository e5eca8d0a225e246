"""Run the DDP workers through torchrun on this machine, read why they failed, and retry faults.

torchrun runs with ``--max-restarts=0`` and a c10d rendezvous on 127.0.0.1 (a free port and a
run-unique id per attempt, so a relaunched group rendezvouses afresh): the retry lives here, in one place, because only here is
the failure classified. Each worker writes an error file (its entry point is wrapped with torch's
``record``); torchrun's ``--log-dir`` keeps each rank's output and error file. After an attempt:

- a worker raised a Python exception (a missing file, a bad spec, a bug): deterministic, so the
  step fails at once with the exception, its traceback and where the logs are kept;
- a worker was killed by a signal (SIGKILL, the OOM killer) or the workers lost each other
  (a collective or rendezvous failed): a fault, so the group is relaunched (``training.max_restarts``
  times at most) and resumes from the latest checkpoint in ``out`` (a storage URI or a path).

The workers get the storage settings (the storage section's variables and the S3 keys) in their environment,
as the cluster jobs' pods do, so they read and write the same storage as this process.

Every attempt's logs are copied into storage under ``runs/<run_id>/train/attempt-<n>/``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.config import Settings
from flywheel.errors import TrainingError
from flywheel.storage import Storage

log = logging.getLogger(__name__)
WORKER_MODULE = "flywheel.training.worker"  # what torchrun runs in every rank (a root of the model's code key)

TORCHRUN_LOG = "torchrun.log"
LOG_TAIL_LINES = 30
TRACEBACK_FRAMES = 6
# gloo reports a peer that vanished as a plain RuntimeError (NCCL and the store raise torch's
# DistError family): these exceptions are the consequence of another rank's death, not a cause.
COMMUNICATION_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
COMMUNICATION_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
                         "connectFullMesh", "Connection refused")
# torchrun's failure summary (torch.distributed.elastic.multiprocessing.errors._FAILURE_FORMAT_TEMPLATE).
_SUMMARY_FAILURE = re.compile(r"rank\s*: (\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*: (-?\d+)")

OK, DETERMINISTIC, FAULT, TIMEOUT = "succeeded", "deterministic failure", "fault", "timed out"


@dataclass
class WorkerError:
    """What one rank's error file says: ``FileNotFoundError: ...`` and the traceback."""

    rank: int
    exception: str  # the type's name
    message: str  # "Type: text", as the error file has it
    traceback: str
    error_file: Path

    @property
    def is_communication_error(self) -> bool:
        return self.exception in COMMUNICATION_ERRORS or (
            self.exception == "RuntimeError" and any(marker in self.message for marker in COMMUNICATION_MARKERS)
        )


@dataclass
class Attempt:
    """One torchrun launch and what came of it."""

    number: int
    folder: Path  # torchrun.log and torch's per-rank log folders
    returncode: int | None  # None: killed after the timeout
    errors: list[WorkerError] = field(default_factory=list)
    exit_codes: dict[int, int] = field(default_factory=dict)  # failed ranks, from torchrun's summary
    kept_at: str = ""  # where the logs were copied in storage

    @property
    def log(self) -> Path:
        return self.folder / TORCHRUN_LOG

    @property
    def outcome(self) -> str:
        return classify(self)


def classify(attempt: Attempt) -> str:
    """Succeeded, a deterministic failure (never retried), a fault (retried), or timed out."""
    if attempt.returncode == 0:
        return OK
    if attempt.returncode is None:
        return TIMEOUT
    if any(not error.is_communication_error for error in attempt.errors):
        return DETERMINISTIC  # a rank raised an exception of its own; the others' errors follow from it
    if any(code < 0 for code in attempt.exit_codes.values()):
        return FAULT  # killed by a signal (SIGKILL, OOM) with no exception of its own
    if attempt.errors or not attempt.exit_codes:
        return FAULT  # the ranks lost each other, or torchrun failed before any worker (rendezvous)
    return DETERMINISTIC  # exited non-zero without an exception: an import error, sys.exit


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(
    settings: Settings, data: str | Path, spec: str | Path, out: str | Path, log_dir: Path, rdzv_id: str = "flywheel"
) -> list[str]:
    """The local launch: torchrun on this machine (a PyTorchJob runs the same worker module), with
    an elastic c10d rendezvous that torchrun hosts on a free loopback port."""
    cfg = settings.training
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id={rdzv_id}",
        f"--nproc_per_node={cfg.nproc}",
        "--max-restarts=0",  # retries are decided by launch(), which knows a fault from a bug
        f"--log-dir={log_dir}",
        "--redirects=3", "--tee=3",  # each rank's output in its own file, and in torchrun's log
        *worker_args(settings, str(data), str(spec), str(out)),
    ]


def worker_args(settings: Settings, data: str, spec: str, out: str) -> list[str]:
    """``-m flywheel.training.worker`` and its flags: what torchrun runs in every rank, here or in a pod."""
    cfg = settings.training
    return [
        "-m", WORKER_MODULE,
        "--data", data,
        "--spec", spec,
        "--out", out,
        "--epochs", str(cfg.epochs),
        "--batch-size", str(cfg.batch_size),
        "--lr", str(cfg.learning_rate),
        "--weight-decay", str(cfg.weight_decay),
        "--validation-fraction", str(cfg.validation_fraction),
        "--patience", str(cfg.patience),
        "--hidden", ",".join(str(h) for h in cfg.hidden),
        "--seed", str(cfg.seed),
        "--backend", cfg.backend,
        "--timeout-s", str(cfg.process_group_timeout_s),
        "--checkpoint-every", str(cfg.checkpoint_every_steps),
    ]


def storage_env(settings: Settings) -> dict[str, str]:
    """The storage settings as the workers' environment (what the cluster jobs set from the settings
    and a Secret): the workers build the same Storage from them."""
    store = settings.storage
    env = {
        "FLYWHEEL_STORAGE__ROOT": store.root,
        "FLYWHEEL_STORAGE__S3_ENDPOINT": store.s3_endpoint,
        "FLYWHEEL_STORAGE__S3_SECURE": str(store.s3_secure).lower(),
        "FLYWHEEL_STORAGE__S3_REGION": store.s3_region,
        "FLYWHEEL_STORAGE__RETRIES": str(store.retries),
        "FLYWHEEL_STORAGE__TIMEOUT_S": str(store.timeout_s),
    }
    if store.access_key is not None:
        env["FLYWHEEL_S3_ACCESS_KEY"] = store.access_key.get_secret_value()
    if store.secret_key is not None:
        env["FLYWHEEL_S3_SECRET_KEY"] = store.secret_key.get_secret_value()
    return {name: value for name, value in env.items() if value != ""}


def worker_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update(extra or {})
    # Without it gloo may pick an interface a relaunched group cannot connect through (FIELD-NOTES).
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def run_torchrun(
    command: list[str], folder: Path, threads: int, timeout_s: float, number: int = 1, env: dict[str, str] | None = None
) -> Attempt:
    """Run torchrun once, its output in ``folder/torchrun.log``; read the failed ranks' error files.
    ``env``: variables added to the workers' environment (the storage settings)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TORCHRUN_LOG, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=worker_env(threads, env),
                                   start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            returncode = None
    attempt = Attempt(number, folder, returncode)
    if returncode != 0:
        attempt.errors = read_error_files(folder)
        attempt.exit_codes = {int(rank): int(code) for rank, code in _SUMMARY_FAILURE.findall(_text(attempt.log))}
    return attempt


def _stop(process: subprocess.Popen) -> None:
    """torchrun forwards SIGTERM to its workers; whatever is left after a grace period is killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def read_error_files(folder: Path) -> list[WorkerError]:
    """The exceptions the ranks recorded (``<log-dir>/<run>/attempt_0/<rank>/error.json``)."""
    errors = []
    for path in sorted(folder.glob("**/attempt_*/*/error.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a rank killed while writing it: its exit code tells the story
        body = data.get("message", {})
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        callstack = body.get("extraInfo", {}).get("py_callstack", "") if isinstance(body, dict) else ""
        errors.append(WorkerError(int(path.parent.name), message.split(":", 1)[0], message, callstack, path))
    return errors


def readable_traceback(callstack: str, frames: int = TRACEBACK_FRAMES) -> str:
    """The frames that matter: flywheel's own, and the innermost one; no wrappers, no carets."""
    parsed: list[list[str]] = []
    for line in callstack.splitlines():
        if line.startswith("  File "):
            parsed.append([line])
        elif parsed and line.startswith("    ") and not set(line.strip()) <= set("^~ "):
            parsed[-1].append(line)
    if not parsed:
        return ""
    kept = [frame for frame in parsed[:-1] if "/flywheel/" in frame[0] and "site-packages" not in frame[0]]
    kept = (kept + [parsed[-1]])[-frames:]
    return "\n".join(line for frame in kept for line in frame)


def kept_log_uri(storage: Storage, run_id: str, number: int, *parts: str) -> str:
    return storage.uri("runs", run_id, "train", f"attempt-{number}", *parts)


def keep_logs(storage: Storage, run_id: str, attempt: Attempt) -> str:
    """Copy the attempt's logs into storage: torchrun.log and rank-<r>/{stdout,stderr}.log, error.json."""
    if attempt.log.exists():
        storage.upload_file(attempt.log, kept_log_uri(storage, run_id, attempt.number, TORCHRUN_LOG))
    for path in sorted(attempt.folder.glob("**/attempt_*/*/*")):
        if path.is_file():
            rank = path.parent.name
            storage.upload_file(path, kept_log_uri(storage, run_id, attempt.number, f"rank-{rank}", path.name))
    attempt.kept_at = kept_log_uri(storage, run_id, attempt.number)
    return attempt.kept_at


def describe(attempt: Attempt) -> str:
    """Why an attempt failed, in words: the root exception and traceback, or the signal, or the log's tail."""
    own = [e for e in attempt.errors if not e.is_communication_error] or attempt.errors
    if attempt.returncode is None:
        head = "the workers did not finish within the timeout (training.timeout_s)"
    elif own and attempt.outcome == DETERMINISTIC:
        first = min(own, key=lambda e: e.rank)
        others = sorted({e.rank for e in own} - {first.rank})
        also = f" (rank(s) {', '.join(map(str, others))} failed the same way or after it)" if others else ""
        head = f"rank {first.rank} raised {first.message}{also}\ntraceback (flywheel's frames and the innermost):\n{readable_traceback(first.traceback)}"
    elif attempt.exit_codes:
        codes = ", ".join(f"rank {rank}: {_exit_reason(code)}" for rank, code in sorted(attempt.exit_codes.items()))
        head = f"workers failed ({codes})"
        if own:
            head += f"; rank {own[0].rank} raised {own[0].message}"
    else:
        head = f"torchrun exited with code {attempt.returncode} before or outside the workers"
    where = _join(attempt.kept_at or str(attempt.folder), TORCHRUN_LOG)
    if not (own and attempt.outcome == DETERMINISTIC):  # no traceback to show: the log's end must do
        head += f"\nlast lines of torchrun's log:\n{_tail(attempt.log)}"
    return f"{head}\nfull log: {where} (per-rank logs and error files beside it)"


def launch(
    settings: Settings, storage: Storage, run_id: str, data: str | Path, spec: str | Path, out: str | Path, work: Path
) -> list[Attempt]:
    """Train with torchrun: relaunch after a fault (resuming from the checkpoint in ``out``), fail at
    once on a deterministic failure. Returns the attempts; raises :class:`TrainingError`."""
    cfg = settings.training
    attempts: list[Attempt] = []
    for number in range(1, cfg.max_restarts + 2):
        folder = work / f"attempt-{number}"
        command = torchrun_command(settings, data, spec, out, folder / "torchelastic", f"{run_id}-{number}")
        log.info("train: attempt %d: %s", number, " ".join(command))
        started = time.perf_counter()
        attempt = run_torchrun(command, folder, cfg.threads_per_worker, cfg.timeout_s, number, storage_env(settings))
        keep_logs(storage, run_id, attempt)
        attempts.append(attempt)
        outcome = attempt.outcome
        log.info("train: attempt %d %s in %.1fs (logs: %s)", number, outcome, time.perf_counter() - started, attempt.kept_at)
        if outcome == OK:
            return attempts
        if outcome == FAULT and number <= cfg.max_restarts:
            log.warning("train: attempt %d was a fault (%s); relaunching from the latest checkpoint",
                        number, describe(attempt).splitlines()[0])
            continue
        raise TrainingError(_failure_message(attempt, cfg.max_restarts))
    raise AssertionError("unreachable")  # the last attempt returns or raises


def _failure_message(attempt: Attempt, max_restarts: int) -> str:
    outcome = attempt.outcome
    if outcome == DETERMINISTIC:
        verdict = "not retried: an exception raised by a worker would happen again; fix its cause and rerun"
    elif outcome == TIMEOUT:
        verdict = "not retried: raise training.timeout_s if the data simply needs longer"
    else:
        verdict = f"gave up after {attempt.number} attempts (training.max_restarts={max_restarts})"
    return f"training failed on attempt {attempt.number} ({outcome}, {verdict}): {describe(attempt)}"


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = _text(path)
    return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"
