"""A stock `celery worker` and celeriac share one Redis broker: no task lost, none run twice."""

import signal
import sys
import time
import uuid

import testapp

TASKS = 2000


def test_stock_worker_and_celeriac_share_a_queue(worker, broker):
    stock = worker(["-A", "testapp", "worker", "-c", "2", "-l", "info", "-n", "stock@%h",
                    "--without-mingle", "--without-gossip"],
                   command=[sys.executable, "-m", "celery"], name="stock")
    ours = worker(["-A", "testapp", "worker", "-c", "2", "-l", "info", "-n", "celeriac@%h"], name="celeriac")
    stock.wait_for("ready.", timeout=60)
    ours.wait_ready()
    key = f"ran:{uuid.uuid4()}"
    ids = {testapp.count.delay(key).id for _ in range(TASKS)}
    runs = testapp._redis()
    deadline = time.time() + 120
    while runs.hlen(key) < TASKS and time.time() < deadline:
        time.sleep(0.1)
    counts = {k.decode(): int(v) for k, v in runs.hgetall(key).items()}
    assert set(counts) == ids, f"{len(ids - set(counts))} tasks never ran"
    assert set(counts.values()) == {1}, "some tasks ran twice"
    assert "succeeded in" in stock.log() and "succeeded in" in ours.log(), "both workers should have run tasks"
    time.sleep(0.5)
    assert broker.ready("celery") == 0 and broker.unacked() == 0
    assert ours.stop(signal.SIGTERM) == 0
    assert stock.stop(signal.SIGTERM) == 0
