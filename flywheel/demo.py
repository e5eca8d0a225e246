"""A use case's demo data: what `flywheel run` ingests when no --source is given.

A use case that can make data of its own (generated, or a public data set it reads) says how in its
``source.py``, with a function ``write_demo(storage, out_uri, *, rows, data)`` that writes raw files
of its contract under ``out_uri`` (``rows``: how many, None for the use case's default; ``data``:
the settings' ``data`` section: seed, days, default rows). It may take more keyword arguments:
``progress`` (called with the rows written so far) and the options `flywheel generate` passes on
when they are given (``start``, the first day; ``format``, the raw files' format; ``options``, a
dict of the free-form ``--option KEY=VALUE`` strings, which the use case checks and refuses by name
when it does not know one), and may return
what it wrote, in a line. Each demo dataset is a world of its own,
so it gets its own lake beside its raw files: a later run with another size neither mixes with nor
collides with an earlier one. The same parameters and the same Python files of the use case
(``source.py`` and the modules it loads, such as a generator) give the same data, written once.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from typing import Any, Callable

from flywheel.errors import UseCaseError
from flywheel.storage import Storage
from flywheel.usecase import UseCase, load_module

SOURCE_MODULE = "source"
DONE = "_demo.json"  # written last: a demo folder without it is written again
FLAGS = {"options": "--option"}  # write_demo's parameter -> `flywheel generate`'s flag, where they differ


def demo_base(storage: Storage, usecase: UseCase, rows: int | None, data: Any) -> str:
    """The folder of one demo dataset: named by its size, days and seed, and by a hash of everything
    that makes it: the use case's Python files (source.py and whatever it loads beside it: a file it
    does not use costs a rewrite, one left out would serve stale data) and the data settings."""
    code = {name: hashlib.sha256((usecase.folder / name).read_bytes()).hexdigest()
            for name in usecase.files if name.endswith(".py")}
    shaping = [code, rows, data.model_dump(mode="json")]
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:8]
    return storage.uri("demo", f"generated-r{rows if rows else 'default'}-d{data.days}-s{data.seed}-{digest}")


def demo_writer(usecase: UseCase) -> Callable[..., Any]:
    """The use case's ``write_demo`` (from its source.py); a :class:`UseCaseError` when it has none."""
    module = load_module(usecase, SOURCE_MODULE)
    write = getattr(module, "write_demo", None) if module is not None else None
    if write is None:
        raise UseCaseError(f"use case {usecase.name} has no demo data (no write_demo in {usecase.folder / 'source.py'}): "
                           "give the raw files to ingest with --source")
    return write


def write_demo_files(storage: Storage, usecase: UseCase, out_uri: str, *, rows: int | None, data: Any,
                     options: dict[str, Any] | None = None, progress: Callable[[int], None] | None = None) -> str:
    """Write the use case's demo data under ``out_uri`` (`flywheel generate`), passing ``options``
    that were given (not None) to its ``write_demo`` by name, and ``progress`` when it takes one.
    Returns what it wrote, in a line (the use case's own words, or the files' count). An option its
    ``write_demo`` does not take is a :class:`UseCaseError` naming it, before anything is written."""
    write = demo_writer(usecase)
    parameters = inspect.signature(write).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    given = {name: value for name, value in (options or {}).items() if value is not None}
    refused = sorted(name for name in given if name not in parameters and not takes_any)
    if refused:
        flags = ", ".join(FLAGS.get(name, "--" + name) for name in refused)
        raise UseCaseError(f"use case {usecase.name}'s demo data takes no {flags}: its "
                           f"write_demo ({usecase.folder / 'source.py'}) has no parameter {', '.join(refused)}; leave "
                           f"{'it' if len(refused) == 1 else 'them'} out")
    if progress is not None and ("progress" in parameters or takes_any):
        given["progress"] = progress
    said = write(storage, out_uri, rows=rows, data=data, **given)
    if isinstance(said, str) and said:
        return said
    files = [uri for uri in storage.list(out_uri) if not uri[len(out_uri.rstrip("/")):].lstrip("/").startswith("_")]
    return f"{len(files)} file(s) under {out_uri}"


def demo_dataset(storage: Storage, usecase: UseCase, rows: int | None, data: Any) -> tuple[str, str, float]:
    """The demo dataset's raw files and its own lake (written by the use case's ``source.py`` the
    first time), and how many seconds writing took (0 when it was there)."""
    write = demo_writer(usecase)
    base = demo_base(storage, usecase, rows, data)
    source, lake = f"{base}/raw", f"{base}/lake"
    if storage.exists(f"{base}/{DONE}"):
        return source, lake, 0.0
    started = time.perf_counter()
    storage.delete_tree(source)  # a half-written attempt
    write(storage, source, rows=rows, data=data)
    seconds = time.perf_counter() - started
    storage.write_json(f"{base}/{DONE}", {"usecase": usecase.name, "rows": rows, "seconds": round(seconds, 3)})
    return source, lake, seconds
