"""Telling a fault from a bug, for torchrun's restarts (locally, and in a PyTorchJob or TrainJob).

torchrun restarts the whole worker group after any failure (``--max-restarts``, or the job's
elastic policy): right after a fault (a worker killed by a signal, a lost node), useless after an
exception a worker raised of its own (a missing file, a bad spec, a bug), which would happen again.
torchrun cannot tell them apart, so the worker does: a rank that raises an exception of its own
records it in the run's output folder (``failure.json``, in storage, so every pod sees it), and a
restarted group that finds that record stops before doing any work, repeating the first exception.

Exceptions raised by a collective whose peer vanished are a consequence of another rank's death,
not a cause: they are not recorded, so a restart goes ahead.
"""

from __future__ import annotations

import os
import traceback

from flywheel.storage import Storage

FAILURE_FILE = "failure.json"
RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun in every worker: 0, then 1, 2, ...

# gloo reports a peer that vanished as a plain RuntimeError (NCCL and the store raise torch's
# DistError family): these exceptions are the consequence of another rank's death, not a cause.
COMMUNICATION_ERRORS = ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError")
COMMUNICATION_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "Broken pipe",
                         "connectFullMesh", "Connection refused")


class EarlierAttemptFailed(Exception):
    """A restarted worker group found an exception recorded by an earlier attempt: not retried."""


def is_communication_error(exception: str, message: str) -> bool:
    """Whether an exception (its type's name and its "Type: text" message) is a lost peer's echo."""
    return exception in COMMUNICATION_ERRORS or (
        exception == "RuntimeError" and any(marker in message for marker in COMMUNICATION_MARKERS)
    )


def failure_uri(out: str) -> str:
    return f"{out.rstrip('/')}/{FAILURE_FILE}"


def restart_count() -> int:
    return int(os.environ.get(RESTART_COUNT, "0") or 0)


def record_failure(storage: Storage, out: str, rank: int, exc: BaseException) -> bool:
    """Record ``exc`` for the attempts after this one, unless it is a lost peer's echo (or the
    refusal of an earlier failure, already recorded). Returns whether it was recorded."""
    name = type(exc).__name__
    message = f"{name}: {exc}"
    if isinstance(exc, EarlierAttemptFailed) or is_communication_error(name, message):
        return False
    record = {"rank": rank, "attempt": restart_count() + 1, "exception": message,
              "traceback": "".join(traceback.format_exception(exc))}
    storage.write_json(failure_uri(out), record)
    return True


def refuse_after_recorded_failure(storage: Storage, out: str) -> None:
    """In a restarted group: raise :class:`EarlierAttemptFailed` when an earlier attempt recorded an
    exception of its own (the first attempt never looks: the launcher clears stale records)."""
    if restart_count() == 0 or not storage.exists(failure_uri(out)):
        return
    record = storage.read_json(failure_uri(out))
    raise EarlierAttemptFailed(
        f"not retried: on attempt {record.get('attempt')} rank {record.get('rank')} raised "
        f"{record.get('exception')}; an exception of a worker's own would happen again"
    )


def clear_failure(storage: Storage, out: str) -> None:
    """Before a launch: a record left by an earlier launch must not stop this one's restarts."""
    if storage.exists(failure_uri(out)):
        storage.delete(failure_uri(out))
