"""Celery's signals fire in the processes and order a stock worker fires them in
(issue: Step 3, point 10): MainProcess-level ones in the zygote, task ones in pool children."""

import time

import pytest

import testapp


def test_signal_order_and_processes(worker, tmp_path):
    log = tmp_path / "signals.log"
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1"], env={"TESTAPP_SIGNAL_LOG": str(log)})
    w.wait_ready()
    assert testapp.add.delay(1, 2).get(timeout=10) == 3
    # The result is stored before task_success fires in the child: let the first task finish
    # before the second one is received, or the two processes' lines interleave.
    deadline = time.time() + 10
    while "task_postrun" not in log.read_text() and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(testapp.TestError):
        testapp.fail.delay("x").get(timeout=10)
    time.sleep(0.5)  # the result is stored before task_postrun runs; let it finish
    assert w.stop() == 0
    lines = [line.split() for line in log.read_text().splitlines()]
    names = [n for n, _, _ in lines]
    order = ["worker_init", "worker_process_init", "worker_ready", "task_received", "task_prerun", "task_success",
             "task_postrun", "task_received", "task_prerun", "task_failure", "task_postrun", "worker_shutting_down",
             "worker_process_shutdown", "worker_shutdown"]
    assert [n for n in names if not n.startswith("request:")] == order, names
    assert "request:Request:testapp.add:[1,2]" in names
    procs = {n: p for n, p, _ in lines}
    assert procs["task_prerun"] == "ForkPoolWorker-1" and procs["worker_process_init"] == "ForkPoolWorker-1"
    assert procs["worker_ready"] == procs["worker_shutdown"] == procs["worker_init"]  # the MainProcess side
    assert procs["task_received"] == procs["worker_init"]
