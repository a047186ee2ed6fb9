"""Storage backends of the lake: bytes by key on local disk or S3.

Both offer create-only writes (``expect=None``), compare-and-swap writes
(``expect=<token from read>``) and unconditional writes (``expect=ANY``).
A local write goes to a temp file renamed over the target under a directory
lock; an S3 PUT is atomic by itself and conditional through ``If-None-Match``
/ ``If-Match``.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

ANY = object()  # write(): no precondition


class LakeConflictError(RuntimeError):
    """A conditional write lost: the object exists, or changed since it was read."""


class LocalStore:
    def __init__(self, root: Path):
        self.root = root

    def url(self, key: str) -> str:
        return str(self.root / key)

    def read(self, key: str) -> tuple[bytes, str] | None:
        try:
            with open(self.root / key, "rb") as handle:
                return handle.read(), self._token(os.fstat(handle.fileno()))
        except FileNotFoundError:
            return None

    @staticmethod
    def _token(stat: os.stat_result) -> str:
        # os.replace gives the target a new inode, so this changes on every write.
        return f"{stat.st_ino}:{stat.st_mtime_ns}:{stat.st_size}"

    def write(self, key: str, data: bytes, expect=ANY, content_type: str | None = None) -> str:
        """Atomic replace; ``content_type`` matters only to S3 (a file's type is its suffix)."""
        import fcntl

        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                fcntl.flock(directory, fcntl.LOCK_EX)  # check-then-rename must not interleave
                try:
                    current = self._token(os.stat(path))
                except FileNotFoundError:
                    current = None
                if expect is not ANY and current != expect:
                    raise LakeConflictError(
                        f"{path}: {'already exists' if expect is None else 'changed since it was read'}")
                os.replace(tmp, path)
                os.fsync(directory)  # make the rename itself durable
                return self._token(os.stat(path))
            finally:
                os.close(directory)  # also releases the lock
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*")
                      if p.is_file() and not p.name.startswith("."))


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None):
        import boto3
        from botocore.config import Config

        # MinIO and other S3-compatible servers want path-style addressing.
        config = Config(retries={"mode": "standard", "max_attempts": 5},
                        s3={"addressing_style": "path"} if endpoint_url else {})
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, config=config)
        self.bucket, self.prefix = bucket, prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def read(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            response = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return response["Body"].read(), response["ETag"]

    def write(self, key: str, data: bytes, expect=ANY, content_type: str | None = None) -> str:
        from botocore.exceptions import ClientError

        options = {} if expect is ANY else {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        if content_type:  # so a browser opening the object renders it (an HTML report)
            options["ContentType"] = content_type
        try:
            response = self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **options)
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                raise LakeConflictError(f"{self.url(key)}: conditional write refused ({code})") from exc
            raise
        return response["ETag"]

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix).rstrip("/") + "/"
        strip = len(self._key(""))
        keys = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys += [item["Key"][strip:] for item in page.get("Contents", [])]
        return sorted(keys)
