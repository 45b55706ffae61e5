"""Operations (issue: Step 4, points 6 and 7): JSON logs, --logfile, warm shutdown with a deadline."""

import json
import signal
import time
import uuid

import pytest
from billiard.exceptions import WorkerLostError

import testapp


def test_json_log_format(worker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--log-format", "json"]).wait_ready()
    r = testapp.add.delay(2, 2)
    assert r.get(timeout=10) == 4
    w.wait_for('"state": "SUCCESS"')
    lines = [json.loads(line) for line in w.log().splitlines() if line.startswith("{")]
    received = [line for line in lines if line.get("task_id") == r.id and line.get("state") == "RECEIVED"]
    assert received and received[0]["process"] == "MainProcess" and received[0]["task"] == "testapp.add"
    done = [line for line in lines if line.get("task_id") == r.id and line.get("state") == "SUCCESS"]
    assert done and done[0]["process"] == "ForkPoolWorker-1" and done[0]["runtime"] >= 0
    assert "guest:guest" not in w.log()  # never a broker password


def test_logfile(worker, tmp_path):
    logfile = tmp_path / "worker.log"
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-f", str(logfile)])
    deadline = time.time() + 30
    while (not logfile.exists() or " ready." not in logfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    r = testapp.add.delay(3, 3)
    assert r.get(timeout=10) == 6
    time.sleep(0.3)
    text = logfile.read_text()
    assert f"Task testapp.add[{r.id}] received" in text  # the supervisor's line
    assert f"Task testapp.add[{r.id}] succeeded" in text  # the child's line
    assert "received" not in w.log()


def test_warm_shutdown_deadline(worker, broker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "2", "--shutdown-timeout", "1"]).wait_ready()
    late_marker, early_marker = f"m:{uuid.uuid4()}", f"m:{uuid.uuid4()}"
    late = testapp.late_sleep.delay(30, late_marker)
    early = testapp.sleep.delay(30, early_marker)
    deadline = time.time() + 10
    while time.time() < deadline and not (testapp._redis().llen(late_marker) and testapp._redis().llen(early_marker)):
        time.sleep(0.02)
    started = time.time()
    w.signal(signal.SIGTERM)
    assert w.wait_exit(15) == 0
    assert time.time() - started < 6
    # acks_late: back in the queue for another worker; early ack: recorded as lost.
    assert broker.ready("celery") == 1
    with pytest.raises(WorkerLostError):
        early.get(timeout=10)
    assert late.state == "PENDING"
