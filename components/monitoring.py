"""The monitoring pipeline's components: monitor a window of captured traffic, then decide whether to
retrain. Logic lives in `flywheel.steps`; these only move artifacts."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Output

from components.steps import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def monitor(since: str, until: str, run_id: str, job_id: str, result: Output[Artifact], metrics: Output[Metrics],
            report: Output[HTML]) -> bool:
    """Drift, skew and estimated and realised performance of the window's captured traffic against the
    served model's baseline. In the Kubeflow UI: the figures and the HTML report. Returns whether
    something crossed a threshold (a plain return: kfp.local resolves `dsl.If` only on it)."""
    from flywheel.kfp_io import write_artifact
    from flywheel.steps import monitor_step, monitoring_html

    outcome = monitor_step(run_id or job_id, since, until)
    write_artifact(result, outcome, ["run_id", "model_version", "rows", "crossed", "report_uri"])
    for name, value in outcome["figures"].items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as handle:
        handle.write(monitoring_html(outcome))
    return bool(outcome["crossed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def trigger(result: Input[Artifact], decision: Output[Markdown]):
    """Submit the training pipeline (cool-down, one triggered run in flight at most) and record the
    decision with its evidence; the record is shown in the Kubeflow UI."""
    from flywheel.kfp_io import read_artifact
    from flywheel.steps import trigger_step

    made = trigger_step(read_artifact(result))
    lines = [f"# Trigger: {made['action']}", "", made.get("reason", ""), ""]
    lines += [f"- {f['kind']}: {f['subject']}: {f['figure']} {f['value']:.4g} (threshold {f['threshold']:.4g})"
              for f in made.get("evidence", [])]
    if made.get("training_run"):
        lines += ["", f"Training run: {made['training_run'].get('run_id')} {made['training_run'].get('url', '')}"]
    with open(decision.path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
