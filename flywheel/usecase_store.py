"""A use case's folder in storage: how a team's use case reaches the pipeline's pods without an image
of its own (TFX reads its module file from storage the same way).

:func:`publish_usecase` copies the folder's files (those its digest covers) to
``<root>/<use case>/usecases/<digest>/<use case>/`` and writes the manifest last, so a reader never
sees half a folder; the path is content-addressed, so publishing the same folder again writes
nothing. :func:`fetch_usecase` downloads a published folder into a local cache, checks that the
files are the ones the manifest's digest names, and loads it. With ``settings.usecase_uri`` set (on a
cluster, the pipeline sets it), :func:`resolve_usecase` turns the settings into ones whose
``usecase`` is the fetched folder: every step then reads the published use case, never the image's.

The training workers and the predictor need none of this: the model's spec carries the use case's
inputs and network code, and its card the contract and feature views.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from flywheel.config import Settings
from flywheel.errors import ArtifactNotFound, UseCaseError
from flywheel.storage import Storage
from flywheel.usecase import UseCase, load_usecase

MANIFEST = "usecase.json"
COMPLETE = ".fetched"  # in a fetched folder: every file is there (hidden: not part of the digest)


def published_uri(storage: Storage, usecase: UseCase) -> str:
    """Where ``usecase`` is (or would be) published in ``storage``."""
    return storage.uri("usecases", usecase.digest, usecase.name)


def publish_usecase(storage: Storage, usecase: UseCase) -> str:
    """Copy the use case's files to storage (once per digest); returns the folder's URI."""
    base = published_uri(storage, usecase)
    manifest = f"{base}/{MANIFEST}"
    if storage.exists(manifest):
        return base  # the same digest: the same files are already there
    for relative in usecase.files:
        storage.write_bytes(f"{base}/files/{relative}", (usecase.folder / relative).read_bytes())
    storage.write_json(manifest, {"name": usecase.name, "digest": usecase.digest, "files": list(usecase.files)})
    return base


def fetch_usecase(storage: Storage, uri: str, cache: Path) -> UseCase:
    """The use case published at ``uri``, downloaded into ``cache`` (once) and checked against its
    digest: a file altered or missing in storage is a :class:`UseCaseError`, never a silent run of
    something else."""
    uri = uri.rstrip("/")
    try:
        manifest = storage.read_json(f"{uri}/{MANIFEST}")
    except ArtifactNotFound:
        raise UseCaseError(f"no use case is published at {uri} (no {MANIFEST}): publish it with "
                           "`flywheel upload --usecase PATH` (or compile, submit, schedule)") from None
    name, digest = manifest.get("name", ""), manifest.get("digest", "")
    if not name or not digest or uri.rsplit("/", 1)[-1] != name:
        raise UseCaseError(f"{uri}/{MANIFEST} does not describe the use case {uri.rsplit('/', 1)[-1]}: {manifest}")
    target = Path(cache) / digest / name
    if not (target / COMPLETE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            for relative in manifest.get("files", []):
                if relative.startswith("/") or ".." in Path(relative).parts:
                    raise UseCaseError(f"{uri}/{MANIFEST} names a file outside the use case's folder: {relative}")
                storage.download_file(f"{uri}/files/{relative}", staging / relative)
            (staging / COMPLETE).write_text(digest)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    usecase = load_usecase(target)
    if usecase.digest != digest:
        raise UseCaseError(f"the use case at {uri} was altered after it was published: its files' digest is "
                           f"{usecase.digest[:12]}, its manifest says {digest[:12]}; publish it again")
    return usecase


def resolve_usecase(settings: Settings) -> Settings:
    """The settings with ``usecase`` the fetched folder of ``settings.usecase_uri`` (unchanged
    without one)."""
    if not settings.usecase_uri:
        return settings
    usecase = fetch_usecase(Storage.from_settings(settings), settings.usecase_uri, settings.home / "usecases")
    return settings.model_copy(update={"usecase": usecase.folder})
