"""kombu's ack emulation on Redis: the visibility-timeout sweep restores messages of a dead worker,
and messages a live celeriac worker holds are kept fresh instead of being redelivered."""

import json
import time
import uuid

import testapp
from conftest import only_on
from test_bad_input import envelope, v2_headers

FAST_SWEEP = json.dumps({"visibility_timeout": 2, "unacked_restore_interval": 0.5, "unacked_restore_throttle": 1})
WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "1"]


@only_on("redis")
def test_dead_workers_unacked_message_is_restored_and_runs(worker, broker):
    # What a worker that crashed mid-prefetch leaves behind (reference §2.6).
    task_id = str(uuid.uuid4())
    env = json.loads(envelope(b"[[20, 22], {}, {}]", v2_headers("testapp.add", task_id)))
    tag = env["properties"]["delivery_tag"]
    broker.redis.hset("unacked", tag, json.dumps([env, "", "celery"]))
    broker.redis.zadd("unacked_index", {tag: time.time() - 60})
    w = worker(WORKER, env={"TESTAPP_TRANSPORT_OPTIONS": FAST_SWEEP}).wait_ready()
    assert testapp.app.AsyncResult(task_id).get(timeout=15) == 42
    assert "Restored 1 unacknowledged message" in w.log()
    assert broker.unacked() == 0


@only_on("redis")
def test_waiting_eta_task_is_not_redelivered(worker, broker):
    # Stock kombu would restore this message after 2 s and run the task twice.
    w = worker(WORKER, env={"TESTAPP_TRANSPORT_OPTIONS": FAST_SWEEP}).wait_ready()
    key = f"count:{uuid.uuid4()}"
    r = testapp.count.apply_async((key,), countdown=5)
    w.wait_for(f"[{r.id}] received")
    time.sleep(3.5)
    # Older than the visibility timeout, yet its index entry is fresh: no sweep (a stock
    # worker's included, which does not know what we hold) will restore it.
    [(tag, score)] = broker.redis.zrange("unacked_index", 0, -1, withscores=True)
    assert time.time() - score < 2
    assert r.get(timeout=20) == 1
    time.sleep(1)
    assert testapp._redis().hgetall(key) == {r.id.encode(): b"1"}
    assert w.log().count(f"[{r.id}] received") == 1


def test_multiprocessing_inside_a_task(worker):
    worker(WORKER).wait_ready()
    assert testapp.uses_multiprocessing.delay().get(timeout=20) == 7
