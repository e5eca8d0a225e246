"""Monitoring as a KFP v2 DAG, run on a schedule: monitor the captured traffic -> if something
crossed a threshold, the trigger (which submits the training pipeline, with a cool-down and one
triggered run in flight at most)."""

# No `from __future__ import annotations` here: KFP reads the pipeline function's real annotations.

import os
from pathlib import Path
from typing import Any, Callable, Optional

from kfp import dsl

from components.monitoring import monitor, trigger
from flywheel.config import Settings, load_settings
from pipelines.training import configure, write_package

PIPELINE_NAME = "flywheel-monitoring"


def create_pipeline(settings: Optional[Settings] = None) -> Callable[..., Any]:
    """The monitoring pipeline for these settings (cluster wiring as for training)."""
    settings = settings or load_settings()

    @dsl.pipeline(name=PIPELINE_NAME, description="Drift, skew and performance of the served model's captured traffic; retrain on evidence.")
    def monitoring_pipeline(since: str = "", until: str = "", run_id: str = "") -> None:
        """since, until: the window (ISO times; empty: the last monitoring.window_days of capture).
        run_id: empty for the KFP job id."""
        # Reads the newest capture and the production model: never cached.
        watched = configure(monitor(since=since, until=until, run_id=run_id, job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER),
                            "Monitor", settings, "monitor")
        # Only a crossing reaches the trigger, which still applies the cool-down and the in-flight rule.
        with dsl.If(watched.outputs["Output"] == True, name="crossed"):  # noqa: E712 - a KFP condition, not Python truth
            configure(trigger(result=watched.outputs["result"]), "Trigger retraining", settings, "trigger")

    return monitoring_pipeline


def compile_pipeline(out_dir: "str | os.PathLike[str]", settings: Optional[Settings] = None) -> Path:
    """Write the pipeline's KFP IR YAML and return its path."""
    return write_package(create_pipeline(settings), PIPELINE_NAME, out_dir)


def run_locally(settings: Settings, run_id: str, since: str = "", until: str = "") -> Any:
    """Run the monitoring DAG with kfp.local, as `flywheel run` runs training."""
    from pipelines.training import local_steps

    with local_steps(settings, run_id):
        pipeline = create_pipeline(settings.model_copy(update={"kfp": settings.kfp.model_copy(update={"retries": 0})}))
        return pipeline(since=since, until=until, run_id=run_id)
