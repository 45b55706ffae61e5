"""The zero-server `filesystem://` transport (issue: Step 6, points 5-6), kombu's folder layout.

A real Celery producer configured with `broker_url='filesystem://'` and kombu's folder options
writes the messages; celeriac consumes them; results go to Redis. These run in the folder pass
of the suite, which also runs the shared scenarios on the folder transport.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
from celery import Celery, chord

import testapp
from conftest import APPS, BACKEND_URL, BROKER_KIND, folder_options, share_one_queue, wait_started, wait_until

pytestmark = pytest.mark.skipif(BROKER_KIND != "filesystem", reason="the folder's own scenarios run in its pass")

NODE = "fs@testhost"


@pytest.fixture
def fs(tmp_path):
    folder = tmp_path / "broker"
    options = folder_options(folder)
    # kombu keeps the folder transport's bindings in one state per process: this test's fresh
    # folder has none, whatever the suite's other producers declared before.
    from kombu.transport.filesystem import Transport

    Transport.global_state.clear()
    app = Celery("producer", broker="filesystem://", backend=BACKEND_URL)
    app.conf.broker_transport_options = options
    env = {"CELERIAC_TEST_BROKER": "filesystem://", "TESTAPP_TRANSPORT_OPTIONS": json.dumps(options)}
    yield SimpleNamespace(app=app, env=env, queue=folder / "queue", control=folder / "control", options=options)
    app.close()


def start(worker, fs, *extra, node=NODE, env=None, **kw):
    args = ["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", node, *extra]
    return worker(args, env={**fs.env, **(env or {})}, **kw)


def waiting(fs, queue="celery"):
    return sorted(p.name for p in fs.queue.glob(f"*.{queue}.msg"))


def held(fs):
    return sorted(p.name for p in (fs.queue / ".celeriac-unacked").rglob("*.msg"))


def send(fs, name, *args, **options):
    return fs.app.send_task(f"testapp.{name}", args, **options)


def test_stock_producer_layout_eta_and_canvas(worker, broker, fs):
    r = send(fs, "add", 2, 3)
    # Written by kombu's producer as kombu lays it out: one file per message, a binding table.
    [name] = waiting(fs)
    assert name.split("_")[0].isdigit() and name.endswith(".celery.msg")
    assert json.loads((fs.control / "celery.exchange").read_text()) == [["celery", "", "celery"]]
    envelope = json.loads((fs.queue / name).read_text())
    assert envelope["headers"]["task"] == "testapp.add"
    start(worker, fs).wait_ready()
    assert r.get(timeout=10) == 5
    wait_until(lambda: not waiting(fs) and not held(fs))
    sent = time.time()
    assert send(fs, "add", 1, 1, countdown=1).get(timeout=10) == 2
    assert time.time() - sent >= 0.9
    add = fs.app.signature("testapp.add")
    assert (add.clone((1, 2)) | add.clone((10,))).apply_async().get(timeout=10) == 13
    result = chord([add.clone((i, i)) for i in range(5)], fs.app.signature("testapp.echo")).apply_async()
    assert result.get(timeout=10) == {"args": [[0, 2, 4, 6, 8]], "kwargs": {}}


def test_remote_control_and_events_through_the_folders(worker, broker, fs):
    w = start(worker, fs, "-E").wait_ready()
    assert fs.app.control.ping(destination=[NODE], timeout=2) == [{NODE: {"ok": "pong"}}]
    assert "testapp.add" in fs.app.control.inspect(destination=[NODE], timeout=2).registered()[NODE]
    # The stock CLI, configured through the same app.
    cli = subprocess.run([sys.executable, "-m", "celery", "-A", "testapp", "inspect", "ping", "-d", NODE],
                         cwd=APPS, env={**os.environ, **fs.env}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "pong" in cli.stdout, cli.stdout + cli.stderr
    # Task events reach a stock event receiver bound to the `celeryev` exchange.
    seen = []
    with fs.app.connection_for_read() as conn:
        recv = fs.app.events.Receiver(conn, handlers={"*": seen.append})
        r = None
        deadline = time.time() + 15
        # Heartbeats arrive every 2 s: the first event comes within the timeout.
        for _ in recv.itercapture(limit=None, timeout=10, wakeup=False):
            if r is None:
                r = send(fs, "add", 4, 4)
            if any(e.get("type") == "task-succeeded" and e.get("uuid") == r.id for e in seen) or time.time() > deadline:
                break
    assert r.get(timeout=10) == 8
    types = {e["type"] for e in seen if e.get("uuid") == r.id}
    assert {"task-received", "task-started", "task-succeeded"} <= types, types
    assert any(e["type"] == "worker-heartbeat" and e["hostname"] == NODE for e in seen)
    assert w.stop() == 0
    # The mailbox is unbound when the worker leaves.
    assert NODE not in (fs.control / "celery.pidbox.exchange").read_text()


def test_a_killed_worker_gets_the_messages_it_held_back(worker, broker, fs):
    w = start(worker, fs).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    late = send(fs, "late_sleep", 2, marker)
    wait_started(marker)  # (messages sent in the same millisecond have no order among them)
    adds = [send(fs, "add", i, i) for i in range(2)]
    wait_until(lambda: len(held(fs)) == 3)  # the running acks_late task and two prefetched
    os.killpg(w.pid, signal.SIGKILL)
    w.proc.wait(10)
    assert len(held(fs)) == 3 and waiting(fs) == []
    w = start(worker, fs).wait_ready()
    assert late.get(timeout=20) == 2
    assert [r.get(timeout=10) for r in adds] == [0, 2]
    assert testapp._redis().lrange(marker, 0, -1).count(b"start") == 2  # acks_late: run again
    assert "Restored 3 message(s)" in w.log()
    wait_until(lambda: not held(fs) and not waiting(fs))


def test_warm_shutdown_gives_prefetched_back_to_the_front(worker, broker, fs):
    w = start(worker, fs, "--prefetch-multiplier", "4").wait_ready()
    marker = f"m:{uuid.uuid4()}"
    running = send(fs, "sleep", 1.5, marker)
    wait_started(marker)
    adds = [send(fs, "add", i, 1) for i in range(3)]
    wait_until(lambda: len(held(fs)) == 3)
    names = held(fs)
    w.signal(signal.SIGTERM)
    assert w.wait_exit(20) == 0
    assert running.get(timeout=5) == 1.5
    # Back under their own names (the front of the queue), marked redelivered.
    assert waiting(fs) == names and held(fs) == []
    assert json.loads((fs.queue / names[0]).read_text())["properties"]["delivery_info"]["redelivered"] is True
    start(worker, fs).wait_ready()
    assert [r.get(timeout=10) for r in adds] == [1, 2, 3]


def test_reject_requeue_store_processed_and_bad_files(worker, broker, tmp_path, fs):
    options = dict(fs.options, store_processed=True, processed_folder=str(tmp_path / "processed"))
    w = start(worker, fs, env={"TESTAPP_TRANSPORT_OPTIONS": json.dumps(options)}).wait_ready()
    # A file that is no kombu envelope: reported and removed, and the worker keeps serving.
    (fs.queue / f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}.celery.msg").write_text("not json")
    w.wait_for("not a kombu envelope")
    key = f"k:{uuid.uuid4()}"
    assert send(fs, "reject_once", key).get(timeout=15) == "second time"
    r = send(fs, "add", 20, 22)
    assert r.get(timeout=10) == 42
    # Acknowledged messages are kept in `processed_folder`, as kombu's `store_processed` does.
    wait_until(lambda: len(list((tmp_path / "processed").glob("*.celery.msg"))) >= 3)
    assert not waiting(fs)


def test_a_stock_worker_shares_the_folder(worker, broker, backend, fs):
    stock = start(worker, fs, "-c", "2", node="stock@testhost", command=[sys.executable, "-m", "celery"], name="stock")
    ours = start(worker, fs, "-c", "2", name="celeriac")
    share_one_queue(stock, ours, fs.app, backend, tasks=400, timeout=60)
    assert not waiting(fs) and not held(fs)


def test_beat_replicas_send_once_under_a_folder_lock(worker, broker, tmp_path, fs):
    """`-B` on two workers sharing the folder: the leader lock is a `flock` in the control
    folder, so one sends; when it is killed the other takes over within seconds."""
    from datetime import datetime

    runs = testapp._redis()
    runs.delete("beat:runs")

    def replica(node):
        (tmp_path / node).mkdir()
        args = ["-A", "beatapp", "worker", "-l", "info", "-c", "1", "-n", f"{node}@testhost", "-B",
                "-s", str(tmp_path / node / "schedule")]
        env = {**fs.env, "BEATAPP_INTERVAL": "1", "BEATAPP_MAX_INTERVAL": "0.2"}
        return worker(args, env=env, name=node).wait_ready()

    def sent():
        entries = [json.loads(x) for x in runs.lrange("beat:runs", 0, -1)]
        return sorted(datetime.fromisoformat(e["at"]) for e in entries if e["name"] == "every")

    a, b = replica("a"), replica("b")
    time.sleep(5)
    gaps = [(y - x).total_seconds() for x, y in zip(sent(), sent()[1:])]
    assert len(gaps) >= 2 and all(g > 0.7 for g in gaps), gaps  # one sender, never two at once
    leader, follower = (a, b) if "took the leader lock" in a.log() else (b, a)
    assert "took the leader lock" not in follower.log()
    before = len(sent())
    os.killpg(leader.pid, signal.SIGKILL)
    follower.wait_for("took the leader lock", timeout=15)
    wait_until(lambda: len(sent()) >= before + 3, timeout=20)
