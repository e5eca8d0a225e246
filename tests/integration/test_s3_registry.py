"""The registry's event log on S3: a conditional PUT (If-None-Match) lets exactly one writer create
an event, so concurrent promotions through S3 never overwrite each other."""

from __future__ import annotations

import threading

from flywheel.registry import Registry
from tests.unit.test_registry_stages import publish


def test_create_if_absent_on_s3_lets_exactly_one_writer_win(s3_storage):
    uri = s3_storage.uri("race", "0000000001.json")
    barrier = threading.Barrier(8)
    won: list[int] = []

    def write(n: int) -> None:
        barrier.wait()
        if s3_storage.create_if_absent(uri, f"writer {n}".encode()):
            won.append(n)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    assert s3_storage.read_bytes(uri) == f"writer {won[0]}".encode()


def test_concurrent_promotions_on_s3_keep_every_event(s3_storage, tmp_path):
    registry = Registry(s3_storage, "fraud")
    plan = [[publish(registry, tmp_path / f"t{t}-{k}", 10 * t + k) for k in range(5)] for t in range(3)]
    barrier = threading.Barrier(3)

    def promote_all(versions: list[str]) -> None:
        barrier.wait()
        for version in versions:
            Registry(s3_storage, "fraud").promote(version, run_id="s3-race")

    threads = [threading.Thread(target=promote_all, args=(versions,)) for versions in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    promotions = [e for e in registry.events() if e.action == "promote"]
    assert len(promotions) == 15
    for before, after in zip(promotions, promotions[1:]):
        assert after.previous_production == before.version
    assert registry.rollback(run_id="s3").version == promotions[-2].version
