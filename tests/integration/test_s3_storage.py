"""The storage layer against S3 (SeaweedFS over HTTP on 127.0.0.1): round trips, metadata, errors, retries."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flywheel.config import load_settings
from flywheel.errors import ArtifactNotFound, StorageError
from flywheel.storage import ObjectRef, S3Backend, Storage, join, sha256_bytes, sha256_file
from tests.s3_server import FaultProxy


def bucket_and_key(uri: str) -> tuple[str, str]:
    return S3Backend.split(uri)


def closed_loopback_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- round trips ------------------------------------------------------------------------------


def test_storage_is_on_s3(s3_storage: Storage) -> None:
    assert s3_storage.root.startswith("s3://flywheel-test-") and s3_storage.root.endswith("/flywheel/fraud")
    assert s3_storage.s3 is not None and s3_storage.s3.endpoint.startswith("127.0.0.1:")


def test_write_and_read_bytes(s3_storage: Storage) -> None:
    uri = s3_storage.uri("a", "b", "blob.bin")
    data = os.urandom(4096)
    ref = s3_storage.write_bytes(uri, data)
    assert ref == ObjectRef(uri, sha256_bytes(data), len(data))
    assert s3_storage.read_bytes(uri) == data
    assert s3_storage.exists(uri)


def test_write_and_read_json(s3_storage: Storage) -> None:
    uri = s3_storage.uri("meta", "run.json")
    value = {"metrics": {"roc_auc": 0.91}, "tags": ["a", "b"]}
    s3_storage.write_json(uri, value)
    assert s3_storage.read_json(uri) == value


def test_overwrite(s3_storage: Storage) -> None:
    uri = s3_storage.uri("x.txt")
    s3_storage.write_bytes(uri, b"old")
    s3_storage.write_bytes(uri, b"new")
    assert s3_storage.read_bytes(uri) == b"new"
    assert s3_storage.stat(uri).sha256 == sha256_bytes(b"new")


def test_sha256_is_object_metadata_and_returned_by_stat(s3_storage: Storage) -> None:
    uri = s3_storage.uri("hashed.bin")
    data = b"some artifact bytes"
    ref = s3_storage.write_bytes(uri, data)
    bucket, key = bucket_and_key(uri)
    info = s3_storage.s3.client.stat_object(bucket, key)
    assert info.metadata["x-amz-meta-sha256"] == sha256_bytes(data)
    assert s3_storage.stat(uri) == ref


def test_stat_hashes_objects_written_without_the_metadata(s3_storage: Storage) -> None:
    uri = s3_storage.uri("foreign.bin")
    bucket, key = bucket_and_key(uri)
    s3_storage.s3.client.put_object(bucket, key, io.BytesIO(b"written by another tool"), 23)
    assert s3_storage.stat(uri) == ObjectRef(uri, sha256_bytes(b"written by another tool"), 23)


def test_parquet_round_trip(s3_storage: Storage) -> None:
    table = pa.table({"card_id": list(range(100)), "amount": [i * 0.5 for i in range(100)]})
    uri = s3_storage.uri("lake", "t.parquet")
    ref = s3_storage.write_parquet(uri, table)
    assert s3_storage.read_parquet(uri).equals(table)
    assert s3_storage.stat(uri).sha256 == ref.sha256


def test_upload_and_download_file(s3_storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(100_000))
    uri = s3_storage.uri("files", "f.bin")
    ref = s3_storage.upload_file(source, uri)
    assert ref == ObjectRef(uri, sha256_file(source), 100_000)
    assert s3_storage.stat(uri).sha256 == ref.sha256
    target = tmp_path / "down" / "f.bin"
    s3_storage.download_file(uri, target)
    assert target.read_bytes() == source.read_bytes()
    copy = s3_storage.local_copy(uri, tmp_path / "copies")
    assert copy.read_bytes() == source.read_bytes()


def test_multi_megabyte_object(s3_storage: Storage, tmp_path: Path) -> None:
    data = os.urandom(12 * 1024 * 1024)  # above minio's 5 MiB part size: a multipart upload
    uri = s3_storage.uri("big", "blob.bin")
    ref = s3_storage.write_bytes(uri, data)
    assert s3_storage.stat(uri) == ObjectRef(uri, sha256_bytes(data), len(data))
    assert s3_storage.read_bytes(uri) == data

    source = tmp_path / "big.bin"
    source.write_bytes(data)
    uploaded = s3_storage.upload_file(source, s3_storage.uri("big", "uploaded.bin"))
    assert uploaded.sha256 == ref.sha256
    assert s3_storage.stat(uploaded.uri).sha256 == ref.sha256
    s3_storage.download_file(uploaded.uri, tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == ref.sha256


def test_upload_of_a_missing_local_file_is_a_storage_error(s3_storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing.bin"):
        s3_storage.upload_file(tmp_path / "missing.bin", s3_storage.uri("x"))


# --- listing ----------------------------------------------------------------------------------


def test_list_with_prefix(s3_storage: Storage) -> None:
    base = s3_storage.uri("lake")
    for name in ["b/2.parquet", "a/1.parquet", "a/0.parquet"]:
        s3_storage.write_bytes(join(base, name), b"x")
    s3_storage.write_bytes(s3_storage.uri("lakeside", "not-below.parquet"), b"x")  # shares the text prefix only
    expected = [join(base, n) for n in ["a/0.parquet", "a/1.parquet", "b/2.parquet"]]
    assert s3_storage.list(base) == expected
    assert s3_storage.list(base + "/") == expected
    assert s3_storage.list(join(base, "a")) == expected[:2]
    assert s3_storage.list(join(base, "a/0.parquet")) == [join(base, "a/0.parquet")]
    assert s3_storage.list(s3_storage.uri("nothing-here")) == []
    bucket, _ = bucket_and_key(base)
    assert len(s3_storage.list(f"s3://{bucket}")) == 4


def test_list_pages_through_more_than_a_thousand_objects_in_key_order(s3_storage: Storage) -> None:
    """Catches a list that stops after the first page (S3 answers at most 1,000 keys per request) or
    that returns the server's order: SeaweedFS lists folder by folder, so "a/..." comes before "a.x"
    there, while key order (and the local backend) put "a.x" first ('.' < '/')."""
    base = s3_storage.uri("many")
    names = [f"a/{i:04d}" for i in range(520)] + [f"a.{i:04d}" for i in range(520)] + ["a-z", "b"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: s3_storage.write_bytes(join(base, name), b"x"), names))
    assert s3_storage.list(base) == sorted(join(base, name) for name in names)


def test_iter_objects_skips_underscore_and_dot_paths(s3_storage: Storage) -> None:
    base = s3_storage.uri("dataset")
    for name in ["date=2026-01-01/part-0.parquet", "_SUCCESS", "_tmp/p.parquet", ".hidden/p.parquet", "x/.crc"]:
        s3_storage.write_bytes(join(base, name), b"x")
    assert list(s3_storage.iter_objects(base, suffixes=(".parquet",))) == [join(base, "date=2026-01-01/part-0.parquet")]


def test_delete(s3_storage: Storage) -> None:
    uri = s3_storage.uri("gone.bin")
    s3_storage.write_bytes(uri, b"x")
    s3_storage.delete(uri)
    assert not s3_storage.exists(uri)


# --- errors -----------------------------------------------------------------------------------


def test_missing_key_is_artifact_not_found(s3_storage: Storage, tmp_path: Path) -> None:
    missing = s3_storage.uri("no", "such.bin")
    with pytest.raises(ArtifactNotFound, match="does not exist"):
        s3_storage.read_bytes(missing)
    with pytest.raises(ArtifactNotFound):
        s3_storage.stat(missing)
    with pytest.raises(ArtifactNotFound):
        s3_storage.download_file(missing, tmp_path / "out.bin")
    assert not s3_storage.exists(missing)
    assert not (tmp_path / "out.bin").exists()


def test_missing_bucket_is_artifact_not_found(s3_storage: Storage) -> None:
    with pytest.raises(ArtifactNotFound, match="NoSuchBucket"):
        s3_storage.read_bytes("s3://flywheel-no-such-bucket/key")


@pytest.mark.parametrize("wrong", ["access key", "secret key"])
def test_wrong_credentials_are_a_clear_storage_error(
    s3_env: Callable[..., dict[str, str]], s3_storage: Storage, s3_server, wrong: str
) -> None:
    # The server knows one key pair (tests/s3_server.py): an unknown access key is InvalidAccessKeyId,
    # the right one with a wrong secret is SignatureDoesNotMatch.
    access = "AKIAWRONGWRONGWRONG1" if wrong == "access key" else s3_server.access_key
    env = s3_env(s3_storage.settings_root, FLYWHEEL_S3_ACCESS_KEY=access, FLYWHEEL_S3_SECRET_KEY="wrong")
    wrong = Storage.from_settings(load_settings(env=env))
    for action in (lambda: wrong.write_bytes(wrong.uri("x.bin"), b"x"), lambda: wrong.read_bytes(wrong.uri("x.bin"))):
        with pytest.raises(StorageError) as info:
            action()
        message = str(info.value)
        assert "refused" in message and "FLYWHEEL_S3_ACCESS_KEY" in message
        assert not isinstance(info.value, ArtifactNotFound)
        # The minio exception is not chained: the CLI prints one clear line, not minio's traceback.
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_write_to_a_missing_bucket_names_the_bucket(s3_storage: Storage) -> None:
    """Catches a write into a bucket nobody created reported as "<uri> does not exist" (the object
    being written), or as an ArtifactNotFound a caller would take for a missing input."""
    bucket = f"flywheel-never-made-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{bucket}/flywheel/x.bin"
    with pytest.raises(StorageError) as info:
        s3_storage.write_bytes(uri, b"x")
    assert not isinstance(info.value, ArtifactNotFound)
    message = str(info.value)
    assert f"bucket {bucket!r} does not exist" in message and "NoSuchBucket" in message, message
    assert not s3_storage.s3.client.bucket_exists(bucket)  # the server did not make it on the fly


def test_unreachable_endpoint_fails_after_retries(
    s3_env: Callable[..., dict[str, str]], aws_env: None
) -> None:
    port = closed_loopback_port()
    env = s3_env(
        "s3://bucket/flywheel",
        FLYWHEEL_STORAGE__S3_ENDPOINT=f"127.0.0.1:{port}",
        FLYWHEEL_STORAGE__RETRIES="2",
        FLYWHEEL_STORAGE__RETRY_BACKOFF_S="0.001",
    )
    storage = Storage.from_settings(load_settings(env=env))
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.write_bytes(storage.uri("x.bin"), b"x")
    assert time.monotonic() - started < 5  # minio's own retries (6 s per try) are off
    message = str(info.value)
    assert "cannot reach" in message and f"127.0.0.1:{port}" in message and "after 3 tries" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_endpoint_may_be_a_url(s3_env: Callable[..., dict[str, str]], s3_storage: Storage, s3_server) -> None:
    # "http://host:port" is what people paste; the scheme decides TLS (S3_SECURE stays at its default).
    env = s3_env(s3_storage.settings_root, FLYWHEEL_STORAGE__S3_ENDPOINT=s3_server.url)
    del env["FLYWHEEL_STORAGE__S3_SECURE"]
    storage = Storage.from_settings(load_settings(env=env))
    storage.write_bytes(storage.uri("via-url.txt"), b"ok")
    assert s3_storage.read_bytes(s3_storage.uri("via-url.txt")) == b"ok"


# --- retries: faults a healthy server does not produce, put on the wire by a proxy in front of it ----


@pytest.fixture
def faulty(s3_storage: Storage, s3_env: Callable[..., dict[str, str]], s3_server) -> Iterator[tuple[FaultProxy, Storage]]:
    """A fault proxy in front of the test server, and a Storage on the same bucket that goes through it."""
    proxy = FaultProxy(s3_server.endpoint)
    env = s3_env(s3_storage.settings_root, FLYWHEEL_STORAGE__S3_ENDPOINT=proxy.endpoint, FLYWHEEL_STORAGE__RETRY_BACKOFF_S="0.001")
    try:
        yield proxy, Storage.from_settings(load_settings(env=env))
    finally:
        proxy.close()


def test_transient_errors_are_retried(s3_storage: Storage, faulty: tuple[FaultProxy, Storage]) -> None:
    proxy, storage = faulty
    proxy.fail("PUT", 2, 503, "SlowDown")
    uri = storage.uri("retried.bin")
    ref = storage.write_bytes(uri, b"made it")
    assert proxy.count("PUT") == 3
    assert s3_storage.read_bytes(uri) == b"made it"  # straight from the server, not through the proxy
    assert s3_storage.stat(uri) == ref


def test_a_5xx_without_an_s3_body_is_retried(s3_storage: Storage, faulty: tuple[FaultProxy, Storage]) -> None:
    # minio raises InvalidResponseError for a GET's bare 5xx and ServerError for a HEAD's: both are retried.
    proxy, storage = faulty
    uri = s3_storage.uri("r.bin")
    ref = s3_storage.write_bytes(uri, b"data")
    proxy.fail("GET", 1, 503)
    assert storage.read_bytes(uri) == b"data"
    assert proxy.count("GET") == 2
    proxy.fail("HEAD", 1, 500)
    assert storage.stat(uri) == ref
    assert proxy.count("HEAD") == 2


def test_retries_give_up_with_a_storage_error(
    s3_storage: Storage, s3_env: Callable[..., dict[str, str]], faulty: tuple[FaultProxy, Storage]
) -> None:
    proxy, _ = faulty
    env = s3_env(s3_storage.settings_root, FLYWHEEL_STORAGE__S3_ENDPOINT=proxy.endpoint,
                 FLYWHEEL_STORAGE__RETRY_BACKOFF_S="0.001", FLYWHEEL_STORAGE__RETRIES="2")
    storage = Storage.from_settings(load_settings(env=env))
    proxy.fail("PUT", 10, 503, "SlowDown")
    with pytest.raises(StorageError, match="after 3 tries: SlowDown") as info:
        storage.write_bytes(storage.uri("never.bin"), b"x")
    assert proxy.count("PUT") == 3
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not s3_storage.exists(storage.uri("never.bin"))


def test_permanent_errors_are_not_retried(faulty: tuple[FaultProxy, Storage]) -> None:
    proxy, storage = faulty
    proxy.fail("PUT", 1, 400, "InvalidArgument")
    with pytest.raises(StorageError, match="InvalidArgument"):
        storage.write_bytes(storage.uri("x.bin"), b"x")
    assert proxy.count("PUT") == 1


def test_invalid_bucket_name_is_a_storage_error(s3_storage: Storage) -> None:
    # minio refuses the name itself (a ValueError) before any request is sent.
    with pytest.raises(StorageError, match="invalid bucket name") as info:
        s3_storage.write_bytes("s3://x/key", b"x")
    assert not isinstance(info.value, ArtifactNotFound)


# --- several writers at once -----------------------------------------------------------------


def test_many_callers_ensure_one_new_bucket_at_once_and_each_their_own(
    s3_env: Callable[..., dict[str, str]], aws_env: None
) -> None:
    """Catches a check-then-create ensure_bucket: callers that all find the bucket missing all create
    it, and all but the first get BucketAlreadyOwnedByYou, which means the bucket is there (success).
    Also: many new buckets made at once are each writable straight away."""
    shared = f"flywheel-shared-{uuid.uuid4().hex[:8]}"
    callers = 8
    barrier = threading.Barrier(callers)

    def caller(index: int) -> list[str]:
        storage = Storage.from_settings(load_settings(env=s3_env(f"s3://{shared}/flywheel")))  # a client each, as processes have
        own = f"flywheel-own-{uuid.uuid4().hex[:8]}-{index}"
        barrier.wait()
        storage.s3.ensure_bucket(shared)
        storage.s3.ensure_bucket(own)
        written = []
        for bucket in (shared, own):
            uri = f"s3://{bucket}/from-{index}.txt"
            storage.write_bytes(uri, f"caller {index}".encode())
            written.append(uri)
        return written

    with ThreadPoolExecutor(callers) as pool:
        written = [uri for uris in pool.map(caller, range(callers)) for uri in uris]
    reader = Storage.from_settings(load_settings(env=s3_env(f"s3://{shared}/flywheel")))
    assert len(reader.list(f"s3://{shared}")) == callers
    for uri in written:
        assert reader.read_bytes(uri) == f"caller {uri.rsplit('-', 1)[-1].removesuffix('.txt')}".encode()


def test_a_reader_sees_the_old_or_the_new_object_never_a_part(s3_storage: Storage) -> None:
    """Catches a write that becomes visible before it is complete (the storage layer's promise that a
    reader never sees half an artifact), with multipart-sized objects overwritten while being read."""
    uri = s3_storage.uri("swapped.bin")
    versions = [bytes([n]) * (6 * 1024 * 1024) for n in range(1, 4)]  # above minio's 5 MiB part size
    s3_storage.write_bytes(uri, versions[0])
    done = threading.Event()

    def overwrite() -> None:
        try:
            for data in versions[1:] * 2:
                s3_storage.write_bytes(uri, data)
        finally:
            done.set()

    writer = threading.Thread(target=overwrite)
    writer.start()
    seen = set()
    while not done.is_set():
        data = s3_storage.read_bytes(uri)
        assert data in versions, f"a read saw {len(data)} bytes, not one whole version"
        seen.add(data[0])
    writer.join()
    assert s3_storage.read_bytes(uri) == versions[2]
    assert len(seen) >= 2, seen  # the reads did overlap the overwrites


# --- other tools read what we write -----------------------------------------------------------


def test_pyarrow_reads_parquet_written_through_storage(s3_storage: Storage, s3_server) -> None:
    from pyarrow import fs

    table = pa.table({"card_id": [1, 2, 3], "merchant": ["m1", "m2", "m3"], "amount": [1.0, 2.5, 4.0]})
    uri = s3_storage.uri("lake", "date=2026-01-01", "part-0.parquet")
    s3_storage.write_parquet(uri, table)

    s3fs = fs.S3FileSystem(
        endpoint_override=s3_server.endpoint,
        scheme="http",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )
    path = uri.removeprefix("s3://")
    assert pq.read_table(path, filesystem=s3fs).equals(table)

    # ...and the other way round: what pyarrow writes, Storage reads (and hashes on stat).
    other = s3_storage.uri("lake", "date=2026-01-02", "part-0.parquet")
    pq.write_table(table, other.removeprefix("s3://"), filesystem=s3fs)
    assert s3_storage.read_parquet(other).equals(table)
    assert s3_storage.stat(other).sha256 == sha256_bytes(s3_storage.read_bytes(other))
    assert list(s3_storage.iter_objects(s3_storage.uri("lake"), suffixes=(".parquet",))) == [uri, other]
