"""One exception family: every error a user can cause says what was wrong, where, and what to do."""

from __future__ import annotations


class FlywheelError(Exception):
    """Base of every error flywheel raises on purpose; the CLI prints these without a traceback."""

    exit_code = 1


class ConfigError(FlywheelError):
    """The settings file or a FLYWHEEL_* variable is invalid."""

    exit_code = 2


class StorageError(FlywheelError):
    """An object could not be read or written, or does not exist."""


class ArtifactNotFound(StorageError):
    """A URI names nothing."""


class IntegrityError(StorageError):
    """A stored artifact no longer matches the sha256 recorded when it was written (tampered or
    corrupted): it is refused, never silently reused."""


class LineageError(FlywheelError):
    """A lineage record is malformed (an input without a URI)."""


class CanaryError(FlywheelError):
    """A canary rollout (splitting proxy, ramp) was given unusable arguments or could not run."""


class DataError(FlywheelError):
    """Input data does not match the expected schema or is unreadable."""


class ValidationFailed(FlywheelError):
    """A Great Expectations suite failed; the message names the failed expectations."""


class FeatureStoreError(FlywheelError):
    """Feast could not apply, materialize or serve features."""


class TrainingError(FlywheelError):
    """The training job failed; the message carries the workers' last log lines."""


class RegistryError(FlywheelError):
    """A model or version is missing from the registry, or a stage change is not allowed."""


class RegistryConflict(RegistryError):
    """A stage change lost a race: another process changed the registry first."""


class GateRefused(FlywheelError):
    """A deployment was refused because the evaluation gate did not bless the version."""


class KfpError(FlywheelError):
    """The Kubeflow Pipelines API cannot be reached, refused the credentials, or refused a request."""


class DeployError(FlywheelError):
    """A deployment could not be rendered, applied, or did not become ready."""


class PipelineError(FlywheelError):
    """A pipeline step failed."""


def first_line(exc: BaseException) -> str:
    """An exception's first line (or its type's name), for messages that quote what a library said."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UseCaseError(FlywheelError):
    """A use case's declaration (its folder, its contract) is missing or invalid."""

    exit_code = 2
