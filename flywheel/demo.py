"""A use case's demo data: what `flywheel run` ingests when no --source is given.

A use case that can make data of its own (generated, or a public data set it reads) says how in its
``source.py``, with a function ``write_demo(storage, out_uri, *, rows, data)`` that writes raw files
of its contract under ``out_uri`` (``rows``: how many, None for the use case's default; ``data``:
the settings' ``data`` section: seed, days, default rows). Each demo dataset is a world of its own,
so it gets its own lake beside its raw files: a later run with another size neither mixes with nor
collides with an earlier one. The same parameters and the same ``source.py`` give the same data,
written once.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from flywheel.errors import UseCaseError
from flywheel.storage import Storage
from flywheel.usecase import UseCase, load_module

SOURCE_MODULE = "source"
DONE = "_demo.json"  # written last: a demo folder without it is written again


def demo_base(storage: Storage, usecase: UseCase, rows: int | None, data: Any) -> str:
    """The folder of one demo dataset: named by its size, days and seed, and by a hash of everything
    that makes it (the use case's source.py and the data settings)."""
    source = usecase.folder / f"{SOURCE_MODULE}.py"
    shaping = [source.read_bytes().hex() if source.exists() else "", rows, data.model_dump(mode="json")]
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:8]
    return storage.uri("demo", f"generated-r{rows if rows else 'default'}-d{data.days}-s{data.seed}-{digest}")


def demo_dataset(storage: Storage, usecase: UseCase, rows: int | None, data: Any) -> tuple[str, str, float]:
    """The demo dataset's raw files and its own lake (written by the use case's ``source.py`` the
    first time), and how many seconds writing took (0 when it was there)."""
    module = load_module(usecase, SOURCE_MODULE)
    write = getattr(module, "write_demo", None) if module is not None else None
    if write is None:
        raise UseCaseError(f"use case {usecase.name} has no demo data (no write_demo in {usecase.folder / 'source.py'}): "
                           "give the raw files to ingest with --source")
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
