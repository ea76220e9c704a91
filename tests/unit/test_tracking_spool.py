"""The tracking spool: ops on disk before MLflow sees them, acknowledged in order, kept across a restart."""

import json

from shadow.tracking import spool as spool_module
from shadow.tracking.spool import ACKED_FILE, SPOOL_FILE, Spool


def _op(i):
    return {"op": "log", "run": "main", "metrics": [["train/loss", float(i), 1000 + i, i]]}


def test_pending_ops_come_back_in_order_until_acknowledged(tmp_path):
    spool = Spool(tmp_path)
    seqs = [spool.append(_op(i)) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [op["seq"] for op in spool.pending(3)] == [1, 2, 3]
    spool.ack(2)
    assert [op["seq"] for op in spool.pending(10)] == [3, 4, 5] and spool.num_pending() == 3
    assert (tmp_path / ACKED_FILE).read_text() == "2"


def test_unacknowledged_ops_survive_a_restart_and_sequence_numbers_continue(tmp_path):
    spool = Spool(tmp_path)
    for i in range(4):
        spool.append(_op(i))
    spool.ack(1)
    spool.close()  # or a crash: every line was written before append returned
    reopened = Spool(tmp_path)
    assert [op["seq"] for op in reopened.pending(10)] == [2, 3, 4]
    assert reopened.pending(1)[0]["metrics"] == [["train/loss", 1.0, 1001, 1]]
    assert reopened.append(_op(9)) == 5


def test_a_torn_last_line_is_dropped_on_reopen(tmp_path):
    spool = Spool(tmp_path)
    spool.append(_op(0))
    spool.close()
    with open(tmp_path / SPOOL_FILE, "a") as f:
        f.write('{"seq": 2, "op": "lo')  # the process died mid-write
    reopened = Spool(tmp_path)
    assert [op["seq"] for op in reopened.pending(10)] == [1]
    assert reopened.append(_op(1)) == 2
    lines = (tmp_path / SPOOL_FILE).read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [1, 2]


def test_non_finite_metric_values_round_trip(tmp_path):
    spool = Spool(tmp_path)
    spool.append({"op": "log", "run": "main", "metrics": [["train/loss", float("nan"), 1, 0],
                                                          ["train/grad_norm", float("inf"), 1, 0]]})
    spool.close()
    values = [m[1] for m in Spool(tmp_path).pending(1)[0]["metrics"]]
    assert values[0] != values[0] and values[1] == float("inf")


def test_a_fully_acknowledged_spool_is_compacted_and_stays_consistent(tmp_path, monkeypatch):
    monkeypatch.setattr(spool_module, "COMPACT_BYTES", 200)
    spool = Spool(tmp_path)
    for i in range(10):
        spool.append(_op(i))
    spool.ack(5)
    assert (tmp_path / SPOOL_FILE).stat().st_size > 200  # ops still pending: nothing is cut
    spool.ack(10)
    assert (tmp_path / SPOOL_FILE).read_text() == ""
    assert spool.append(_op(10)) == 11
    spool.close()
    reopened = Spool(tmp_path)
    assert [op["seq"] for op in reopened.pending(10)] == [11] and reopened.append(_op(11)) == 12
