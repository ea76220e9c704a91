"""A checkpoint store under an S3 prefix, through boto3.

Endpoint, region and credentials come from boto3's standard chain (`AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance roles); nothing of
them is stored in the checkpoint or written to any message. Every request has bounded retries and
timeouts (`S3Options`); files above the multipart threshold go through boto3's managed multipart
upload. An S3 PUT is atomic for readers, so the manifest-last commit works as on a file system.

Errors become StorageError (unreachable endpoint, missing bucket, access denied) naming the URI and
the file; any credential that might appear in a server's message is masked.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from shadow.checkpoint.errors import CheckpointError, StorageError
from shadow.checkpoint.store import CheckpointStore

_ABSENT = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken", "AccountProblem"}


@dataclass(frozen=True)
class S3Options:
    max_attempts: int = 5  # per request, first try included (botocore "standard" retry mode)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    multipart_threshold_bytes: int = 64 * 2**20  # larger files are uploaded in parts, in parallel
    multipart_chunk_bytes: int = 32 * 2**20
    max_concurrency: int = 8  # parallel part uploads per file


class S3Store(CheckpointStore):
    def __init__(self, bucket: str, prefix: str, run: str, keep_last: int = 0, options: S3Options | None = None):
        prefix = prefix.strip("/")
        super().__init__(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", run, keep_last)
        # Keys below the run are built from plain names only (step directories, the format's files, pin
        # names), so the prefix and the run name are what could make a key read as a path walk, on a
        # file system or in a tool that syncs the bucket to one.
        if not _plain_key(f"{prefix}/{run}" if prefix else run):
            raise CheckpointError(f"{self.run_uri}: '.', '..' and empty components are not allowed in S3 checkpoint "
                                  "keys; fix checkpoint.uri")
        self.bucket = bucket
        self.options = options or S3Options()
        self._key_prefix = f"{prefix}/{run}/" if prefix else f"{run}/"
        session = boto3.session.Session()
        self._client = session.client("s3", config=Config(
            retries={"max_attempts": self.options.max_attempts, "mode": "standard"},
            connect_timeout=self.options.connect_timeout_s,
            read_timeout=self.options.read_timeout_s,
        ))
        self._transfer = TransferConfig(
            multipart_threshold=self.options.multipart_threshold_bytes,
            multipart_chunksize=self.options.multipart_chunk_bytes,
            max_concurrency=self.options.max_concurrency,
        )
        # only for masking them in messages; never formatted anywhere
        credentials = session.get_credentials()
        frozen = credentials.get_frozen_credentials() if credentials else None
        self._secrets = [s for s in (frozen or ()) if s]
        split = urlsplit(self._client.meta.endpoint_url)
        self.endpoint = f"{split.scheme}://{split.hostname}" + (f":{split.port}" if split.port else "")

    def __repr__(self) -> str:
        return f"S3Store({self.run_uri!r}, endpoint={self.endpoint!r})"

    def check(self) -> None:
        try:
            self._call(f"{self.run_uri}/", "checking the bucket", lambda: self._client.head_bucket(Bucket=self.bucket))
        except FileNotFoundError:  # HeadBucket answers a bare 404 for a missing bucket
            raise StorageError(f"{self.run_uri}/: {self._no_bucket()}") from None

    def _put(self, path: str, data: bytes) -> None:
        self._call(f"{self.run_uri}/{path}", "uploading", lambda: self._client.upload_fileobj(
            io.BytesIO(data), self.bucket, self._key_prefix + path, Config=self._transfer))

    @contextlib.contextmanager
    def _open_writer(self, path: str):
        upload = _StreamingUpload(self, path)
        try:
            yield upload
            upload.complete()
        except BaseException:
            upload.abort()
            raise

    def _read_range(self, path: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._call(f"{self.run_uri}/{path}", "downloading", lambda: self._client.get_object(
            Bucket=self.bucket, Key=self._key_prefix + path, Range=f"bytes={offset}-{offset + length - 1}")["Body"].read())

    def _size(self, path: str) -> int:
        return self._call(f"{self.run_uri}/{path}", "checking", lambda: self._client.head_object(
            Bucket=self.bucket, Key=self._key_prefix + path)["ContentLength"])

    def _get(self, path: str) -> bytes:
        return self._call(f"{self.run_uri}/{path}", "downloading", lambda: self._client.get_object(
            Bucket=self.bucket, Key=self._key_prefix + path)["Body"].read())

    def _list(self, directory: str) -> tuple[list[str], list[str]]:
        prefix = self._key_prefix + (f"{directory}/" if directory else "")

        def list_all():
            dirs, files = [], []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                dirs += [p["Prefix"][len(prefix):].rstrip("/") for p in page.get("CommonPrefixes", [])]
                files += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            return dirs, files

        return self._call(f"{self.run_uri}/{directory}", "listing", list_all)

    def _remove(self, path: str) -> None:
        self._call(f"{self.run_uri}/{path}", "deleting", lambda: self._client.delete_object(
            Bucket=self.bucket, Key=self._key_prefix + path))

    def _remove_tree(self, directory: str) -> None:
        prefix = f"{self._key_prefix}{directory}/"

        def remove_all():
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                if keys:
                    response = self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    errors = response.get("Errors")
                    if errors:  # per-key failures come back in the response, not as an exception
                        first = errors[0]
                        raise StorageError(self._mask(f"s3://{self.bucket}/{first.get('Key')}: deleting failed "
                                                      f"({len(errors)} objects): {first.get('Code')}"))

        self._call(f"{self.run_uri}/{directory}", "deleting", remove_all)

    def _call(self, where: str, action: str, request):
        """Run one request, turning boto errors into FileNotFoundError or a StorageError naming `where`."""
        try:
            return request()
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in _ABSENT:
                raise FileNotFoundError(where) from None
            if code == "NoSuchBucket":
                message = self._no_bucket()
            elif code in _DENIED:
                message = (f"access denied ({code}) while {action}; check the credentials (AWS_PROFILE, "
                           "AWS_ACCESS_KEY_ID, role) and the bucket policy")
            else:
                message = f"{action} failed: {code} {error.get('Message', '')}".rstrip()
        except NoCredentialsError:
            message = "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        except BotoCoreError as exc:
            message = (f"{action} failed after {self.options.max_attempts} attempts at {self.endpoint} "
                       f"({type(exc).__name__}: {exc}); check AWS_ENDPOINT_URL and the network")
        raise StorageError(self._mask(f"{where}: {message}")) from None

    def _no_bucket(self) -> str:
        return f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it or fix checkpoint.uri"

    def _mask(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _StreamingUpload:
    """A file written in pieces: held in memory up to the multipart threshold and sent with one PUT if it
    ends there, else sent as a multipart upload in parts of `multipart_chunk_bytes` as it is written,
    so a rank's memory holds at most one threshold's worth of its shard. The object appears only when
    the upload completes; an aborted one leaves nothing behind."""

    def __init__(self, store: S3Store, path: str):
        self.store, self.path = store, path
        self.key = store._key_prefix + path
        self.where = f"{store.run_uri}/{path}"
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []

    def write(self, data) -> None:
        self.buffer += data
        options = self.store.options
        if self.upload_id is None and len(self.buffer) > options.multipart_threshold_bytes:
            self.upload_id = self.store._call(self.where, "starting a multipart upload", lambda: self.store._client
                                              .create_multipart_upload(Bucket=self.store.bucket, Key=self.key))["UploadId"]
        while self.upload_id is not None and len(self.buffer) >= options.multipart_chunk_bytes:
            self._send_part(options.multipart_chunk_bytes)

    def _send_part(self, size: int) -> None:
        body, self.buffer = bytes(self.buffer[:size]), self.buffer[size:]
        number = len(self.parts) + 1
        response = self.store._call(self.where, f"uploading part {number}", lambda: self.store._client.upload_part(
            Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=body))
        self.parts.append({"PartNumber": number, "ETag": response["ETag"]})

    def complete(self) -> None:
        if self.upload_id is None:
            body = bytes(self.buffer)
            self.store._call(self.where, "uploading", lambda: self.store._client.put_object(
                Bucket=self.store.bucket, Key=self.key, Body=body))
            return
        if self.buffer or not self.parts:
            self._send_part(len(self.buffer))
        self.store._call(self.where, "completing a multipart upload", lambda: self.store._client
                         .complete_multipart_upload(Bucket=self.store.bucket, Key=self.key, UploadId=self.upload_id,
                                                    MultipartUpload={"Parts": self.parts}))

    def abort(self) -> None:
        if self.upload_id is not None:
            try:
                self.store._client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.key,
                                                          UploadId=self.upload_id)
            except (BotoCoreError, ClientError):
                pass  # the upload stays invisible either way; a bucket lifecycle rule reaps stale parts


def _plain_key(key: str) -> bool:
    return all(part not in ("", ".", "..") and "\\" not in part and "\0" not in part for part in key.split("/"))
