"""Tasks sent by the real celery package run under celeriac, results come back (every broker)."""

import json
import time
import uuid

import pytest
from celery import chain, chord, group

import testapp
from conftest import only_on, producer_app, wait_started, wait_until

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]


def test_delay_and_get(worker):
    w = worker(WORKER).wait_ready()
    assert testapp.add.delay(2, 3).get(timeout=10) == 5
    assert testapp.echo.apply_async((1, "a"), {"k": [1, 2]}).get(timeout=10) == {"args": [1, "a"], "kwargs": {"k": [1, 2]}}
    log = w.log()
    assert "Task testapp.add[" in log and "] received" in log
    assert "succeeded in" in log


def test_large_arguments_and_results(worker):
    # Larger than an AMQP frame (16 KiB here), than what is queued behind a running task
    # (64 KiB), and within SQS's 256 KiB message limit once base64-encoded.
    worker(WORKER).wait_ready()
    blob = "x" * 150_000 + "é"
    results = [testapp.echo.delay(blob, n=i) for i in range(6)]
    for i, r in enumerate(results):
        assert r.get(timeout=20) == {"args": [blob], "kwargs": {"n": i}}


def test_failure_reraises_same_exception(worker):
    worker(WORKER).wait_ready()
    result = testapp.fail.delay("it broke")
    with pytest.raises(testapp.TestError) as info:
        result.get(timeout=10)
    assert str(info.value) == "it broke"
    assert result.state == "FAILURE"


def test_bind_request_and_signals(worker):
    worker(WORKER + ["-n", "probe@%h"]).wait_ready()
    res = testapp.whoami.apply_async(priority=3)
    info = res.get(timeout=10)
    assert info["id"] == res.id
    assert info["hostname"].startswith("probe@")
    assert info["retries"] == 0
    assert info["delivery_info"]["routing_key"] == "celery"
    assert info["process_init"] == 1  # worker_process_init ran once in this child
    assert testapp.signal_probe.delay().get(timeout=10) is True  # task_prerun ran in the child


def test_ignore_result(worker, backend):
    worker(WORKER).wait_ready()
    r = testapp.ignored.delay(7)
    marker = testapp.add.delay(1, 1)  # FIFO: once this is done, ignored has run
    assert marker.get(timeout=10) == 2
    time.sleep(0.2)
    assert backend.get(f"celery-task-meta-{r.id}") is None


def test_many_tasks_and_concurrency(worker):
    worker(WORKER).wait_ready()
    results = [testapp.add.delay(i, i) for i in range(200)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(200)]


def test_sys_executable_is_the_virtualenvs(worker):
    """The app sees the virtualenv's interpreter, the worker's command line as sys.argv (as
    under `celery worker`), and the library path the user had, not the one the zygote was
    started with."""
    import os
    import sys

    worker(WORKER, env={"LD_LIBRARY_PATH": "/opt/users/own/lib"}).wait_ready()
    info = testapp.sys_info.delay().get(timeout=10)
    assert info["prefix"] == sys.prefix
    assert info["subprocess_prefix"] == sys.prefix
    assert info["argv"][1:] == WORKER and os.path.basename(info["argv"][0]) == "celeriac"
    assert info["ld_library_path"] == "/opt/users/own/lib"


def test_tasks_read_devnull_and_print_to_the_log(worker, tmp_path):
    """As in a billiard pool child: sys.stdin is /dev/null, not the terminal the worker was started
    from, and what a task prints goes to the log as a warning of its pool process (the zygote
    sets both up once before the fork; children do not redo it)."""
    typed = tmp_path / "typed"
    typed.write_text("typed at the terminal\n")
    with open(typed) as stdin:
        w = worker(WORKER, stdin=stdin).wait_ready()
    marker = f"printed-{uuid.uuid4().hex}"
    assert testapp.stdin_and_output.delay(marker).get(timeout=10) == ["/dev/null", ""]
    w.wait_for(marker)
    line = next(line for line in w.log().splitlines() if marker in line)
    assert "WARNING/ForkPoolWorker-" in line, line


def test_countdown_waits_and_runs(worker, broker):
    worker(WORKER).wait_ready()
    start = time.time()
    r = testapp.add.apply_async((1, 2), countdown=4)
    # Held unacked while waiting (in kombu's unacked hash on Redis), not yet run. The countdown
    # leaves room for a slow `rabbitmqctl` on a loaded machine.
    wait_until(lambda: broker.unacked() == 1, timeout=3, what="the waiting task held unacked")
    assert r.state == "PENDING"
    assert r.get(timeout=10) == 3
    assert time.time() - start >= 3.9


def test_retry_then_success(worker):
    worker(WORKER).wait_ready()
    key = f"retry:{uuid.uuid4()}"
    assert testapp.retrying.delay(key).get(timeout=20) == 3


def test_canvas_chain_group_chord(worker):
    worker(WORKER).wait_ready()
    assert chain(testapp.add.s(1, 2), testapp.add.s(3), testapp.add.s(4))().get(timeout=20) == 10
    assert group(testapp.add.s(i, i) for i in range(5))().get(timeout=20) == [0, 2, 4, 6, 8]
    assert chord([testapp.add.s(1, 1), testapp.add.s(2, 2)], testapp.echo.s())().get(timeout=20) == {
        "args": [[2, 4]], "kwargs": {}}


def test_protocol_v1_message(worker):
    worker(WORKER).wait_ready()
    old = producer_app("old_producer")
    old.conf.task_protocol = 1
    r = old.send_task("testapp.add", (20, 22))
    assert r.get(timeout=10) == 42


def test_queues_option(worker, broker):
    worker(WORKER + ["-Q", "alpha,beta"]).wait_ready()
    assert testapp.add.apply_async((1, 1), queue="beta").get(timeout=10) == 2
    assert testapp.add.apply_async((2, 2), queue="alpha").get(timeout=10) == 4
    if broker.kind == "redis":
        # Bindings exactly as kombu declares them, so named-exchange routing reaches the queue.
        assert b"beta\x06\x16\x06\x16beta" in broker.redis.smembers("_kombu.binding.beta")
    # Not consumed from the default queue.
    r = testapp.add.apply_async((3, 3), queue="celery")
    time.sleep(1)
    assert r.state == "PENDING"
    if broker.kind == "redis":  # RabbitMQ drops it: nobody declared that queue in this vhost
        assert broker.ready("celery") == 1


@only_on("redis")
def test_priorities_use_kombu_priority_lists(worker, broker):
    # Fill the queue before the worker starts: lower number = served first on Redis.
    low = testapp.add.apply_async((0, 1), priority=9)
    high = testapp.add.apply_async((0, 2), priority=0)
    assert broker.redis.llen("celery\x06\x169") == 1 and broker.redis.llen("celery") == 1
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--prefetch-multiplier", "1"]).wait_ready()
    assert high.get(timeout=10) == 2 and low.get(timeout=10) == 1
    log = w.log()
    assert log.index(f"[{high.id}] received") < log.index(f"[{low.id}] received")


def test_acks_late_per_task_acks_after_return(worker, broker):
    worker(WORKER).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    # Long enough for rabbitmqctl, which can take over a second on a busy machine, to answer
    # while the task still runs.
    r = testapp.late_sleep.delay(3.0, marker)
    wait_started(marker)
    assert broker.unacked() == 1  # still unacked while running
    assert r.get(timeout=10) == 3.0
    time.sleep(0.2)
    assert broker.unacked() == 0


def test_early_ack_acks_at_start(worker, broker):
    worker(WORKER).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    r = testapp.sleep.delay(1.0, marker)
    wait_started(marker)
    time.sleep(0.1)
    assert broker.unacked() == 0  # acked when the child started it
    assert r.get(timeout=10) == 1.0


def test_acks_late_global_setting(worker, broker):
    worker(WORKER, env={"TESTAPP_ACKS_LATE": "1"}).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    r = testapp.sleep.delay(3.0, marker)
    wait_started(marker)
    # Unacked while it runs; the task lasts long enough for a slow `rabbitmqctl` to see it.
    wait_until(lambda: broker.unacked() == 1, timeout=2.5, what="the running task held unacked")
    assert r.get(timeout=10) == 3.0


def test_tasks_taken_one_at_a_time_leave_nothing_unacked(worker, broker):
    # Each task reaches an idle worker alone (on Redis: BRPOP, whose unacked record goes out once
    # the task is on its way to a child) and is acked late, right after it returns: every record
    # must be gone with its ack, none may land after it.
    worker(WORKER, env={"TESTAPP_ACKS_LATE": "1"}).wait_ready()
    for i in range(100):
        assert testapp.add.delay(i, i).get(timeout=10) == 2 * i
    wait_until(lambda: broker.unacked() == 0, timeout=5, what="nothing left unacknowledged")
    if broker.kind == "redis":
        assert broker.redis.zcard("unacked_index") == 0


def test_prefetch_limits_unacked(worker, broker):
    # -c 1 × multiplier 2: one running (acked early) + at most 2 held.
    worker(["-A", "testapp", "worker", "-c", "1", "--prefetch-multiplier", "2", "-l", "info"]).wait_ready()
    # Hundreds of acks first: each gives its slot back exactly once, so the window is still 2.
    assert group(testapp.add.s(i, i) for i in range(300))().get(timeout=30) == [2 * i for i in range(300)]
    marker = f"m:{uuid.uuid4()}"
    results = [testapp.sleep.delay(5.0, marker)] + [testapp.sleep.delay(0.1) for _ in range(3)]
    wait_started(marker)
    # While the first runs (acked when it started): two prefetched, one left in the queue. It runs
    # long enough for RabbitMQ's counters, read by a slow `rabbitmqctl`, to show that.
    wait_until(lambda: (broker.unacked(), broker.ready("celery")) == (2, 1), timeout=4, interval=0.1,
               what=lambda: f"2 unacked and 1 ready (saw {(broker.unacked(), broker.ready('celery'))})")
    for r in results:
        r.get(timeout=20)


def test_reject_requeue_false_stores_failure(worker):
    worker(WORKER).wait_ready()
    r = testapp.reject.delay(False)
    with pytest.raises(testapp.Reject):
        r.get(timeout=10)
    assert r.state == "FAILURE"


def test_stored_meta_matches_celery(worker, backend):
    worker(WORKER).wait_ready()
    r = testapp.add.delay(40, 2)
    assert r.get(timeout=10) == 42
    meta = json.loads(backend.get(f"celery-task-meta-{r.id}"))
    assert meta["status"] == "SUCCESS" and meta["result"] == 42 and meta["task_id"] == r.id
    assert meta["date_done"]


def test_reject_requeue_true_with_acks_late_runs_again(worker):
    worker(WORKER).wait_ready()
    key = f"rej:{uuid.uuid4()}"
    assert testapp.reject_once.delay(key).get(timeout=15) == "second time"
    assert int(testapp._redis().get(key)) == 2


def test_expired_before_it_could_run_is_revoked(worker):
    w = worker(WORKER).wait_ready()
    r = testapp.add.apply_async((1, 1), countdown=1.5, expires=0.5)
    wait_until(lambda: r.state != "PENDING", timeout=10, what="a state past PENDING")
    assert r.state == "REVOKED"
    assert f"Discarding revoked task: testapp.add[{r.id}]" in w.log()
    still = testapp.add.delay(2, 2)
    assert still.get(timeout=10) == 4
