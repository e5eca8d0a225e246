"""The storage layer over a local folder: round trips, sha256, atomic writes, listing, errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from flywheel.config import Settings
from flywheel.errors import ArtifactNotFound, StorageError
from flywheel.storage import ObjectRef, Storage, canonical_uri, join, sha256_bytes, sha256_file


@pytest.fixture
def storage(flywheel_home: Settings) -> Storage:
    return Storage.from_settings(flywheel_home)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


def test_from_settings_is_local_under_home(storage: Storage, flywheel_home: Settings) -> None:
    assert storage.root == str(flywheel_home.home / "store" / "fraud")  # the use case's namespace
    assert storage.s3 is None


def test_write_and_read_bytes(storage: Storage) -> None:
    uri = storage.uri("a", "b", "blob.bin")
    data = os.urandom(4096)
    ref = storage.write_bytes(uri, data)
    assert ref == ObjectRef(uri, hashlib.sha256(data).hexdigest(), len(data))
    assert storage.read_bytes(uri) == data
    assert storage.exists(uri)
    assert storage.stat(uri) == ref


def test_write_and_read_json(storage: Storage) -> None:
    uri = storage.uri("meta.json")
    value = {"b": [1, 2.5, None], "a": {"nested": "x"}}
    ref = storage.write_json(uri, value)
    assert storage.read_json(uri) == value
    assert ref.sha256 == sha256_bytes(Path(uri).read_bytes())


def test_read_json_of_non_json_is_a_storage_error(storage: Storage) -> None:
    uri = storage.uri("not.json")
    storage.write_bytes(uri, b"\x00 not json")
    with pytest.raises(StorageError, match="not valid JSON"):
        storage.read_json(uri)


@pytest.mark.parametrize(
    "data, digest",
    [  # FIPS 180-2 test vectors
        (b"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
        (b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
        (b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
        (b"a" * 1_000_000, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"),
    ],
)
def test_sha256_helpers_match_the_standard_test_vectors(tmp_path: Path, data: bytes, digest: str) -> None:
    (tmp_path / "f").write_bytes(data)
    assert sha256_bytes(data) == digest
    assert sha256_file(tmp_path / "f") == digest


def test_sha256_file_across_read_chunks_matches_sha256sum(tmp_path: Path) -> None:
    """A file over two read chunks (8 MiB each) hashes like coreutils' sha256sum says."""
    path = tmp_path / "big"
    path.write_bytes(os.urandom(17 * 1024 * 1024 + 3))
    oracle = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    assert sha256_file(path) == oracle


def test_overwrite_replaces_content(storage: Storage) -> None:
    uri = storage.uri("x.txt")
    storage.write_bytes(uri, b"old")
    ref = storage.write_bytes(uri, b"new content")
    assert storage.read_bytes(uri) == b"new content"
    assert storage.stat(uri).sha256 == ref.sha256 == sha256_bytes(b"new content")


def test_atomic_write_leaves_no_temp_files(storage: Storage) -> None:
    for i in range(5):
        storage.write_bytes(storage.uri("dir", f"{i}.bin"), b"x" * i)
    storage.upload_file(storage.uri("dir", "0.bin"), storage.uri("dir", "copy.bin"))
    assert leftovers(Path(storage.root)) == []
    assert sorted(p.name for p in (Path(storage.root) / "dir").iterdir()) == [
        "0.bin", "1.bin", "2.bin", "3.bin", "4.bin", "copy.bin"
    ]


def test_written_files_get_normal_permissions(storage: Storage) -> None:
    # mkstemp creates 0600 files; a published artifact must be readable like any other file.
    uri = storage.uri("perm.bin")
    storage.write_bytes(uri, b"data")
    mode = stat.S_IMODE(Path(uri).stat().st_mode)
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_interrupted_write_keeps_the_old_content(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = storage.uri("model", "weights.bin")
    storage.write_bytes(uri, b"version 1")

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="No space left"):
        storage.write_bytes(uri, b"version 2, never published")
    with pytest.raises(StorageError):
        storage.upload_file(Path(uri), storage.uri("model", "weights.bin"))
    monkeypatch.undo()

    assert storage.read_bytes(uri) == b"version 1"
    assert leftovers(Path(storage.root)) == []


def test_interrupted_write_by_a_non_os_error_is_not_swallowed(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = storage.uri("k.bin")
    storage.write_bytes(uri, b"kept")

    def interrupt(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(uri, b"lost")
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"kept"
    assert leftovers(Path(storage.root)) == []


def test_list_is_recursive_sorted_and_skips_temp_files(storage: Storage) -> None:
    base = storage.uri("lake")
    for name in ["b/2.parquet", "a/1.parquet", "a/0.parquet"]:
        storage.write_bytes(join(base, name), b"x")
    (Path(base) / "a" / ".tmp-inflight").write_bytes(b"half")
    assert storage.list(base) == [join(base, n) for n in ["a/0.parquet", "a/1.parquet", "b/2.parquet"]]
    assert storage.list(base + "/") == storage.list(base)
    assert storage.list(join(base, "a/0.parquet")) == [join(base, "a/0.parquet")]
    assert storage.list(storage.uri("nothing-here")) == []


def test_iter_objects_skips_underscore_and_dot_paths(storage: Storage) -> None:
    base = storage.uri("dataset")
    names = [
        "date=2026-01-01/part-0.parquet",
        "date=2026-01-02/part-0.parquet",
        "_SUCCESS",
        "_tmp/part-9.parquet",
        ".hidden/part-8.parquet",
        "date=2026-01-01/.part-1.parquet.crc",
        "date=2026-01-01/_metadata",
        "notes.txt",
    ]
    for name in names:
        storage.write_bytes(join(base, name), b"x")
    assert list(storage.iter_objects(base)) == [
        join(base, "date=2026-01-01/part-0.parquet"),
        join(base, "date=2026-01-02/part-0.parquet"),
        join(base, "notes.txt"),
    ]
    assert list(storage.iter_objects(base, suffixes=(".parquet",))) == [
        join(base, "date=2026-01-01/part-0.parquet"),
        join(base, "date=2026-01-02/part-0.parquet"),
    ]


def test_iter_objects_only_judges_paths_below_the_prefix(tmp_path: Path) -> None:
    # A prefix that itself has a '_' or '.' component (pytest's tmp dirs do) must not hide everything.
    storage = Storage(str(tmp_path / "_private" / ".store"))
    storage.write_bytes(storage.uri("t", "x.parquet"), b"x")
    assert list(storage.iter_objects(storage.uri("t"))) == [storage.uri("t", "x.parquet")]


def test_missing_object_is_artifact_not_found(storage: Storage, tmp_path: Path) -> None:
    missing = storage.uri("no", "such.bin")
    with pytest.raises(ArtifactNotFound, match="does not exist"):
        storage.read_bytes(missing)
    with pytest.raises(ArtifactNotFound):
        storage.read_json(missing)
    with pytest.raises(ArtifactNotFound):
        storage.stat(missing)
    with pytest.raises(ArtifactNotFound):
        storage.download_file(missing, tmp_path / "out.bin")
    with pytest.raises(ArtifactNotFound):
        storage.local_copy(missing, tmp_path)
    assert not storage.exists(missing)
    assert issubclass(ArtifactNotFound, StorageError)


def test_reading_a_folder_is_a_storage_error(storage: Storage) -> None:
    storage.write_bytes(storage.uri("folder", "x"), b"x")
    with pytest.raises(StorageError, match="folder"):
        storage.read_bytes(storage.uri("folder"))


def test_upload_and_download_file(storage: Storage, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(10_000))
    uri = storage.uri("files", "f.bin")
    ref = storage.upload_file(source, uri)
    assert ref == ObjectRef(uri, sha256_file(source), 10_000)
    target = tmp_path / "down" / "deeper" / "f.bin"
    storage.download_file(uri, target)
    assert target.read_bytes() == source.read_bytes()
    assert storage.local_copy(uri, tmp_path / "ignored") == Path(uri)


def test_upload_of_a_missing_file_is_a_storage_error(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="missing.bin"):
        storage.upload_file(tmp_path / "missing.bin", storage.uri("x"))


def test_delete(storage: Storage) -> None:
    uri = storage.uri("gone.bin")
    storage.write_bytes(uri, b"x")
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting what is not there is fine


def test_parquet_round_trip(storage: Storage) -> None:
    table = pa.table({"card_id": [1, 2, 3], "amount": [9.5, 0.25, 120.0], "merchant": ["a", "b", None]})
    uri = storage.uri("tables", "t.parquet")
    ref = storage.write_parquet(uri, table)
    assert ref.sha256 == sha256_file(uri)
    assert storage.read_parquet(uri).equals(table)
    assert storage.read_parquet(uri, columns=["amount"]).column_names == ["amount"]


def test_parquet_from_pandas(storage: Storage) -> None:
    import pandas as pd

    frame = pd.DataFrame({"x": [1, 2], "y": ["a", "b"]}, index=[10, 20])
    uri = storage.uri("tables", "df.parquet")
    storage.write_parquet(uri, frame)
    back = storage.read_parquet(uri)
    assert back.column_names == ["x", "y"]  # the index is not stored
    assert back.to_pandas().equals(frame.reset_index(drop=True))


def test_file_uris(storage: Storage, tmp_path: Path) -> None:
    path = tmp_path / "with space" / "f.json"
    uri = path.as_uri()  # file:///.../with%20space/f.json
    assert uri.startswith("file://") and "%20" in uri
    ref = storage.write_json(uri, {"k": 1})
    assert ref.uri == uri
    assert path.is_file()
    assert storage.read_json(uri) == {"k": 1}
    assert storage.read_json(str(path)) == {"k": 1}
    assert storage.exists(uri) and storage.stat(uri).sha256 == sha256_file(path)
    folder_uri = (tmp_path / "with space").as_uri()
    assert storage.list(folder_uri) == [folder_uri + "/f.json"]
    assert storage.local_copy(uri, tmp_path) == path


def test_file_uri_with_a_host_is_refused(storage: Storage) -> None:
    with pytest.raises(StorageError, match="file:///"):
        storage.read_bytes("file://relative/path.json")


def test_canonical_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert canonical_uri("s3://b/k") == "s3://b/k"
    assert canonical_uri("rel/x") == str(tmp_path / "rel" / "x")
    assert canonical_uri((tmp_path / "x").as_uri()) == canonical_uri(str(tmp_path / "x"))


def test_s3_uri_without_s3_settings_is_a_clear_error(storage: Storage) -> None:
    with pytest.raises(StorageError, match="FLYWHEEL_STORAGE__S3_ENDPOINT"):
        storage.read_bytes("s3://bucket/key")


@pytest.mark.parametrize(
    ("base", "parts", "expected"),
    [
        ("s3://bucket/root", ("a", "b.parquet"), "s3://bucket/root/a/b.parquet"),
        ("s3://bucket/root/", ("/a/", "/b"), "s3://bucket/root/a/b"),
        ("/tmp/store", ("x", "", "y"), "/tmp/store/x/y"),
        ("file:///tmp/store/", ("x",), "file:///tmp/store/x"),
        ("/tmp/store", (), "/tmp/store"),
        ("s3://bucket", ("date=2026-01-01", "part-0.parquet"), "s3://bucket/date=2026-01-01/part-0.parquet"),
    ],
)
def test_join(base: str, parts: tuple[str, ...], expected: str) -> None:
    assert join(base, *parts) == expected


def test_uri_is_below_root(storage: Storage) -> None:
    assert storage.uri("a", "b") == join(storage.root, "a", "b")
    assert storage.uri() == storage.root
