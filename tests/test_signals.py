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


def test_children_start_like_billiard_processes(worker):
    """A pool child runs the after-fork hooks a billiard child runs: `app.on_after_fork`
    receivers, and the app forgets the broker connections its parent opened, so tasks that
    send tasks from several children never share one connection."""
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "2"], env={"TESTAPP_SEND_AT_INIT": "1"})
    w.wait_ready()
    infos = [testapp.whoami.delay().get(timeout=10) for _ in range(4)]
    assert {i["after_fork"] for i in infos} == {1}, infos
    # Children sending at once: each through a connection of its own.
    sent = [testapp.send_add.delay(i, i) for i in range(60)]
    ids = [r.get(timeout=20) for r in sent]
    assert [testapp.app.AsyncResult(i).get(timeout=20) for i in ids] == [2 * i for i in range(60)]
    assert w.stop() == 0
    assert "Traceback" not in w.log(), w.log()
