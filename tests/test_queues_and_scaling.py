"""Changing what a running worker does, as operators do with the stock worker (issue: Step 4,
points 1, 3 and 4): `add_consumer` / `cancel_consumer`, `--autoscale` and the `autoscale`
command, and gossip between workers — with the real `celery control` commands and
`app.control`, on every broker."""

import os
import signal
import subprocess
import sys
import time
import uuid

import testapp
from conftest import APPS, needs, wait_started, wait_until

NODE = "ops@testhost"


def control(*args):
    """Run `celery -A testapp control ...` as an operator would."""
    out = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "control", *args, "-d", NODE],
                         cwd=APPS, env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def stats():
    return testapp.app.control.inspect(destination=[NODE], timeout=2).stats()[NODE]


@needs("remote_control")
def test_add_and_cancel_consumer(worker, broker):
    # `extra` is one of the app's queues (defined, excluded with -X); `adhoc` is not defined at all.
    env = {"TESTAPP_QUEUES": "celery,extra"}
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", NODE, "-X", "extra"], env=env)
    w.wait_ready()
    queues = lambda: [q["name"] for q in testapp.app.control.inspect(destination=[NODE], timeout=2).active_queues()[NODE]]  # noqa: E731
    assert queues() == ["celery"]
    waiting = testapp.add.apply_async((1, 2), queue="extra")
    time.sleep(1)
    assert waiting.state == "PENDING"

    assert "add consumer extra" in control("add_consumer", "extra")
    assert waiting.get(timeout=15) == 3
    w.wait_for("Started consuming from extra")
    assert queues() == ["celery", "extra"]

    reply = testapp.app.control.add_consumer("adhoc", destination=[NODE], reply=True)
    assert reply == [{NODE: {"ok": "add consumer adhoc"}}]
    assert testapp.add.apply_async((2, 3), queue="adhoc").get(timeout=15) == 5
    assert queues() == ["celery", "extra", "adhoc"]

    reply = testapp.app.control.cancel_consumer("extra", destination=[NODE], reply=True)
    assert reply == [{NODE: {"ok": "no longer consuming from extra"}}]
    w.wait_for("Canceling queue extra")
    assert queues() == ["celery", "adhoc"]
    left = testapp.add.apply_async((5, 5), queue="extra")
    time.sleep(1.5)
    assert left.state == "PENDING" and broker.ready("extra") == 1
    # The other queues are still served; and the message is there for whoever consumes `extra`.
    assert testapp.add.delay(1, 1).get(timeout=15) == 2
    assert "add consumer extra" in control("add_consumer", "extra")
    assert left.get(timeout=15) == 10
    assert "no longer consuming from adhoc" in control("cancel_consumer", "adhoc")
    # With every queue cancelled the worker idles, and wakes for the next add_consumer.
    assert "no longer consuming from extra" in control("cancel_consumer", "extra")
    assert "no longer consuming from celery" in control("cancel_consumer", "celery")
    assert queues() == []
    idle = testapp.add.delay(3, 4)
    time.sleep(1.5)
    assert idle.state == "PENDING"
    assert "add consumer celery" in control("add_consumer", "celery")
    assert idle.get(timeout=15) == 7


@needs("remote_control")
def test_autoscale_grows_with_load_and_shrinks_after_keepalive(worker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-n", NODE, "--autoscale", "3,1"],
               env={"AUTOSCALE_KEEPALIVE": "1"})
    w.wait_ready()
    s = stats()
    assert s["autoscaler"] == {"max": 3, "min": 1, "current": 1, "qty": 0}
    assert len(s["pool"]["processes"]) == 1
    assert s["prefetch_count"] == 3 * 4  # the largest pool's window, as stock
    marker = f"m:{uuid.uuid4()}"
    running = [testapp.sleep.delay(3, marker) for _ in range(3)]
    wait_started(marker, count=3, timeout=20)  # three at once: the pool grew to max
    w.wait_for("Scaling up")
    assert len(stats()["pool"]["processes"]) == 3
    assert [r.get(timeout=20) for r in running] == [3, 3, 3]
    # Idle for longer than the keepalive: back to the minimum.
    wait_until(lambda: stats()["autoscaler"]["current"] == 1, timeout=15, what="shrink to min")
    w.wait_for("Scaling down 2 processes.")
    assert testapp.add.delay(2, 2).get(timeout=15) == 4

    assert "autoscale now max=2 min=2" in control("autoscale", "2", "2")
    wait_until(lambda: len(stats()["pool"]["processes"]) == 2, timeout=15, what="grow to the new min")
    assert stats()["prefetch_count"] == 2 * 4
    refused = testapp.app.control.pool_grow(1, reply=True, destination=[NODE])
    assert refused == [{NODE: {"error": "pool_grow is not supported with autoscale. Adjust autoscale range instead."}}]


@needs("remote_control")
def test_autoscale_command_without_autoscale_is_an_error(worker):
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", NODE]).wait_ready()
    reply = testapp.app.control.autoscale(4, 1, destination=[NODE], reply=True)
    assert reply == [{NODE: {"error": "ValueError('Autoscale not enabled')"}}]


@needs("gossip")
def test_gossip_follows_other_workers(worker):
    ours = worker(["-A", "testapp", "worker", "-l", "debug", "-c", "1", "-n", NODE], name="ours").wait_ready()
    peer = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", "peer@testhost"], name="peer")
    peer.wait_ready()
    ours.wait_for("peer@testhost joined the party", timeout=10)
    # A stock worker hears our heartbeats as its own gossip does, and we hear it.
    stock = worker(["-A", "testapp", "worker", "-c", "1", "-l", "debug", "-n", "stock@testhost"],
                   command=[sys.executable, "-m", "celery"], name="stock")
    stock.wait_ready(timeout=60)
    ours.wait_for("stock@testhost joined the party", timeout=10)
    stock.wait_for(f"{NODE} joined the party", timeout=10)
    stock.stop()
    ours.wait_for("stock@testhost left", timeout=10)
    # A peer that dies without a word is noticed once its heartbeats stop (2 s × 2).
    os.killpg(peer.pid, signal.SIGKILL)
    ours.wait_for("missed heartbeat from peer@testhost", timeout=15)
    assert "missed heartbeat from stock@testhost" not in ours.log()


@needs("gossip")
def test_without_gossip(worker):
    ours = worker(["-A", "testapp", "worker", "-l", "debug", "-c", "1", "-n", NODE, "--without-gossip"],
                  name="ours").wait_ready()
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", "peer@testhost"], name="peer").wait_ready()
    time.sleep(3)
    assert "joined the party" not in ours.log()
