"""RabbitMQ specifics (issue: Step 2): topology shared with stock workers, QoS, priorities,
per-message expiration, connection loss, queue deletion and the rpc:// result backend."""

import subprocess
import sys
import time
import uuid

import pytest
from celery import Celery

import testapp
from conftest import BACKEND_URL, BROKER_URL, only_on, wait_started, wait_until

pytestmark = only_on("amqp")
WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]
SPECIAL = {"TESTAPP_SPECIAL_QUEUES": "1"}


def special_producer():
    """A producer that knows the special queues' arguments, as the app's own producers would."""
    p = Celery("special", broker=BROKER_URL, backend=BACKEND_URL)
    p.conf.task_queues = testapp.special_queues()
    return p


def rabbitmqctl(*args):
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def our_connections(column, name='"celeriac'):
    """`column` of this test vhost's connections whose client properties hold `name` (others,
    such as a benchmark's worker on the same broker, are not ours to count or cut)."""
    out = rabbitmqctl("list_connections", "--no-table-headers", "vhost", column, "client_properties")
    rows = [line.split("\t") for line in out.splitlines()]
    return [row[1] for row in rows if len(row) > 2 and row[0] == "celeriac-test" and name in row[2]]


def celeriac_connections():
    return our_connections("pid")


def test_declares_exactly_what_a_stock_worker_declares(worker, broker):
    # The stock worker declares the queues first (priority, quorum, TTL/expires arguments) ...
    stock = worker(["-A", "testapp", "worker", "-c", "1", "-l", "info", "-n", "stock@%h",
                    "--without-mingle", "--without-gossip", "-Q", "celery,prio,quorum_q,ttl_q"],
                   command=[sys.executable, "-m", "celery"], env=SPECIAL, name="stock")
    stock.wait_for("ready.", timeout=60)
    assert stock.stop() == 0
    # ... then celeriac re-declares them: any difference would be PRECONDITION_FAILED.
    w = worker(WORKER + ["-Q", "celery,prio,quorum_q,ttl_q"], env=SPECIAL).wait_ready()
    producer = special_producer()
    for q in ("celery", "prio", "quorum_q", "ttl_q"):
        assert producer.send_task("testapp.add", (1, 1), queue=q).get(timeout=15) == 2
    assert "PRECONDITION_FAILED" not in w.log()
    queues = rabbitmqctl("list_queues", "-p", "celeriac-test", "--no-table-headers", "name", "arguments")
    assert "x-max-priority" in queues and "quorum" in queues


def test_priority_queue_serves_highest_first(worker, broker):
    # Declare the queue (with x-max-priority) before filling it.
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-Q", "prio"], env=SPECIAL).wait_ready()
    assert w.stop() == 0
    producer = special_producer()
    low = producer.send_task("testapp.add", (0, 1), queue="prio", priority=1)
    high = producer.send_task("testapp.add", (0, 2), queue="prio", priority=9)
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--prefetch-multiplier", "1", "-Q", "prio"],
               env=SPECIAL).wait_ready()
    assert high.get(timeout=10) == 2 and low.get(timeout=10) == 1
    log = w.log()
    assert log.index(f"[{high.id}] received") < log.index(f"[{low.id}] received")


def test_message_expired_in_the_broker_never_runs(worker, broker):
    w = worker(WORKER).wait_ready()  # declares the queue
    assert w.stop() == 0
    r = testapp.add.apply_async((1, 1), expires=0.5)  # `expiration` property: RabbitMQ drops it
    time.sleep(1.5)
    worker(WORKER).wait_ready()
    assert testapp.add.delay(2, 2).get(timeout=10) == 4
    assert r.state == "PENDING"


def test_waiting_eta_tasks_raise_the_qos(worker, broker):
    # Prefetch 1: without raising QoS per waiting ETA task, the immediate task would wait 3 s.
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--prefetch-multiplier", "1"]).wait_ready()
    later = [testapp.add.apply_async((i, 0), countdown=3) for i in range(3)]
    time.sleep(0.5)
    start = time.time()
    assert testapp.add.delay(5, 5).get(timeout=10) == 10
    assert time.time() - start < 2
    assert [r.get(timeout=15) for r in later] == [0, 1, 2]


def task_channel_qos():
    """The QoS RabbitMQ holds for the task connection's consumer and channel:
    (the consumer's prefetch_count, the channel's global_prefetch_count)."""
    consumers = rabbitmqctl("list_consumers", "-p", "celeriac-test", "--no-table-headers",
                            "queue_name", "channel_pid", "prefetch_count")
    on_celery = [line.split("\t") for line in consumers.splitlines() if line.startswith("celery\t")]
    assert len(on_celery) == 1, consumers
    _, channel, consumer_limit = on_celery[0]
    channels = rabbitmqctl("list_channels", "--no-table-headers", "pid", "global_prefetch_count")
    global_limit = next(line.split("\t")[1] for line in channels.splitlines() if line.startswith(channel + "\t"))
    return int(consumer_limit), int(global_limit)


def test_one_queue_takes_its_prefetch_per_consumer_until_it_changes(worker, broker):
    # One queue: the window is set on the consumer (cheaper for RabbitMQ, the same limit) ...
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--prefetch-multiplier", "2"]).wait_ready()
    assert task_channel_qos() == (2, 0)
    marker = f"m:{uuid.uuid4()}"
    sleeping = [testapp.sleep.delay(0.3, marker) for _ in range(8)]
    wait_started(marker)
    time.sleep(0.5)
    assert broker.unacked() <= 2, "more taken than the window"  # the running task is acked
    # ... and, when the prefetch count first changes (an ETA task waits: stock raises the QoS),
    # on the channel, as stock sets it, with the consumer restarted without a limit of its own.
    assert [r.get(timeout=20) for r in sleeping] == [0.3] * 8
    later = testapp.add.apply_async((1, 2), countdown=5)  # rabbitmqctl takes a second a call
    wait_until(lambda: task_channel_qos() == (0, 3), timeout=10, what="the channel's QoS raised")
    assert testapp.add.delay(2, 3).get(timeout=10) == 5
    assert later.get(timeout=10) == 3
    wait_until(lambda: task_channel_qos() == (0, 2), timeout=10, what="the channel's QoS lowered again")
    assert testapp.add.delay(2, 2).get(timeout=10) == 4
    assert "Connection to broker lost" not in w.log()
    assert w.stop() == 0


def test_connection_closed_by_the_broker_mid_load(worker, broker):
    w = worker(WORKER).wait_ready()
    key = f"ran:{uuid.uuid4()}"
    ids = [testapp.count.delay(key).id for _ in range(3000)]
    runs = testapp._redis()
    for _ in range(2):
        deadline = time.time() + 20
        while runs.hlen(key) < 300 * (_ + 1) and time.time() < deadline:
            time.sleep(0.02)
        for pid in celeriac_connections():
            rabbitmqctl("close_connection", pid, "test: cut the connection")
        w.wait_for("Connection to broker lost")
    wait_until(lambda: runs.hlen(key) >= len(ids), timeout=90, interval=0.1,
               what=lambda: f"every task run ({len(ids) - runs.hlen(key)} never ran)")
    done = {k.decode() for k in runs.hkeys(key)}
    assert done == set(ids), f"{len(set(ids) - done)} tasks never ran"
    assert w.log().count("Connected to") >= 2  # reconnected
    assert testapp.add.delay(1, 2).get(timeout=10) == 3


def task_connection_frame_max():
    return [int(v) for v in our_connections("frame_max", '"celeriac"')]


def test_headers_larger_than_a_frame_are_taken_as_they_come(worker, broker):
    # A message's headers travel in one frame that cannot be split, and RabbitMQ sends it even
    # when it is larger than the frames the connection asked for (lapin, and py-amqp, close the
    # connection then). The task connection takes it: no reconnect, nothing redelivered.
    w = worker(WORKER, env={"TESTAPP_TRANSPORT_OPTIONS": '{"frame_max": 16384}'}).wait_ready()
    assert task_connection_frame_max() == [16384]
    big = [testapp.add.apply_async((i, 1), headers={"x-big": "x" * 65536}) for i in range(2)]
    small = [testapp.add.delay(i, 2) for i in range(20)]
    assert [r.get(timeout=30) for r in big] == [1, 2]
    assert [r.get(timeout=30) for r in small] == [i + 2 for i in range(20)]
    assert testapp.add.apply_async((5, 5), headers={"x-big": "y" * 100_000}).get(timeout=10) == 10
    assert task_connection_frame_max() == [16384]
    assert "Connection to broker lost" not in w.log() and w.log().count("Connected to") == 1
    assert w.stop() == 0


def test_task_connection_asks_for_frames_as_py_amqp_does(worker, broker):
    # 128 KiB by default, as py-amqp; broker_transport_options['frame_max'] (which kombu hands
    # to py-amqp) sets it, 0 meaning the largest.
    w = worker(WORKER).wait_ready()
    assert testapp.add.delay(2, 3).get(timeout=10) == 5
    assert task_connection_frame_max() == [131072]
    assert w.stop() == 0
    w = worker(WORKER, env={"TESTAPP_TRANSPORT_OPTIONS": '{"frame_max": 0}'}).wait_ready()
    assert testapp.add.delay(2, 3).get(timeout=10) == 5
    assert task_connection_frame_max() == [131072]
    assert w.stop() == 0


def test_idle_task_connection_keeps_its_heartbeats(worker, broker):
    # With a 2 s heartbeat RabbitMQ closes a connection that stays silent for 4 s; the task
    # connection (celeriac's own client) sends them while nothing else happens.
    w = worker(WORKER, env={"TESTAPP_BROKER_HEARTBEAT": "2"}).wait_ready()
    assert our_connections("timeout", '"celeriac"') == ["2"]
    time.sleep(7)
    assert "Connection to broker lost" not in w.log(), w.log()[-2000:]
    assert testapp.add.delay(3, 4).get(timeout=10) == 7
    assert w.log().count("Connected to") == 1
    assert w.stop() == 0


def test_warm_shutdown_closes_every_connection_cleanly(worker, broker):
    # Tasks, remote control and gossip each have a connection; all are closed (connection.close)
    # before the process ends, so none fails on the way out and logs an error, and mingle's
    # unrouted hello (no other worker) is not reported as a returned message.
    w = worker(WORKER).wait_ready()
    key = f"ran:{uuid.uuid4()}"
    ids = [testapp.count.delay(key).id for _ in range(2000)]
    runs = testapp._redis()
    wait_until(lambda: runs.hlen(key) == len(ids), timeout=60,
               what=lambda: f"all {len(ids)} tasks run (ran {runs.hlen(key)})")
    assert len(celeriac_connections()) >= 3
    assert w.stop() == 0
    log = w.log()
    assert "ERROR" not in log, log[-3000:]
    assert "BasicReturnMessage" not in log
    wait_until(lambda: celeriac_connections() == [], timeout=10, interval=0.2,
               what=lambda: f"no connection left (still {celeriac_connections()})")


def test_queue_deleted_under_the_consumer(worker, broker):
    w = worker(WORKER).wait_ready()
    assert testapp.add.delay(1, 1).get(timeout=10) == 2
    rabbitmqctl("delete_queue", "-p", "celeriac-test", "celery")
    time.sleep(1)
    assert w.proc.poll() is None
    # The worker re-declares and consumes again.
    deadline = time.time() + 20
    while "celery" not in broker._queues() and time.time() < deadline:
        time.sleep(0.2)
    assert testapp.add.delay(2, 2).get(timeout=15) == 4


def test_rpc_result_backend(worker, broker):
    worker(WORKER, env={"CELERIAC_TEST_BACKEND": "rpc://"}).wait_ready()
    producer = Celery("rpc_producer", broker=BROKER_URL, backend="rpc://")
    assert producer.send_task("testapp.add", (20, 22)).get(timeout=15) == 42
    with pytest.raises(Exception) as info:
        producer.send_task("testapp.fail", ("over rpc",)).get(timeout=15)
    assert "over rpc" in str(info.value)
    assert BACKEND_URL  # results of the other tests stay on Redis



def test_cancel_long_running_tasks_on_connection_loss(worker, broker):
    w = worker(WORKER, env={"TESTAPP_CANCEL_ON_LOSS": "1"}).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    r = testapp.late_sleep.delay(3, marker)
    wait_started(marker, 1)
    for pid in celeriac_connections():
        rabbitmqctl("close_connection", pid, "test: cut the connection")
    w.wait_for("Terminating it instead")
    # Marked RETRY ("cancelled by Celery") at once, then redelivered by the broker and run again.
    wait_until(lambda: r.state == "RETRY", timeout=10, what=lambda: f"state RETRY (is {r.state})")
    assert r.get(timeout=30) == 3
    assert testapp._redis().lrange(marker, 0, -1).count(b"start") == 2


def test_without_cancel_a_running_acks_late_task_finishes_and_runs_again(worker, broker):
    w = worker(WORKER).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    r = testapp.late_sleep.delay(2, marker)
    wait_started(marker, 1)
    for pid in celeriac_connections():
        rabbitmqctl("close_connection", pid, "test: cut the connection")
    w.wait_for("can't be acknowledged after the connection loss")
    assert r.get(timeout=30) == 2
    wait_started(marker, 2)  # at least once: the broker redelivered it


@pytest.fixture
def tls_proxy(test_ca):
    """A TLS endpoint in front of RabbitMQ (socat), with a certificate from a CA of our own."""
    import shutil
    import socket

    if not shutil.which("socat"):
        pytest.fail("socat is needed for the amqps test (.ci/run installs it)")
    ca, cert, key = test_ca
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = subprocess.Popen(["socat", f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={cert},key={key},verify=0",
                              "TCP:127.0.0.1:5672"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield port, ca
    proxy.terminate()
    proxy.wait(10)


def test_amqps_with_the_apps_ca(worker, broker, tls_proxy):
    port, ca = tls_proxy
    url = f"amqps://guest:guest@127.0.0.1:{port}/celeriac-test"
    w = worker(WORKER, env={"CELERIAC_TEST_BROKER": url, "TESTAPP_BROKER_CA": str(ca)}).wait_ready()
    assert f"amqps://guest:**@127.0.0.1:{port}/celeriac-test" in w.log()
    assert testapp.add.delay(20, 22).get(timeout=15) == 42  # produced over plain AMQP, same vhost
    assert testapp.app.control.ping(timeout=2)  # the mailbox connection is TLS too
