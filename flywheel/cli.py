"""The `flywheel` command line: generate, run, serve, compile.

Errors that a user can cause (FlywheelError) print as one clear message and a non-zero exit code,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

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
def _demo_dataset(storage: Any, rows: int, days: int, seed: int) -> tuple[str, str, float]:
    """Generated data for `flywheel run` without --source: its raw files and its own lake.

    Each generated dataset is a world of its own (its cards, merchants and ids), so it gets its own
    lake: a later run with other --rows neither mixes with nor collides with an earlier one. The same
    parameters give the same data, generated once.
    """
    from flywheel.datagen import generate

    base = storage.uri("demo", f"generated-r{rows}-d{days}-s{seed}")
    source, lake = f"{base}/raw", f"{base}/lake"
    if storage.exists(f"{source}/_generation.json"):
        return source, lake, 0.0
    started = time.perf_counter()
    generate(storage, source, rows=rows, days=days, seed=seed)
    return source, lake, time.perf_counter() - started


def cmd_run(args: argparse.Namespace) -> int:
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
        source, lake, generated_s = _demo_dataset(storage, rows, settings.data.days, settings.data.seed)
    truth_uri = join(source, "_truth")
    if not storage.list(truth_uri):
        truth_uri = ""
    console.print(f"[bold]run {run_id}[/]: the training pipeline on {source} with kfp.local", soft_wrap=True)
    log_path = settings.home / "runs" / run_id / "pipeline.log"
    failure: Exception | None = None
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if not args.verbose:  # every step's own output goes to the log; the terminal shows progress
            terminal = _console_on(stack.enter_context(_output_to(log_path)))
            stack.enter_context(_progress(terminal, storage, run_id))
        try:
            run_locally(settings, source, run_id, truth_uri, lake)
        except Exception as exc:  # kfp.local raises RuntimeError naming the failed task; the step record has why
            failure = exc
    total = time.perf_counter() - started
    records = read_step_records(storage, run_id)
    summary = _summary(records, run_id, source, generated_s, total)
    storage.write_json(storage.uri("runs", run_id, "summary.json"), summary)
    _print_summary(console, summary)
    console.print(f"summary: {storage.uri('runs', run_id, 'summary.json')}", soft_wrap=True)
    if not args.verbose:
        console.print(f"steps' output: {log_path}", soft_wrap=True)
    if failure is not None:
        failed = [r for r in records.values() if r.get("status") == "failed"]
        if failed:
            raise PipelineError(f"step {failed[0]['step']} failed: {failed[0].get('error')}")
        raise PipelineError(f"the pipeline failed: {failure}")
    return 0


STEP_ORDER = ["ingest", "validate", "features", "train", "evaluate", "deploy"]


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[TextIO]:
    """Send file descriptors 1 and 2 (where kfp.local streams every step) to a log; yield the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    with open(log_path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def _console_on(stream: TextIO) -> Any:
    from rich.console import Console

    return Console(file=stream, highlight=False)


@contextlib.contextmanager
def _progress(console: Any, storage: Any, run_id: str) -> Iterator[None]:
    """Show which step is running, and a line per finished step, from the steps' records."""
    from flywheel.steps import read_step_records

    stop = threading.Event()

    def watch() -> None:
        shown: set[str] = set()
        with console.status("starting the pipeline") as status:
            while not stop.wait(0.5):
                try:
                    records = read_step_records(storage, run_id)
                except Exception:  # progress is best effort; the summary reads the records again
                    continue
                for name in STEP_ORDER:
                    record = records.get(name)
                    if record and name not in shown:
                        shown.add(name)
                        rows = f", {record['rows']:,} rows" if record.get("rows") else ""
                        mark = "[green]done[/]" if record.get("status") == "succeeded" else "[red]failed[/]"
                        console.print(f"  {name:<9} {mark} in {record['seconds']:.1f}s{rows}")
                running = next((name for name in STEP_ORDER if name not in records), None)
                if running:
                    status.update(f"{running} running")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _summary(records: dict[str, Any], run_id: str, source: str, generated_s: float | None, total: float) -> dict[str, Any]:
    evaluation = records.get("evaluate", {})
    return {
        "run_id": run_id,
        "source": source,
        "pipeline_seconds": round(total, 2),
        "generate_seconds": round(generated_s, 2) if generated_s is not None else None,
        "steps": [records[name] for name in STEP_ORDER if name in records],
        "model_version": records.get("train", {}).get("model_version"),
        "metrics": evaluation.get("metrics"),
        "truth": evaluation.get("truth"),
        "blessed": evaluation.get("blessed"),
        "reasons": evaluation.get("reasons"),
        "deployed": records.get("deploy", {}).get("model_version"),
    }


def _print_summary(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"flywheel run {summary['run_id']}", show_lines=False)
    for column in ("step", "status", "seconds", "rows", "notes"):
        table.add_column(column, justify="right" if column in ("seconds", "rows") else "left")
    if summary.get("generate_seconds") is not None:
        table.add_row("generate", "succeeded", f"{summary['generate_seconds']:.1f}", "", summary["source"])
    for record in summary["steps"]:
        notes = []
        if record.get("reused"):
            notes.append("reused (same inputs)")
        if record["step"] == "evaluate" and record.get("metrics"):
            m = record["metrics"]
            notes.append(f"ROC-AUC {m['roc_auc']:.4f}  PR-AUC {m['pr_auc']:.4f}  blessed={record.get('blessed')}")
        if record["step"] in ("train", "deploy") and record.get("model_version"):
            notes.append(f"model {record['model_version']}")
        if record.get("error"):
            notes.append(record["error"][:200])
        rows = record.get("rows")
        table.add_row(record["step"], record.get("status", "?"), f"{record.get('seconds', 0):.1f}", f"{rows:,}" if rows else "", "; ".join(notes))
    console.print(table)
    if summary.get("metrics"):
        m = summary["metrics"]
        line = f"holdout: {int(m['rows']):,} rows, {int(m['positives']):,} fraud; ROC-AUC {m['roc_auc']:.4f}, PR-AUC {m['pr_auc']:.4f}"
        truth = summary.get("truth")
        if truth:
            line += f"; best achievable PR-AUC {truth['truth_pr_auc']:.4f} (model reaches {truth['pr_auc_vs_truth']:.1%} of it)"
        console.print(line, soft_wrap=True)
    if summary.get("blessed") is not None:
        console.print(f"gate: {'blessed' if summary['blessed'] else 'NOT blessed'}: {'; '.join(summary.get('reasons') or [])}", soft_wrap=True)
    if summary.get("deployed"):
        console.print(f"production model: {summary['deployed']}")
    console.print("artifacts:")
    for record in summary["steps"]:
        for name, uri in (record.get("artifacts") or {}).items():
            if uri:
                console.print(f"  {record['step']:>9} {name}: {uri}", soft_wrap=True)
    console.print(f"pipeline time: {summary['pipeline_seconds']:.1f}s")


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
