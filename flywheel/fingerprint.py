"""Code fingerprints for content keys: the code that makes an artifact, found by following imports.

An artifact's key must change when any code that shapes it changes. A hand-kept list of modules goes
stale the day someone moves a function, so the list is derived: starting from the modules that make
the artifact, every ``flywheel`` module they import (at the top or inside a function, transitively)
is hashed with them, and every third-party package they import contributes its installed version.
Over-inclusion costs a retrain; under-inclusion costs a stale artifact, which is worse.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from flywheel.errors import FlywheelError

PACKAGE = "flywheel"


def _source_path(module: str) -> Path | None:
    """The .py file of an importable module, or None when there is none (namespace, builtin)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement in ``path`` may refer to (absolute form)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if _is_package(path) else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from flywheel.features import compute` imports a module, not only a name.
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {name for name in names if name}


def _parents(module: str) -> list[str]:
    """``a.b.c`` → ``["a", "a.b"]``: importing a submodule runs its packages' ``__init__`` too."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def project_modules(*roots: str) -> tuple[tuple[str, Path], ...]:
    """The ``flywheel`` modules that ``roots`` use, transitively, with their source files, sorted."""
    return _scan(roots)[0]


def _scan(roots: tuple[str, ...]) -> tuple[tuple[tuple[str, Path], ...], tuple[str, ...]]:
    """(flywheel modules with their files, third-party top-level modules) reachable from ``roots``."""
    seen: dict[str, Path] = {}
    third_party: set[str] = set()
    pending = list(roots)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        top = name.split(".")[0]
        if top != PACKAGE:
            third_party.add(top)
            continue
        path = _source_path(name)
        if path is None:
            continue  # `from flywheel.x import function`: the name is not a module
        seen[name] = path
        pending.extend(_parents(name))
        pending.extend(_imported_names(name, path))
    missing = [root for root in roots if root not in seen]
    if missing:
        raise FlywheelError(f"cannot fingerprint {missing}: no such flywheel module")
    return tuple(sorted(seen.items())), tuple(sorted(third_party))


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _package_versions(top_level: tuple[str, ...]) -> list[str]:
    """``name==version`` of the installed distributions behind third-party top-level modules."""
    out = set()
    stdlib = sys.stdlib_module_names
    for module in top_level:
        if module in stdlib:
            continue
        for dist in _distributions().get(module, []):
            try:
                out.add(f"{dist}=={importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                continue
    return sorted(out)


def code_fingerprint(*roots: str) -> str:
    """sha256 over the source of ``roots`` and every flywheel module they import (transitively),
    plus the versions of the third-party packages those modules import.

    ``roots`` are module names, e.g. ``code_fingerprint("flywheel.features.build")``. A process the
    code launches by module name (a torchrun worker) is a root of its own.
    """
    modules, third_party = _scan(tuple(roots))
    digest = hashlib.sha256()
    for name, path in modules:
        digest.update(f"{name}\n".encode())
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
    for pin in _package_versions(third_party):
        digest.update(f"{pin}\n".encode())
    return digest.hexdigest()
