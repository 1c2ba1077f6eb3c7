"""Where a Redis deployment keeps its files (an input while its task waits, a finished video): `RESULT_STORE`.

    redis                 in Redis itself (`vd:input:<id>`, `vd:result:<id>`): small setups, today's behaviour
    /an/absolute/folder   a folder every API replica and worker mounts (a volume, an NFS share)
    s3://bucket/prefix    any S3-compatible store (AWS S3, MinIO, Garage, Ceph RGW, R2), through boto3, with
                          `S3_ENDPOINT_URL` and the standard AWS credential variables

Objects are named `inputs/<id>.png` and `results/<id>`. A write is atomic (a temporary name, then a rename; an
S3 object is visible only once its upload completed), a read streams (an S3 read is a seekable stream of ranged
GETs, so `Range` requests work without the whole video in memory), and expiry deletes what is older than
`RESULT_TTL` (`sweep`, run by a supervised loop). Every failure is a `BlobStoreError` whose message names the
store's kind, never its path, host or bucket: public answers carry it.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlsplit

from video_diffusion.backends.storage import check_max_storage
from video_diffusion.errors import StorageUnavailable

log = logging.getLogger(__name__)


class BlobStoreError(Exception):
    """The store could not do what was asked; the message is fit for a public answer."""


class StoreUnusable(RuntimeError):
    """At start: a folder store that is missing or cannot be written (a one-line error; the process exits)."""


def check_at_start(settings) -> None:
    """A folder store that cannot be used stops the process at once, naming it (the operator's console, not a
    public answer); an S3 store may come up later, so an outage there is `/health`'s to report."""
    store = for_settings(settings)
    if store is None or store.kind != "folder":
        return
    try:
        store.probe()
    except BlobStoreError as exc:
        raise StoreUnusable(f"RESULT_STORE={settings.result_store}: {exc}: mount it, or point RESULT_STORE at a "
                            "writable folder") from None


class Blobs(Protocol):
    kind: str  # "folder" or "s3"

    def put(self, name: str, data: BinaryIO) -> int:
        """Store `data` (read to its end) under `name`, atomically; return the bytes written."""

    def open(self, name: str) -> BinaryIO | None:
        """A seekable binary stream of `name`, or None if there is no such object."""

    def delete(self, *names: str) -> None: ...

    def probe(self) -> None:
        """Write, read back and delete a small object: raise BlobStoreError if any of it fails."""

    def sweep(self, older_than: float) -> int:
        """Delete every object last written before `older_than` (epoch seconds); return how many."""

    def stored_bytes(self) -> int: ...

    def presigned_url(self, name: str, seconds: int, filename: str, content_type: str) -> str | None:
        """A URL that downloads `name` for `seconds` without credentials (S3), or None (a folder has none)."""


def input_name(task_id: str) -> str:
    return f"inputs/{task_id}.png"


def result_name(task_id: str) -> str:
    return f"results/{task_id}"


def for_settings(settings) -> Blobs | None:
    """The store `RESULT_STORE` names (None: Redis), as the API and every worker open it."""
    return open_store(settings.result_store, endpoint_url=settings.s3_endpoint_url)


def open_store(spec: str, *, endpoint_url: str | None = None, region: str | None = None) -> Blobs | None:
    """The store `RESULT_STORE` names; None for `redis` (the files stay in Redis)."""
    if spec == "redis":
        return None
    if spec.startswith("s3://"):
        parts = urlsplit(spec)
        return S3Blobs(parts.netloc, parts.path.strip("/"), endpoint_url=endpoint_url, region=region)
    return FolderBlobs(Path(spec))


class FolderBlobs:
    """Objects as files under one folder; written to a temporary name in the same folder, then renamed."""

    kind = "folder"

    def __init__(self, root: Path):
        self.root = root

    def _path(self, name: str) -> Path:
        return self.root / name

    def put(self, name: str, data: BinaryIO) -> int:
        path = self._path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
            try:
                with os.fdopen(handle, "wb") as out:
                    shutil.copyfileobj(data, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                    size = out.tell()
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.error("result store (folder): writing %s failed: %s", name, exc)
            raise BlobStoreError("the result store (folder) could not be written") from None
        return size

    def open(self, name: str) -> BinaryIO | None:
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("result store (folder): reading %s failed: %s", name, exc)
            raise BlobStoreError("the result store (folder) could not be read") from None

    def delete(self, *names: str) -> None:
        for name in names:
            try:
                self._path(name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("result store (folder): deleting %s failed: %s", name, exc)

    def probe(self) -> None:
        if not self.root.is_dir():
            raise BlobStoreError("the result store (folder) does not exist or is not a folder")
        name = f".probe-{os.getpid()}"
        self.put(name, io.BytesIO(b"probe"))
        stream = self.open(name)
        if stream is None:
            raise BlobStoreError("the result store (folder) lost what was just written to it")
        with stream:
            stream.read()
        self.delete(name)

    def _files(self):
        for kind in ("inputs", "results"):
            try:
                with os.scandir(self.root / kind) as entries:
                    yield from (entry for entry in entries if entry.is_file(follow_symlinks=False))
            except FileNotFoundError:
                continue

    def sweep(self, older_than: float) -> int:
        gone = 0
        for entry in list(self._files()):
            try:
                if entry.stat().st_mtime < older_than:
                    os.unlink(entry.path)
                    gone += 1
            except FileNotFoundError:
                continue
        return gone

    def stored_bytes(self) -> int:
        total = 0
        for entry in self._files():
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def presigned_url(self, name: str, seconds: int, filename: str, content_type: str) -> str | None:
        return None


class S3Blobs:
    """Objects in an S3 bucket under a prefix, through boto3 (its signing, retries and multipart uploads)."""

    kind = "s3"

    def __init__(self, bucket: str, prefix: str, *, endpoint_url: str | None = None, region: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, (prefix + "/" if prefix else "")
        # Short timeouts and few retries: an outage must fail a task or a request in seconds, never hang it.
        config = Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"},
                        signature_version="s3v4", s3={"addressing_style": "path"} if endpoint_url else {})
        self.client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region or None, config=config)
        from boto3.s3.transfer import TransferConfig

        self.transfer = TransferConfig(multipart_threshold=16 << 20, multipart_chunksize=16 << 20, use_threads=False)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _failed(self, doing: str, name: str, exc: Exception) -> BlobStoreError:
        log.error("result store (s3): %s %s failed: %s", doing, name, exc)
        return BlobStoreError(f"the result store (s3) could not be {doing}")

    def put(self, name: str, data: BinaryIO) -> int:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        counted = _Counting(data)
        try:  # a multipart upload shows its object only once completed; an aborted one shows nothing
            self.client.upload_fileobj(counted, self.bucket, self._key(name), Config=self.transfer)
        except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
            raise self._failed("written", name, exc) from None
        return counted.count

    def open(self, name: str) -> BinaryIO | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._failed("read", name, exc) from None
        except BotoCoreError as exc:
            raise self._failed("read", name, exc) from None
        return _S3Reader(self, self._key(name), head["ContentLength"], head.get("ETag"))

    def delete(self, *names: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        if not names:
            return
        try:
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": self._key(n)} for n in names],
                                                                   "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            log.warning("result store (s3): deleting %d objects failed: %s", len(names), exc)

    def probe(self) -> None:
        name = f".probe-{os.getpid()}"
        self.put(name, io.BytesIO(b"probe"))
        stream = self.open(name)
        if stream is None:
            raise BlobStoreError("the result store (s3) lost what was just written to it")
        stream.read()
        self.delete(name)

    def _objects(self):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            for kind in ("inputs/", "results/"):
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                                   Prefix=self.prefix + kind):
                    yield from page.get("Contents", [])
        except (BotoCoreError, ClientError) as exc:
            raise self._failed("listed", "objects", exc) from None

    def sweep(self, older_than: float) -> int:
        old = [item["Key"] for item in self._objects() if item["LastModified"].timestamp() < older_than]
        for start in range(0, len(old), 1000):  # DeleteObjects takes at most 1000 keys
            self.delete(*(key[len(self.prefix):] for key in old[start:start + 1000]))
        return len(old)

    def stored_bytes(self) -> int:
        return sum(item["Size"] for item in self._objects())

    def presigned_url(self, name: str, seconds: int, filename: str, content_type: str) -> str | None:
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=seconds,
            Params={"Bucket": self.bucket, "Key": self._key(name), "ResponseContentType": content_type,
                    "ResponseContentDisposition": f"attachment; filename={filename}"})


class _Reader(io.RawIOBase):
    """A raw reader whose subclasses implement `read`; `readinto` (what buffered readers call) goes through it."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Counting(_Reader):
    """A reader that counts what passes through it."""

    def __init__(self, source: BinaryIO):
        self.source, self.count = source, 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.count += len(data)
        return data


class _S3Reader(_Reader):
    """An S3 object as a seekable stream: each read continues one ranged GET; a seek starts another one. Pinned to
    the object's ETag, so an object replaced mid-read is an error, never a mix of two videos."""

    def __init__(self, store: S3Blobs, key: str, size: int, etag: str | None):
        self.store, self.key, self.size, self.etag = store, key, size, etag
        self.position, self.body = 0, None

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.position + offset, io.SEEK_END: self.size + offset}[whence]
        if target != self.position:
            self._drop()
            self.position = max(0, target)
        return self.position

    def _drop(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None

    def read(self, size: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.position >= self.size or size == 0:
            return b""
        try:
            if self.body is None:
                extra = {"IfMatch": self.etag} if self.etag else {}
                self.body = self.store.client.get_object(Bucket=self.store.bucket, Key=self.key,
                                                         Range=f"bytes={self.position}-", **extra)["Body"]
            data = self.body.read(None if size is None or size < 0 else size)
        except (BotoCoreError, ClientError) as exc:
            self._drop()
            raise self.store._failed("read", self.key, exc) from None
        self.position += len(data)
        return data

    def close(self) -> None:
        self._drop()
        super().close()


def expired_before(result_ttl: int) -> float:
    """The write time before which an object has outlived `RESULT_TTL`."""
    return time.time() - result_ttl


class StoreWatch:
    """The store as a component of a Redis-mode process: probed every CHECK_SECONDS (a write, a read, a delete),
    its usage against MAX_STORAGE_MB (a folder store), and swept of what outlived RESULT_TTL every SWEEP_SECONDS.
    `/health` and admission read `state` and `reason`; nothing here ever blocks a request."""

    CHECK_SECONDS = 5.0
    SWEEP_SECONDS = 60.0

    def __init__(self, store: Blobs, result_ttl: int, max_bytes: int | None = None):
        self.store, self.result_ttl, self.max_bytes = store, result_ttl, max_bytes
        self.state, self.reason, self.stored = "ok", "", 0
        self._swept = float("-inf")

    def check(self) -> None:
        try:
            self.store.probe()
            if self.store.kind == "folder":  # S3: the bucket's lifecycle rules bound it
                self.stored = self.store.stored_bytes()
            if time.monotonic() - self._swept >= self.SWEEP_SECONDS:
                self._swept = time.monotonic()
                gone = self.store.sweep(expired_before(self.result_ttl))
                if gone:
                    log.info("result store (%s): deleted %d objects older than RESULT_TTL", self.store.kind, gone)
        except BlobStoreError as exc:
            if self.state != "storage_unavailable":
                log.error("result store unusable: %s", exc)
            self.state, self.reason = "storage_unavailable", str(exc)
            return
        if self.state != "ok":
            log.info("result store (%s) usable again", self.store.kind)
        full = self.max_bytes is not None and self.stored >= self.max_bytes
        self.state, self.reason = ("storage_full", "the result store is at MAX_STORAGE_MB") if full else ("ok", "")

    def run(self, stopping) -> None:
        while not stopping.wait(self.CHECK_SECONDS):
            self.check()

    def admit(self, estimate: int) -> None:
        if self.state == "storage_unavailable":
            raise StorageUnavailable(f"{self.reason}; try again shortly", retry_after=30)
        check_max_storage(self.max_bytes, self.stored, estimate)

    def health(self) -> dict:
        body = {"kind": self.store.kind, "state": self.state}
        if self.store.kind == "folder":
            body.update(stored_bytes=self.stored, max_bytes=self.max_bytes)
        return body
