"""Pool children: loss is detected, the task's outcome recorded as stock does, the child replaced."""

import uuid

import pytest
from billiard.exceptions import WorkerLostError

import testapp

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]


def test_killed_child_marks_worker_lost_and_is_replaced(worker):
    w = worker(WORKER).wait_ready()
    r = testapp.die.delay()
    with pytest.raises(WorkerLostError) as info:
        r.get(timeout=15)
    assert "signal 9 (SIGKILL)" in str(info.value)
    assert "exited with 'signal 9 (SIGKILL)'" in w.log()
    # Both slots keep serving: the killed child was replaced by a new one.
    names = {r.get(timeout=15) for r in [testapp.procname.delay(0.5) for _ in range(4)]}
    assert len(names) == 2 and "ForkPoolWorker-3" in names, names


def test_reject_on_worker_lost_requeues(worker):
    worker(WORKER).wait_ready()
    key = f"die:{uuid.uuid4()}"
    assert testapp.die_once.delay(key).get(timeout=20) == "survived"
    assert int(testapp._redis().get(key)) == 2
