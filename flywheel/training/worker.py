"""One DDP worker: run under torchrun (locally, gloo on CPU) or in a PyTorchJob pod (NCCL on GPUs).

    torchrun --nproc_per_node=2 -m flywheel.training.worker --data URI --spec URI --out URI

``--data``, ``--spec`` and ``--out`` are storage URIs (``s3://...``) or local paths, read and written
through :class:`flywheel.storage.Storage` built from the storage settings (``FLYWHEEL_STORAGE__ROOT`` and the rest of that section) in the
environment: one code path on a laptop and in a pod.

Reading: every rank reads the timestamp and label columns of the whole parquet file (small) to cut
the validation rows off its end by time, then only the row groups that hold its own shard of the fit
rows (a contiguous block of them; S3: ranged GETs, no local copy). Rank 0 also reads the validation
rows, which it scores. The sampler shuffles each rank's block per epoch (seeded), so a rank never
leaves its shard. Rows and bytes read per rank are in the history.

Training: the task's loss (binary cross-entropy, cross-entropy, or the regression loss the use case
declares). After every epoch rank 0 scores the validation rows (the task's early-stopping figure:
PR-AUC for fraud, mean absolute error for flight delays) and broadcasts the figure, so
every rank keeps the same best-so-far state and stops together after ``--patience`` epochs without
improvement; the final weights are the best epoch's. On a GPU (NCCL) the forward pass runs under
bf16 autocast.

Checkpoints: rank 0 writes ``<out>/checkpoint.pt`` (atomically, through Storage) every
``--checkpoint-every`` optimizer steps and at each epoch's end: weights, optimizer, the position
(epoch, step within it, global step), every rank's RNG state, early stopping's state and the epoch's
partial loss and coverage sums. On start every rank loads it and resumes at the next step, skipping
the batches the epoch had already done: a resumed run ends with the same weights as an
uninterrupted one. The entry point is wrapped with torch's ``record``: an exception is written, with
its traceback, to the error file torchrun names (``TORCHELASTIC_ERROR_FILE``), which the launcher reads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler, TensorDataset

from flywheel.config import load_settings
from flywheel.features.transform import FeatureSpec
from flywheel.storage import Storage, join
from flywheel.training.failures import record_failure, refuse_after_recorded_failure
from flywheel.training.model import WEIGHTS_FILE, build_network, output_layer
from flywheel.training.split import split_validation

log = logging.getLogger("flywheel.training.worker")
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="flywheel DDP training worker")
    parser.add_argument("--data", required=True, help="training parquet file (storage URI or local path)")
    parser.add_argument("--spec", required=True, help="FeatureSpec JSON (storage URI or local path)")
    parser.add_argument("--out", required=True, help="where checkpoints, history and the final weights go (URI or path)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    parser.add_argument("--hidden", default="64,32")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="the last fraction of the training span, by time, held out for early stopping (0: none)")
    parser.add_argument("--patience", type=int, default=4, help="epochs without a better validation figure before stopping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="process group (collective) timeout")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints (0: epoch ends only)")
    # Tests and benchmarks: stop cleanly after this global step, with a checkpoint there (0: never).
    parser.add_argument("--stop-at-step", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_backend(requested: str) -> str:
    """``auto``: NCCL when a GPU is visible, else gloo."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU; nothing on the CPU (gloo), where float32 stays exact and reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ reading
class TrainingFile:
    """One parquet object in storage, read by row groups: only what a rank asks for is fetched."""

    def __init__(self, storage: Storage, uri: str) -> None:
        import pyarrow.parquet as pq

        self.uri = uri
        self.handle = storage.open_input(uri)
        # Two readers over one handle and one footer: column by column for a few columns of every
        # row group (no coalescing, which would fetch the columns between them too), and coalesced
        # ranges (one request per run of row groups) for whole row groups.
        self.parquet = pq.ParquetFile(self.handle, pre_buffer=False)
        self.groups = pq.ParquetFile(self.handle, metadata=self.parquet.metadata, pre_buffer=True)
        sizes = [self.parquet.metadata.row_group(i).num_rows for i in range(self.parquet.num_row_groups)]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.rows_read = 0  # rows materialized with every column

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    @property
    def bytes_read(self) -> int:
        return int(self.handle.bytes_read)

    def require(self, *names: str) -> None:
        present = set(self.parquet.schema_arrow.names)
        for name in names:
            if name not in present:
                raise KeyError(name)

    def columns(self, names: list[str]) -> pd.DataFrame:
        """These columns of every row (file order, index = row number)."""
        self.require(*names)
        return self.parquet.read(columns=names).to_pandas()

    def rows(self, numbers: np.ndarray) -> pd.DataFrame:
        """The rows with these (sorted) row numbers, every column: only their row groups are read."""
        if len(numbers) == 0:
            return self.parquet.schema_arrow.empty_table().to_pandas()
        groups = np.unique(np.searchsorted(self.starts, numbers, side="right") - 1)
        table = self.groups.read_row_groups(groups.tolist())
        self.rows_read += table.num_rows
        offsets = np.concatenate([np.arange(self.starts[g], self.starts[g + 1]) for g in groups])
        local = np.searchsorted(offsets, numbers)
        return table.take(local).to_pandas()

    def close(self) -> None:
        self.handle.close()


def shard_block(n: int, rank: int, world: int) -> tuple[np.ndarray, int]:
    """This rank's positions among ``n`` fit rows: a contiguous block, padded (by repeating its own
    rows) to ``ceil(n / world)`` so every rank takes the same number of steps."""
    per_rank = math.ceil(n / world)
    block = np.arange(rank * per_rank, min((rank + 1) * per_rank, n))
    if len(block) == 0:
        block = np.array([n - 1])  # fewer rows than ranks: repeat the last one
    if len(block) < per_rank:
        block = np.resize(block, per_rank)
    return block, per_rank


class ShardSampler(Sampler[int]):
    """Indices into this rank's shard, shuffled per epoch (seeded by seed, epoch and rank); on resume
    the first ``skip`` batches of the epoch are left out."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int) -> None:
        self.size, self.batch_size, self.seed, self.rank = size, batch_size, seed, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1_009 + self.rank)
        order = torch.randperm(self.size, generator=generator)
        return iter(order[self.skip * self.batch_size:].tolist())

    def __len__(self) -> int:
        return max(0, self.size - self.skip * self.batch_size)

    def batches(self) -> int:
        """Batches in a whole epoch."""
        return math.ceil(self.size / self.batch_size)


@dataclass
class Shard:
    """This rank's view of the training data."""

    spec: FeatureSpec
    dataset: TensorDataset  # (inputs, targets, position among the fit rows)
    sampler: ShardSampler
    loader: DataLoader
    priors: list[float]  # binary: the positive rate; multiclass: each class's share (none for regression)
    fit_rows: int  # over every rank
    validation_x: torch.Tensor  # rank 0 only (it scores them); empty elsewhere
    validation_y: np.ndarray  # the validation rows' targets (as the network learns them)
    validating: bool  # every rank: whether there are validation rows
    rows_read: int = 0
    bytes_read: int = 0


def load_shard(args: argparse.Namespace, rank: int, world: int, storage: Storage) -> Shard:
    """Read the spec; the time and label columns of every row (to cut the validation rows off the
    end and agree on the base rate or class priors); then only this rank's block of fit rows, and on
    rank 0 the validation rows."""
    spec = FeatureSpec.from_dict(json.loads(storage.read_bytes(args.spec)))
    label = spec.objective.label
    data = TrainingFile(storage, args.data)
    try:
        index = data.columns([spec.time, label] if args.validation_fraction > 0 else [label])
        fit, validation = split_validation(index, args.validation_fraction, spec.time)
        fit_numbers, validation_numbers = fit.index.to_numpy(), validation.index.to_numpy()
        block, per_rank = shard_block(len(fit_numbers), rank, world)
        unique, inverse = np.unique(block, return_inverse=True)
        mine = data.rows(fit_numbers[unique])
        x = torch.from_numpy(spec.transform(mine))[torch.from_numpy(inverse)]
        y = torch.from_numpy(spec.targets(mine))[torch.from_numpy(inverse)]
        scored = data.rows(validation_numbers) if rank == 0 else data.rows(validation_numbers[:0])
        rows_read, bytes_read = data.rows_read, data.bytes_read
    finally:
        data.close()
    dataset = TensorDataset(x, y, torch.from_numpy(block))
    sampler = ShardSampler(per_rank, args.batch_size, args.seed, rank)
    # A generator of its own: creating the loader's iterator must not draw from torch's global RNG.
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=False,
                        generator=torch.Generator().manual_seed(args.seed))
    validation_x = torch.from_numpy(spec.transform(scored)) if len(scored) else torch.zeros(0, spec.width)
    validation_y = spec.targets(scored) if len(scored) else spec.targets(fit.iloc[:0])
    return Shard(spec, dataset, sampler, loader, priors(spec, fit), len(fit_numbers), validation_x, validation_y,
                 len(validation_numbers) > 0, rows_read, bytes_read)


def priors(spec: FeatureSpec, fit: pd.DataFrame) -> list[float]:
    """What the output layer's bias starts from, from every fit row's label (the same on every rank):
    the positive rate (binary), each class's share (multiclass), nothing (regression: the target is
    already centred)."""
    task = spec.objective
    if task.kind == "regression":
        return []
    targets = spec.targets(fit)
    if task.kind == "binary":
        return [float(np.clip(targets.mean(), 1e-6, 1 - 1e-6))]
    counts = np.bincount(targets, minlength=task.outputs).astype("float64")
    return [float(np.clip(c / max(counts.sum(), 1.0), 1e-6, 1.0)) for c in counts]


def loss_function(spec: FeatureSpec) -> torch.nn.Module:
    """The task's loss on the network's raw outputs."""
    task = spec.objective
    if task.kind == "binary":
        return torch.nn.BCEWithLogitsLoss()
    if task.kind == "multiclass":
        return torch.nn.CrossEntropyLoss()
    return {"huber": torch.nn.HuberLoss(), "l1": torch.nn.L1Loss(), "mse": torch.nn.MSELoss()}[task.loss]


# ------------------------------------------------------------------------------- early stopping
@dataclass
class BestSoFar:
    """Early stopping's state, the same on every rank (rank 0's validation figure is broadcast)."""

    metric: float = float("-inf")
    epoch: int = -1
    model: dict | None = None  # the best epoch's weights (a copy)
    bad_epochs: int = 0  # epochs since the best one
    stopped: bool = False

    def update(self, metric: float, epoch: int, model: torch.nn.Module, patience: int) -> None:
        if metric > self.metric:
            self.metric, self.epoch, self.bad_epochs = metric, epoch, 0
            self.model = {name: tensor.detach().clone().cpu() for name, tensor in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        self.stopped = self.bad_epochs >= patience

    def to_state(self) -> dict:
        return {"metric": self.metric, "epoch": self.epoch, "model": self.model, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped}

    @classmethod
    def from_state(cls, state: dict | None) -> "BestSoFar":
        return cls(**state) if state else cls()


def validation_metric(model: torch.nn.Module, shard: Shard, device: torch.device) -> tuple[str, float]:
    """Rank 0: the task's early-stopping figure on the validation rows, oriented so that higher is
    better (``neg_mae``: the mean absolute error, negated). A binary figure that needs both classes
    falls back to the negated log loss when the validation rows hold one class only."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    task = shard.spec.objective
    model.eval()
    with torch.inference_mode(), autocast(device):
        raw = model(shard.validation_x.to(device)).float().cpu()
    targets = shard.validation_y
    if task.kind == "binary":
        if task.early_stopping != "log_loss" and 0 < targets.sum() < len(targets):
            score = average_precision_score if task.early_stopping == "pr_auc" else roc_auc_score
            return task.early_stopping, float(score(targets, raw.numpy()))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(raw, torch.from_numpy(targets))
        return "neg_log_loss", -float(loss)
    if task.kind == "multiclass":
        if task.early_stopping == "accuracy":
            return "accuracy", float((raw.argmax(dim=-1).numpy() == targets).mean())
        return "neg_log_loss", -float(torch.nn.functional.cross_entropy(raw, torch.from_numpy(targets)))
    error = (raw.numpy().astype("float64") - targets) * shard.spec.target[1]  # in the label's own units
    if task.early_stopping == "rmse":
        return "neg_rmse", -float(np.sqrt(np.mean(error ** 2)))
    return "neg_mae", -float(np.mean(np.abs(error)))


def agree_on_validation(model: torch.nn.Module, shard: Shard, device: torch.device, rank: int) -> tuple[str, float]:
    """Rank 0 scores the validation rows and broadcasts the figure: every rank then takes the same
    early-stopping decision (the broadcast is a collective, bound by the process group's timeout).
    The figure's name is the task's, or the binary fallback (``neg_log_loss``)."""
    name, value = validation_metric(model, shard, device) if rank == 0 else ("", 0.0)
    fallback = shard.spec.objective.kind == "binary" and name == "neg_log_loss"
    figure = torch.tensor([value, 0.0 if fallback else 1.0], dtype=torch.float64, device=device)
    dist.broadcast(figure, src=0)
    task = shard.spec.objective
    primary = {"mae": "neg_mae", "rmse": "neg_rmse", "log_loss": "neg_log_loss"}.get(task.early_stopping, task.early_stopping)
    return (primary if figure[1].item() == 1.0 else "neg_log_loss"), float(figure[0].item())


def build_model(spec: FeatureSpec, hidden: str, priors: list[float]) -> torch.nn.Module:
    model = build_network(spec, [int(h) for h in hidden.split(",") if h])
    # Start from the base rate's log-odds (binary) or the classes' log shares (multiclass): with ~1%
    # positives, steps then go to ranking, not to pulling the output down from 0.5 (every rank reads
    # the same label column, so the same bias). A regression target is centred already.
    last = output_layer(model)
    if priors and last is not None and last.bias is not None:
        with torch.no_grad():
            if len(priors) == 1:
                last.bias.fill_(float(np.log(priors[0] / (1 - priors[0]))))
            elif last.bias.shape[0] == len(priors):
                last.bias.copy_(torch.log(torch.tensor(priors, dtype=last.bias.dtype)))
    return model


# ---------------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Where training stands: the epoch, optimizer steps done in it, steps done in all, and the
    epoch's partial sums (loss and samples, samples per rank, how often each fit row was used)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    samples_per_rank: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None


@dataclass
class Run:
    """Everything a rank trains with."""

    args: argparse.Namespace
    storage: Storage
    out: str
    rank: int
    world: int
    device: torch.device
    shard: Shard
    model: torch.nn.Module
    ddp: DistributedDataParallel
    optimizer: torch.optim.Optimizer
    best: BestSoFar
    history: list[dict]
    first_step_pending: bool = False  # log the first step after a resume (the benchmark times it)

    def uri(self, name: str) -> str:
        return join(self.out, name)


def write_checkpoint(run: Run, progress: Progress, complete: bool) -> None:
    """Every rank: gather the RNG states; rank 0: write the checkpoint atomically (Storage.write_bytes)."""
    states: list[Any] = [None] * run.world
    dist.all_gather_object(states, torch.get_rng_state())
    if run.rank != 0:
        return
    state = {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "best": run.best.to_state(),
        "epoch": progress.epoch, "step": progress.step, "global_step": progress.global_step, "complete": complete,
        "world_size": run.world, "rng": states,
        "partial": None if complete else {
            "loss_sum": progress.loss_sum, "samples": progress.samples,
            "samples_per_rank": progress.samples_per_rank, "seen": progress.seen,
        },
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    run.storage.write_bytes(run.uri(CHECKPOINT), buffer.getvalue())


def write_history(run: Run) -> None:
    run.storage.write_bytes(run.uri(HISTORY), "".join(json.dumps(line) + "\n" for line in run.history).encode())


def resume(run: Run) -> Progress:
    """Load the latest checkpoint if there is one (a relaunched group): where to start and early
    stopping's state, weights, optimizer and RNG as they were when it was written."""
    uri = run.uri(CHECKPOINT)
    if not run.storage.exists(uri):
        return Progress()
    state = torch.load(io.BytesIO(run.storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.best = BestSoFar.from_state(state.get("best"))
    rng = state.get("rng") or []
    if len(rng) == run.world:
        torch.set_rng_state(rng[run.rank])
    epoch, step, global_step = int(state["epoch"]), int(state.get("step", 0)), int(state.get("global_step", 0))
    if state.get("complete", True):
        progress = Progress(epoch + 1, 0, global_step)
    else:
        partial = state["partial"]
        progress = Progress(epoch, step, global_step, partial["loss_sum"] if run.rank == 0 else 0.0,
                            partial["samples"] if run.rank == 0 else 0, partial["samples_per_rank"],
                            partial["seen"] if run.rank == 0 else None)
    if run.rank == 0 and run.storage.exists(run.uri(HISTORY)):
        # The history may hold an epoch whose checkpoint never landed: it runs again.
        lines = run.storage.read_bytes(run.uri(HISTORY)).decode().splitlines()
        run.history = [json.loads(line) for line in lines if line and json.loads(line)["epoch"] < progress.epoch]
    log.info("resuming from epoch %d step %d (global step %d)", progress.epoch, progress.step, progress.global_step)
    return progress


# ------------------------------------------------------------------------------------- training
def partial_sums(run: Run, at: Progress, total: torch.Tensor, seen: torch.Tensor, mine: torch.Tensor) -> Progress:
    """Every rank: the epoch's sums so far over all ranks, for a checkpoint at ``at`` (``total`` and
    ``seen`` hold rank 0's carried sums of a resumed epoch; ``mine``, this rank's samples since)."""
    summed, counts = total.clone(), [torch.zeros(1, device=run.device) for _ in range(run.world)]
    dist.all_gather(counts, mine.clone())
    dist.all_reduce(summed)
    seen_all = seen.clone()
    dist.all_reduce(seen_all)
    before = at.samples_per_rank or [0] * run.world
    return Progress(at.epoch, at.step, at.global_step, float(summed[0].item()), int(summed[1].item()),
                    [b + int(c.item()) for b, c in zip(before, counts)], seen_all.cpu())


def train_epoch(run: Run, progress: Progress) -> dict | None:
    """The rest of one pass over this rank's shard (from ``progress.step``): checkpoints every
    ``--checkpoint-every`` steps; the loss and sample counts gathered from every rank. None when
    ``--stop-at-step`` was reached (after its checkpoint)."""
    shard, args = run.shard, run.args
    shard.sampler.set_epoch(progress.epoch, progress.step)
    run.ddp.train()
    loss_fn = loss_function(shard.spec)
    total = torch.zeros(2, device=run.device)
    total[0], total[1] = progress.loss_sum, progress.samples  # rank 0 carries the sums of a resumed epoch
    seen = torch.zeros(shard.fit_rows, dtype=torch.int32, device=run.device)
    if progress.seen is not None:
        seen += progress.seen.to(run.device)
    mine = torch.zeros(1, device=run.device)
    last = shard.sampler.batches()
    for features, labels, rows in shard.loader:
        features, labels = features.to(run.device), labels.to(run.device)
        run.optimizer.zero_grad(set_to_none=True)
        with autocast(run.device):
            logits = run.ddp(features)
        loss = loss_fn(logits.float(), labels)  # labels: the task's targets (float, or class indices)
        loss.backward()
        run.optimizer.step()
        total[0] += loss.detach() * len(labels)
        total[1] += len(labels)
        mine += len(labels)
        seen[rows.to(run.device)] += 1
        progress.step += 1
        progress.global_step += 1
        if run.first_step_pending:
            run.first_step_pending = False
            log.info("first step after resume done (global step %d)", progress.global_step)
        stop = args.stop_at_step and progress.global_step >= args.stop_at_step
        due = args.checkpoint_every and progress.global_step % args.checkpoint_every == 0
        if progress.step < last and (due or stop):
            # The sums cover all ranks and the steps so far: a resumed epoch ends with the same figures.
            at = Progress(progress.epoch, progress.step, progress.global_step, samples_per_rank=progress.samples_per_rank)
            here = partial_sums(run, at, total, seen, mine)
            write_checkpoint(run, here, complete=False)
            if stop:
                return None
    per_rank = [torch.zeros(1, device=run.device) for _ in range(run.world)]
    dist.all_gather(per_rank, mine)
    dist.all_reduce(total)
    dist.all_reduce(seen)  # how often each row was used, over all ranks: the shards' coverage
    before = progress.samples_per_rank or [0] * run.world
    return {
        "loss": (total[0] / total[1]).item(),
        "samples": int(total[1].item()),
        "world_size": run.world,
        "samples_per_rank": [b + int(t.item()) for b, t in zip(before, per_rank)],
        "distinct_samples": int((seen > 0).sum().item()),
        "steps": progress.global_step,
    }


def reads_per_rank(shard: Shard, device: torch.device, world: int) -> tuple[list[int], list[int]]:
    """Rows and bytes each rank read from the training file (the shards' reads, for the history)."""
    gathered = [torch.zeros(2, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([shard.rows_read, shard.bytes_read], dtype=torch.float64, device=device))
    return [int(t[0].item()) for t in gathered], [int(t[1].item()) for t in gathered]


@record
def main(argv: list[str] | None = None) -> None:
    """torchrun's entry point in every rank. An exception of the worker's own is recorded in ``out``
    (see :mod:`flywheel.training.failures`), so that torchrun's restart does not redo it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '?')} %(message)s")
    storage = Storage.from_settings(load_settings())
    refuse_after_recorded_failure(storage, args.out)
    try:
        train_rank(args, storage)
    except Exception as exc:
        if record_failure(storage, args.out, int(os.environ.get("RANK", 0)), exc):
            log.error("recorded %s in %s: a restart will not retry it", type(exc).__name__, args.out)
        raise


def train_rank(args: argparse.Namespace, storage: Storage) -> None:
    """One rank's whole run: join the group, read its shard, train (resuming), publish (rank 0)."""
    backend = resolve_backend(args.backend)
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info("worker pid %d started (backend %s, world size %d, attempt %d)", os.getpid(), backend, world,
             int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) + 1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    shard = load_shard(args, rank, world, storage)
    rows_read, bytes_read = reads_per_rank(shard, device, world)
    model = build_model(shard.spec, args.hidden, shard.priors).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)
    run = Run(args, storage, args.out, rank, world, device, shard, model, ddp, optimizer, BestSoFar(), [])
    progress = resume(run)
    run.first_step_pending = progress.global_step > 0
    finished = True

    for epoch in range(progress.epoch, args.epochs):
        if run.best.stopped:
            break  # a relaunch after early stopping had already decided: nothing left to run
        if epoch != progress.epoch:
            progress = Progress(epoch, 0, progress.global_step)
        started = time.perf_counter()
        facts = train_epoch(run, progress)
        if facts is None:
            log.info("stopping at global step %d (--stop-at-step), checkpoint written", progress.global_step)
            finished = False
            break
        facts["samples_per_s"] = int((facts["samples"] - progress.samples) / (time.perf_counter() - started))
        facts.update({"rows_read_per_rank": rows_read, "bytes_read_per_rank": bytes_read})
        if shard.validating:
            name, value = agree_on_validation(model, shard, device, rank)
            run.best.update(value, epoch, model, args.patience)
            facts.update({f"validation_{name}": value, "best_epoch": run.best.epoch, "early_stop": run.best.stopped})
        if rank == 0:
            # The history first, then the checkpoint: a checkpoint never runs ahead of the history.
            run.history.append({"epoch": epoch, **facts})
            write_history(run)
        write_checkpoint(run, progress, complete=True)
        if rank == 0:
            log.info("epoch %d/%d loss %.5f%s (%d samples/s, %d ranks)", epoch + 1, args.epochs, facts["loss"],
                     f" validation {value:.4f} (best epoch {run.best.epoch + 1})" if shard.validating else "",
                     facts["samples_per_s"], facts["world_size"])
        if run.best.stopped:
            log.info("early stop after epoch %d: no better validation figure for %d epochs", epoch + 1, args.patience)
    dist.barrier()
    if finished and rank == 0:
        # With validation rows the published weights are the best epoch's, not the last one's.
        buffer = io.BytesIO()
        torch.save(run.best.model if run.best.model is not None else model.state_dict(), buffer)
        storage.write_bytes(run.uri(WEIGHTS_FILE), buffer.getvalue())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
