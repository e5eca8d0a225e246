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
    serve(
        settings,
        host=args.host or settings.serving.host,
        port=args.port or settings.serving.port,
        workers=args.workers or settings.serving.workers,
        model_name=args.model_name,
        version=args.version,
    )
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.training import compile_pipeline

    path = compile_pipeline(args.out, _settings(args))
    _console().print(f"wrote {path}")
    return 0


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
    serve.add_argument("--host", help="address to bind (default: settings serving.host, 127.0.0.1)")
    serve.add_argument("--port", type=_positive, help="HTTP port (default: settings serving.port, 8080)")
    serve.add_argument("--workers", type=_positive, help="server processes, one torch thread each (default: settings serving.workers, 1)")
    serve.add_argument("--version", help="serve this registry version, pinned (default: the production version, "
                                         "followed: a promotion is picked up without a restart)")
    serve.add_argument("--model-name", default=None, help="the name clients use in the URL (default: settings model_name, 'fraud')")
    serve.set_defaults(func=cmd_serve)

    comp = sub.add_parser("compile", help="write the training pipeline's KFP IR YAML",
                          description="Compile the training pipeline to KFP IR YAML for upload to Kubeflow Pipelines.")
    comp.add_argument("--out", default="build", help="output folder (default build/)")
    comp.set_defaults(func=cmd_compile)
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
