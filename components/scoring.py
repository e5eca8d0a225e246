"""The batch scoring pipeline's components. Logic lives in `flywheel.steps` / `flywheel.scoring`."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.steps import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def plan_scoring(
    start_date: str, end_date: str, out_uri: str, run_id: str, job_id: str, chunk_days: int, lake_uri: str, plan: Output[Artifact]
) -> List[dict]:
    """Pin the production model version and the lake snapshot; split the range into chunks of days."""
    from flywheel.steps import plan_scoring_step
    from flywheel.kfp_io import write_artifact

    scoring = plan_scoring_step(start_date, end_date, out_uri, run_id or job_id, chunk_days, lake_uri=lake_uri)
    write_artifact(plan, scoring, ["model_version", "out_uri", "start", "end"])
    return scoring["chunks"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def score(chunk: dict, plan: Input[Artifact]) -> dict:
    """Score one chunk of days with the pinned model; writes one partition per day."""
    from flywheel.steps import score_step
    from flywheel.kfp_io import read_artifact

    scoring = read_artifact(plan)
    return score_step(chunk, scoring, scoring["run_id"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def summarize(plan: Input[Artifact], results: List[dict], summary: Output[Artifact]):
    """Gather the chunks into the run's summary.json."""
    from flywheel.steps import summarize_scoring_step
    from flywheel.kfp_io import read_artifact, write_artifact

    scoring = read_artifact(plan)
    write_artifact(summary, summarize_scoring_step(scoring, results, scoring["run_id"]),
                   ["rows", "days", "flagged", "model_version", "uri"])
