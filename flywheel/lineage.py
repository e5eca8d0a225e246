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
from flywheel.errors import ArtifactNotFound, LineageError
from flywheel.storage import ObjectRef, Storage, canonical_uri


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
    """Where the lineage record of ``artifact_uri`` lives; ``file:///x``, ``/x`` and a relative
    spelling of the same local file share one record."""
    key = hashlib.sha256(canonical_uri(artifact_uri).encode()).hexdigest()[:40]
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
    """Write the lineage record of ``artifact`` and return it.

    Each input is an :class:`ObjectRef` or a mapping with at least ``uri`` (and ideally ``sha256``).
    """
    input_dicts = [i.to_dict() if isinstance(i, ObjectRef) else dict(i) for i in inputs]
    for item in input_dicts:
        if not isinstance(item.get("uri"), str) or not item["uri"]:
            raise LineageError(f"lineage input {item!r} of {artifact.uri} has no 'uri'")
    entry = {
        "artifact": artifact.to_dict(),
        "step": step,
        "run_id": run_id,
        "inputs": input_dicts,
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
    """The tree of records from ``artifact_uri`` back to inputs that have no record (raw files).

    Each node has ``uri`` and ``sha256`` (for an input: the sha256 it had when it was used); a node
    with a record adds ``step``, ``run_id``, ``code_version`` and ``inputs``. An artifact used twice
    (a diamond) appears in full under both users. A node that leads back to one of its own
    descendants is marked ``cycle: True`` and not expanded; one deeper than ``max_depth`` is marked
    ``truncated: True``.
    """
    records: dict[str, dict[str, Any] | None] = {}

    def lookup_once(uri: str) -> dict[str, Any] | None:
        key = canonical_uri(uri)
        if key not in records:
            records[key] = lookup(storage, uri)
        return records[key]

    def walk(uri: str, sha: str | None, depth: int, path: frozenset[str]) -> dict[str, Any]:
        entry = lookup_once(uri)
        node: dict[str, Any] = {"uri": uri, "sha256": sha or (entry or {}).get("artifact", {}).get("sha256")}
        if entry is None:
            return node
        node.update(step=entry["step"], run_id=entry["run_id"], code_version=entry["code_version"])
        key = canonical_uri(uri)
        if key in path:
            node["cycle"] = True
            return node
        if depth >= max_depth:
            node["truncated"] = True
            return node
        node["inputs"] = [
            walk(i["uri"], i.get("sha256"), depth + 1, path | {key}) for i in entry.get("inputs", [])
        ]
        return node

    return walk(artifact_uri, None, 0, frozenset())


def leaves(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """The inputs at the bottom of a :func:`trace` tree: the raw files (and artifacts recorded with
    no inputs, such as generated data), each once. Nodes that close a cycle are not leaves."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str | None]] = set()

    def collect(node: dict[str, Any]) -> None:
        if node.get("cycle"):
            return
        if node.get("inputs"):
            for child in node["inputs"]:
                collect(child)
        elif (node["uri"], node.get("sha256")) not in seen:  # a file reached by two paths counts once
            seen.add((node["uri"], node.get("sha256")))
            out.append(node)

    collect(tree)
    return out


def records(storage: Storage) -> list[dict[str, Any]]:
    """Every lineage record under the storage root (one read each)."""
    out = []
    for uri in storage.list(storage.uri("lineage")):
        if uri.endswith(".json"):
            try:
                out.append(storage.read_json(uri))
            except ArtifactNotFound:  # removed while listing
                continue
    return out


def downstream(storage: Storage, artifact_uri: str, max_depth: int = 32) -> dict[str, Any]:
    """The tree of artifacts made from ``artifact_uri``, directly or through others: for a raw file,
    the lake parts it became, the snapshots that hold them, the training sets, models, reports and
    deployments they reached. Each node has ``uri`` and ``sha256``, plus ``step`` and ``run_id`` when
    it has a record, and ``users`` (the artifacts that list it as an input). Reads every record once."""
    users: dict[str, list[dict[str, Any]]] = {}
    by_uri: dict[str, dict[str, Any]] = {}
    for entry in records(storage):
        artifact = entry.get("artifact") or {}
        if not artifact.get("uri"):
            continue
        by_uri[canonical_uri(artifact["uri"])] = entry
        for item in entry.get("inputs", []):
            if item.get("uri"):
                users.setdefault(canonical_uri(item["uri"]), []).append(entry)

    def walk(uri: str, depth: int, path: frozenset[str]) -> dict[str, Any]:
        key = canonical_uri(uri)
        entry = by_uri.get(key)
        node: dict[str, Any] = {"uri": uri, "sha256": (entry or {}).get("artifact", {}).get("sha256")}
        if entry is not None:
            node.update(step=entry["step"], run_id=entry["run_id"])
        else:  # a raw file: the sha256 it had when it was read
            node["sha256"] = next((i.get("sha256") for user in users.get(key, []) for i in user.get("inputs", [])
                                   if canonical_uri(i.get("uri", "")) == key), None)
        if key in path:
            node["cycle"] = True
            return node
        if depth >= max_depth:
            node["truncated"] = True
            return node
        seen: set[str] = set()
        children = []
        for user in sorted(users.get(key, []), key=lambda e: e["artifact"]["uri"]):
            child = canonical_uri(user["artifact"]["uri"])
            if child not in seen:
                seen.add(child)
                children.append(walk(user["artifact"]["uri"], depth + 1, path | {key}))
        node["users"] = children
        return node

    return walk(artifact_uri, 0, frozenset())


def render_tree(tree: dict[str, Any], children: str = "inputs") -> str:
    """A :func:`trace` (``children="inputs"``) or :func:`downstream` (``"users"``) tree as text, one
    artifact a line: its URI, the step and run that made it, and the first 12 hex of its sha256."""
    lines: list[str] = []

    def label(node: dict[str, Any]) -> str:
        if node.get("step"):
            made = f"  [{node['step']} {node.get('run_id', '')}".rstrip() + "]"
        else:
            made = "  [raw]"
        sha = f"  sha256 {node['sha256'][:12]}" if node.get("sha256") else ""
        extra = "  (cycle)" if node.get("cycle") else "  (truncated)" if node.get("truncated") else ""
        return f"{node['uri']}{made}{sha}{extra}"

    def walk(node: dict[str, Any], prefix: str, last: bool, root: bool) -> None:
        lines.append(label(node) if root else f"{prefix}{'└── ' if last else '├── '}{label(node)}")
        kids = node.get(children) or []
        for i, child in enumerate(kids):
            walk(child, prefix if root else prefix + ("    " if last else "│   "), i == len(kids) - 1, False)

    walk(tree, "", True, True)
    return "\n".join(lines)
