"""Candidate model versions for release tests, made from a published version's own files.

- :func:`copy_version`: the same weights published again as a new version (a good candidate: its
  scores are production's).
- :func:`wider_copy`: the same function computed by a much wider network (each hidden layer padded
  with units whose weights are all zero, so every score is the same up to float rounding) — a
  candidate that only differs by being slow, about 10x production's latency per request.
- :func:`shifted_copy`: a regression's same network answering ``shift`` more in the label's units
  (its last layer's bias moved): a candidate that differs from production by exactly that much.
- ``corrupt=True``: a model card that is not JSON — a version that cannot load.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch

from flywheel.registry import Registry
from flywheel.training.model import WEIGHTS_FILE, TabularMLP, Model


def copy_version(registry: Registry, version: str, folder: Path, *, corrupt: bool = False) -> str:
    """Publish ``version``'s files again as a new version (optionally with a corrupt model card)."""
    model, files = registry.download(version, folder / uuid.uuid4().hex)
    if corrupt:
        (files / "model.json").write_text("{this is not a model card")
    return registry.publish(files, training_key=uuid.uuid4().hex, run_id="release-test", inputs=[], meta=model.meta).version


def wider_copy(registry: Registry, version: str, folder: Path, hidden: list[int]) -> str:
    """Publish ``version`` as a network with hidden layers of ``hidden`` units (at least the
    original's): the original weights in the top-left corner of each layer, zeros elsewhere."""
    model, files = registry.download(version, folder / uuid.uuid4().hex)
    original = Model.load(files)
    widths = original.meta["hidden"]
    if len(hidden) != len(widths) or any(h < w for h, w in zip(hidden, widths)):
        raise ValueError(f"hidden {hidden} must have as many layers as {widths}, each at least as wide")
    wide = TabularMLP(original.spec.width, hidden)
    small_layers = [m for m in original.module.net if isinstance(m, torch.nn.Linear)]
    wide_layers = [m for m in wide.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for small, big in zip(small_layers, wide_layers):
            big.weight.zero_()
            big.bias.zero_()
            out_features, in_features = small.weight.shape
            big.weight[:out_features, :in_features] = small.weight
            big.bias[:out_features] = small.bias
    out = folder / uuid.uuid4().hex
    for stale in files.iterdir():  # the exported and quantized copies are of the narrow network: not published
        stale.unlink()
    Model(wide.eval(), original.spec, dict(original.meta, hidden=list(hidden))).save(out)
    assert (out / WEIGHTS_FILE).exists()
    return registry.publish(out, training_key=uuid.uuid4().hex, run_id="release-test", inputs=[],
                            meta=dict(model.meta, hidden=list(hidden))).version


def shifted_copy(registry: Registry, version: str, folder: Path, shift: float) -> str:
    """Publish a regression ``version`` answering ``shift`` more for every row (in the label's units:
    the network learns the label centred and scaled, so its last bias moves by ``shift / scale``)."""
    model, files = registry.download(version, folder / uuid.uuid4().hex)
    original = Model.load(files)
    if original.task.kind != "regression":
        raise ValueError(f"shifted_copy moves a regression's answers, and {version} is {original.task.kind}")
    _, scale = original.spec.target
    last = [m for m in original.module.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias += shift / scale
    out = folder / uuid.uuid4().hex
    for stale in files.iterdir():  # exported and quantized copies are of the unshifted network: not published
        stale.unlink()
    Model(original.module, original.spec, original.meta).save(out)
    return registry.publish(out, training_key=uuid.uuid4().hex, run_id="release-test", inputs=[], meta=model.meta).version
