"""One storage interface over a local folder and S3/MinIO, addressed by URI.

A URI is either ``s3://bucket/key`` (served by the ``minio`` client) or a local path (optionally
``file://``). Every write is atomic: a local write goes to a temporary file in the same folder and
is renamed into place; an S3 PUT only becomes visible once complete. Every write returns the
object's sha256, which S3 objects also carry as user metadata. Transient S3 errors are retried with
exponential backoff. A multi-file artifact is published by writing its manifest last: readers go
through the manifest, so they never see half an artifact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from flywheel.config import Settings, split_endpoint
from flywheel.errors import ArtifactNotFound, IntegrityError, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectRef:
    """A stored object: where it is, its sha256 and its size in bytes."""

    uri: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "sha256": self.sha256, "size": self.size}


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', for local paths and s3:// alike."""
    out = base.rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        parsed = urllib.parse.urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri!r} names a host; a file:// URI must be file:///absolute/path")
        return Path(urllib.parse.unquote(parsed.path))
    return Path(uri)


def canonical_uri(uri: str) -> str:
    """One spelling per object: s3:// URIs as given, local paths and file:// URIs as absolute paths."""
    if is_s3(uri):
        return uri
    return os.path.abspath(_local_path(uri))


@lru_cache(maxsize=1)
def _umask() -> int:
    # os.umask can only be read by setting it; do it once, lazily (not at import time).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path) -> None:
    """Give a temp file the mode a plain open() would have (mkstemp makes it 0600, unreadable to
    other users of a shared volume), then rename it into place."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _synced_temp(path: Path, data: bytes) -> str:
    """``data`` in a new temp file beside ``path`` (its folder made), flushed to disk: the first half
    of every atomic local write (the second renames or links it into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


class LocalBackend:
    """Objects as files below a folder; writes are temp-file-then-rename."""

    def write_bytes(self, uri: str, data: bytes) -> ObjectRef:
        path = _local_path(uri)
        tmp = None
        try:
            tmp = _synced_temp(path, data)
            _publish(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write {uri}: {exc.strerror or exc}") from exc
            raise
        return ObjectRef(uri, sha256_bytes(data), len(data))

    def upload_file(self, local: Path, uri: str) -> ObjectRef:
        path = _local_path(uri)
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            os.close(fd)
            shutil.copyfile(local, tmp)
            digest, size = sha256_file(tmp), Path(tmp).stat().st_size
            _publish(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot copy {local} to {uri}: {exc.strerror or exc}") from exc
            raise
        return ObjectRef(uri, digest, size)

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` only if nothing is there yet, atomically: the content goes to a
        temp file, which is then hard-linked into place (``link`` fails if the name exists, so of two
        writers exactly one wins and a reader never sees half an object). False when it existed."""
        path = _local_path(uri)
        tmp = None
        try:
            tmp = _synced_temp(path, data)
            os.chmod(tmp, 0o666 & ~_umask())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            return True
        except OSError as exc:
            raise StorageError(f"cannot create {uri}: {exc.strerror or exc}") from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def read_bytes(self, uri: str) -> bytes:
        path = _local_path(uri)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFound(f"{uri} does not exist") from None
        except IsADirectoryError:
            raise StorageError(f"{uri} is a folder, not an object") from None

    def download_file(self, uri: str, local: Path) -> None:
        path = _local_path(uri)
        if not path.is_file():
            raise ArtifactNotFound(f"{uri} does not exist")
        self.upload_file(path, str(local))  # the same atomic copy, in the other direction

    def exists(self, uri: str) -> bool:
        return _local_path(uri).is_file()

    def stat(self, uri: str) -> ObjectRef:
        path = _local_path(uri)
        if not path.is_file():
            raise ArtifactNotFound(f"{uri} does not exist")
        return ObjectRef(uri, sha256_file(path), path.stat().st_size)

    def list(self, prefix: str) -> list[str]:
        root = _local_path(prefix)
        if root.is_file():
            return [prefix]
        if not root.is_dir():
            return []
        base = prefix.rstrip("/")
        found = []
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                found.append(f"{base}/{path.relative_to(root).as_posix()}")
        return found

    def delete(self, uri: str) -> None:
        _local_path(uri).unlink(missing_ok=True)


class S3Backend:
    """Objects in S3 or MinIO through the ``minio`` client."""

    TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed"}

    def __init__(
        self,
        endpoint: str,
        access_key: str | None,
        secret_key: str | None,
        secure: bool = True,
        region: str | None = None,
        retries: int = 4,
        backoff_s: float = 0.2,
        timeout_s: float = 60.0,
    ) -> None:
        import certifi
        import urllib3
        from minio import Minio

        # Accept "http://host:port" too (minio wants a bare host:port): the scheme decides TLS.
        try:
            endpoint, scheme_secure = split_endpoint(endpoint or "s3.amazonaws.com")
        except ValueError as exc:
            raise StorageError(str(exc)) from None
        self.endpoint = endpoint
        self.secure = secure if scheme_secure is None else scheme_secure
        self.region = region or None
        # Our own pool instead of minio's default: minio's retries 5 times with backoff inside every
        # call (on top of ours, about 6 s per try on a dead endpoint) and waits 5 minutes to connect.
        # Here urllib3 does not retry, so 5xx answers reach _call as S3 errors and are retried there.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(10.0, timeout_s), read=timeout_s),
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5, raise_on_status=False),
        )
        try:
            self.client = Minio(
                self.endpoint,
                access_key=access_key,
                secret_key=secret_key,
                secure=secure,
                region=self.region,
                http_client=http,
            )
        except ValueError as exc:
            raise StorageError(f"invalid S3 settings (endpoint {self.endpoint!r}): {exc}") from None
        self.retries = retries
        self.backoff_s = backoff_s
        self._access_key = access_key
        self._secret_key = secret_key

    @staticmethod
    def split(uri: str) -> tuple[str, str]:
        parsed = urllib.parse.urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise StorageError(f"{uri!r} is not an s3://bucket/key URI")
        return parsed.netloc, parsed.path.lstrip("/")

    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """Run one minio call: retry transient failures with exponential backoff, and turn every
        failure into ArtifactNotFound or StorageError with a message that says what to do."""
        from minio.error import InvalidResponseError, S3Error, ServerError
        from urllib3.exceptions import HTTPError as Urllib3Error

        attempt = 0
        while True:
            tries = f"after {attempt + 1} tries" if attempt else "on the first try"
            try:
                return fn()
            except S3Error as exc:
                if exc.code == "NoSuchBucket" and what == "write":
                    # Not a missing input: the storage root names a bucket nobody created.
                    raise StorageError(
                        f"cannot write {uri}: bucket {self.split(uri)[0]!r} does not exist on {self.endpoint} "
                        "(NoSuchBucket); create it, or check FLYWHEEL_STORAGE__ROOT"
                    ) from None
                if exc.code in {"NoSuchKey", "NoSuchBucket"}:
                    raise ArtifactNotFound(f"{uri} does not exist ({exc.code})") from None
                if exc.code in {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                    raise StorageError(
                        f"{what} {uri} was refused by {self.endpoint} ({exc.code}): "
                        "check FLYWHEEL_S3_ACCESS_KEY / FLYWHEEL_S3_SECRET_KEY and the bucket's permissions"
                    ) from None
                if exc.code not in self.TRANSIENT_CODES:
                    raise StorageError(f"{what} {uri} failed: {exc.code}: {exc.message}") from None
                if attempt >= self.retries:
                    raise StorageError(f"{what} {uri} failed {tries}: {exc.code}: {exc.message}") from None
            except ServerError as exc:  # a 5xx answer without an S3 error body
                if attempt >= self.retries:
                    raise StorageError(f"{what} {uri} failed {tries}: {exc}") from None
            except InvalidResponseError as exc:  # not S3 talking (a proxy, a wrong endpoint), or a 5xx page
                if getattr(exc, "_code", 0) < 500 or attempt >= self.retries:
                    raise StorageError(
                        f"{what} {uri}: {self.endpoint} did not answer like S3 ({exc}); check FLYWHEEL_STORAGE__S3_ENDPOINT"
                    ) from None
            except (Urllib3Error, ConnectionError, TimeoutError, OSError) as exc:
                if attempt >= self.retries:
                    reason = getattr(exc, "reason", None) or exc
                    raise StorageError(
                        f"{what} {uri} failed {tries}: cannot reach {self.endpoint} ({reason}); "
                        "check FLYWHEEL_STORAGE__S3_ENDPOINT and FLYWHEEL_STORAGE__S3_SECURE"
                    ) from None
            except ValueError as exc:  # minio's argument checks: bucket or object names, local paths
                raise StorageError(f"{what} {uri} failed: {exc}") from None
            delay = self.backoff_s * (2**attempt)
            attempt += 1
            log.warning("%s %s: transient error, retry %d in %.2fs", what, uri, attempt, delay)
            time.sleep(delay)

    def write_bytes(self, uri: str, data: bytes) -> ObjectRef:
        bucket, key = self.split(uri)
        digest = sha256_bytes(data)
        self._call(
            "write",
            uri,
            lambda: self.client.put_object(
                bucket, key, io.BytesIO(data), len(data), metadata={"sha256": digest}
            ),
        )
        return ObjectRef(uri, digest, len(data))

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` only if no object is there: a conditional PUT (``If-None-Match:
        *``), which S3, MinIO and SeaweedFS answer with 412 when the key exists. minio's public
        ``put_object`` turns unknown headers into user metadata, so this goes through its
        ``_put_object`` (the one call that passes headers as they are). False when it existed."""
        from minio.error import S3Error

        bucket, key = self.split(uri)
        headers = {"If-None-Match": "*", "Content-Type": "application/octet-stream", "x-amz-meta-sha256": sha256_bytes(data)}

        def put() -> bool:
            try:
                self.client._put_object(bucket, key, data, headers)
            except S3Error as exc:
                if exc.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return False
                raise
            return True

        if self._call("create", uri, put):
            return True
        # A retried PUT whose first attempt landed finds its own object: that is a success.
        return self.read_bytes(uri) == data

    def upload_file(self, local: Path, uri: str) -> ObjectRef:
        bucket, key = self.split(uri)
        if not Path(local).is_file():
            raise StorageError(f"cannot upload {local} to {uri}: it is not a file")
        digest = sha256_file(local)
        self._call("write", uri, lambda: self.client.fput_object(bucket, key, str(local), metadata={"sha256": digest}))
        return ObjectRef(uri, digest, Path(local).stat().st_size)

    def read_bytes(self, uri: str) -> bytes:
        return self.read_range(uri, 0, 0)

    def download_file(self, uri: str, local: Path) -> None:
        bucket, key = self.split(uri)
        self._call("read", uri, lambda: self.client.fget_object(bucket, key, str(local)))

    def exists(self, uri: str) -> bool:
        try:
            self._stat(uri)
            return True
        except ArtifactNotFound:
            return False

    def _stat(self, uri: str) -> Any:
        bucket, key = self.split(uri)
        return self._call("stat", uri, lambda: self.client.stat_object(bucket, key))

    def stat(self, uri: str) -> ObjectRef:
        info = self._stat(uri)
        meta = {k.lower(): v for k, v in (info.metadata or {}).items()}
        digest = meta.get("x-amz-meta-sha256")
        if not digest:
            digest = sha256_bytes(self.read_bytes(uri))
        return ObjectRef(uri, digest, int(info.size or 0))

    def list(self, prefix: str) -> list[str]:
        bucket, key = self.split(prefix)
        if key and not key.endswith("/") and self.exists(prefix):
            return [prefix]
        folder = f"{key.rstrip('/')}/" if key else ""
        objects = self._call("list", prefix, lambda: list(self.client.list_objects(bucket, prefix=folder, recursive=True)))
        return sorted(f"s3://{bucket}/{obj.object_name}" for obj in objects)

    def delete(self, uri: str) -> None:
        bucket, key = self.split(uri)
        self._call("delete", uri, lambda: self.client.remove_object(bucket, key))

    def read_range(self, uri: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (one ranged GET; length 0: to the end)."""
        bucket, key = self.split(uri)

        def get() -> bytes:
            response = self.client.get_object(bucket, key, offset=offset, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("read", uri, get)

    def ensure_bucket(self, bucket: str) -> None:
        """Create ``bucket`` unless it exists; safe when several callers do it at once."""
        from minio.error import S3Error

        def make() -> None:
            try:
                self.client.make_bucket(bucket)
            except S3Error as exc:
                # Another caller created it between our check and our create: it is there, and ours.
                if exc.code != "BucketAlreadyOwnedByYou":
                    raise

        if not self._call("check bucket", f"s3://{bucket}", lambda: self.client.bucket_exists(bucket)):
            self._call("create bucket", f"s3://{bucket}", make)


class RangeReader(io.RawIOBase):
    """A read-only, seekable file over one S3 object: every read is a ranged GET, so a reader such as
    ``pyarrow.parquet.ParquetFile`` fetches the footer and the column chunks it needs, nothing else."""

    def __init__(self, backend: S3Backend, uri: str) -> None:
        super().__init__()
        self.backend, self.uri = backend, uri
        self.size = int(backend._stat(uri).size or 0)
        self.position = 0
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        length = min(len(buffer), self.size - self.position)
        if length <= 0:
            return 0
        data = self.backend.read_range(self.uri, self.position, length)
        buffer[: len(data)] = data
        self.position += len(data)
        self.bytes_read += len(data)
        return len(data)


class CountingFile(io.FileIO):
    """A local file that counts the bytes read through it (as :class:`RangeReader` does)."""

    bytes_read = 0

    def readinto(self, buffer: Any) -> int:  # type: ignore[override]
        count = super().readinto(buffer) or 0
        self.bytes_read += count
        return count

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        self.bytes_read += len(data or b"")
        return data


class Storage:
    """Reads and writes objects by URI, through the local or the S3 backend as the URI says."""

    def __init__(self, root: str, s3: S3Backend | None = None) -> None:
        self.root = root
        self.local = LocalBackend()
        self._s3 = s3

    @classmethod
    def from_settings(cls, settings: Settings) -> "Storage":
        cfg = settings.storage
        s3 = None
        if is_s3(cfg.root) or cfg.s3_endpoint:
            s3 = S3Backend(
                endpoint=cfg.s3_endpoint,
                access_key=cfg.access_key.get_secret_value() if cfg.access_key else None,
                secret_key=cfg.secret_key.get_secret_value() if cfg.secret_key else None,
                secure=cfg.s3_secure,
                region=cfg.s3_region,
                retries=cfg.retries,
                backoff_s=cfg.retry_backoff_s,
                timeout_s=cfg.timeout_s,
            )
        # Each use case has its own folder of the root (lake, features, training sets, registry,
        # reports, runs, lineage): several share one root without seeing each other's artifacts.
        return cls(join(cfg.root, settings.namespace), s3)

    @property
    def s3(self) -> S3Backend | None:
        """The S3 backend (for bucket administration such as ``ensure_bucket``), or None when no S3
        endpoint is configured."""
        return self._s3

    def uri(self, *parts: str) -> str:
        """A URI below the storage root."""
        return join(self.root, *parts)

    def _backend(self, uri: str) -> LocalBackend | S3Backend:
        if is_s3(uri):
            if self._s3 is None:
                raise StorageError(f"{uri} is on S3 but no S3 endpoint is configured (set FLYWHEEL_STORAGE__S3_ENDPOINT)")
            return self._s3
        return self.local

    def write_bytes(self, uri: str, data: bytes) -> ObjectRef:
        return self._backend(uri).write_bytes(uri, data)

    def write_json(self, uri: str, value: Any) -> ObjectRef:
        return self.write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` unless an object is already there (atomically: of two writers
        racing for one name, exactly one gets True). The building block of append-only logs."""
        return self._backend(uri).create_if_absent(uri, data)

    def read_bytes(self, uri: str) -> bytes:
        return self._backend(uri).read_bytes(uri)

    def read_json(self, uri: str) -> Any:
        raw = self.read_bytes(uri)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri} is not valid JSON: {exc}") from None

    def upload_file(self, local: str | os.PathLike[str], uri: str) -> ObjectRef:
        return self._backend(uri).upload_file(Path(local), uri)

    def download_file(self, uri: str, local: str | os.PathLike[str]) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        self._backend(uri).download_file(uri, Path(local))

    def exists(self, uri: str) -> bool:
        return self._backend(uri).exists(uri)

    def stat(self, uri: str) -> ObjectRef:
        return self._backend(uri).stat(uri)

    def list(self, prefix: str) -> list[str]:
        """Every object below ``prefix`` (recursively), sorted."""
        return self._backend(prefix).list(prefix)

    def delete(self, uri: str) -> None:
        self._backend(uri).delete(uri)

    def verify(self, uri: str, sha256: str) -> ObjectRef:
        """Re-hash a stored object and check it against the sha256 recorded when it was written.

        Raises :class:`IntegrityError` (naming the object, both hashes and the way out) when they
        differ, and :class:`ArtifactNotFound` when the object is gone.
        """
        data = self.read_bytes(uri)
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityError(
                f"{uri} does not match the sha256 recorded when it was written (recorded {sha256[:16]}..., "
                f"now {actual[:16]}...): it was modified or corrupted after publication and is refused. "
                "Delete the artifact's folder to have it rebuilt from its inputs."
            )
        return ObjectRef(uri, actual, len(data))

    def delete_tree(self, prefix: str) -> None:
        """Remove every object below ``prefix`` (locally, the folder itself too); nothing there is fine."""
        if is_s3(prefix):
            for uri in self.list(prefix):
                self.delete(uri)
            return
        path = _local_path(prefix)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot remove {prefix}: {exc.strerror or exc}") from exc

    def write_parquet(self, uri: str, table: Any, row_group_size: int | None = None) -> ObjectRef:
        """Write a pyarrow Table (or pandas DataFrame) as one parquet object; ``row_group_size`` rows
        per row group at most (readers can then fetch a part of the rows)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", row_group_size=row_group_size)
        return self.write_bytes(uri, buffer.getvalue())

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> Any:
        """Read one parquet object into a pyarrow Table."""
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(self.read_bytes(uri)), columns=columns)

    def open_input(self, uri: str) -> "RangeReader | CountingFile":
        """A seekable binary file over one object that reads only what is asked of it (S3: ranged
        GETs; locally: the file itself), with a ``bytes_read`` count. A missing local file raises
        FileNotFoundError naming it; a missing S3 object, ArtifactNotFound."""
        backend = self._backend(uri)
        if isinstance(backend, S3Backend):
            return RangeReader(backend, uri)
        return CountingFile(_local_path(uri), "rb")

    def iter_objects(self, prefix: str, suffixes: tuple[str, ...] = ()) -> Iterator[str]:
        """Objects below ``prefix`` whose names end with one of ``suffixes``, skipping names that start
        with '_' or '.' at any level below the prefix (as pyarrow datasets do)."""
        base = prefix.rstrip("/")
        for uri in self.list(prefix):
            relative = uri[len(base):].lstrip("/") if uri != prefix else uri.rsplit("/", 1)[-1]
            if any(part.startswith(("_", ".")) for part in relative.split("/")):
                continue
            if suffixes and not uri.endswith(suffixes):
                continue
            yield uri

    def local_copy(self, uri: str, folder: str | os.PathLike[str]) -> Path:
        """A local path holding the object: the object itself when local, else a downloaded copy."""
        if not is_s3(uri):
            path = _local_path(uri)
            if not path.is_file():
                raise ArtifactNotFound(f"{uri} does not exist")
            return path
        target = Path(folder) / uri.rsplit("/", 1)[-1]
        self.download_file(uri, target)
        return target
