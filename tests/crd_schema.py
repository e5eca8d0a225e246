"""Check a manifest against a CRD's structural schema, as the API server would: a field the schema
does not declare is an error (a real server prunes it or, with strict validation, refuses it), and so
is a wrong type, a value outside an enum or a missing required field."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

# Upstream's CRD files, kept in the repository: where each came from is in tests/crds/SOURCE.md.
CRDS = Path(__file__).resolve().parent / "crds"
# The root's metadata is an ObjectMeta, which the server validates itself (the CRD says only "object").
OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}


@lru_cache(maxsize=None)
def crd_schema(filename: str, version: str) -> dict[str, Any]:
    """``spec.versions[name == version].schema.openAPIV3Schema`` of a CRD file in ``CRDS``."""
    crd = yaml.safe_load((CRDS / filename).read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{filename} has no version {version}")


def schema_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Every place where ``value`` breaks ``schema``; an empty list when it conforms."""
    where = path or "<root>"
    if schema.get("x-kubernetes-int-or-string"):
        return [] if isinstance(value, (int, str)) and not isinstance(value, bool) else [f"{where}: expected int or string, got {value!r}"]
    expected = schema.get("type")
    if expected:
        python_type = TYPES[expected]
        if isinstance(value, bool) and expected in ("integer", "number") or not isinstance(value, python_type):
            return [f"{where}: expected {expected}, got {type(value).__name__} {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: required field {name!r} is missing")
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if properties is not None and key in properties:
                errors += schema_errors(item, properties[key], child)
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, child)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            elif path == "metadata" and key in OBJECT_META:
                continue
            else:
                errors.append(f"{child}: unknown field (the schema declares {sorted(properties or [])})")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def assert_conforms(body: dict[str, Any], filename: str, version: str) -> None:
    errors = schema_errors(body, crd_schema(filename, version))
    assert not errors, "the manifest breaks the CRD schema:\n" + "\n".join(errors)
