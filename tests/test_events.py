"""Events a real `app.events.Receiver` (what Flower uses) sees from celeriac (issue: Step 4, point 2)."""

import threading
import time

import pytest

import testapp
from conftest import wait_until

NODE = "ev@testhost"


class Collector:
    """Runs celery's own event receiver in a thread and keeps every event."""

    def __init__(self):
        self.events = []
        self.ready = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)
        time.sleep(0.5)  # let the receiver bind before the worker starts

    def run(self):
        with testapp.app.connection_for_read() as conn:
            recv = testapp.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.ready.set()
            for _ in recv.itercapture(limit=None, timeout=None, wakeup=True):
                if self.stop:
                    return

    def of(self, kind, **match):
        return [e for e in self.events if e["type"] == kind and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, kind, timeout=15, **match):
        return wait_until(lambda: self.of(kind, **match), timeout=timeout,
                          what=lambda: f"a {kind} {match} (saw {[e['type'] for e in self.events]})")


@pytest.fixture
def collector(broker):
    c = Collector()
    yield c
    c.stop = True


def test_task_and_worker_events(worker, collector):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "2", "-n", NODE, "-E", "--heartbeat-interval", "1"])
    w.wait_ready()
    online = collector.wait_for("worker-online", hostname=NODE)[0]
    assert online["sw_ident"] == "py-celery" and online["freq"] == 1.0
    ok = testapp.add.delay(2, 3)
    assert ok.get(timeout=10) == 5
    bad = testapp.fail.delay("boom")
    with pytest.raises(testapp.TestError):
        bad.get(timeout=10)
    received = collector.wait_for("task-received", uuid=ok.id)[0]
    assert received["name"] == "testapp.add" and received["args"] == "(2, 3)" and received["hostname"] == NODE
    collector.wait_for("task-started", uuid=ok.id)
    succeeded = collector.wait_for("task-succeeded", uuid=ok.id)[0]
    assert succeeded["result"] == "5" and succeeded["runtime"] >= 0
    failed = collector.wait_for("task-failed", uuid=bad.id)[0]
    assert "boom" in failed["exception"] and "TestError" in failed["traceback"]
    collector.wait_for("worker-heartbeat", hostname=NODE)
    beats = collector.of("worker-heartbeat", hostname=NODE)
    assert beats[-1]["processed"] >= 2
    assert w.stop() == 0
    collector.wait_for("worker-offline", hostname=NODE)


def test_no_task_events_without_E_but_heartbeats(worker, collector):
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", NODE, "--heartbeat-interval", "0.5"]).wait_ready()
    r = testapp.add.delay(1, 1)
    assert r.get(timeout=10) == 2
    collector.wait_for("worker-heartbeat", hostname=NODE)
    time.sleep(0.5)
    assert not collector.of("task-received", uuid=r.id)
    # enable_events at run time turns them on.
    testapp.app.control.enable_events(destination=[NODE])
    time.sleep(0.3)
    r2 = testapp.add.delay(2, 2)
    assert r2.get(timeout=10) == 4
    collector.wait_for("task-succeeded", uuid=r2.id)


def test_without_heartbeat_sends_no_worker_events(worker, collector):
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", NODE, "--without-heartbeat",
            "--heartbeat-interval", "0.5"]).wait_ready()
    time.sleep(1.5)
    assert not collector.of("worker-heartbeat", hostname=NODE)
    assert not collector.of("worker-online", hostname=NODE)
