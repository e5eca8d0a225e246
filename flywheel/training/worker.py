"""One DDP worker: run under torchrun (locally, gloo on CPU) or in a PyTorchJob pod (NCCL on GPUs).

    torchrun --nproc_per_node=2 -m flywheel.training.worker --data train.parquet --spec spec.json --out DIR

Each rank reads the training file, takes its shard through a DistributedSampler, and trains; rank 0
writes a checkpoint after every epoch (and resumes from it after a restart) and the final weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from flywheel.features.transform import FeatureSpec
from flywheel.schema import LABEL
from flywheel.training.model import WEIGHTS_FILE, FraudMLP

log = logging.getLogger("flywheel.training.worker")
CHECKPOINT = "checkpoint.pt"


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
    return parser.parse_args(argv)


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and os.environ.get("FLYWHEEL_DDP_BACKEND", "") != "gloo" else "gloo"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(rank)s %(message)s")
    backend = _backend()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    extra = {"rank": rank}
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if backend == "nccl" else "cpu")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    spec = FeatureSpec.from_dict(json.loads(Path(args.spec).read_text()))
    frame = pd.read_parquet(args.data)
    x = torch.from_numpy(spec.transform(frame))
    y = torch.from_numpy(frame[LABEL].to_numpy(dtype="float32"))
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=False)

    hidden = [int(h) for h in args.hidden.split(",") if h]
    model = FraudMLP(spec.width, hidden)
    # Start from the base rate's log-odds: with ~1% positives, steps then go to ranking, not to
    # pulling the output down from 0.5 (every rank sees the same file, so the same bias).
    base_rate = float(y.mean().clamp(1e-6, 1 - 1e-6))
    with torch.no_grad():
        model.net[-1].bias.fill_(float(np.log(base_rate / (1 - base_rate))))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start_epoch = 0
    if (out / CHECKPOINT).exists():  # a restarted group resumes where the last checkpoint left off
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        log.info("resuming from epoch %d", start_epoch, extra=extra)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if backend == "nccl" else None)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    for epoch in range(start_epoch, args.epochs):
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        ddp.train()
        total, count = torch.zeros(2, device=device), 0
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(ddp(features), labels)
            loss.backward()
            optimizer.step()
            total[0] += loss.detach() * len(labels)
            total[1] += len(labels)
            count += 1
        dist.all_reduce(total)
        mean_loss = (total[0] / total[1]).item()
        if rank == 0:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch}
            torch.save(state, out / f".{CHECKPOINT}.tmp")
            os.replace(out / f".{CHECKPOINT}.tmp", out / CHECKPOINT)
            samples_per_s = int(total[1].item() / (time.perf_counter() - started))
            log.info("epoch %d/%d loss %.5f (%d samples/s, %d ranks)", epoch + 1, args.epochs, mean_loss, samples_per_s, world, extra=extra)
            with open(out / "history.jsonl", "a") as history:
                history.write(json.dumps({"epoch": epoch, "loss": mean_loss, "samples_per_s": samples_per_s}) + "\n")
    dist.barrier()
    if rank == 0:
        torch.save(model.state_dict(), out / WEIGHTS_FILE)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
