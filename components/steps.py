"""The training pipeline's components. Logic lives in `flywheel.steps`; these only move artifacts."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

# The project image: the flywheel package and its locked dependencies (see README, "Cluster").
IMAGE = "ghcr.io/flywheel-ml/flywheel:0.1.0"


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def ingest(
    source_uri: str, lake_uri: str, run_id: str, job_id: str, staged: Output[Dataset]
) -> NamedTuple("IngestOutputs", [("run_id", str)]):
    """Raw csv/parquet/jsonl files -> a staged, schema-enforced batch of the lake; settles the run id."""
    from collections import namedtuple

    from flywheel.steps import ingest_step
    from flywheel.kfp_io import write_artifact

    run_id = run_id or job_id
    write_artifact(staged, ingest_step(source_uri, run_id, lake_uri=lake_uri), ["uri", "sha256", "rows"])
    return namedtuple("IngestOutputs", ["run_id"])(run_id)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(
    staged: Input[Dataset],
    run_id: str,
    report: Output[HTML],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    snapshot: Output[Dataset],
):
    """Great Expectations suite on the staged batch: publishes it into the lake, or discards it and stops the run.
    In the Kubeflow UI: GE's data docs (HTML), a Markdown summary with the drift checks, the pass/fail counts."""
    from flywheel.steps import validate_step, validation_outputs
    from flywheel.kfp_io import log_metrics, read_artifact, write_artifact, write_text

    published = validate_step(read_artifact(staged), run_id)
    write_artifact(snapshot, published, ["uri", "sha256", "rows"])
    shown = validation_outputs(run_id)
    write_text(report, shown["html"])
    report.metadata.update(shown["meta"])
    write_text(summary, shown["markdown"])
    log_metrics(metrics, shown["metrics"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def features(snapshot: Input[Dataset], run_id: str, training_set: Output[Dataset]):
    """Card and merchant aggregates, feast apply + materialize, point-in-time training set."""
    from flywheel.steps import features_step
    from flywheel.kfp_io import read_artifact, write_artifact

    write_artifact(
        training_set,
        features_step(read_artifact(snapshot), run_id),
        ["uri", "sha256", "rows", "train_rows", "holdout_rows", "cutoff"],
    )


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train(training_set: Input[Dataset], run_id: str, model: Output[Model], triggered_by: str = ""):
    """Distributed PyTorch training (torchrun locally, the same worker in a PyTorchJob)."""
    from flywheel.steps import train_step
    from flywheel.kfp_io import read_artifact, write_artifact

    write_artifact(model, train_step(read_artifact(training_set), run_id, triggered_by=triggered_by), ["uri", "version", "sha256"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    training_set: Input[Dataset],
    model: Input[Model],
    run_id: str,
    truth_uri: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification: Output[ClassificationMetrics],
    report: Output[HTML],
) -> bool:
    """Holdout metrics and the gate: an absolute floor AND no worse than production. Returns the blessing.
    In the Kubeflow UI: the scalar metrics, the ROC curve and confusion matrix, and the HTML report
    (plots against production, segments, calibration, model card).

    (A plain return, not a NamedTuple field: kfp.local resolves `dsl.If` conditions only on `Output`.)
    """
    from flywheel.steps import evaluate_step, evaluation_html
    from flywheel.kfp_io import log_evaluation, read_artifact, write_artifact

    result = evaluate_step(read_artifact(training_set), read_artifact(model), run_id, truth_uri)
    write_artifact(evaluation, result, ["model_version", "blessed", "report_uri"], extra=result["metrics"])
    log_evaluation(metrics, classification, result)
    with open(report.path, "w") as handle:
        handle.write(evaluation_html(result))
    return bool(result["blessed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def deploy(model: Input[Model], evaluation: Input[Artifact], run_id: str, deployed: Output[Model], decision: Output[Markdown]):
    """Release the blessed version (deploy.target) as a canary against production, then promote or roll
    back: locally two `flywheel serve` processes behind a splitting proxy for the release's duration,
    on KServe the InferenceService. The decision record is shown in the Kubeflow UI."""
    from flywheel.steps import decision_markdown, deploy_step
    from flywheel.kfp_io import read_artifact, write_artifact

    result = deploy_step(read_artifact(model), read_artifact(evaluation), run_id)
    write_artifact(deployed, result, ["uri", "version"])
    with open(decision.path, "w") as handle:
        handle.write(decision_markdown(result))
