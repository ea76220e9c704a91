"""A checkpoint store under an S3 prefix, through boto3.

Endpoint, region and credentials come from boto3's standard chain (`AWS_ENDPOINT_URL`,
`AWS_REGION`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, instance roles); nothing of
them is stored in the checkpoint or written to any message. Every request has bounded retries and
timeouts (`S3Options`). Every file is streamed up as it is written (`_StreamingUpload`): one PUT up to
the multipart threshold, a multipart upload with parallel parts above it. Either is atomic for readers
(a multipart object exists only once completed), so the manifest-last commit works as on a file system.

Errors become StorageError (unreachable endpoint, missing bucket, access denied) naming the URI and
the file; any credential that might appear in a server's message is masked.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

import boto3
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
    multipart_chunk_bytes: int = 32 * 2**20  # S3 takes parts of 5 MiB or more (all but the last)
    max_concurrency: int = 8  # parts in flight per file: memory per file is about threshold + this x chunk


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
        with self._open_writer(path) as out:
            out.write(data)

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

        def read():
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self._key_prefix + path,
                                               Range=f"bytes={offset}-{offset + length - 1}")["Body"].read()
            except ClientError as exc:
                # a range starting at or past the end (the file shrank since its size was checked): no
                # bytes, as a file read there gives, so the reader reports a truncated checkpoint
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""
                raise

        return self._call(f"{self.run_uri}/{path}", "downloading", read)

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
    """A file written in pieces, as DCP hands over a rank's chunks. Held in memory up to the multipart
    threshold and sent with one PUT if it ends there; past it, a multipart upload whose parts of
    `multipart_chunk_bytes` go up on `max_concurrency` threads while the writer goes on. `write` blocks
    while that many parts are in flight, so a rank holds at most about threshold + concurrency x chunk
    bytes of its shard, however large the shard. The object appears only when the upload completes; an
    aborted one leaves nothing behind.

    boto3's managed transfer (s3transfer) pulls from a file object, while DCP pushes the chunks: bridging
    the two would take a pipe and a thread of its own, so the parts are sent here with the same client.
    """

    def __init__(self, store: S3Store, path: str):
        self._options, self._client, self._call = store.options, store._client, store._call
        self._bucket, self._key = store.bucket, store._key_prefix + path
        self._where = f"{store.run_uri}/{path}"
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._parts: list[Future] = []  # part i + 1; each gives {"PartNumber", "ETag"}

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        if self._upload_id is None:
            if len(self._buffer) + len(view) <= self._options.multipart_threshold_bytes:
                self._buffer += view
                return
            self._start()
            held, self._buffer = self._buffer, bytearray()
            self._cut_parts(memoryview(held))
        self._cut_parts(view)

    def _cut_parts(self, view: memoryview) -> None:
        """Fill the buffer from `view` a part at a time and send each full part (a large write is never
        copied whole)."""
        chunk = self._options.multipart_chunk_bytes
        while view:
            take = chunk - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == chunk:
                part, self._buffer = self._buffer, bytearray()
                self._submit(part)

    def complete(self) -> None:
        if self._upload_id is None:
            body = self._buffer
            self._call(self._where, "uploading", lambda: self._client.put_object(
                Bucket=self._bucket, Key=self._key, Body=body))
            return
        if self._buffer:
            self._submit(self._buffer)
            self._buffer = bytearray()
        parts = [part.result() for part in self._parts]  # the first failed part's StorageError, if any
        self._pool.shutdown()
        self._call(self._where, "completing a multipart upload", lambda: self._client.complete_multipart_upload(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}))

    def abort(self) -> None:
        if self._upload_id is None:
            return
        # parts still being sent finish first: one landing after the abort would be stored again
        self._pool.shutdown(wait=True, cancel_futures=True)
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
        except (BotoCoreError, ClientError):
            pass  # the upload stays invisible either way; a bucket lifecycle rule reaps stale parts

    def _start(self) -> None:
        self._upload_id = self._call(self._where, "starting a multipart upload", lambda: self._client
                                     .create_multipart_upload(Bucket=self._bucket, Key=self._key))["UploadId"]
        self._pool = ThreadPoolExecutor(self._options.max_concurrency, thread_name_prefix="s3-part")

    def _submit(self, body: bytearray) -> None:
        """Hand one part to the pool, then wait while `max_concurrency` parts are in flight; a part that
        failed stops the writer here rather than after the whole shard was sent."""
        number = len(self._parts) + 1
        self._parts.append(self._pool.submit(self._send_part, number, body))
        in_flight = [part for part in self._parts if not part.done()]
        if len(in_flight) >= self._options.max_concurrency:
            wait(in_flight, return_when=FIRST_COMPLETED)
        for part in self._parts:
            if part.done() and part.exception() is not None:
                raise part.exception()

    def _send_part(self, number: int, body: bytearray) -> dict:
        response = self._call(self._where, f"uploading part {number}", lambda: self._client.upload_part(
            Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=body))
        return {"PartNumber": number, "ETag": response["ETag"]}


def _plain_key(key: str) -> bool:
    return all(part not in ("", ".", "..") and "\\" not in part and "\0" not in part for part in key.split("/"))
