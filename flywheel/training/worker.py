"""One DDP worker: run under torchrun (locally, gloo on CPU) or in a PyTorchJob pod (NCCL on GPUs).

    torchrun --nproc_per_node=2 -m flywheel.training.worker --data train.parquet --spec spec.json --out DIR

Each rank reads the training file, cuts the validation rows off its end by time, takes its shard of
the rest through a DistributedSampler, and trains. After every epoch rank 0 scores the validation rows
(PR-AUC) and broadcasts the figure, so every rank keeps the same best-so-far state and stops together
after ``--patience`` epochs without improvement; the final weights are the best epoch's. Rank 0 writes
a checkpoint after every epoch (weights, optimizer, best-so-far state and patience counter; a restart
resumes from it and ends with the same weights) and the final weights.
The entry point is wrapped with torch's ``record``: an exception is written, with its traceback, to
the error file torchrun names (``TORCHELASTIC_ERROR_FILE``), which the launcher reads.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from flywheel.features.transform import FeatureSpec
from flywheel.schema import LABEL
from flywheel.training.model import WEIGHTS_FILE, FraudMLP
from flywheel.training.split import split_validation

log = logging.getLogger("flywheel.training.worker")
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="flywheel DDP training worker")
    parser.add_argument("--data", required=True, help="training parquet file")
    parser.add_argument("--spec", required=True, help="FeatureSpec JSON")
    parser.add_argument("--out", required=True, help="folder for checkpoints and the final weights")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay")
    parser.add_argument("--hidden", default="64,32")
    parser.add_argument("--validation-fraction", type=float, default=0.0,
                        help="the last fraction of the training span, by time, held out for early stopping (0: none)")
    parser.add_argument("--patience", type=int, default=4, help="epochs without a better validation PR-AUC before stopping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="process group (collective) timeout")
    return parser.parse_args(argv)


def resolve_backend(requested: str) -> str:
    """``auto``: NCCL when a GPU is visible, else gloo."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


@dataclass
class Shard:
    """This rank's view of the training data."""

    spec: FeatureSpec
    dataset: TensorDataset  # (inputs, labels, row index)
    sampler: DistributedSampler
    loader: DataLoader
    base_rate: float
    validation_x: torch.Tensor  # the validation rows (every rank holds them; rank 0 scores them)
    validation_y: np.ndarray


def load_shard(args: argparse.Namespace, rank: int, world: int) -> Shard:
    """Read the training file and spec, cut off the validation rows; this rank's shard of the rest
    comes from a DistributedSampler."""
    spec = FeatureSpec.from_dict(json.loads(Path(args.spec).read_text()))
    frame = pd.read_parquet(args.data)
    fit, validation = split_validation(frame, args.validation_fraction)
    x = torch.from_numpy(spec.transform(fit))
    y = torch.from_numpy(fit[LABEL].to_numpy(dtype="float32"))
    dataset = TensorDataset(x, y, torch.arange(len(y)))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=False)
    validation_x = torch.from_numpy(spec.transform(validation)) if len(validation) else torch.zeros(0, spec.width)
    validation_y = validation[LABEL].to_numpy(dtype="float32")
    return Shard(spec, dataset, sampler, loader, float(y.mean().clamp(1e-6, 1 - 1e-6)), validation_x, validation_y)


@dataclass
class BestSoFar:
    """Early stopping's state, the same on every rank (rank 0's validation figure is broadcast)."""

    metric: float = float("-inf")
    epoch: int = -1
    model: dict | None = None  # the best epoch's weights (a copy)
    bad_epochs: int = 0  # epochs since the best one
    stopped: bool = False

    def update(self, metric: float, epoch: int, model: FraudMLP, patience: int) -> None:
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


def validation_metric(model: FraudMLP, shard: Shard, device: torch.device) -> tuple[str, float]:
    """Rank 0: the validation PR-AUC (the metric the model is judged by); the negated log loss when
    the validation rows hold one class only (PR-AUC is undefined there)."""
    from sklearn.metrics import average_precision_score

    model.eval()
    with torch.inference_mode():
        logits = model(shard.validation_x.to(device)).float().cpu()
    labels = shard.validation_y
    if 0 < labels.sum() < len(labels):
        return "pr_auc", float(average_precision_score(labels, logits.numpy()))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels))
    return "neg_log_loss", -float(loss)


def agree_on_validation(model: FraudMLP, shard: Shard, device: torch.device, rank: int) -> tuple[str, float]:
    """Rank 0 scores the validation rows and broadcasts the figure: every rank then takes the same
    early-stopping decision (the broadcast is a collective, bound by the process group's timeout)."""
    name, value = validation_metric(model, shard, device) if rank == 0 else ("", 0.0)
    figure = torch.tensor([value, 1.0 if name == "pr_auc" else 0.0], dtype=torch.float64, device=device)
    dist.broadcast(figure, src=0)
    return ("pr_auc" if figure[1].item() == 1.0 else "neg_log_loss"), float(figure[0].item())


def build_model(width: int, hidden: str, base_rate: float) -> FraudMLP:
    model = FraudMLP(width, [int(h) for h in hidden.split(",") if h])
    # Start from the base rate's log-odds: with ~1% positives, steps then go to ranking, not to
    # pulling the output down from 0.5 (every rank sees the same file, so the same bias).
    with torch.no_grad():
        model.net[-1].bias.fill_(float(np.log(base_rate / (1 - base_rate))))
    return model


def resume(out: Path, model: FraudMLP, optimizer: torch.optim.Optimizer, rank: int) -> tuple[int, BestSoFar]:
    """Load the latest checkpoint if there is one (a relaunched group): the first epoch to run and
    early stopping's state as it was after the checkpointed epoch."""
    if not (out / CHECKPOINT).exists():
        return 0, BestSoFar()
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["epoch"]) + 1
    if rank == 0 and (out / HISTORY).exists():
        # The history may hold an epoch whose checkpoint never landed: it runs again.
        kept = [line for line in (out / HISTORY).read_text().splitlines() if line and json.loads(line)["epoch"] < start]
        (out / HISTORY).write_text("".join(line + "\n" for line in kept))
    log.info("resuming from epoch %d (checkpoint of epoch %d)", start, start - 1)
    return start, BestSoFar.from_state(state.get("best"))


def train_epoch(
    ddp: DistributedDataParallel, shard: Shard, optimizer: torch.optim.Optimizer, device: torch.device, epoch: int
) -> dict:
    """One pass over this rank's shard; the loss and sample counts gathered from every rank."""
    shard.sampler.set_epoch(epoch)
    ddp.train()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    total = torch.zeros(2, device=device)
    seen = torch.zeros(len(shard.dataset), dtype=torch.int32, device=device)
    for features, labels, rows in shard.loader:
        features, labels = features.to(device), labels.to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(features), labels)
        loss.backward()
        optimizer.step()
        total[0] += loss.detach() * len(labels)
        total[1] += len(labels)
        seen[rows.to(device)] += 1
    per_rank = [torch.zeros(1, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, total[1:].clone())
    dist.all_reduce(total)
    dist.all_reduce(seen)  # how often each row was used, over all ranks: the shards' coverage
    return {
        "loss": (total[0] / total[1]).item(),
        "samples": int(total[1].item()),
        "world_size": dist.get_world_size(),
        "samples_per_rank": [int(t.item()) for t in per_rank],
        "distinct_samples": int((seen > 0).sum().item()),
    }


def save_epoch(
    out: Path, model: FraudMLP, optimizer: torch.optim.Optimizer, epoch: int, facts: dict, best: BestSoFar
) -> None:
    """Rank 0: the history line, then the checkpoint (atomically): a checkpoint never runs ahead of it."""
    with open(out / HISTORY, "a") as history:
        history.write(json.dumps({"epoch": epoch, **facts}) + "\n")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best.to_state()}
    torch.save(state, out / f".{CHECKPOINT}.tmp")
    os.replace(out / f".{CHECKPOINT}.tmp", out / CHECKPOINT)


@record
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '?')} %(message)s")
    backend = resolve_backend(args.backend)
    dist.init_process_group(backend, timeout=dt.timedelta(seconds=args.timeout_s))
    rank = dist.get_rank()
    log.info("worker pid %d started (backend %s, world size %d)", os.getpid(), backend, dist.get_world_size())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    shard = load_shard(args, rank, dist.get_world_size())
    model = build_model(shard.spec.width, args.hidden, shard.base_rate).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch, best = resume(out, model, optimizer, rank)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)
    validating = len(shard.validation_y) > 0

    for epoch in range(start_epoch, args.epochs):
        if best.stopped:
            break  # a relaunch after early stopping had already decided: nothing left to run
        started = time.perf_counter()
        facts = train_epoch(ddp, shard, optimizer, device, epoch)
        facts["samples_per_s"] = int(facts["samples"] / (time.perf_counter() - started))
        if validating:
            name, value = agree_on_validation(model, shard, device, rank)
            best.update(value, epoch, model, args.patience)
            facts.update({f"validation_{name}": value, "best_epoch": best.epoch, "early_stop": best.stopped})
        if rank == 0:
            save_epoch(out, model, optimizer, epoch, facts, best)
            log.info("epoch %d/%d loss %.5f%s (%d samples/s, %d ranks)", epoch + 1, args.epochs, facts["loss"],
                     f" validation {value:.4f} (best epoch {best.epoch + 1})" if validating else "",
                     facts["samples_per_s"], facts["world_size"])
        if best.stopped:
            log.info("early stop after epoch %d: no better validation figure for %d epochs", epoch + 1, args.patience)
    dist.barrier()
    if rank == 0:
        # With validation rows the published weights are the best epoch's, not the last one's.
        torch.save(best.model if best.model is not None else model.state_dict(), out / WEIGHTS_FILE)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
