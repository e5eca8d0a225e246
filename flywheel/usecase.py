"""A use case: the folder a team owns, read by the platform through one typed object (issue 19).

A use case lives outside the platform, in a folder of its own (``usecases/<name>/`` here, anywhere
for a team): its data contract (``contract.yaml``, :mod:`flywheel.contract`) and, as the use-case
API grows, its expectations, features, request-time inputs, task, model and evaluation. It is chosen
with ``--usecase PATH``, ``FLYWHEEL_USECASE`` or the settings' ``usecase``; the platform loads it
once through :func:`load_usecase` and never names anything a use case declares.

Every file of the folder shapes what the loop makes from it, so :attr:`UseCase.digest` (a sha256 over
the folder's files, their paths and bytes) joins the content keys of those artifacts: an edit to a
use case's feature code retrains that use case, and an edit to another use case's folder does not.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import linecache
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from flywheel.aggregations import Features, load_features
from flywheel.contract import CONTRACT_FILE, Contract, load_contract
from flywheel.errors import UseCaseError
from flywheel.task import Task, load_task

# The name becomes a namespace in storage and in Kubernetes object names: keep it plain.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Not part of a use case: caches and editor/OS leftovers, which change without changing its meaning.
_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache"}
_IGNORED_SUFFIXES = (".pyc", ".pyo", "~", ".swp")


@dataclass(frozen=True)
class UseCase:
    """One team's use case, as the platform sees it."""

    folder: Path  # absolute
    name: str  # the folder's name
    contract: Contract
    features: Features  # its windowed aggregations per entity (features.yaml; none when absent)
    task: Task  # what its model predicts and how it learns (task.yaml; defaults from the contract)
    digest: str  # sha256 over the folder's files: part of every content key the use case shapes
    files: tuple[str, ...]  # the files the digest covers, relative to the folder

    def describe(self) -> dict[str, object]:
        """What a lineage record or a run summary says about the use case."""
        return {"name": self.name, "folder": str(self.folder), "digest": self.digest, "files": list(self.files)}


def use_case_files(folder: Path) -> list[Path]:
    """The files that make the use case, sorted by their path in the folder (caches and hidden files
    left out: they change without changing what the use case declares)."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS and not d.startswith("."))
        found += [Path(root) / n for n in names if not n.startswith(".") and not n.endswith(_IGNORED_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def folder_digest(folder: Path, files: list[Path]) -> str:
    """sha256 over each file's path (relative, POSIX) and content: a rename counts as a change."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode() + b"\n")
    return digest.hexdigest()


def load_usecase(folder: str | os.PathLike[str]) -> UseCase:
    """The use case in ``folder``; :class:`UseCaseError` says what is missing or wrong, and where.

    Loading is cached while no file of the folder changes (same paths, sizes and modification times),
    so every stage of a process reads the one object."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise UseCaseError(f"no use case at {path}: the folder does not exist (choose one with --usecase PATH, "
                           f"FLYWHEEL_USECASE or the settings' usecase)")
    if not path.is_dir():
        raise UseCaseError(f"{path} is a file; a use case is a folder holding its {CONTRACT_FILE}")
    path = path.resolve()
    try:
        files = use_case_files(path)
        signature = tuple((p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError as exc:
        raise UseCaseError(f"use case {path} cannot be read: {exc.strerror or exc}") from None
    return _load(path, signature)


@functools.lru_cache(maxsize=16)
def _load(path: Path, signature: tuple[tuple[str, int, int], ...]) -> UseCase:
    if not NAME_PATTERN.match(path.name):
        raise UseCaseError(f"use case folder {path}: its name {path.name!r} names the use case in storage and on the "
                           "cluster, so it must be lower-case letters, digits, '-' and '_' (at most 63), starting "
                           "with a letter or digit: rename the folder")
    contract = load_contract(path)
    features = load_features(path, contract)
    task = load_task(path, contract)
    files = use_case_files(path)
    try:
        digest = folder_digest(path, files)
    except OSError as exc:
        raise UseCaseError(f"use case {path} cannot be read: {exc.strerror or exc}") from None
    return UseCase(folder=path, name=path.name, contract=contract, features=features, task=task, digest=digest,
                   files=tuple(p.relative_to(path).as_posix() for p in files))


def load_module(usecase: UseCase, name: str) -> ModuleType | None:
    """The use case's Python module ``<folder>/<name>.py`` (None when it has none), imported once per
    process under a name of its own (``flywheel_usecase_<use case>_<digest>_<name>``), so that two use
    cases' modules of the same name never meet, nor two versions of one. An error in it is a UseCaseError naming the file."""
    path = usecase.folder / f"{name}.py"
    if not path.is_file():
        return None
    qualified = f"flywheel_usecase_{usecase.name.replace('-', '_')}_{usecase.digest[:12]}_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, path)
    if spec is None or spec.loader is None:
        raise UseCaseError(f"{path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the team's code: name the file and the cause
        del sys.modules[qualified]
        raise UseCaseError(f"{path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def import_source(source: str, filename: str) -> ModuleType:
    """A module from its source text (a use case's code as a model's spec carries it), imported once
    per process under a name from its sha256, so two versions never meet. Tracebacks show its lines
    under ``filename``. An error in it is a UseCaseError naming the file."""
    digest = hashlib.sha256(source.encode()).hexdigest()
    qualified = f"flywheel_code_{digest[:20]}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    label = f"<use case {filename} {digest[:12]}>"
    linecache.cache[label] = (len(source), None, source.splitlines(True), label)
    module = ModuleType(qualified)
    module.__file__ = label
    sys.modules[qualified] = module
    try:
        exec(compile(source, label, "exec"), module.__dict__)
    except Exception as exc:  # the team's code: name the file and the cause
        del sys.modules[qualified]
        raise UseCaseError(f"the use case's {filename} failed to import: {type(exc).__name__}: {exc}") from exc
    return module
