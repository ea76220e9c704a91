"""Multipart uploads of checkpoint data files over a real S3-protocol server (moto on 127.0.0.1).

A rank's data file above the multipart threshold goes up in parts while it is written: in parallel, with
at most `max_concurrency` parts held in memory, and visible only once complete. A save that fails after
some parts went up aborts the upload and leaves neither the object nor the step behind. (That such a
file round-trips exactly is `test_s3_store.py::test_round_trip_is_exact`.)
"""

import contextlib
import threading
import time
import tracemalloc

import pytest
import torch
from s3_fixtures import BUCKET, object_key, s3_client, s3_env, s3_root, s3_server

from shadow.checkpoint import StorageError, open_store
from shadow.checkpoint.s3 import S3Options
from shadow.snapshot import Snapshot

__all__ = ["s3_env", "s3_root", "s3_server"]  # fixtures used here

PART = 5 * 2**20  # S3's smallest part


def _snapshot(step):
    tensors = {"model.w": torch.full((256, 256), float(step)), "optim.w.exp_avg": torch.ones(3 * 2**20)}  # 12 MiB
    return Snapshot(step, tensors, {"job_hash": "j", "param_groups": []})


def test_parts_go_up_in_parallel_with_bounded_memory(s3_root):
    store = open_store(s3_root, "run", s3_options=S3Options(multipart_threshold_bytes=PART,
                                                            multipart_chunk_bytes=PART, max_concurrency=2))
    lock = threading.Lock()
    sending, most_sending = 0, 0

    def part_starts(**_):
        nonlocal sending, most_sending
        with lock:
            sending += 1
            most_sending = max(most_sending, sending)
        time.sleep(0.1)  # a slow link: unless the writer waits for the parts, they pile up in memory

    def part_ends(**_):
        nonlocal sending
        with lock:
            sending -= 1

    store._client.meta.events.register("before-call.s3.UploadPart", part_starts)
    store._client.meta.events.register("after-call.s3.UploadPart", part_ends)
    data = bytes(range(256)) * (8 * PART // 256)  # 40 MiB: 8 parts
    tracemalloc.start()
    try:
        with store.open_writer(1, "rank-00000.bin") as out:
            for offset in range(0, len(data), 2**20):  # as DCP writes: chunk after chunk
                out.write(memoryview(data)[offset:offset + 2**20])
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert most_sending == 2
    # threshold + max_concurrency parts (15 MiB) and some slack; all 8 parts at once would be 40 MiB
    assert peak_bytes < 4 * PART, f"{peak_bytes / 2**20:.1f} MiB held while uploading"
    stored = s3_client(store.endpoint).get_object(Bucket=BUCKET, Key=object_key(s3_root, 1, "rank-00000.bin"))
    assert stored["ETag"].endswith('-8"') and stored["Body"].read() == data


def test_a_save_failing_midway_aborts_its_upload_and_leaves_no_step(s3_root, monkeypatch):
    store = open_store(s3_root, "run", s3_options=S3Options(multipart_threshold_bytes=PART,
                                                            multipart_chunk_bytes=PART))
    store.save(_snapshot(10))
    stored_parts = threading.Semaphore(0)
    store._client.meta.events.register("after-call.s3.UploadPart", lambda **_: stored_parts.release())
    open_writer = store._open_writer

    @contextlib.contextmanager
    def dying_writer(path):  # the rank writes 11 MiB of its data file, and fails once two parts are stored
        with open_writer(path) as out:
            class Dying:
                room = 11 * 2**20

                def write(self, data):
                    out.write(memoryview(data)[:self.room])
                    self.room -= len(data)
                    if self.room < 0:
                        assert stored_parts.acquire(timeout=10) and stored_parts.acquire(timeout=10)
                        raise StorageError(f"{path}: the writer died (injected)")
            yield Dying()

    monkeypatch.setattr(store, "_open_writer", dying_writer)
    with pytest.raises(StorageError, match=r"step-000000020/rank-00000.bin: the writer died \(injected\)"):
        store.save(_snapshot(20))
    client = s3_client(store.endpoint)
    step_prefix = object_key(s3_root, 20, "")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET, Prefix=step_prefix)  # aborted
    assert client.list_objects_v2(Bucket=BUCKET, Prefix=step_prefix)["KeyCount"] == 0
    assert store.list_committed() == [10] and store.latest_committed() == 10
