"""Lineage: every artifact written gets a record of how it was made.

A record names the artifact (URI and sha256), the run and step that wrote it, its inputs (each with
its URI and sha256), the parameters, the code version and the time. Records live at
``<root>/lineage/<sha256(uri)[:40]>.json``, so the record of any URI is one read away and
:func:`trace` can walk from a model version back to the raw files it was trained on.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterable

from flywheel import __version__
from flywheel.errors import ArtifactNotFound
from flywheel.storage import ObjectRef, Storage


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code's version: FLYWHEEL_CODE_VERSION (set in the image), else the git commit, else the package version."""
    if os.environ.get("FLYWHEEL_CODE_VERSION"):
        return os.environ["FLYWHEEL_CODE_VERSION"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return __version__


def record_uri(storage: Storage, artifact_uri: str) -> str:
    key = hashlib.sha256(artifact_uri.encode()).hexdigest()[:40]
    return storage.uri("lineage", f"{key}.json")


def record(
    storage: Storage,
    artifact: ObjectRef,
    *,
    step: str,
    run_id: str,
    inputs: Iterable[ObjectRef | dict[str, Any]] = (),
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the lineage record of ``artifact`` and return it."""
    entry = {
        "artifact": artifact.to_dict(),
        "step": step,
        "run_id": run_id,
        "inputs": [i.to_dict() if isinstance(i, ObjectRef) else dict(i) for i in inputs],
        "params": params or {},
        "code_version": code_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    storage.write_json(record_uri(storage, artifact.uri), entry)
    return entry


def lookup(storage: Storage, artifact_uri: str) -> dict[str, Any] | None:
    """The lineage record of a URI, or None when it has none."""
    try:
        return storage.read_json(record_uri(storage, artifact_uri))
    except ArtifactNotFound:
        return None


def trace(storage: Storage, artifact_uri: str, max_depth: int = 32) -> dict[str, Any]:
    """The tree of records from ``artifact_uri`` back to inputs that have no record (raw files)."""
    seen: set[str] = set()

    def walk(uri: str, sha: str | None, depth: int) -> dict[str, Any]:
        entry = lookup(storage, uri)
        node: dict[str, Any] = {"uri": uri, "sha256": sha or (entry or {}).get("artifact", {}).get("sha256")}
        if entry is None or depth >= max_depth or uri in seen:
            return node
        seen.add(uri)
        node.update(step=entry["step"], run_id=entry["run_id"], code_version=entry["code_version"])
        node["inputs"] = [walk(i["uri"], i.get("sha256"), depth + 1) for i in entry["inputs"]]
        return node

    return walk(artifact_uri, None, 0)


def leaves(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs at the bottom of a :func:`trace` tree: the raw files."""
    if not tree.get("inputs"):
        return [tree]
    out: list[dict[str, Any]] = []
    for child in tree["inputs"]:
        out.extend(leaves(child))
    return out
