"""Remote control with the real `celery inspect/control` commands and `app.control` calls
(issues: Step 3 point 4 revocation, Step 4 point 1), on every broker."""

import os
import subprocess
import sys
import time
import uuid

import pytest
from celery.exceptions import TaskRevokedError

import testapp
from conftest import APPS, BROKER_KIND, wait_started, wait_until

NODE = "rc@testhost"
WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2", "-n", NODE]


def inspect():
    return testapp.app.control.inspect(destination=[NODE], timeout=2)




def test_celery_inspect_ping_cli(worker):
    worker(WORKER).wait_ready()
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "inspect", "ping", "-d", NODE],
                         cwd=APPS, env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pong" in out.stdout and NODE in out.stdout


def test_inspect_views(worker):
    worker(WORKER).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    running = testapp.sleep.delay(2, marker)
    later = testapp.add.apply_async((1, 2), countdown=30)
    wait_started(marker)
    time.sleep(0.2)
    assert testapp.app.control.ping(destination=[NODE], timeout=2) == [{NODE: {"ok": "pong"}}]
    i = inspect()
    active = i.active()[NODE]
    assert [t["id"] for t in active] == [running.id]
    assert active[0]["name"] == "testapp.sleep" and active[0]["worker_pid"] and active[0]["time_start"]
    scheduled = i.scheduled()[NODE]
    assert [s["request"]["id"] for s in scheduled] == [later.id]
    assert i.reserved()[NODE] == []
    assert "testapp.add" in i.registered()[NODE]
    stats = i.stats()[NODE]
    assert stats["pool"]["max-concurrency"] == 2 and len(stats["pool"]["processes"]) == 2
    assert stats["total"].get("testapp.sleep") == 1
    queues = i.active_queues()[NODE]
    assert [q["name"] for q in queues] == ["celery"]
    states = i.query_task([running.id, later.id])[NODE]
    assert states[running.id][0] == "active" and states[later.id][0] == "scheduled"
    assert "result_backend" in i.conf()[NODE]
    assert i.clock()[NODE]["clock"] > 0
    testapp.app.control.revoke(later.id)
    assert running.get(timeout=10) == 2


def test_revoke_waiting_and_future_tasks(worker):
    w = worker(WORKER).wait_ready()
    eta = testapp.add.apply_async((1, 1), countdown=2)
    future_id = str(uuid.uuid4())
    replies = testapp.app.control.revoke([eta.id, future_id], reply=True, destination=[NODE])
    assert replies and "flagged as revoked" in replies[0][NODE]["ok"]
    assert future_id in inspect().revoked()[NODE]
    # Sent after the revoke: discarded when it arrives.
    future = testapp.add.apply_async((2, 2), task_id=future_id)
    with pytest.raises(TaskRevokedError):
        eta.get(timeout=10)
    with pytest.raises(TaskRevokedError):
        future.get(timeout=10)
    w.wait_for(f"Discarding revoked task: testapp.add[{eta.id}]")  # when its ETA came
    assert testapp.add.delay(3, 3).get(timeout=10) == 6


def test_revoke_terminate_kills_the_running_task(worker):
    w = worker(WORKER).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    r = testapp.late_sleep.delay(30, marker)
    wait_started(marker)
    replies = testapp.app.control.revoke(r.id, terminate=True, signal="SIGKILL", reply=True, destination=[NODE])
    assert replies[0][NODE] == {"ok": f"terminate: {r.id}"}
    with pytest.raises(TaskRevokedError):
        r.get(timeout=10)
    assert "WorkerLostError" not in w.log()
    assert testapp.add.delay(1, 2).get(timeout=10) == 3
    time.sleep(0.5)
    assert testapp._redis().lrange(marker, 0, -1) == [b"start"]  # not redelivered


def test_rate_limit_and_time_limit_at_run_time(worker):
    worker(WORKER).wait_ready()
    reply = testapp.app.control.rate_limit("testapp.add", "5/s", reply=True, destination=[NODE])
    assert reply == [{NODE: {"ok": "new rate limit set successfully"}}]
    start = time.time()
    [r.get(timeout=20) for r in [testapp.add.delay(i, i) for i in range(6)]]
    assert time.time() - start >= 0.9
    assert "testapp.add [rate_limit=5/s]" in inspect().registered()[NODE]
    reply = testapp.app.control.time_limit("testapp.stubborn", soft=0.2, hard=0.8, reply=True, destination=[NODE])
    assert reply == [{NODE: {"ok": "time limits set successfully"}}]
    from billiard.exceptions import TimeLimitExceeded

    with pytest.raises(TimeLimitExceeded):
        testapp.stubborn.delay(30).get(timeout=15)
    bad = testapp.app.control.rate_limit("no.such.task", "1/s", reply=True, destination=[NODE])
    assert bad == [{NODE: {"error": "unknown task"}}]


def test_unknown_command_answers_an_error(worker):
    worker(WORKER).wait_ready()
    replies = testapp.app.control.broadcast("no_such_command", reply=True, destination=[NODE], timeout=2)
    assert replies == [{NODE: {"error": "KeyError('no_such_command')"}}]


def test_shutdown_command(worker):
    w = worker(WORKER).wait_ready()
    testapp.app.control.shutdown(destination=[NODE])
    assert w.wait_exit(20) == 0
    assert "Got shutdown from remote" in w.log()


def test_destination_filters_nodes(worker):
    worker(WORKER).wait_ready()
    assert testapp.app.control.ping(destination=["someone@else"], timeout=1) == []


def test_two_workers_with_one_node_name(worker):
    worker(WORKER).wait_ready()
    second = worker(WORKER, name="second").wait_ready()
    if BROKER_KIND == "amqp":
        second.wait_for("is already using this process mailbox")  # refused, as stock
    else:
        second.wait_for("two workers share this node name")  # the first answered mingle's hello
    assert testapp.add.delay(1, 1).get(timeout=10) == 2


def test_statedb_keeps_revoked_ids_across_restarts(worker, tmp_path):
    statedb = tmp_path / "worker.state"
    first = worker(WORKER + ["--statedb", str(statedb)]).wait_ready()
    doomed = str(uuid.uuid4())
    testapp.app.control.revoke(doomed, destination=[NODE])
    time.sleep(0.3)
    assert first.stop() == 0
    second = worker(WORKER + ["--statedb", str(statedb)], name="second").wait_ready()
    assert doomed in inspect().revoked()[NODE]
    r = testapp.add.apply_async((1, 1), task_id=doomed)
    with pytest.raises(TaskRevokedError):
        r.get(timeout=10)
    second.wait_for(f"Discarding revoked task: testapp.add[{doomed}]")
    # The file is celery's own format: the stock worker reads it too.
    import shelve
    import zlib
    import pickle

    with shelve.open(str(statedb)) as db:
        assert doomed in pickle.loads(zlib.decompress(db["zrevoked"]))


def test_revoke_by_stamped_headers(worker):
    w = worker(WORKER).wait_ready()
    stamped = testapp.add.s(1, 1)
    stamped.stamp(batch="nightly-42")
    doomed = stamped.apply_async(countdown=2)
    other = testapp.add.apply_async((2, 2), countdown=2)
    time.sleep(0.3)
    replies = testapp.app.control.revoke_by_stamped_headers({"batch": "nightly-42"}, reply=True, destination=[NODE])
    assert replies and "flagged as revoked" in replies[0][NODE]["ok"]
    with pytest.raises(TaskRevokedError):
        doomed.get(timeout=10)
    assert other.get(timeout=10) == 4
    w.wait_for(f"Discarding revoked task: testapp.add[{doomed.id}]")


def test_task_revoked_signal_runs(worker, tmp_path):
    log = tmp_path / "signals.log"
    w = worker(WORKER, env={"TESTAPP_SIGNAL_LOG": str(log)}).wait_ready()
    r = testapp.add.apply_async((1, 1), countdown=1)
    testapp.app.control.revoke(r.id, destination=[NODE])
    with pytest.raises(TaskRevokedError):
        r.get(timeout=10)
    w.wait_for(f"Discarding revoked task: testapp.add[{r.id}]")
    wait_until(lambda: "task_revoked" in log.read_text(), timeout=5, what="task_revoked in the signal log")


def test_mingle_syncs_revoked_ids_with_a_running_worker(worker):
    first = worker(WORKER).wait_ready()
    assert "mingle: all alone" in first.log()
    doomed = str(uuid.uuid4())
    testapp.app.control.revoke(doomed, destination=[NODE])
    time.sleep(0.3)
    second = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", "second@testhost"], name="second")
    second.wait_ready()
    assert "mingle: sync with 1 nodes" in second.log()
    assert doomed in testapp.app.control.inspect(destination=["second@testhost"], timeout=2).revoked()["second@testhost"]
    third = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", "third@testhost", "--without-mingle"],
                   name="third").wait_ready()
    assert "mingle" not in third.log()


def test_mingle_with_a_stock_worker(worker):
    import sys

    stock = worker(["-A", "testapp", "worker", "-c", "1", "-l", "info", "-n", "stock@testhost", "--without-gossip"],
                   command=[sys.executable, "-m", "celery"], name="stock")
    stock.wait_ready(timeout=60)
    doomed = str(uuid.uuid4())
    # Under load stock can say "ready." before its pidbox subscription (Redis pub/sub) is live:
    # a broadcast sent in between is lost, so ask again until it answers (revoking twice is harmless).
    wait_until(lambda: testapp.app.control.revoke(doomed, destination=["stock@testhost"], reply=True, timeout=2),
               timeout=30, what="a reply from the stock worker")
    ours = worker(WORKER).wait_ready()
    assert "mingle: sync with 1 nodes" in ours.log()
    assert doomed in inspect().revoked()[NODE]


def test_pool_grow_and_shrink(worker):
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", NODE]).wait_ready()
    assert testapp.app.control.pool_grow(2, reply=True, destination=[NODE]) == [{NODE: {"ok": "pool will grow"}}]
    wait_until(lambda: len(inspect().stats()[NODE]["pool"]["processes"]) >= 3, timeout=15, interval=0.2,
               what="three pool processes")
    stats = inspect().stats()[NODE]
    assert stats["pool"]["max-concurrency"] == 3 and len(stats["pool"]["processes"]) == 3
    # Three tasks run side by side now.
    names = {r.get(timeout=15) for r in [testapp.procname.delay(0.8) for _ in range(3)]}
    assert len(names) == 3
    assert testapp.app.control.pool_shrink(2, reply=True, destination=[NODE]) == [{NODE: {"ok": "pool will shrink"}}]
    wait_until(lambda: len(inspect().stats()[NODE]["pool"]["processes"]) == 1, timeout=15, interval=0.2,
               what=lambda: f"one pool process (has {inspect().stats()[NODE]['pool']['processes']})")
    bad = testapp.app.control.pool_shrink(1, reply=True, destination=[NODE])
    assert bad == [{NODE: {"error": "pool already at minimum"}}]
    assert testapp.add.delay(1, 1).get(timeout=10) == 2
