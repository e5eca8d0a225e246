"""What `flywheel run` shows: live step progress on the terminal, the steps' own output sent to a
log, and the summary table built from the records the steps leave."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, TextIO

from flywheel.task import headline

STEP_ORDER = ["ingest", "validate", "features", "train", "evaluate", "deploy"]


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[TextIO]:
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


def console_on(stream: TextIO) -> Any:
    from rich.console import Console

    return Console(file=stream, highlight=False)


@contextlib.contextmanager
def progress(console: Any, storage: Any, run_id: str) -> Iterator[None]:
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


def run_summary(records: dict[str, Any], run_id: str, source: str, generated_s: float | None, total: float) -> dict[str, Any]:
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


def print_summary(console: Any, summary: dict[str, Any]) -> None:
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
            notes.append(f"{headline(record['metrics'])}  blessed={record.get('blessed')}")
        if record["step"] in ("train", "deploy") and record.get("model_version"):
            notes.append(f"model {record['model_version']}")
        if record.get("error"):
            notes.append(record["error"][:200])
        rows = record.get("rows")
        table.add_row(record["step"], record.get("status", "?"), f"{record.get('seconds', 0):.1f}", f"{rows:,}" if rows else "", "; ".join(notes))
    console.print(table)
    if summary.get("metrics"):
        m = summary["metrics"]
        positives = f", {int(m['positives']):,} positive" if "positives" in m else ""
        line = f"holdout: {int(m['rows']):,} rows{positives}; {headline(m, ', ')}"
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
