"""One DDP worker: run under torchrun (locally, gloo on CPU) or in a PyTorchJob pod (NCCL on GPUs).

    torchrun --nproc_per_node=2 -m flywheel.training.worker --data train.parquet --spec spec.json --out DIR

Each rank reads the training file, takes its shard through a DistributedSampler, and trains; rank 0
writes a checkpoint after every epoch (and resumes from it after a restart) and the final weights.
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

log = logging.getLogger("flywheel.training.worker")
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="flywheel DDP training worker")
    parser.add_argument("--data", required=True, help="training parquet file")
    parser.add_argument("--spec", required=True, help="FeatureSpec JSON")
    parser.add_argument("--out", required=True, help="folder for checkpoints and the final weights")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", default="64,32")
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


def load_shard(args: argparse.Namespace, rank: int, world: int) -> Shard:
    """Read the training file and spec; this rank's shard comes from a DistributedSampler."""
    spec = FeatureSpec.from_dict(json.loads(Path(args.spec).read_text()))
    frame = pd.read_parquet(args.data)
    x = torch.from_numpy(spec.transform(frame))
    y = torch.from_numpy(frame[LABEL].to_numpy(dtype="float32"))
    dataset = TensorDataset(x, y, torch.arange(len(y)))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=False)
    return Shard(spec, dataset, sampler, loader, float(y.mean().clamp(1e-6, 1 - 1e-6)))


def build_model(width: int, hidden: str, base_rate: float) -> FraudMLP:
    model = FraudMLP(width, [int(h) for h in hidden.split(",") if h])
    # Start from the base rate's log-odds: with ~1% positives, steps then go to ranking, not to
    # pulling the output down from 0.5 (every rank sees the same file, so the same bias).
    with torch.no_grad():
        model.net[-1].bias.fill_(float(np.log(base_rate / (1 - base_rate))))
    return model


def resume(out: Path, model: FraudMLP, optimizer: torch.optim.Optimizer, rank: int) -> int:
    """Load the latest checkpoint if there is one (a relaunched group); the first epoch to run."""
    if not (out / CHECKPOINT).exists():
        return 0
    state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["epoch"]) + 1
    if rank == 0 and (out / HISTORY).exists():
        # The history may hold an epoch whose checkpoint never landed: it runs again.
        kept = [line for line in (out / HISTORY).read_text().splitlines() if line and json.loads(line)["epoch"] < start]
        (out / HISTORY).write_text("".join(line + "\n" for line in kept))
    log.info("resuming from epoch %d (checkpoint of epoch %d)", start, start - 1)
    return start


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


def save_epoch(out: Path, model: FraudMLP, optimizer: torch.optim.Optimizer, epoch: int, facts: dict) -> None:
    """Rank 0: the history line, then the checkpoint (atomically): a checkpoint never runs ahead of it."""
    with open(out / HISTORY, "a") as history:
        history.write(json.dumps({"epoch": epoch, **facts}) + "\n")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
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
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch = resume(out, model, optimizer, rank)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)

    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        facts = train_epoch(ddp, shard, optimizer, device, epoch)
        facts["samples_per_s"] = int(facts["samples"] / (time.perf_counter() - started))
        if rank == 0:
            save_epoch(out, model, optimizer, epoch, facts)
            log.info("epoch %d/%d loss %.5f (%d samples/s, %d ranks)", epoch + 1, args.epochs, facts["loss"],
                     facts["samples_per_s"], facts["world_size"])
    dist.barrier()
    if rank == 0:
        torch.save(model.state_dict(), out / WEIGHTS_FILE)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
