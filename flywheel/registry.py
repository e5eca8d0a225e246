"""The model registry: versions in storage, and the stage of each one, from an append-only event log.

Layout below ``<root>/models/<name>/``:
``<version>/<files>`` (whatever the saved model folder holds: weights and model card),
``<version>/version.json`` (written last: a version exists once it is there, and it records every
file's sha256), ``keys/<training key>.json`` (so a rerun with the same inputs reuses its model) and
``events/<sequence number>.json``: one file per stage change, never rewritten.

Stages: a published version is a ``candidate``; it may become the ``canary`` (serving a share of
traffic), then ``production``; the production version it replaces, and a canary that is rolled back,
become ``archived``. Every event records who (the user and the run), why, and when. The stages are
derived by replaying the events, so the history can never disagree with the state.

Concurrent writers: an event is created under the next sequence number only if that name is free
(:meth:`Storage.create_if_absent`: a hard link locally, a conditional PUT on S3). Of two processes
appending at once exactly one gets the number; the other re-reads the log and either retries (when
its change is still valid) or fails with :class:`RegistryConflict` (when the caller said which
production it expected and that changed). No event is ever lost or overwritten.

The registry stores and verifies files; it does not know how to build a model from them (that is
:mod:`flywheel.training.model`), so it needs no torch.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel import lineage
from flywheel.errors import ArtifactNotFound, IntegrityError, RegistryConflict, RegistryError
from flywheel.storage import ObjectRef, Storage, sha256_file

STAGES = ("candidate", "canary", "production", "archived")
# action -> the stages the version may be in before it
ALLOWED_FROM = {
    "publish": (None,),
    "canary": ("candidate", "archived"),
    "promote": ("candidate", "canary", "archived"),
    "abort_canary": ("canary",),
    "rollback": ("archived",),
}
_UNSET: Any = object()
MAX_APPEND_ATTEMPTS = 50


def current_user() -> str:
    """Who is acting: ``$FLYWHEEL_ACTOR`` (a pipeline sets it), else the login name, else the uid."""
    if os.environ.get("FLYWHEEL_ACTOR"):
        return os.environ["FLYWHEEL_ACTOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid-{os.getuid()}"


@dataclass(frozen=True)
class StageEvent:
    """One stage change. ``previous_production`` is the production version just before it."""

    seq: int
    action: str  # publish | canary | promote | abort_canary | rollback
    version: str
    stage: str  # the version's stage after the event
    previous_production: str | None
    user: str
    run_id: str
    reason: str
    at: str
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegistryState:
    """What the event log says now: each version's stage, production, canary, and the production
    versions a rollback would return to (most recent last)."""

    stages: dict[str, str] = field(default_factory=dict)
    production: str | None = None
    canary: str | None = None
    production_stack: list[str] = field(default_factory=list)
    events: list[StageEvent] = field(default_factory=list)

    @property
    def next_seq(self) -> int:
        return self.events[-1].seq + 1 if self.events else 1


def replay(events: list[StageEvent]) -> RegistryState:
    """Derive the registry's state from its events, in sequence order. A pure function: the events
    are the truth, the state is only ever computed from them."""
    state = RegistryState(events=list(events))
    for event in events:
        if event.action == "publish":
            state.stages[event.version] = "candidate"
        elif event.action == "canary":
            state.stages[event.version] = "canary"
            state.canary = event.version
        elif event.action == "abort_canary":
            state.stages[event.version] = "archived"
            state.canary = None
        elif event.action == "promote":
            if state.production is not None:
                state.stages[state.production] = "archived"
            state.stages[event.version] = "production"
            state.production = event.version
            state.production_stack.append(event.version)
            if state.canary == event.version:
                state.canary = None
        elif event.action == "rollback":
            if state.production is not None:
                state.stages[state.production] = "archived"
                if state.production_stack and state.production_stack[-1] == state.production:
                    state.production_stack.pop()
            state.stages[event.version] = "production"
            state.production = event.version
        else:
            raise IntegrityError(f"registry event {event.seq} has an unknown action {event.action!r}")
    return state


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

    def _events_uri(self) -> str:
        return f"{self.root}/events"

    def _event_uri(self, seq: int) -> str:
        return f"{self._events_uri()}/{seq:010d}.json"

    def events(self) -> list[StageEvent]:
        """Every stage event, in sequence order."""
        found = self._read_events()
        if not found and self.storage.exists(f"{self.root}/state.json"):
            self._import_legacy_state()
            found = self._read_events()
        return found

    def _import_legacy_state(self) -> None:
        """A registry written before the event log kept ``state.json`` (production and a list of
        promotions): its promotions become the first events, once (racing importers write the same)."""
        legacy = self.storage.read_json(f"{self.root}/state.json")
        for seq, entry in enumerate(legacy.get("history") or [], start=1):
            event = StageEvent(seq=seq, action="promote", version=entry["version"], stage="production",
                               previous_production=entry.get("previous"), user="legacy-state.json",
                               run_id=entry.get("run_id", ""), reason=entry.get("reason", ""), at=entry.get("at", ""),
                               id=f"legacy-{seq}")
            self.storage.create_if_absent(self._event_uri(seq), json.dumps(event.to_dict(), indent=2, sort_keys=True).encode())

    def _read_events(self) -> list[StageEvent]:
        found = []
        for uri in self.storage.list(self._events_uri()):
            name = uri.rsplit("/", 1)[-1]
            if not name.endswith(".json") or not name[:-5].isdigit():
                continue
            try:
                found.append(StageEvent(**self.storage.read_json(uri)))
            except (TypeError, ValueError) as exc:
                raise IntegrityError(f"registry event {uri} is malformed ({exc}); the event log must not be edited") from None
        found.sort(key=lambda event: event.seq)
        for expected, event in enumerate(found, start=1):
            if event.seq != expected:
                raise IntegrityError(f"the registry event log {self._events_uri()} is missing event {expected}")
        return found

    def state(self) -> RegistryState:
        """The current stages, derived from the event log."""
        return replay(self.events())

    def stage(self, version: str) -> str:
        """A published version's stage (a version published before the event log: candidate)."""
        self.get(version)
        return self.state().stages.get(version, "candidate")

    def _append(self, action: str, version: str, *, run_id: str, reason: str, expected_production: Any = _UNSET,
                target: str | None = None) -> StageEvent:
        """Append one event after checking that it is allowed by the state it follows. Lost races for
        a sequence number re-read the log and check again; ``expected_production`` (when given) must
        still be the production version, else :class:`RegistryConflict`."""
        for _ in range(MAX_APPEND_ATTEMPTS):
            state = self.state()
            if expected_production is not _UNSET and state.production != expected_production:
                raise RegistryConflict(
                    f"model {self.name!r}: production is {state.production or 'none'}, not {expected_production or 'none'} "
                    f"as expected; another promotion landed first (event {state.next_seq - 1}). Check `flywheel models list` and retry"
                )
            stage = _check_transition(self.name, state, action, version, target)
            event = StageEvent(
                seq=state.next_seq,
                action=action,
                version=version,
                stage=stage,
                previous_production=state.production,
                user=current_user(),
                run_id=run_id,
                reason=reason,
                at=dt.datetime.now(dt.timezone.utc).isoformat(),
                id=secrets.token_hex(8),
            )
            data = json.dumps(event.to_dict(), indent=2, sort_keys=True).encode()
            if self.storage.create_if_absent(self._event_uri(event.seq), data):
                return event
        raise RegistryConflict(f"model {self.name!r}: could not append a {action} event after {MAX_APPEND_ATTEMPTS} tries (too many concurrent writers)")

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
        self._append("publish", version, run_id=run_id, reason=f"trained by run {run_id}")
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
        version = self.state().production
        return self.get(version) if version else None

    def canary(self) -> ModelVersion | None:
        """The version now in canary, or None."""
        version = self.state().canary
        return self.get(version) if version else None

    def promote(self, version: str, *, run_id: str, reason: str = "", expected_production: Any = _UNSET) -> ModelVersion:
        """Make ``version`` the production version; the one it replaces is archived (and is where a
        rollback returns). With ``expected_production``, refuse (:class:`RegistryConflict`) unless
        production is still that version: a decision taken against one production never silently
        overrides another process's promotion."""
        model = self.get(version)
        event = self._append("promote", version, run_id=run_id, reason=reason, expected_production=expected_production)
        self._record(model, event, run_id)
        return model

    def start_canary(self, version: str, *, run_id: str, reason: str = "") -> ModelVersion:
        """Mark ``version`` as the canary (a share of traffic is about to reach it)."""
        model = self.get(version)
        self._append("canary", version, run_id=run_id, reason=reason)
        return model

    def abort_canary(self, version: str, *, run_id: str, reason: str) -> ModelVersion:
        """A canary that failed its analysis is archived; production is untouched."""
        model = self.get(version)
        self._append("abort_canary", version, run_id=run_id, reason=reason)
        return model

    def rollback(self, *, run_id: str, reason: str = "", expected_production: Any = _UNSET) -> ModelVersion:
        """Return production to the version it replaced (the one before that on a second rollback)."""
        state = self.state()
        if len(state.production_stack) < 2:
            raise RegistryError(
                f"model {self.name!r} has no previous production version to roll back to"
                + (f" (production is {state.production}, its first)" if state.production else " (nothing was ever promoted)")
            )
        target = state.production_stack[-2]
        model = self.get(target)
        event = self._append("rollback", target, run_id=run_id, reason=reason, expected_production=expected_production, target=target)
        self._record(model, event, run_id)
        return model

    def _record(self, model: ModelVersion, event: StageEvent, run_id: str) -> None:
        ref = self.storage.stat(self._event_uri(event.seq))
        lineage.record(self.storage, ref, step="deploy", run_id=run_id, inputs=[{"uri": model.manifest_uri, "sha256": model.sha256}])

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


def _check_transition(name: str, state: RegistryState, action: str, version: str, target: str | None) -> str:
    """The version's stage after ``action``, or :class:`RegistryError` naming why it is not allowed."""
    current = state.stages.get(version, "candidate" if action != "publish" else None)
    if action == "rollback":
        if len(state.production_stack) < 2 or state.production_stack[-2] != target:
            raise RegistryConflict(f"model {name!r}: the rollback target {target} is no longer the previous production version")
        return "production"
    if action == "publish" and current is not None:
        raise RegistryError(f"model {name!r} version {version} is already published ({current})")
    if action == "promote" and current == "production":
        raise RegistryError(f"model {name!r} version {version} is already production")
    if action == "canary" and state.canary not in (None, version):
        raise RegistryError(f"model {name!r} already has a canary, {state.canary}: promote or abort it first")
    if current not in ALLOWED_FROM[action]:
        raise RegistryError(f"model {name!r} version {version} is {current}; it cannot {action.replace('_', ' ')}")
    return {"publish": "candidate", "canary": "canary", "promote": "production", "abort_canary": "archived"}[action]
