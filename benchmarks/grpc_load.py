"""A v2 gRPC load, what wrk is to REST: ``concurrency`` ModelInfer calls in flight over one HTTP/2
channel for ``seconds``, the requests rotating through pre-serialized ``ModelInferRequest``s.

    python benchmarks/grpc_load.py --target HOST:PORT --requests FILE --concurrency N --seconds S

``FILE`` holds the serialized requests, each preceded by its length (4 bytes, little-endian). The
calls send and take raw bytes (no protobuf work on this side beyond gRPC's own), after one second of
warm-up that is not counted. Prints one JSON object: requests, errors (the first error's status),
requests/s, and p50/p99 latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import time

import grpc
import numpy as np

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def read_requests(path: str) -> list[bytes]:
    data = open(path, "rb").read()
    requests, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        requests.append(data[offset + 4:offset + 4 + length])
        offset += 4 + length
    return requests


async def load(target: str, requests: list[bytes], concurrency: int, seconds: float) -> dict:
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out
        latencies: list[float] = []
        errors: list[str] = []
        counting = False
        next_index = 0

        async def worker(deadline: float) -> None:
            nonlocal next_index
            while time.perf_counter() < deadline:
                body = requests[next_index % len(requests)]
                next_index += 1
                started = time.perf_counter()
                try:
                    await call(body, timeout=30)
                except grpc.RpcError as exc:
                    if counting:
                        errors.append(f"{exc.code().name}: {exc.details()}"[:300])
                    continue
                if counting:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker(time.perf_counter() + 1.0) for _ in range(concurrency)))  # warm-up
        counting = True
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    values = np.array(latencies) * 1000 if latencies else np.array([0.0])
    return {"requests": len(latencies), "errors": len(errors), "first_error": errors[0] if errors else "",
            "rps": len(latencies) / elapsed,
            **{f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 75, 90, 99)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--requests", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(load(args.target, read_requests(args.requests), args.concurrency, args.seconds))))


if __name__ == "__main__":
    main()
