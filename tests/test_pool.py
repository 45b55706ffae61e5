"""Pool children: loss is detected, the task's outcome recorded as stock does, the child replaced."""

import uuid

import pytest
from billiard.exceptions import WorkerLostError

import testapp
from conftest import free_port, metric

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


# Pipelining (docs/pipelining.md): behind a busy child's short task the next request is written
# to its socket before the task ends. These show it happens, and that what was queued behind a
# job is never lost when the child dies or leaves instead of starting it.


def test_child_killed_with_a_request_queued_behind_loses_nothing(worker):
    port = free_port()
    results = [testapp.die_at.delay(i, 60) for i in range(120)]  # waiting before the worker starts
    worker(WORKER[:-1] + ["1", "--http-port", str(port)]).wait_ready()
    for i, r in enumerate(results):
        if i == 60:
            with pytest.raises(WorkerLostError):
                r.get(timeout=30)
        else:
            assert r.get(timeout=30) == i
    assert metric(port, "celeriac_tasks_pipelined_total") > 0


def test_recycled_child_gives_back_what_was_queued_behind(worker):
    port = free_port()
    results = [testapp.add.delay(i, 1) for i in range(60)]  # waiting before the worker starts
    worker(WORKER[:-1] + ["1", "--max-tasks-per-child", "5", "--http-port", str(port)]).wait_ready()
    assert [r.get(timeout=30) for r in results] == [i + 1 for i in range(60)]
    assert metric(port, "celeriac_tasks_pipelined_total") > 0


def test_no_pipelining_behind_slow_tasks_or_when_off(worker):
    port = free_port()
    w = worker(WORKER[:-1] + ["1", "--http-port", str(port)]).wait_ready()
    assert [r.get(timeout=30) for r in [testapp.sleep.delay(0.05) for _ in range(8)]]
    assert metric(port, "celeriac_tasks_pipelined_total") == 0
    w.stop()
    port = free_port()
    worker(WORKER[:-1] + ["1", "--http-port", str(port)], env={"CELERIAC_PIPELINE_MAX_MS": "0"}).wait_ready()
    assert [r.get(timeout=30) for r in [testapp.add.delay(i, 1) for i in range(40)]] == [i + 1 for i in range(40)]
    assert metric(port, "celeriac_tasks_pipelined_total") == 0
