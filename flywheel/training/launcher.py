"""Run the DDP workers through torchrun on this machine, and read why they failed.

torchrun runs with a c10d rendezvous on 127.0.0.1 (a free port) and ``--max-restarts`` from
``training.max_restarts``: after a fault (a worker killed by a signal, the OOM killer, peers lost)
torchrun restarts the worker group, which resumes from the latest checkpoint in ``out`` (a storage
URI or a path). An exception a worker raised of its own (a missing file, a bad spec, a bug) is not
retried: the worker records it in ``out`` and the restarted group stops at once (see
:mod:`flywheel.training.failures`), so the step fails with the first exception and its traceback.

Each worker writes an error file (its entry point is wrapped with torch's ``record``); torchrun's
``--log-dir`` keeps each attempt's per-rank output and error files (``<run>/attempt_<k>/<rank>/``).
The workers get the storage settings (the storage section's variables and the S3 keys) in their
environment, as the cluster jobs' pods do, so they read and write the same storage as this process.

torchrun's log is copied into storage as ``runs/<run_id>/train/torchrun.log`` and every attempt's
per-rank files under ``runs/<run_id>/train/attempt-<n>/rank-<r>/``.
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
from flywheel.training.failures import clear_failure, is_communication_error

log = logging.getLogger(__name__)
WORKER_MODULE = "flywheel.training.worker"  # what torchrun runs in every rank (a root of the model's code key)

TORCHRUN_LOG = "torchrun.log"
LOG_TAIL_LINES = 30
TRACEBACK_FRAMES = 6
# torch 2.13 shares the rendezvous's TCP store with the workers across restarts, and a restarted
# gloo group reads the dead group's addresses from it: connectFullMesh fails ("Connect timeout") after
# minutes. A store per round (the opt-out torch offers) restarts at once. Set for the cluster's pods too.
RESTART_SAFE_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
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
        return is_communication_error(self.exception, self.message)


@dataclass
class Attempt:
    """One start of the worker group by torchrun (torchelastic's ``attempt_<k>`` folder)."""

    number: int  # 1, 2, ...: the first start, then torchrun's restarts
    folder: Path  # its per-rank folders: stdout.log, stderr.log, error.json
    ranks: list[int] = field(default_factory=list)
    errors: list[WorkerError] = field(default_factory=list)

    @property
    def own_errors(self) -> list[WorkerError]:
        """Exceptions the ranks raised of their own (not the echo of a lost peer)."""
        return [error for error in self.errors if not error.is_communication_error]

    @property
    def silent_ranks(self) -> list[int]:
        """Ranks that ended without an exception: killed by a signal (or still running when it ended)."""
        return sorted(set(self.ranks) - {error.rank for error in self.errors})

    def text(self) -> str:
        """The ranks' output, rank by rank."""
        return "\n".join(_text(path) for path in sorted(self.folder.glob("*/*.log")))


@dataclass
class TorchrunRun:
    """One torchrun launch: its attempts (the first start and each restart) and how it ended."""

    folder: Path  # torchrun.log and torchelastic's log folder
    returncode: int | None  # None: killed after the timeout
    attempts: list[Attempt] = field(default_factory=list)
    exit_codes: dict[int, int] = field(default_factory=dict)  # the last attempt's failed ranks, from torchrun's summary
    kept_at: str = ""  # where the logs were copied in storage

    @property
    def log(self) -> Path:
        return self.folder / TORCHRUN_LOG

    @property
    def outcome(self) -> str:
        return classify(self)

    @property
    def restarts(self) -> int:
        return max(len(self.attempts) - 1, 0)


def classify(run: TorchrunRun) -> str:
    """Succeeded, a deterministic failure (an exception of a worker's own: not retried), a fault
    (the restarts ran out), or timed out."""
    if run.returncode == 0:
        return OK
    if run.returncode is None:
        return TIMEOUT
    if any(attempt.own_errors for attempt in run.attempts):
        return DETERMINISTIC  # a rank raised an exception of its own; the others' errors follow from it
    codes = list(run.exit_codes.values())
    if codes and all(code > 0 for code in codes) and not any(attempt.errors for attempt in run.attempts):
        return DETERMINISTIC  # exited non-zero without an exception: an import error, sys.exit
    return FAULT  # killed by a signal (SIGKILL, OOM), the ranks lost each other, or no worker started


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
        f"--max-restarts={cfg.max_restarts}",  # after a fault; an exception is not retried (failures.py)
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
    and a Secret): the workers build the same Storage from them, in the same use case's namespace."""
    store = settings.storage
    env = {
        "FLYWHEEL_USECASE": str(settings.usecase),
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
    env.update(RESTART_SAFE_ENV)
    return env


def run_torchrun(
    command: list[str], folder: Path, threads: int, timeout_s: float, env: dict[str, str] | None = None
) -> TorchrunRun:
    """Run torchrun once (its restarts included), its output in ``folder/torchrun.log``; read every
    attempt's error files. ``env``: variables added to the workers' environment (the storage settings)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / TORCHRUN_LOG, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=worker_env(threads, env),
                                   start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop(process)
            returncode = None
    run = TorchrunRun(folder, returncode, read_attempts(folder))
    if returncode != 0:
        run.exit_codes = {int(rank): int(code) for rank, code in _SUMMARY_FAILURE.findall(_text(run.log))}
    return run


def read_attempts(folder: Path) -> list[Attempt]:
    """torchelastic's ``<log-dir>/<run>/attempt_<k>/<rank>/`` folders, in order, with their error files."""
    found: dict[int, Attempt] = {}
    for path in folder.glob("**/attempt_*"):
        number = path.name.removeprefix("attempt_")
        if path.is_dir() and number.isdigit():
            ranks = sorted(int(rank.name) for rank in path.iterdir() if rank.is_dir() and rank.name.isdigit())
            found[int(number)] = Attempt(int(number) + 1, path, ranks, read_error_files(path))
    return [found[k] for k in sorted(found)]


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


def read_error_files(attempt_folder: Path) -> list[WorkerError]:
    """The exceptions the ranks of one attempt recorded (``attempt_<k>/<rank>/error.json``)."""
    errors = []
    for path in sorted(attempt_folder.glob("*/error.json")):
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


def kept_log_uri(storage: Storage, run_id: str, *parts: str) -> str:
    return storage.uri("runs", run_id, "train", *parts)


def keep_logs(storage: Storage, run_id: str, run: TorchrunRun) -> str:
    """Copy the logs into storage: torchrun.log, and attempt-<n>/rank-<r>/{stdout,stderr}.log, error.json."""
    if run.log.exists():
        storage.upload_file(run.log, kept_log_uri(storage, run_id, TORCHRUN_LOG))
    for attempt in run.attempts:
        for path in sorted(attempt.folder.glob("*/*")):
            if path.is_file():
                storage.upload_file(path, kept_log_uri(storage, run_id, f"attempt-{attempt.number}",
                                                       f"rank-{path.parent.name}", path.name))
    run.kept_at = kept_log_uri(storage, run_id)
    return run.kept_at


def describe(run: TorchrunRun) -> str:
    """Why a launch failed, in words: the first exception of a worker's own and its traceback, or
    what each attempt ended with and the log's tail."""
    where = _join(run.kept_at or str(run.folder), TORCHRUN_LOG)
    first = next((attempt for attempt in run.attempts if attempt.own_errors), None)
    if run.returncode is None:
        head = "the workers did not finish within the timeout (training.timeout_s)"
    elif first is not None and run.outcome == DETERMINISTIC:
        root = min(first.own_errors, key=lambda e: e.rank)
        others = sorted({e.rank for e in first.own_errors} - {root.rank})
        also = f" (rank(s) {', '.join(map(str, others))} failed the same way or after it)" if others else ""
        head = (f"rank {root.rank} raised {root.message}{also} (attempt {first.number})\n"
                f"traceback (flywheel's frames and the innermost):\n{readable_traceback(root.traceback)}")
        return f"{head}\nfull log: {where} (per-attempt, per-rank logs and error files beside it)"
    else:
        head = "; ".join(_attempt_summary(attempt, run) for attempt in run.attempts) or (
            f"torchrun exited with code {run.returncode} before or outside the workers")
    return f"{head}\nlast lines of torchrun's log:\n{_tail(run.log)}\nfull log: {where} (per-attempt, per-rank logs beside it)"


def _attempt_summary(attempt: Attempt, run: TorchrunRun) -> str:
    parts = [f"rank {e.rank} raised {e.message.splitlines()[0][:200]}" for e in attempt.errors]
    last = attempt is run.attempts[-1]
    for rank in attempt.silent_ranks:
        code = run.exit_codes.get(rank) if last else None
        parts.append(f"rank {rank}: {_exit_reason(code)}" if code is not None
                     else f"rank {rank} ended without an exception (killed by a signal, or stopped by torchrun)")
    return f"attempt {attempt.number}: {', '.join(parts) or 'no rank failed'}"


def launch(
    settings: Settings, storage: Storage, run_id: str, data: str | Path, spec: str | Path, out: str | Path, work: Path
) -> TorchrunRun:
    """Train with torchrun: restarted by torchrun after a fault (resuming from the checkpoint in
    ``out``), not after an exception of a worker's own. Returns the run; raises :class:`TrainingError`."""
    cfg = settings.training
    clear_failure(storage, str(out))
    command = torchrun_command(settings, data, spec, out, work / "torchelastic", run_id)
    log.info("train: %s", " ".join(command))
    started = time.perf_counter()
    run = run_torchrun(command, work, cfg.threads_per_worker, cfg.timeout_s, storage_env(settings))
    keep_logs(storage, run_id, run)
    for attempt in run.attempts[:-1]:
        log.warning("train: %s; torchrun restarted the workers from the latest checkpoint",
                    _attempt_summary(attempt, run))
    log.info("train: %s in %.1fs after %d attempt(s) (logs: %s)", run.outcome, time.perf_counter() - started,
             len(run.attempts), run.kept_at)
    if run.outcome != OK:
        raise TrainingError(_failure_message(run, cfg.max_restarts))
    return run


def _failure_message(run: TorchrunRun, max_restarts: int) -> str:
    outcome = run.outcome
    if outcome == DETERMINISTIC:
        verdict = "not retried: an exception raised by a worker would happen again; fix its cause and rerun"
    elif outcome == TIMEOUT:
        verdict = "raise training.timeout_s if the data simply needs longer"
    else:
        verdict = f"gave up after {len(run.attempts)} attempt(s) (training.max_restarts={max_restarts})"
    return f"training failed ({outcome}, {verdict}): {describe(run)}"


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "no exit code"
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
