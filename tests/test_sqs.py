"""Amazon SQS (issue: Step 6, points 1-4), against moto's SQS server on 127.0.0.1 started here.

A real Celery producer uses kombu's SQS transport (boto3) with the same URL and transport
options as the worker; results go to Redis. Each test has queues of its own (a fresh
`queue_name_prefix`). These run in the SQS pass of the suite, which also runs the shared
scenarios on SQS (conftest starts moto's server for it).
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
from kombu import Queue

import conftest
import testapp
from conftest import BACKEND_URL, BROKER_KIND, share_one_queue, wait_started, wait_until

pytestmark = pytest.mark.skipif(BROKER_KIND != "sqs", reason="SQS's own scenarios run in the SQS pass")

NODE = "sqs@testhost"


@pytest.fixture
def moto():
    return conftest.MOTO_ENDPOINT


@pytest.fixture
def sqs(moto):
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    url = f"sqs://test:test@{moto.split('//')[1]}"
    options = conftest.sqs_options(prefix)
    client = conftest.sqs_client(moto)
    made = []

    def producer(**more):
        app = Celery("producer", broker=url, backend=BACKEND_URL)
        app.conf.broker_transport_options = {**options, **more}
        made.append(app)
        return app

    def env(**more):
        return {"CELERIAC_TEST_BROKER": url, "TESTAPP_TRANSPORT_OPTIONS": json.dumps({**options, **more})}

    yield SimpleNamespace(url=url, prefix=prefix, client=client, producer=producer, env=env, app=producer())
    for app in made:
        app.close()


def start(worker, sqs, *extra, node=NODE, options=None, **kw):
    args = ["-A", "testapp", "worker", "-l", "info", "-c", "1", "-n", node, *extra]
    return worker(args, env={**sqs.env(**(options or {})), **kw.pop("env", {})}, **kw)


def queue_url(sqs, name="celery"):
    return sqs.client.get_queue_url(QueueName=f"{sqs.prefix}{name}")["QueueUrl"]


def counts(sqs, name="celery"):
    attrs = sqs.client.get_queue_attributes(
        QueueUrl=queue_url(sqs, name),
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def send(app, name, *args, **options):
    return app.send_task(f"testapp.{name}", args, **options)


def test_stock_producer_layout_eta_and_canvas(worker, broker, sqs):
    r = send(sqs.app, "add", 2, 3)
    # kombu created the queue under its mapped name and wrote base64 of the JSON envelope.
    msg = sqs.client.receive_message(QueueUrl=queue_url(sqs), VisibilityTimeout=0)["Messages"][0]
    import base64

    envelope = json.loads(base64.b64decode(msg["Body"]))
    assert envelope["headers"]["task"] == "testapp.add"
    w = start(worker, sqs).wait_ready()
    assert "Remote control is not available on SQS" in w.log()
    assert r.get(timeout=20) == 5
    wait_until(lambda: counts(sqs) == (0, 0))  # acknowledged = deleted
    sent = time.time()
    assert send(sqs.app, "add", 1, 1, countdown=1).get(timeout=20) == 2
    assert time.time() - sent >= 0.9
    add = sqs.app.signature("testapp.add")
    assert (add.clone((1, 2)) | add.clone((10,))).apply_async().get(timeout=20) == 13
    result = chord([add.clone((i, i)) for i in range(5)], sqs.app.signature("testapp.echo")).apply_async()
    assert result.get(timeout=20) == {"args": [[0, 2, 4, 6, 8]], "kwargs": {}}
    # Queue names are mapped as kombu maps them: dots become dashes.
    dotted = sqs.producer()
    dotted.conf.task_queues = [Queue("reports.daily")]
    start(worker, sqs, "-Q", "reports.daily", node="dotted@testhost",
          env={"TESTAPP_QUEUES": "reports.daily"}, name="dotted").wait_ready()
    assert dotted.send_task("testapp.add", (3, 4), queue="reports.daily").get(timeout=20) == 7
    assert queue_url(sqs, "reports-daily").endswith(f"/{sqs.prefix}reports-daily")


def test_visibility_is_extended_while_tasks_wait_and_run(worker, broker, sqs):
    # A 2 s visibility timeout: stock would hand these to the worker again while they run
    # (5 s) or wait for their ETA (4 s); celeriac keeps them invisible while it holds them.
    start(worker, sqs, "-c", "2", options={"visibility_timeout": 2}).wait_ready()
    key = f"runs:{uuid.uuid4()}"
    running = send(sqs.app, "late_count_slowly", key, 5)
    waiting = send(sqs.app, "count_slowly", key, 0, countdown=4)
    assert running.get(timeout=30) == 1 and waiting.get(timeout=30) == 1
    time.sleep(3)
    runs = {k.decode(): int(v) for k, v in testapp._redis().hgetall(key).items()}
    assert runs == {running.id: 1, waiting.id: 1}


def test_a_killed_worker_messages_come_back_after_the_visibility_timeout(worker, broker, sqs):
    w = start(worker, sqs, options={"visibility_timeout": 2}).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    late = send(sqs.app, "late_sleep", 1, marker)
    wait_started(marker)
    os.killpg(w.pid, signal.SIGKILL)
    w.proc.wait(10)
    start(worker, sqs, options={"visibility_timeout": 2}).wait_ready()
    assert late.get(timeout=30) == 1
    assert testapp._redis().lrange(marker, 0, -1).count(b"start") == 2  # acks_late: it ran again


def test_warm_shutdown_releases_prefetched_at_once(worker, broker, sqs):
    w = start(worker, sqs, "--prefetch-multiplier", "4").wait_ready()
    marker = f"m:{uuid.uuid4()}"
    running = send(sqs.app, "sleep", 1.5, marker)
    wait_started(marker)  # (SQS does not keep the order of standard queues)
    adds = [send(sqs.app, "add", i, 1) for i in range(3)]
    wait_until(lambda: counts(sqs)[1] == 3)  # the three adds, prefetched and invisible
    w.signal(signal.SIGTERM)
    assert w.wait_exit(30) == 0
    assert running.get(timeout=5) == 1.5
    # Visible again at once, not after the 30 s visibility timeout.
    wait_until(lambda: counts(sqs) == (3, 0), timeout=5)
    start(worker, sqs).wait_ready()
    assert [r.get(timeout=20) for r in adds] == [1, 2, 3]


def test_reject_requeue_unknown_tasks_and_foreign_bodies(worker, broker, sqs):
    w = start(worker, sqs).wait_ready()
    key = f"k:{uuid.uuid4()}"
    assert send(sqs.app, "reject_once", key).get(timeout=20) == "second time"
    unknown = sqs.app.send_task("testapp.no_such_task", ())
    with pytest.raises(Exception, match="no_such_task"):
        unknown.get(timeout=20)
    # A body no kombu producer wrote: wrapped as kombu does, then refused as a malformed
    # message (no task headers) and deleted; the worker goes on.
    sqs.client.send_message(QueueUrl=queue_url(sqs), MessageBody="plain text")
    assert send(sqs.app, "add", 20, 22).get(timeout=20) == 42
    wait_until(lambda: counts(sqs) == (0, 0))
    assert "no_such_task" in w.log()


def test_fifo_and_predefined_queues(worker, broker, sqs):
    fifo = f"{sqs.prefix}jobs.fifo"
    sqs.client.create_queue(QueueName=fifo, Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"})
    producer = sqs.producer()
    producer.conf.task_queues = [Queue("jobs.fifo")]
    start(worker, sqs, "-Q", "jobs.fifo", env={"TESTAPP_QUEUES": "jobs.fifo"}).wait_ready()
    results = [producer.send_task("testapp.add", (i, i), queue="jobs.fifo") for i in range(5)]
    assert [r.get(timeout=20) for r in results] == [0, 2, 4, 6, 8]
    # A predefined queue (keyed by its SQS name, as kombu keys it): used by its URL as given,
    # never created or looked up by name.
    custom = sqs.client.create_queue(QueueName=f"{sqs.prefix}somewhere-else")["QueueUrl"]
    predefined = {"predefined_queues": {f"{sqs.prefix}celery": {"url": custom}}}
    app = sqs.producer(**predefined)
    start(worker, sqs, node="pre@testhost", options=predefined, name="pre").wait_ready()
    assert send(app, "add", 5, 5).get(timeout=20) == 10
    names = [u.rsplit("/", 1)[1] for u in sqs.client.list_queues(QueueNamePrefix=sqs.prefix).get("QueueUrls", [])]
    assert f"{sqs.prefix}celery" not in names


def test_a_stock_worker_shares_the_queue(worker, broker, backend, sqs):
    stock = start(worker, sqs, "-c", "2", node="stock@testhost", command=[sys.executable, "-m", "celery"],
                  name="stock")
    ours = start(worker, sqs, "-c", "2", name="celeriac")
    share_one_queue(stock, ours, sqs.app, backend, tasks=200, timeout=90)


def test_credentials_from_the_aws_chain_and_a_clear_error_without(worker, broker, sqs, moto):
    # `sqs://` with no key in the URL: the standard AWS chain (here: the environment) supplies
    # the credentials, and `endpoint_url` points at the emulator. IMDS is off: no traffic may
    # leave this machine.
    no_imds = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/nonexistent",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    chain = {"CELERIAC_TEST_BROKER": "sqs://", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
             **no_imds}
    start(worker, sqs, options={"endpoint_url": moto}, env=chain).wait_ready()
    assert send(sqs.app, "add", 1, 2).get(timeout=20) == 3
    bare = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")}, **no_imds,
            **sqs.env(endpoint_url=moto), "CELERIAC_TEST_BROKER": "sqs://", "TESTAPP_NO_STARTUP_RETRY": "1",
            "VIRTUAL_ENV": sys.prefix}
    from conftest import APPS, BIN

    out = subprocess.run([str(BIN), "-A", "testapp", "worker", "-c", "1", "-n", "bare@testhost"], cwd=APPS,
                         env=bare, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Cannot connect to sqs://" in out.stderr and "credentials" in out.stderr.lower(), out.stderr
