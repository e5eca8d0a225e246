"""The `flywheel` command line: generate, run, train, serve, score, compile, and upload/submit/schedule/runs on Kubeflow. It parses and dispatches; the run
report and progress display are in :mod:`flywheel.report`.

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
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from flywheel.errors import ConfigError, DataError, FlywheelError, PipelineError

log = logging.getLogger("flywheel")


def _settings(args: argparse.Namespace) -> Any:
    from flywheel.config import load_settings

    usecase = getattr(args, "usecase", None)
    if usecase:
        # Through the environment, so that every process the command starts (pipeline steps, torchrun
        # workers, server workers) runs the same use case.
        os.environ["FLYWHEEL_USECASE"] = str(Path(usecase).expanduser().resolve())
        from flywheel.usecase import load_usecase

        load_usecase(usecase)  # a wrong path is named now, before any work starts
    return load_settings(args.config)


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def new_run_id() -> str:
    return f"run-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# ---------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flywheel.demo import write_demo_files
    from flywheel.storage import Storage
    from flywheel.usecase import load_usecase

    settings = _settings(args)
    storage = Storage.from_settings(settings)
    usecase = load_usecase(settings.usecase)
    # --days and --seed are the settings' data section for this command (unvalidated: the use case checks them).
    data = settings.data.model_copy(update={k: v for k, v in (("days", args.days), ("seed", args.seed)) if v is not None})
    free_form: dict[str, str] = {}
    for key, value in args.option or []:
        if key in free_form:
            raise ConfigError(f"--option {key} is given twice ({free_form[key]!r} and {value!r}): give it once")
        free_form[key] = value
    started = time.perf_counter()
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task(f"writing {usecase.name}'s demo data", total=args.rows)
        wrote = write_demo_files(storage, usecase, args.out, rows=args.rows, data=data,
                                 options={"start": args.start, "format": args.format, "options": free_form or None},
                                 progress=lambda n: bar.update(task, completed=n))
    _console().print(f"wrote {wrote} ({time.perf_counter() - started:.1f}s)", soft_wrap=True, markup=False)
    return 0


# ---------------------------------------------------------------- run
def cmd_gc(args: argparse.Namespace) -> int:
    from flywheel.gc import collect
    from flywheel.storage import Storage

    settings = _settings(args)
    result = collect(Storage.from_settings(settings), settings, dry_run=args.dry_run)
    console = _console()
    verb = "would remove" if args.dry_run else "removed"
    for key, why in sorted(result.keep.items()):
        console.print(f"keep {key}: {why}", soft_wrap=True, markup=False)
    for uri in result.remove_sets + result.remove_days:
        console.print(f"{verb} {uri}", soft_wrap=True, markup=False)
    for world in result.remove_worlds:
        console.print(f"{verb} feature world {world}", soft_wrap=True, markup=False)
    console.print(f"{verb} {len(result.remove_sets)} training sets and tables, {len(result.remove_days)} day tables, "
                  f"{len(result.remove_worlds)} feature worlds", soft_wrap=True)
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from flywheel.scaffold import init_usecase

    written = init_usecase(Path(args.path), Path(args.sample), label=args.label, timestamp=args.timestamp,
                           id=args.id, entities=args.entity)
    console = _console()
    console.print(f"wrote use case {Path(args.path).name}: {', '.join(p.name for p in written)} in {Path(args.path)}", soft_wrap=True)
    console.print("review them (ranges and vocabularies are the sample's), then: "
                  f"flywheel run --usecase {args.path} --source YOUR_DATA", soft_wrap=True, markup=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from flywheel.demo import demo_dataset
    from flywheel.report import console_on, output_to, print_summary, progress, run_summary
    from flywheel.steps import read_step_records
    from flywheel.storage import Storage, join
    from pipelines.training import run_locally

    if args.source and args.rows:
        raise ConfigError("--rows sets how much data to generate, so it cannot be combined with --source")
    settings = _settings(args)
    storage = Storage.from_settings(settings)
    console = _console()
    run_id = args.run_id or new_run_id()
    generated_s = None
    lake = ""  # the settings' lake
    if args.source:
        source = args.source
    else:
        from flywheel.usecase import load_usecase

        usecase = load_usecase(settings.usecase)
        size = f"{args.rows:,} rows" if args.rows else "its default size"
        console.print(f"[bold]preparing[/] use case {usecase.name}'s demo data ({size})")
        source, lake, generated_s = demo_dataset(storage, usecase, args.rows, settings.data)
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
            run_locally(settings, source, run_id, truth_uri, lake, args.triggered_by)
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


def cmd_monitor(args: argparse.Namespace) -> int:
    import json

    from flywheel.steps import monitor_step, trigger_step

    settings = _settings(args)
    run_id = new_run_id()
    result = monitor_step(run_id, args.since or "", args.until or "", settings)
    decision = trigger_step(result, settings, submit=args.trigger or settings.monitoring.trigger, wait=args.wait)
    console = _console()
    if args.json:
        print(json.dumps({"result": result, "decision": decision}, indent=2, default=str))
    else:
        console.print(f"monitor {run_id}: {result['rows']:,} captured rows from {result['since']} to {result['until']}"
                      + (f", model {result['model_version']}" if result.get("model_version") else ""), soft_wrap=True, markup=False)
        for note in result["notes"]:
            console.print(f"  note: {note}", soft_wrap=True, markup=False)
        for finding in result["findings"]:
            console.print(f"  crossed: {finding['kind']}: {finding['subject']}: {finding['figure']} {finding['value']:.4g} "
                          f"(threshold {finding['threshold']:.4g})", soft_wrap=True, markup=False)
        if not result["findings"]:
            console.print("  nothing crossed a threshold" if result["judged"] else "  not judged", soft_wrap=True, markup=False)
        console.print(f"  trigger: {decision['action']}: {decision.get('reason', '')}", soft_wrap=True, markup=False)
        console.print(f"report: {result['report_uri']}", soft_wrap=True, markup=False)
    if decision["action"] == "failed":
        raise PipelineError(f"the trigger failed: {decision['reason']}")
    return 4 if result["findings"] else 0


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
    version = args.version
    if version == "latest":  # the newest trained version, pinned (a model no gate has passed yet: try it out)
        from flywheel.registry import Registry
        from flywheel.storage import Storage

        name = settings.model_name  # the registry's name (--model-name only renames the URL)
        versions = Registry(Storage.from_settings(settings), name).versions()
        if not versions:
            raise ConfigError(f"model {name!r} has no version yet: train one first (flywheel train, or flywheel run)")
        version = versions[-1]
    serve(
        settings,
        host=args.host or settings.serving.host,
        port=args.port or settings.serving.port,
        grpc_port=settings.serving.grpc_port if args.grpc_port is None else args.grpc_port,
        workers=args.workers or settings.serving.workers,
        model_name=args.model_name,
        version=version,
    )
    return 0


def _published(args: argparse.Namespace, settings: Any, publish: bool) -> Any:
    """With ``--usecase`` and a storage root in S3 (a cluster's): the settings naming the use case's
    folder in storage (``usecase_uri``), which every step of the pipeline fetches; ``publish``: copy
    it there now (upload, submit, schedule; compile only names where it goes)."""
    from flywheel.storage import Storage, is_s3

    if not getattr(args, "usecase", None) or not is_s3(settings.storage.root):
        return settings
    from flywheel.usecase import load_usecase
    from flywheel.usecase_store import publish_usecase, published_uri

    storage, usecase = Storage.from_settings(settings), load_usecase(settings.usecase)
    uri = publish_usecase(storage, usecase) if publish else published_uri(storage, usecase)
    _console().print(f"use case {usecase.name} ({usecase.digest[:12]}) {'published at' if publish else 'will be read from'} "
                     f"{uri}" + ("" if publish else " (upload, submit and schedule publish it)"), soft_wrap=True)
    return settings.model_copy(update={"usecase_uri": uri})


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines import monitoring, scoring, training

    settings = _published(args, _settings(args), publish=False)
    for module in (training, scoring, monitoring):
        _console().print(f"wrote {module.compile_pipeline(args.out, settings)}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from flywheel.report import output_to
    from flywheel.scoring import describe
    from flywheel.steps import read_step_records
    from flywheel.storage import Storage
    from pipelines.scoring import run_locally

    settings = _settings(args)
    storage = Storage.from_settings(settings)
    run_id = new_run_id()
    console = _console()
    console.print(f"[bold]run {run_id}[/]: scoring {args.start} to {args.end} with kfp.local", soft_wrap=True)
    log_path = settings.home / "runs" / run_id / "pipeline.log"
    failure: Exception | None = None
    with contextlib.ExitStack() as stack:
        if not args.verbose:  # every step's own output goes to the log
            stack.enter_context(output_to(log_path))
        try:
            run_locally(settings, args.start, args.end, run_id, out_uri=args.out or "", chunk_days=args.chunk_days or 0,
                        lake_uri=args.lake or "")
        except Exception as exc:  # kfp.local names the failed task; the step record says why
            failure = exc
    records = read_step_records(storage, run_id)
    if failure is not None:
        failed = [r for r in records.values() if r.get("status") == "failed"]
        if failed:
            raise PipelineError(f"step {failed[0]['step']} failed: {failed[0].get('error')}")
        raise PipelineError(f"the scoring pipeline failed: {failure} (steps' output: {log_path})")
    summary = storage.read_json(records["summarize"]["artifacts"]["summary"])
    console.print(describe(summary), soft_wrap=True, markup=False)
    console.print(f"summary: {records['summarize']['artifacts']['summary']}", soft_wrap=True)
    return 0


# ---------------------------------------------------------------- upload / submit / schedule / runs
def _package(args: argparse.Namespace, settings: Any, scratch: str) -> tuple[str, str]:
    """The package to upload (given, or compiled now from these settings) and the pipeline's name."""
    import yaml

    if args.package:
        path = args.package
    else:
        from pipelines import monitoring, scoring, training

        module = {"training": training, "scoring": scoring, "monitoring": monitoring}[args.pipeline]
        path = str(module.compile_pipeline(scratch, settings))
    try:
        with open(path) as handle:
            spec = next(yaml.safe_load_all(handle))
        name = spec["pipelineInfo"]["name"]
    except FileNotFoundError:
        raise ConfigError(f"pipeline package {path} does not exist (run `flywheel compile` first)") from None
    except (yaml.YAMLError, TypeError, KeyError, StopIteration):
        raise ConfigError(f"{path} is not a compiled KFP pipeline (no pipelineInfo.name)") from None
    return path, args.pipeline_name or name


def _checked_params(path: str, pairs: list[str]) -> dict[str, str]:
    """--param NAME=VALUE pairs, checked against the package's inputs: an unknown or a missing required
    parameter is named here rather than by a failed run on the cluster."""
    import yaml

    from flywheel.kfp_client import parse_params

    params = parse_params(pairs)
    with open(path) as handle:
        spec = next(yaml.safe_load_all(handle))
    declared = spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ConfigError(f"the pipeline has no parameter {', '.join(unknown)}; its parameters: {', '.join(sorted(declared))}")
    missing = sorted(n for n, d in declared.items() if not d.get("isOptional") and n not in params)
    if missing:
        raise ConfigError(f"the pipeline needs --param {' --param '.join(f'{n}=...' for n in missing)}")
    return params


def _kfp(args: argparse.Namespace, publish: bool = False) -> tuple[Any, Any]:
    """The settings and a KFP client; ``publish``: the use case published for the pipeline's pods first."""
    from flywheel.kfp_client import KfpClient

    settings = _settings(args)
    if publish:
        settings = _published(args, settings, publish=True)
    return settings, KfpClient(settings)


def _upload(args: argparse.Namespace, settings: Any, client: Any, scratch: str) -> tuple[Any, dict[str, str]]:
    """Upload (or reuse) the package; for submit and schedule, also the checked --param values."""
    path, name = _package(args, settings, scratch)
    params = _checked_params(path, args.param) if hasattr(args, "param") else {}
    uploaded = client.upload(path, name)
    what = ("new pipeline" if uploaded.new_pipeline else "new version") if uploaded.new_version else "already uploaded"
    _console().print(f"pipeline {uploaded.pipeline_name} ({uploaded.pipeline_id}) version {uploaded.version_name} "
                     f"({uploaded.version_id}): {what}", soft_wrap=True)
    return uploaded, params


def cmd_upload(args: argparse.Namespace) -> int:
    import tempfile

    settings, client = _kfp(args, publish=True)
    with tempfile.TemporaryDirectory() as scratch:
        _upload(args, settings, client, scratch)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    import tempfile

    settings, client = _kfp(args, publish=True)
    with tempfile.TemporaryDirectory() as scratch:
        uploaded, params = _upload(args, settings, client, scratch)
        run = client.submit(uploaded, params, args.run_name or new_run_id())
    _console().print(f"run {run.run_name} ({run.run_id}) in experiment {settings.kfp.experiment}: {run.url}", soft_wrap=True)
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    import tempfile

    settings, client = _kfp(args, publish=True)
    with tempfile.TemporaryDirectory() as scratch:
        uploaded, params = _upload(args, settings, client, scratch)
        cron = args.cron or (settings.monitoring.schedule if args.pipeline == "monitoring" and not args.package else None)
        scheduled = client.schedule(uploaded, params, args.name or f"{uploaded.pipeline_name}-scheduled", cron)
    _console().print(f"recurring run {scheduled.name} ({scheduled.recurring_run_id}) on cron '{scheduled.cron}', one at a "
                     f"time, no catch-up: {scheduled.url}", soft_wrap=True)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    settings, client = _kfp(args)
    rows = client.runs(args.limit)
    console = _console()
    if not rows:
        console.print(f"no runs in experiment {settings.kfp.experiment}")
        return 0
    console.print(f"{len(rows)} latest run(s) in experiment {settings.kfp.experiment}, newest first:")
    for row in rows:  # whole ids, one run a line: they are what the UI and the API take
        console.print(f"{row.run_id}  {row.state:<9}  created {row.created_at}  finished {row.finished_at or '-'}  {row.name}",
                      soft_wrap=True, markup=False)
    return 0


# ---------------------------------------------------------------- ingest / lineage
def cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest and validate one delivery: exit 0 accepted, 1 rejected (reasons printed), 2 usage error."""
    from flywheel import steps
    from flywheel.errors import DataError, StorageError, ValidationFailed
    from flywheel.ingest import source_files
    from flywheel.storage import Storage

    settings = _settings(args)
    storage = Storage.from_settings(settings)
    lake_uri = args.lake or storage.uri("lake")
    try:
        files = source_files(storage, args.source)
    except DataError as exc:  # nothing to read there: the command line is wrong, not the data
        raise ConfigError(str(exc)) from None
    console = _console()
    run_id = new_run_id().replace("run-", "ingest-", 1)
    policy = args.policy or settings.ingest.policy
    try:
        published = steps.ingest_and_validate(args.source, run_id, settings, lake_uri, policy)
    except (DataError, ValidationFailed) as exc:
        console.print(f"rejected: {len(files)} file(s) seen under {args.source}; nothing entered {lake_uri}", soft_wrap=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StorageError as exc:  # the store failed mid-batch (retried with backoff first): not the data's fault
        console.print(f"failed: the batch from {args.source} did not complete; readers of {lake_uri} see whole published "
                      "snapshots only. Run the same command again once the store answers: it completes the batch.", soft_wrap=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sources = published["source_files"]
    skipped = [f for f in sources if f.get("skipped")]
    new_rows = sum(p["rows"] for p in published["parts"] if p["uri"] in set(published["new_parts"]))
    quarantine = published.get("quarantine") or {}
    duplicates = sum(f.get("duplicates", 0) for f in sources)
    console.print(
        f"accepted: {len(sources)} file(s) seen, {len(skipped)} skipped as already ingested, {new_rows:,} rows accepted, "
        f"{quarantine.get('rows', 0):,} quarantined, 0 rejected"
        + (f", {duplicates:,} re-delivered rows dropped" if duplicates else ""),
        soft_wrap=True,
    )
    if quarantine:
        console.print(f"quarantined rows and their reasons: {quarantine['uri']}", soft_wrap=True)
    console.print(f"lake {lake_uri}: snapshot {published['sha256'][:12]}, {published['rows']:,} rows (policy {policy})", soft_wrap=True)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    import json

    from flywheel import lineage
    from flywheel.storage import Storage

    storage = Storage.from_settings(_settings(args))
    tree = lineage.downstream(storage, args.uri) if args.down else lineage.trace(storage, args.uri)
    children = "users" if args.down else "inputs"
    if not tree.get("step") and not tree.get(children):
        raise ConfigError(f"no lineage record names {args.uri}: give the URI of an artifact flywheel wrote or read")
    if args.json:
        sys.stdout.write(json.dumps(tree, indent=2) + "\n")
    else:
        sys.stdout.write(lineage.render_tree(tree, children) + "\n")
    return 0


def _add_lake_commands(sub: Any) -> None:
    ing = sub.add_parser("ingest", help="ingest and validate raw files into the lake, without training",
                         description="Ingest SOURCE (a csv/parquet/jsonl file, folder or glob; local or s3://) into the lake and "
                                     "validate it (schema, the GE suite, the drift gate). Exit 0: accepted; 1: rejected (each "
                                     "reason printed; the lake is unchanged); 2: usage error.")
    ing.add_argument("source", metavar="SOURCE_URI", help="a file, a folder or a glob, local or s3://bucket/prefix")
    ing.add_argument("--policy", choices=["fail", "quarantine"],
                     help="fail: any bad row rejects the batch (default: settings ingest.policy); quarantine: bad rows go "
                          "to <lake>/quarantine/<batch>/ with their reason, the rest passes if they are few enough")
    ing.add_argument("--lake", help="the lake's URI (default: <storage root>/lake)")
    ing.set_defaults(func=cmd_ingest)

    lin = sub.add_parser("lineage", help="print an artifact's lineage: its inputs down to raw files, or what it reached",
                         description="Print the lineage of URI as a tree: upstream to the raw files and their sha256 "
                                     "(default), or downstream with --down (the parts, snapshots, training sets and models a "
                                     "raw file reached).")
    lin.add_argument("uri", metavar="URI", help="an artifact (a model file, a training set, a lake part) or a raw file")
    lin.add_argument("--down", action="store_true", help="what was made from URI, instead of what URI was made from")
    lin.add_argument("--json", action="store_true", help="the tree as JSON")
    lin.set_defaults(func=cmd_lineage)


# ---------------------------------------------------------------- features
def _latest_snapshot(settings: Any, lake: str | None) -> tuple[Any, dict[str, Any]]:
    from flywheel.lake import latest_snapshot
    from flywheel.storage import Storage

    storage = Storage.from_settings(settings)
    lake_uri = lake or storage.uri("lake")
    snapshot = latest_snapshot(storage, lake_uri)
    if snapshot is None:
        raise ConfigError(f"the lake {lake_uri} holds no published snapshot: `flywheel ingest SOURCE` first")
    return storage, snapshot.to_dict()


def cmd_features(args: argparse.Namespace) -> int:
    """features training-set | apply | materialize, on the lake's latest published snapshot."""
    from flywheel import steps
    from flywheel.features import store as feast_store
    from flywheel.features.build import feature_world, features_key, latest_tables, materialize_window

    settings = _settings(args)
    storage, snapshot = _latest_snapshot(settings, args.lake)
    console = _console()
    if args.features_command == "training-set":
        run_id = new_run_id().replace("run-", "features-", 1)
        started = time.perf_counter()
        built = steps.features_step(snapshot, run_id, settings)
        written = []
        for name in ("train", "holdout"):
            ref = storage.write_bytes(f"{args.out.rstrip('/')}/{name}.parquet", storage.read_bytes(built[f"{name}_uri"]))
            written.append(ref.uri)
        console.print(
            f"training set {built['key'][:16]} ({'reused' if built['reused'] else 'built'} in {time.perf_counter() - started:.1f} s, "
            f"offline store {settings.features.offline_store}): {built['train_rows']:,} train + {built['holdout_rows']:,} holdout "
            f"rows -> {', '.join(written)}",
            soft_wrap=True,
        )
        return 0
    from flywheel.errors import ArtifactNotFound

    key = features_key(snapshot["sha256"], settings)
    try:
        latest = storage.read_json(storage.uri("features", "offline", "latest.json"))
    except ArtifactNotFound:
        latest = {}
    if latest.get("key") != key:
        raise ConfigError(
            "the latest feature tables were not computed from the lake's latest snapshot with these settings: "
            "run `flywheel features training-set --out URI` (or `flywheel run`) first"
        )
    world = feature_world(key)
    tables = latest_tables(storage)
    from flywheel.features.views import views_of
    from flywheel.usecase import load_usecase

    views = views_of(load_usecase(settings.usecase))
    store = feast_store.open_store(settings, world)
    if args.features_command == "apply":
        feast_store.apply_definitions(store, views, tables)
        console.print(f"applied the feature views {', '.join(tables)} to world {world} ({feast_store.world_dir(settings, world)})", soft_wrap=True)
        return 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from flywheel.features.online_write import materialize_world

    start, end = materialize_window(list(tables.values()))
    engine = args.engine or settings.features.materialize_engine
    started = time.perf_counter()
    feast_store.apply_definitions(store, views, tables)
    if engine == "feast":
        materialize_world(store, settings, start, end, engine="feast")
        done = "with Feast's own materialize"
    else:
        with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as bar:
            tasks: dict[str, Any] = {}

            def show(view: str, written: int, total: int) -> None:
                if view not in tasks:
                    tasks[view] = bar.add_task(f"{view} entities", total=total)
                bar.update(tasks[view], completed=written)

            views = materialize_world(store, settings, start, end, engine="flywheel", progress=show) or []
        done = "with flywheel's streaming engine: " + "; ".join(
            f"{view.view} {view.entities:,} entities from {view.source_rows:,} rows since {view.start:%Y-%m-%d %H:%M:%S}"
            for view in views
        )
    console.print(
        f"materialized world {world} ({settings.features.online_store}) up to {end:%Y-%m-%d %H:%M} {done} "
        f"in {time.perf_counter() - started:.1f} s",
        soft_wrap=True,
    )
    return 0


def _add_features_parser(sub: Any) -> None:
    features = sub.add_parser("features", help="the feature store on the lake's latest snapshot: training set, apply, materialize",
                              description="Feast on the lake's latest published snapshot: build (or reuse) its point-in-time "
                                          "training set, apply its feature views, or materialize them into its online store.")
    fsub = features.add_subparsers(dest="features_command", required=True, metavar="ACTION")
    training = fsub.add_parser("training-set", help="build (or reuse) the point-in-time training set and copy it to --out",
                               description="Compute the feature tables, apply and materialize them, join every transaction "
                                           "with the features as they were just before it (Feast get_historical_features on "
                                           "features.offline_store), check a sample against a merge_asof oracle, and write "
                                           "train.parquet and holdout.parquet under --out.")
    training.add_argument("--out", required=True, metavar="URI", help="a folder or s3://bucket/prefix")
    apply = fsub.add_parser("apply", help="register the feature views of the latest features step in its world",
                            description="Apply the card and merchant entities and feature views (over the latest offline "
                                        "tables) to the feature world of the lake's latest snapshot.")
    mat = fsub.add_parser("materialize", help="load the latest feature values into the online store",
                          description="Apply, then materialize the offline tables into the world's online store "
                                      "(features.online_store). --engine flywheel (the default: features.materialize_engine) "
                                      "streams each entity's latest row in chunks and continues from the end of the last "
                                      "materialization (Feast's materialize-incremental); --engine feast runs Feast's own "
                                      "materialize over the tables' whole span (the baseline).")
    mat.add_argument("--engine", choices=["flywheel", "feast"], default=None,
                     help="flywheel (streamed, incremental) or feast (Feast's own materialize); default: features.materialize_engine")
    for command in (training, apply, mat):
        command.add_argument("--lake", help="the lake's URI (default: <storage root>/lake)")
    features.set_defaults(func=cmd_features)


# ---------------------------------------------------------------- events (live features)
def cmd_events(args: argparse.Namespace) -> int:
    """events push FILE|- | apply | dead: the live-feature event log of the use case."""
    import json

    from flywheel.features.events import open_event_log, parse_events
    from flywheel.usecase import load_usecase

    settings = _settings(args)
    event_log = open_event_log(settings)
    if args.events_command == "push":
        stream = sys.stdin.buffer if args.file == "-" else _open_events_file(args.file)
        contract = load_usecase(settings.usecase).contract
        bodies, bad = [], []
        with stream:
            for number, line in enumerate(stream, 1):
                if line.strip():
                    bodies.append((f"{args.file}:{number}", line.strip()))
        # Checked before anything is appended: a file with a bad line appends nothing, and says which.
        _, dead = parse_events(bodies, contract)
        bad = [f"{letter.where}: {letter.reason}" for letter in dead]
        if bad:
            raise DataError(f"{len(bad)} of {len(bodies)} events do not fit the contract; nothing was pushed:\n  "
                            + "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else ""))
        pushed = event_log.append([body if isinstance(body, bytes) else body.encode() for _, body in bodies])
        print(f"pushed {pushed} events to the {settings.live.log} log (backlog now {event_log.backlog()})")
        return 0
    if args.events_command == "apply":
        from flywheel.deploy.live import updater_for

        stats = updater_for(settings, pinned=args.version).drain()
        print(json.dumps({"read": stats.read, "applied": stats.applied, "dead": stats.dead, "batches": stats.batches,
                          "seconds": round(stats.seconds, 3)}))
        return 0
    if args.events_command == "run":
        import signal
        import threading

        from flywheel.deploy.live import updater_for

        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        updater = updater_for(settings, pinned=args.version)
        print(f"live updater: applying the {settings.live.log} log to the served worlds until stopped", flush=True)
        try:
            updater.run(stop, settings.live.poll_ms / 1000)
        except KeyboardInterrupt:
            pass
        print(json.dumps({"read": updater.stats.read, "applied": updater.stats.applied, "dead": updater.stats.dead}))
        return 0
    for letter in event_log.dead_letters():
        print(json.dumps({"where": letter.where, "reason": letter.reason, "event": letter.body}))
    return 0


def _open_events_file(path: str) -> Any:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read events file {path}: {exc.strerror or exc}") from None


def _add_events_parser(sub: Any) -> None:
    events = sub.add_parser("events", help="live features: push events (labels, further sources' rows, rows), apply them, read dead letters",
                            description="The use case's live-feature event log (live.log). Each event is a JSON line: "
                                        '{"row": {...}}, {"label": {"<id>": ..., "<label>": ...}} or {"source": "<name>", "row": {...}}.')
    esub = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    push = esub.add_parser("push", help="append the events of a JSON-lines file (or - for stdin) to the log",
                           description="Check every event against the contract, then append them all (or none) to the event log; "
                                       "a running `flywheel serve` with live.enabled (or `flywheel events apply`) applies them.")
    push.add_argument("file", metavar="FILE", help="a JSON-lines file of events, or - for standard input")
    apply = esub.add_parser("apply", help="apply the log's events to the served feature worlds now, then exit",
                            description="Bring the served worlds (production, and a canary) live and apply every event in the log.")
    run = esub.add_parser("run", help="the updater: apply the log's events to the served worlds as they come, until stopped",
                          description="Apply events as they arrive (a Deployment of one replica on a cluster: live.run_updater false "
                                      "in the predictor's settings); stops on SIGTERM or Ctrl-C.")
    for command in (apply, run):
        command.add_argument("--version", help="apply to this version's world only (default: the served versions')")
    esub.add_parser("dead", help="print the dead-lettered events with their reasons (JSON lines)")
    events.set_defaults(func=cmd_events)


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
                            description="Release a model version the gate blessed as a canary against production: locally "
                                        "between two `flywheel serve` processes behind a splitting proxy (a replay of held-out "
                                        "requests, for the release only), on KServe through the InferenceService's canary; then "
                                        "promote it (the registry's production, which `flywheel serve` follows) or roll it back. "
                                        "Exit 0 promoted, 3 rolled back. With --render, print the KServe manifests and change nothing.")
    deploy.add_argument("--target", choices=["local", "kserve"], help="where to release (default: settings deploy.target, 'local')")
    deploy.add_argument("--version", help="the model version (default: the newest)")
    deploy.add_argument("--render", action="store_true", help="print the ServiceAccount, ServingRuntime and InferenceService YAML and exit")
    deploy.set_defaults(func=cmd_deploy)


# ---------------------------------------------------------------- parser
def _run_id(value: str) -> str:
    """A run id that is safe in a storage path and a KFP run name."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a run id: letters, digits, '.', '_' and '-', at most 100")
    return value


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def _key_value(value: str) -> tuple[str, str]:
    key, equals, text = value.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE (a name, =, its value)")
    return key.strip(), text.strip()


def _port_or_zero(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{value} must be a port from 1 to 65535, or 0 for none")
    return number


USECASE_HELP = ("the use case: a folder holding its contract.yaml (default: $FLYWHEEL_USECASE, else the "
                "settings' usecase, usecases/fraud)")


def _add_usecase_option(subparsers: Any) -> None:
    """``--usecase PATH`` on every command, after its name as well as before it (``flywheel run
    --usecase usecases/flights``); given in neither place, the settings decide."""
    for parser in subparsers.choices.values():
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            _add_usecase_option(nested[0])
        else:
            parser.add_argument("--usecase", metavar="PATH", default=argparse.SUPPRESS, help=USECASE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="A retraining loop on Kubeflow: ingest, validate, features, train, gate, deploy, serve.",
    )
    parser.add_argument("--config", help="settings YAML (default: $FLYWHEEL_CONFIG or $FLYWHEEL_HOME/flywheel.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, and show every step's own output")
    parser.add_argument("--usecase", metavar="PATH", help=USECASE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="write the use case's demo data (fraud's: seeded synthetic transactions with their true probabilities)",
                         description="Write the use case's demo data under URI: what `flywheel run` ingests without --source, "
                                     "written by the use case's source.py (write_demo). --start, --format and --option are "
                                     "passed on to it when given; a use case that does not take them says so, and its generator "
                                     "checks each --option and names the ones it knows (fraud's: a later period of the same "
                                     "world, and drift from a given day; usecases/fraud/generator.py says what each does).")
    gen.add_argument("--rows", type=_positive, help="number of rows (default: the use case's own, e.g. settings data.rows)")
    gen.add_argument("--days", type=_positive, help="days of history (default: settings data.days, 30)")
    gen.add_argument("--seed", type=int, help="random seed (default: settings data.seed, 7)")
    gen.add_argument("--start", help="first day, YYYY-MM-DD (default: the use case's, 2026-10-01 for generated transactions)")
    gen.add_argument("--format", choices=["parquet", "csv", "jsonl"], help="raw file format (default: the use case's, parquet)")
    gen.add_argument("--option", action="append", type=_key_value, metavar="KEY=VALUE",
                     help="an option of the use case's generator, passed on as text (repeat for several); "
                          "the use case refuses one it does not know")
    gen.add_argument("--out", required=True, help="where to write: a folder or s3://bucket/prefix")
    gen.set_defaults(func=cmd_generate)

    gc = sub.add_parser("gc", help="remove the training sets, tables and feature worlds no kept model or recent run needs",
                        description="Remove the use case's training sets, offline and day tables and feature worlds "
                                    "that no kept model version (production, canary, recent productions, the newest), "
                                    "the latest features step or a recent run needs; never what a kept model's "
                                    "lineage names (settings gc: keep_previous, keep_newest, keep_days).")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, and why the rest stays")
    gc.set_defaults(func=cmd_gc)

    init = sub.add_parser("init", help="write a new use case's folder from a sample of its data (contract, features)",
                          description="Write a new use case into PATH: its contract inferred from a sample (types, "
                                      "nullability, ranges, vocabularies), a starting set of features per entity, and "
                                      "settings when the sample is history. Review every file, then run it with "
                                      "`flywheel run --usecase PATH --source URI`.")
    init.add_argument("path", metavar="PATH", help="the new use case's folder (its name names it: lower-case, digits, - and _)")
    init.add_argument("--from", dest="sample", required=True, metavar="SAMPLE_FILE", help="a parquet, csv or jsonl sample")
    init.add_argument("--label", required=True, help="the column the model learns to predict")
    init.add_argument("--timestamp", required=True, help="the column holding each row's event time")
    init.add_argument("--id", help="a column unique per row, when there is one")
    init.add_argument("--entity", action="append", default=[], metavar="COLUMN",
                      help="a join key to aggregate features by (repeat for several)")
    init.set_defaults(func=cmd_init)

    run = sub.add_parser("run", help="run the training pipeline locally with kfp.local and print a summary",
                         description="Run ingest -> validate -> features -> train -> evaluate -> deploy with kfp.local. Without --source, generates data first.")
    run.add_argument("--rows", type=_positive, help="rows of the use case's demo data when no --source is given (default: the use case's, for fraud settings data.rows)")
    run.add_argument("--source", help="raw files to ingest: a folder, a file or s3://bucket/prefix")
    run.add_argument("--run-id", type=_run_id, help="the run's id (default: a new one from the time)")
    run.add_argument("--triggered-by", default="", help="the monitor's decision record that asked for this run (the model's lineage names it)")
    run.set_defaults(func=cmd_run)

    mon = sub.add_parser("monitor", help="drift, skew and performance of the captured traffic against the served model's baseline",
                         description="Read the captured requests of a window (default: the last monitoring.window_days of "
                                     "capture), compare them with the model's training baseline (drift), replay a sample "
                                     "through the offline path (skew), estimate performance without labels and measure it "
                                     "where labels are known. Exits 0 when nothing crossed a threshold, 4 when something did "
                                     "(each named with its figure). With --trigger, a crossing submits the training pipeline "
                                     "(cool-down and one run in flight at most).")
    mon.add_argument("--since", help="the window's start (ISO time, UTC when no offset)")
    mon.add_argument("--until", help="the window's end (default: just after the newest captured row)")
    mon.add_argument("--trigger", action="store_true", help="submit the training pipeline when something crossed (also monitoring.trigger)")
    mon.add_argument("--wait", action="store_true", help="with a local trigger: wait for the triggered run to end")
    mon.add_argument("--json", action="store_true", help="print the result (and the decision) as JSON")
    mon.set_defaults(func=cmd_monitor)

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
    serve.add_argument("--grpc-port", type=_port_or_zero, help="v2 gRPC port (default: settings serving.grpc_port, 8081; 0: no gRPC)")
    serve.add_argument("--workers", type=_positive, help="server processes, one torch thread each (default: settings serving.workers, 1)")
    serve.add_argument("--version", help="serve this registry version, pinned, or 'latest', the newest one trained "
                                         "(default: the production version, followed: a promotion is picked up "
                                         "without a restart)")
    serve.add_argument("--model-name", default=None, help="the name clients use in the URL (default: settings model_name, 'fraud')")
    serve.set_defaults(func=cmd_serve)

    comp = sub.add_parser("compile", help="write the training and batch scoring pipelines' KFP IR YAML",
                          description="Compile the training and batch scoring pipelines to KFP IR YAML for upload to Kubeflow Pipelines.")
    comp.add_argument("--out", default="build", help="output folder (default build/)")
    comp.set_defaults(func=cmd_compile)
    _add_lake_commands(sub)

    score = sub.add_parser("score", help="score a date range of the lake with the production model (kfp.local)",
                           description="Run the batch scoring pipeline locally: the lake's rows from --start to --end "
                                       "scored in chunks of days, one partition per day and a summary.json under --out "
                                       "(each row's id, timestamp, join keys, the model's output and model_version).")
    score.add_argument("--start", required=True, help="first day, YYYY-MM-DD")
    score.add_argument("--end", required=True, help="last day, YYYY-MM-DD (inclusive)")
    score.add_argument("--chunk-days", type=_positive, help="days per chunk (default: settings scoring.chunk_days)")
    score.add_argument("--out", help="where the results go (default: <root>/scores/<run>)")
    score.add_argument("--lake", help="the lake to read (default: the settings' lake, <root>/lake)")
    score.set_defaults(func=cmd_score)

    def package_args(command: argparse.ArgumentParser, params: bool = True) -> None:
        command.add_argument("--pipeline", choices=["training", "scoring", "monitoring"], default="training",
                             help="which pipeline to compile now from the settings (default training)")
        command.add_argument("--package", help="a compiled pipeline YAML instead (from `flywheel compile`)")
        command.add_argument("--pipeline-name", help="the pipeline's name in Kubeflow (default: the package's pipelineInfo.name)")
        if params:
            command.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                                 help="a pipeline parameter (repeatable), e.g. --param source_uri=s3://bucket/raw")

    kfp_note = "Host, namespace, experiment and auth come from the settings' kfp section (FLYWHEEL_KFP__HOST, FLYWHEEL_KFP_TOKEN)."
    upload = sub.add_parser("upload", help="upload the pipeline to Kubeflow Pipelines, or a new version of it",
                            description="Upload the compiled pipeline; a changed pipeline becomes a new version (named after "
                                        "the package's sha256), an unchanged one is reused. " + kfp_note)
    package_args(upload, params=False)
    upload.set_defaults(func=cmd_upload)

    submit = sub.add_parser("submit", help="upload if needed, then start a run in the settings' experiment",
                            description="Upload the pipeline if needed and start one run with the given parameters. " + kfp_note)
    package_args(submit)
    submit.add_argument("--run-name", help="the run's name (default: run-<time>-<random>)")
    submit.set_defaults(func=cmd_submit)

    schedule = sub.add_parser("schedule", help="upload if needed, then create a recurring run (cron, one at a time, no catch-up)",
                              description="Create a recurring run for scheduled retraining: max_concurrency=1 and no catch-up "
                                          "after a pause. " + kfp_note)
    package_args(schedule)
    schedule.add_argument("--cron", help="six fields, seconds first (default: settings kfp.schedule_cron, '0 0 2 * * *')")
    schedule.add_argument("--name", help="the recurring run's name (default: <pipeline>-scheduled)")
    schedule.set_defaults(func=cmd_schedule)

    runs = sub.add_parser("runs", help="list the experiment's latest runs with their state",
                          description="List the latest runs of the settings' experiment, newest first. " + kfp_note)
    runs.add_argument("--limit", type=_positive, default=20, help="how many runs (default 20)")
    runs.set_defaults(func=cmd_runs)


    _add_features_parser(sub)
    _add_events_parser(sub)
    _add_models_parser(sub)
    _add_deploy_parser(sub)
    _add_usecase_option(sub)
    return parser


@contextlib.contextmanager
def _env_restored(name: str) -> Iterator[None]:
    """Put an environment variable back as it was once the command is done (``main`` also runs in
    process, from tests and notebooks: ``--usecase`` must not outlive its command)."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        with _env_restored("FLYWHEEL_USECASE"):
            return args.func(args)
    except FlywheelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
