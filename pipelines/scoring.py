"""Batch scoring as a KFP v2 DAG: plan -> score each chunk of days (in parallel) -> summarize."""

# No `from __future__ import annotations` here: KFP reads the pipeline function's real annotations.

import os
from pathlib import Path
from typing import Any, Callable, Optional

from kfp import dsl

import components
from flywheel.config import Settings, load_settings
from pipelines.training import configure, write_package

PIPELINE_NAME = "flywheel-scoring"


def create_pipeline(settings: Optional[Settings] = None) -> Callable[..., Any]:
    """The batch scoring pipeline for these settings (cluster wiring as for training)."""
    settings = settings or load_settings()

    @dsl.pipeline(name=PIPELINE_NAME, description="Score a date range of the lake with the production model, in chunks of days.")
    def scoring_pipeline(start_date: str, end_date: str, out_uri: str = "", run_id: str = "", chunk_days: int = 0,
                         lake_uri: str = "") -> None:
        """start_date, end_date: the days to score (YYYY-MM-DD, inclusive). out_uri: empty for
        <root>/scores/<run>. run_id: empty for the KFP job id. chunk_days: 0 for the settings'
        scoring.chunk_days. lake_uri: empty for the settings' lake."""
        # Pins the production model and the latest lake snapshot: never cached, they move.
        plan = configure(
            components.plan_scoring(start_date=start_date, end_date=end_date, out_uri=out_uri, run_id=run_id,
                                    job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, chunk_days=chunk_days, lake_uri=lake_uri),
            "Plan chunks", settings, "plan_scoring",
        )
        # One task per chunk, at most max_parallel_chunks at a time; a failed chunk retries alone.
        with dsl.ParallelFor(plan.outputs["Output"], parallelism=settings.scoring.max_parallel_chunks, name="chunks") as chunk:
            scored = configure(components.score(chunk=chunk, plan=plan.outputs["plan"]), "Score chunk", settings, "score")
        # The publication point: summary.json names every partition; written after all chunks.
        configure(components.summarize(plan=plan.outputs["plan"], results=dsl.Collected(scored.output)),
                  "Summarize", settings, "summarize")

    return scoring_pipeline


def compile_pipeline(out_dir: "str | os.PathLike[str]", settings: Optional[Settings] = None) -> Path:
    """Write the pipeline's KFP IR YAML and return its path."""
    return write_package(create_pipeline(settings), PIPELINE_NAME, out_dir)


def run_locally(settings: Settings, start_date: str, end_date: str, run_id: str, out_uri: str = "", chunk_days: int = 0,
                lake_uri: str = "") -> Any:
    """Run the scoring DAG with kfp.local, exactly as `flywheel run` runs training."""
    from pipelines.training import local_steps

    with local_steps(settings, run_id):
        pipeline = create_pipeline(settings.model_copy(update={"kfp": settings.kfp.model_copy(update={"retries": 0})}))
        return pipeline(start_date=start_date, end_date=end_date, out_uri=out_uri, run_id=run_id, chunk_days=chunk_days,
                        lake_uri=lake_uri)
