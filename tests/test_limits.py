"""Time limits and child recycling (issue: Step 3, points 5 and 7)."""

import pytest
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

import testapp

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]


def test_soft_time_limit_from_the_message_can_be_caught(worker):
    w = worker(WORKER).wait_ready()
    # apply_async(soft_time_limit=...) travels in the message's `timelimit` header.
    assert testapp.soft_limited.apply_async((3, True), soft_time_limit=0.5).get(timeout=10) == "caught"
    with pytest.raises(SoftTimeLimitExceeded):
        testapp.soft_limited.apply_async((3, False), soft_time_limit=0.5).get(timeout=10)
    assert "Soft time limit (0.5s) exceeded for testapp.soft_limited" in w.log()


def test_hard_time_limit_kills_marks_failure_and_replaces_the_child(worker):
    w = worker(WORKER).wait_ready()
    r = testapp.sleep.apply_async((30,), time_limit=1)
    with pytest.raises(TimeLimitExceeded):
        r.get(timeout=15)
    assert "Hard time limit (1s) exceeded for testapp.sleep" in w.log()
    assert "WorkerLostError" not in w.log()
    names = {r.get(timeout=15) for r in [testapp.procname.delay(0.5) for _ in range(4)]}
    assert len(names) == 2 and "ForkPoolWorker-3" in names, names


def test_hard_time_limit_from_the_task_option(worker):
    worker(WORKER).wait_ready()
    with pytest.raises(TimeLimitExceeded):
        testapp.hard_limited_by_option.delay(30).get(timeout=15)
    assert testapp.hard_limited_by_option.delay(0).get(timeout=10) == "finished"


def test_time_limits_from_the_command_line(worker):
    w = worker(WORKER + ["--soft-time-limit", "0.5", "--time-limit", "1.5"]).wait_ready()
    assert testapp.soft_limited.delay(30, True).get(timeout=10) == "caught"
    with pytest.raises(TimeLimitExceeded):
        testapp.stubborn.delay(30).get(timeout=15)
    assert testapp.add.delay(1, 1).get(timeout=10) == 2
    assert w.proc.poll() is None


def test_max_tasks_per_child_recycles(worker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--max-tasks-per-child", "2"]).wait_ready()
    names = [testapp.procname.delay().get(timeout=15) for _ in range(5)]
    assert names == ["ForkPoolWorker-1", "ForkPoolWorker-1", "ForkPoolWorker-2", "ForkPoolWorker-2",
                     "ForkPoolWorker-3"], names
    assert "exited with" not in w.log()  # a recycled child is not an error


def test_max_memory_per_child_recycles(worker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--max-memory-per-child", "100000"]).wait_ready()
    first = testapp.grow.delay(200).get(timeout=20)  # ~200 MB > 100,000 KiB: recycled afterwards
    second = testapp.procname.delay().get(timeout=20)
    assert first != second
    assert "exceeding memory limit" in w.log()
