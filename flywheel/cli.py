"""The `flywheel` command line: generate, run, train, serve, compile. It parses and dispatches; the run
report and progress display are in :mod:`flywheel.report`.

Errors that a user can cause (FlywheelError) print as one clear message and a non-zero exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import secrets
import sys
import time
from typing import Any, Sequence

from flywheel.errors import ConfigError, FlywheelError, PipelineError

log = logging.getLogger("flywheel")


def _settings(args: argparse.Namespace) -> Any:
    from flywheel.config import load_settings

    return load_settings(args.config)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def new_run_id() -> str:
    return f"run-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flywheel.datagen import generate
    from flywheel.storage import Storage

    settings = _settings(args)
    storage = Storage.from_settings(settings)
    started = time.perf_counter()
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("generating rows", total=args.rows)
        result = generate(
            storage, args.out, rows=args.rows, days=args.days, seed=args.seed, start=args.start, fmt=args.format,
            progress=lambda n: bar.update(task, completed=n),
        )
    console = _console()
    console.print(
        f"wrote {result.rows:,} rows ({result.fraud_rate():.2%} fraud, {result.cards:,} cards, {result.merchants:,} merchants) "
        f"in {len(result.files)} file(s) under {args.out} in {time.perf_counter() - started:.1f}s; "
        f"true probabilities under {args.out.rstrip('/')}/_truth/"
    )
    return 0


# ---------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from flywheel.datagen import demo_dataset
    from flywheel.report import console_on, output_to, print_summary, progress, run_summary
    from flywheel.steps import read_step_records
    from flywheel.storage import Storage, join
    from pipelines.training import run_locally

    if args.source and args.rows:
        raise ConfigError("--rows sets how much data to generate, so it cannot be combined with --source")
    settings = _settings(args)
    storage = Storage.from_settings(settings)
    console = _console()
    run_id = new_run_id()
    rows = args.rows or settings.data.rows
    generated_s = None
    lake = ""  # the settings' lake
    if args.source:
        source = args.source
    else:
        console.print(f"[bold]generating[/] {rows:,} synthetic transactions over {settings.data.days} days")
        source, lake, generated_s = demo_dataset(storage, rows, settings.data.days, settings.data.seed)
    truth_uri = join(source, "_truth")
    if not storage.list(truth_uri):
        truth_uri = ""
    console.print(f"[bold]run {run_id}[/]: the training pipeline on {source} with kfp.local", soft_wrap=True)
    log_path = settings.home / "runs" / run_id / "pipeline.log"
    failure: Exception | None = None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if not args.verbose:  # every step's own output goes to the log; the terminal shows progress
            terminal = console_on(stack.enter_context(output_to(log_path)))
            stack.enter_context(progress(terminal, storage, run_id))
        try:
            run_locally(settings, source, run_id, truth_uri, lake)
        except Exception as exc:  # kfp.local raises RuntimeError naming the failed task; the step record has why
            failure = exc
    total = time.perf_counter() - started
    records = read_step_records(storage, run_id)
    summary = run_summary(records, run_id, source, generated_s, total)
    storage.write_json(storage.uri("runs", run_id, "summary.json"), summary)
    print_summary(console, summary)
    console.print(f"summary: {storage.uri('runs', run_id, 'summary.json')}", soft_wrap=True)
    if not args.verbose:
        console.print(f"steps' output: {log_path}", soft_wrap=True)
    if failure is not None:
        failed = [r for r in records.values() if r.get("status") == "failed"]
        if failed:
            raise PipelineError(f"step {failed[0]['step']} failed: {failed[0].get('error')}")
        raise PipelineError(f"the pipeline failed: {failure}")
    return 0


# ---------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from flywheel import steps
    from flywheel.features.build import latest_training_set
    from flywheel.storage import Storage
    from flywheel.training.train import render_training_job

    settings = _settings(args)
    backend = args.backend or settings.training.launcher
    if args.render and backend == "local":
        raise ConfigError("--render prints the cluster job: choose --backend pytorchjob or --backend trainjob")
    settings = settings.model_copy(update={"training": settings.training.model_copy(update={"launcher": backend})})
    storage = Storage.from_settings(settings)
    training_set = latest_training_set(storage)
    run_id = new_run_id()
    if args.render:
        sys.stdout.write(render_training_job(storage, settings, training_set, run_id).to_yaml())
        return 0
    model = steps.train_step(training_set.to_dict(), run_id, settings)
    _console().print(f"run {run_id}: model {settings.model_name} {model['version']} ({backend}) from training set {training_set.uri}",
                     soft_wrap=True)
    return 0


# ---------------------------------------------------------------- serve / compile
def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import serve

    settings = _settings(args)
    serve(settings, host=args.host or settings.serving.host, port=args.port or settings.serving.port, model_name=args.model_name)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.training import compile_pipeline

    path = compile_pipeline(args.out, _settings(args))
    _console().print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    """The registry: list versions with their stages, show one with its history, promote, roll back."""
    import json

    from flywheel.registry import Registry
    from flywheel.storage import Storage

    settings = _settings(args)
    registry = Registry(Storage.from_settings(settings), settings.model_name)
    console = _console()
    run_id = args.run_id if getattr(args, "run_id", None) else new_run_id()
    if args.models_command == "list":
        state = registry.state()
        last: dict[str, Any] = {event.version: event for event in state.events}
        console.print(f"model {settings.model_name}: {'VERSION':<26} {'STAGE':<10} LAST CHANGE", soft_wrap=True)
        for version in registry.versions():
            event = last.get(version)
            change = f"{event.at[:19]} {event.action} by {event.user} ({event.run_id}): {event.reason}" if event else ""
            console.print(f"{'':<{len(settings.model_name) + 7}}{version:<26} {state.stages.get(version, 'candidate'):<10} {change}",
                          soft_wrap=True, markup=False)
        return 0
    if args.models_command == "show":
        model = registry.get(args.version)
        state = registry.state()
        shown = {
            **model.to_dict(),
            "stage": state.stages.get(model.version, "candidate"),
            "history": [event.to_dict() for event in state.events if event.version == model.version or event.previous_production == model.version],
        }
        sys.stdout.write(json.dumps(shown, indent=2, sort_keys=True, default=str) + "\n")
        return 0
    if args.models_command == "promote":
        previous = registry.production()
        model = registry.promote(args.version, run_id=run_id, reason=args.reason,
                                 expected_production=previous.version if previous else None)
        console.print(f"model {settings.model_name} {model.version} is production" + (f" (was {previous.version})" if previous else ""),
                      soft_wrap=True)
        return 0
    if args.models_command == "rollback":
        previous = registry.production()
        model = registry.rollback(run_id=run_id, reason=args.reason, expected_production=previous.version if previous else None)
        console.print(f"model {settings.model_name} rolled back: {model.version} is production again "
                      f"(was {previous.version if previous else 'none'})", soft_wrap=True)
        return 0
    raise ConfigError(f"unknown models command {args.models_command!r}")


def _add_models_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry: list, show, promote, rollback",
                            description="Model versions and their stages (candidate, canary, production, archived), "
                                        "from the registry's append-only event log.")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    msub.add_parser("list", help="every version with its stage and last change", description="List every version with its stage.")
    show = msub.add_parser("show", help="one version: its manifest, stage and history (JSON)",
                           description="Print one version's manifest, stage and stage history as JSON.")
    show.add_argument("version")
    promote = msub.add_parser("promote", help="make a version production (the current one is archived)",
                              description="Make VERSION the production version; refused if another promotion lands first.")
    promote.add_argument("version")
    rollback = msub.add_parser("rollback", help="return production to the previous production version",
                               description="Return production to the version the current one replaced.")
    for action in (promote, rollback):
        action.add_argument("--reason", default="by hand", help="why (recorded in the event log)")
        action.add_argument("--run-id", help="the run this change belongs to (default: a new run id)")
    models.set_defaults(func=cmd_models)


# ---------------------------------------------------------------- deploy
def cmd_deploy(args: argparse.Namespace) -> int:
    """Release a blessed version (default: the newest) locally or on KServe; --render prints the manifests."""
    import json

    from flywheel.deploy.promote import latest_evaluation, release
    from flywheel.registry import Registry
    from flywheel.storage import Storage

    settings = _settings(args)
    target = args.target or settings.deploy.target
    storage = Storage.from_settings(settings)
    registry = Registry(storage, settings.model_name)
    version = args.version or (registry.versions() or [None])[-1]
    if version is None:
        raise ConfigError(f"model {settings.model_name!r} has no versions yet: run `flywheel run` first")
    model = registry.get(version)
    if args.render:
        if target != "kserve":
            raise ConfigError("--render prints the KServe manifests: use --target kserve")
        from flywheel.deploy.kserve import render_all

        production = registry.production()
        canary = settings.deploy.canary.traffic_percent if production and production.version != model.version else None
        sys.stdout.write(render_all(settings, model, canary))
        return 0
    run_id = new_run_id()
    deployed, decision = release(storage, settings, model.version, latest_evaluation(storage, model.version), run_id, target=target)
    console = _console()
    if decision:
        console.print(f"{decision['verdict']}: {'; '.join(decision['reasons'])}", soft_wrap=True)
        console.print(f"decision record: {decision['uri']}", soft_wrap=True)
    console.print(f"production model: {deployed.version if deployed else 'none'}", soft_wrap=True)
    return 0 if not decision or decision["verdict"] == "promote" else 3


def _add_deploy_parser(sub: Any) -> None:
    deploy = sub.add_parser("deploy", help="release a blessed model version locally or on KServe (canary, then promote or roll back)",
                            description="Release a model version the gate blessed: locally it becomes production (which "
                                        "`flywheel serve` follows); on KServe it rolls out as a canary and is promoted or rolled "
                                        "back by the canary analysis. With --render, print the KServe manifests and change nothing.")
    deploy.add_argument("--target", choices=["local", "kserve"], help="where to release (default: settings deploy.target, 'local')")
    deploy.add_argument("--version", help="the model version (default: the newest)")
    deploy.add_argument("--render", action="store_true", help="print the ServiceAccount, ServingRuntime and InferenceService YAML and exit")
    deploy.set_defaults(func=cmd_deploy)


# ---------------------------------------------------------------- parser
def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="A retraining loop on Kubeflow: ingest, validate, features, train, gate, deploy, serve.",
    )
    parser.add_argument("--config", help="settings YAML (default: $FLYWHEEL_CONFIG or $FLYWHEEL_HOME/flywheel.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show every step's own output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="write seeded synthetic card transactions (and their true fraud probabilities)",
                         description="Write seeded synthetic card transactions under URI, and each row's true fraud probability under URI/_truth/.")
    gen.add_argument("--rows", type=_positive, required=True, help="number of transactions")
    gen.add_argument("--days", type=_positive, default=30, help="days of history (default 30)")
    gen.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    gen.add_argument("--start", default="2026-10-01", help="first day, YYYY-MM-DD (default 2026-10-01)")
    gen.add_argument("--format", choices=["parquet", "csv", "jsonl"], default="parquet", help="raw file format")
    gen.add_argument("--out", required=True, help="where to write: a folder or s3://bucket/prefix")
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="run the training pipeline locally with kfp.local and print a summary",
                         description="Run ingest -> validate -> features -> train -> evaluate -> deploy with kfp.local. Without --source, generates data first.")
    run.add_argument("--rows", type=_positive, help="rows to generate when no --source is given (default: settings data.rows)")
    run.add_argument("--source", help="raw files to ingest: a folder, a file or s3://bucket/prefix")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train on the latest training set: torchrun here, or a PyTorchJob/TrainJob",
                           description="Train on the latest training set (from the last `flywheel run`) and publish the model; "
                                       "a model already trained from the same inputs is reused. With --render, print the "
                                       "PyTorchJob or TrainJob it would create (YAML) and create nothing.")
    train.add_argument("--backend", choices=["local", "pytorchjob", "trainjob"],
                       help="where the workers run (default: settings training.launcher, 'local')")
    train.add_argument("--render", action="store_true", help="print the cluster job's manifest and exit (no cluster needed)")
    train.set_defaults(func=cmd_train)

    serve = sub.add_parser("serve", help="serve the production model with KServe (v1 and v2 protocols)",
                           description="Start the KServe ModelServer with the production model; features come from the Feast online store.")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_positive, help="HTTP port (default 8080)")
    serve.add_argument("--model-name", default=None, help="the name clients use in the URL (default: settings model_name, 'fraud')")
    serve.set_defaults(func=cmd_serve)

    comp = sub.add_parser("compile", help="write the training pipeline's KFP IR YAML",
                          description="Compile the training pipeline to KFP IR YAML for upload to Kubeflow Pipelines.")
    comp.add_argument("--out", default="build", help="output folder (default build/)")
    comp.set_defaults(func=cmd_compile)
    _add_models_parser(sub)
    _add_deploy_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
