"""The model registry: versions in storage, and which one is in production.

Layout below ``<root>/models/<name>/``:
``<version>/<files>`` (whatever the saved model folder holds: weights and model card),
``<version>/version.json`` (written last: a version exists once it is there, and it records every
file's sha256), ``keys/<training key>.json`` (so a rerun with the same inputs reuses its model) and
``state.json`` (the production version and the history of promotions).

The registry stores and verifies files; it does not know how to build a model from them (that is
:mod:`flywheel.training.model`), so it needs no torch.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, IntegrityError, RegistryError
from flywheel.storage import ObjectRef, Storage, sha256_file


@dataclass
class ModelVersion:
    """One registered model version."""

    name: str
    version: str
    uri: str
    sha256: str  # of the manifest's content: every file's sha256, by name
    training_key: str
    created_at: str
    run_id: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def manifest_uri(self) -> str:
        return f"{self.uri}/version.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """Versions of one model name, and its production stage."""

    def __init__(self, storage: Storage, name: str) -> None:
        if not name or "/" in name or name.startswith((".", "_")):
            raise RegistryError(f"invalid model name {name!r}: use letters, digits, '-' or '_'")
        self.storage = storage
        self.name = name
        self.root = storage.uri("models", name)

    def _state_uri(self) -> str:
        return f"{self.root}/state.json"

    def _state(self) -> dict[str, Any]:
        try:
            return self.storage.read_json(self._state_uri())
        except ArtifactNotFound:
            return {"production": None, "history": []}

    def find_by_key(self, training_key: str) -> ModelVersion | None:
        """The version trained from exactly these inputs, if one exists, verified against its
        checksums (a tampered version raises :class:`IntegrityError`, never is silently reused)."""
        try:
            version = self.storage.read_json(f"{self.root}/keys/{training_key}.json")["version"]
        except ArtifactNotFound:
            return None
        try:
            model = self.get(version)
        except RegistryError:
            return None
        if model.training_key != training_key:
            raise IntegrityError(f"{self.root}/keys/{training_key}.json names {version}, which was trained from other inputs")
        self.verify(model)
        return model

    def verify(self, model: ModelVersion) -> None:
        """Re-hash every file of a version against its manifest."""
        if not model.files:
            raise IntegrityError(f"{model.manifest_uri} records no files")
        for name, expected in model.files.items():
            self.storage.verify(f"{model.uri}/{name}", expected)

    def publish(
        self,
        folder: str | Path,
        *,
        training_key: str,
        run_id: str,
        inputs: list[dict[str, Any]],
        meta: dict[str, Any],
    ) -> ModelVersion:
        """Upload every file of a saved model folder as a new version; its manifest is written last."""
        created = dt.datetime.now(dt.timezone.utc)
        version = f"{created:%Y%m%d-%H%M%S}-{training_key[:8]}"
        uri = f"{self.root}/{version}"
        files: dict[str, str] = {}
        refs: list[ObjectRef] = []
        names = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
        if not names:
            raise RegistryError(f"{folder} holds no model files to publish")
        for name in names:
            ref = self.storage.upload_file(Path(folder) / name, f"{uri}/{name}")
            lineage.record(self.storage, ref, step="train", run_id=run_id, inputs=inputs, params=meta.get("params", {}))
            files[name] = ref.sha256
            refs.append(ref)
        model = ModelVersion(
            name=self.name,
            version=version,
            uri=uri,
            sha256=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
            training_key=training_key,
            created_at=created.isoformat(),
            run_id=run_id,
            files=files,
            meta=meta,
        )
        manifest = self.storage.write_json(model.manifest_uri, model.to_dict())
        lineage.record(self.storage, manifest, step="train", run_id=run_id, inputs=[r.to_dict() for r in refs])
        self.storage.write_json(f"{self.root}/keys/{training_key}.json", {"version": version})
        return model

    def get(self, version: str) -> ModelVersion:
        try:
            data = self.storage.read_json(f"{self.root}/{version}/version.json")
        except ArtifactNotFound:
            raise RegistryError(f"model {self.name!r} has no version {version!r} (looked in {self.root})") from None
        return ModelVersion(**data)

    def versions(self) -> list[str]:
        """Every published version, oldest first."""
        return sorted(
            uri.split("/")[-2] for uri in self.storage.list(self.root) if uri.endswith("/version.json")
        )

    def production(self) -> ModelVersion | None:
        """The production version, or None before the first promotion."""
        version = self._state().get("production")
        return self.get(version) if version else None

    def promote(self, version: str, *, run_id: str, reason: str = "") -> ModelVersion:
        """Make ``version`` the production version (the previous one stays in the history)."""
        model = self.get(version)
        state = self._state()
        state.setdefault("history", []).append(
            {
                "version": version,
                "stage": "production",
                "previous": state.get("production"),
                "run_id": run_id,
                "reason": reason,
                "at": dt.datetime.now(dt.timezone.utc).isoformat(),
            }
        )
        state["production"] = version
        ref = self.storage.write_json(self._state_uri(), state)
        lineage.record(self.storage, ref, step="deploy", run_id=run_id, inputs=[{"uri": model.manifest_uri, "sha256": model.sha256}])
        return model

    def download(self, version: str | ModelVersion, cache_dir: str | Path | None = None) -> tuple[ModelVersion, Path]:
        """Download a version's files into a local folder and check each sha256 against the manifest."""
        model = version if isinstance(version, ModelVersion) else self.get(version)
        folder = Path(cache_dir or tempfile.mkdtemp(prefix="flywheel-model-")) / model.version
        folder.mkdir(parents=True, exist_ok=True)
        for name, expected in model.files.items():
            target = folder / name
            self.storage.download_file(f"{model.uri}/{name}", target)
            if sha256_file(target) != expected:
                raise IntegrityError(f"{model.uri}/{name} does not match its recorded sha256: the version is corrupt")
        return model, folder
