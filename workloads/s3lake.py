"""The lake on S3 (or any S3-compatible endpoint): same interface as ``LocalLake``.

S3 puts are atomic per object, so a reader sees a whole object or none. Content-addressed
originals use a conditional put (``IfNoneMatch="*"``): the first writer wins and a 412
means "already there". Large objects go multipart through boto3's transfer manager.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from collections.abc import Iterator
from typing import BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from workloads.objects import RETRIES, Counters, ObjectInfo, check_key

BOTO_CONFIG = Config(retries=dict(RETRIES), max_pool_connections=64)  # botocore edits the dict
TRANSFER = TransferConfig(
    multipart_threshold=64 << 20, multipart_chunksize=16 << 20, max_concurrency=8
)


def s3_client(endpoint_url: str | None = None):
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
        config=BOTO_CONFIG,
    )


# botocore operation → request kind counted (multipart parts count as puts).
REQUEST_KIND = {
    "ListObjectsV2": "list",
    "GetObject": "get",
    "HeadObject": "head",
    "PutObject": "put",
    "UploadPart": "put",
    "CreateMultipartUpload": "put",
    "CompleteMultipartUpload": "put",
    "DeleteObject": "delete",
}


# A response body that broke off mid-read, as botocore's StreamingBody raises it.
BODY_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError)
# a conditional put refused: 412, or 409 when another conditional put of the key was under way
REFUSED = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


def _missing(e: ClientError) -> bool:
    return e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Lake:
    """``s3://bucket/prefix``: keys are relative to the prefix."""

    # Directories listed at once by a check over many (``names``): each listing waits on its
    # requests, 1,000 keys a page.
    list_threads = 8

    def __init__(self, url: str, endpoint_url: str | None = None):
        if not url.startswith("s3://"):
            raise ValueError(f"not an s3:// url: {url}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = s3_client(self.endpoint_url)
        self.counters = Counters()
        # Counted where botocore makes the call: transfer-manager parts and paginated listings too.
        self.client.meta.events.register("before-call.s3", self._count)

    def fork(self) -> S3Lake:
        """The same lake with a client and counters of its own (a thread's tasks count their
        own requests: the counting hook is the client's)."""
        return S3Lake(self.url, endpoint_url=self.endpoint_url)

    def _count(self, model, **_kwargs) -> None:
        self.counters.add(REQUEST_KIND.get(model.name, model.name))

    def _key(self, key: str) -> str:
        check_key(key[:-1] if key.endswith("/") else key)  # a listing prefix may end with "/"
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    # -- reads -----------------------------------------------------------------
    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if _missing(e):
                return False
            raise

    def _get_object(self, key: str) -> tuple[bytes, str]:
        """(bytes, ETag) of the object at ``key``. botocore retries a failed request, not a body
        that breaks off while it is read (a reset connection): that read is retried here, with
        the same attempts and backoff, as a fresh GET."""
        attempt = 1
        while True:
            r = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            try:
                data = r["Body"].read()
                break
            except BODY_ERRORS:
                if attempt == RETRIES["max_attempts"]:
                    raise
                time.sleep(min(20.0, 0.1 * 2**attempt) * random.random())  # full jitter
                attempt += 1
        self.counters.add("bytes_read", len(data))
        return data, r["ETag"]

    def get(self, key: str) -> bytes:
        try:
            return self._get_object(key)[0]
        except ClientError as e:
            if _missing(e):
                raise FileNotFoundError(self.uri(key)) from None
            raise

    def get_tagged(self, key: str) -> tuple[bytes | None, str | None]:
        """The object at ``key`` and its ETag, or ``(None, None)`` when there is none."""
        try:
            return self._get_object(key)
        except ClientError as e:
            if _missing(e):
                return None, None
            raise

    def size(self, key: str) -> int:
        return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]

    def stream(self, key: str) -> BinaryIO:
        """The object's bytes as a forward-only stream (a GetObject body): one request, read as
        it arrives (a shard: ``workloads.training.shards.iter_shard``). Close it when done."""
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        """A seekable local copy (zip readers seek); streamed to disk, never held in memory."""
        with tempfile.TemporaryFile(prefix="cvgraph-") as f:
            self.client.download_fileobj(self.bucket, self._key(key), f, Config=TRANSFER)
            self.counters.add("bytes_read", f.tell())
            f.seek(0)
            yield f

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[ObjectInfo]:
        kw = {
            "Bucket": self.bucket,
            "Prefix": self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else ""),
        }
        if start_after:
            kw["StartAfter"] = self._key(start_after)
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(**kw):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/"):  # directory markers some writers leave
                    continue
                yield ObjectInfo(obj["Key"][strip:], obj["Size"])

    def keys(self, prefix: str = "") -> list[str]:
        return [o.key for o in self.list(prefix)]

    def names(self, directory: str) -> list[str]:
        """The names of the objects directly in ``directory`` (a key prefix ending in ``/``):
        ListObjectsV2 with the ``/`` delimiter, so nothing below it is listed."""
        full = self._key(directory)
        return [
            obj["Key"][len(full) :]
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, Delimiter="/"
            )
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]

    # -- writes ----------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        self.counters.add("bytes_written", len(data))

    def put_file(self, key: str, src: str | os.PathLike) -> None:
        self.client.upload_file(str(src), self.bucket, self._key(key), Config=TRANSFER)
        self.counters.add("bytes_written", os.path.getsize(src))

    def put_file_if_absent(self, key: str, src: str | os.PathLike) -> bool:
        with open(src, "rb") as f:
            return self._put_conditional(key, f, os.path.getsize(src), IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, tag: str | None) -> bool:
        """Store ``data`` at ``key`` only if the object there still has ETag ``tag`` (``None``:
        only if there is none); True if stored."""
        return self._put_conditional(
            key, data, len(data), **({"IfMatch": tag} if tag else {"IfNoneMatch": "*"})
        )

    def _put_conditional(self, key: str, body, size: int, **condition) -> bool:
        """A put that S3 refuses (412, or 409 for a concurrent conditional put; 404 when an
        If-Match object is gone) unless ``condition`` holds; False when refused. A refusal of a
        retry whose earlier attempt's answer was lost may be that attempt's own write: stored,
        if the object holds exactly these bytes."""
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **condition)
        except ClientError as e:
            if _missing(e):
                return False
            if e.response.get("Error", {}).get("Code") not in REFUSED:
                raise
            retried = e.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            if not (retried and self._holds(key, body)):
                return False
        self.counters.add("bytes_written", size)
        return True

    def _holds(self, key: str, body) -> bool:
        if hasattr(body, "seek"):
            body.seek(0)
            body = body.read()
        try:
            return self.get(key) == body
        except FileNotFoundError:
            return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    # -- tables ----------------------------------------------------------------
    def arrow_filesystem(self):
        """(pyarrow S3 filesystem, base path); pyarrow ignores AWS_ENDPOINT_URL, so pass it."""
        import pyarrow.fs as pafs

        kw = {
            "region": self.client.meta.region_name,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=RETRIES["max_attempts"]),
        }
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kw.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kw), f"{self.bucket}/{self.prefix}".rstrip("/")
