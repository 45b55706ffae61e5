"""Integration tests: the real celeriac binary, a real Redis, a real Celery producer.

Each test gets empty Redis databases (broker and results) and starts celeriac through the
`worker` fixture, which captures its log and makes sure it is stopped afterwards.
"""

import base64
import json
import os
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
BIN = Path(os.environ.get("CELERIAC_BIN", ROOT / "target" / "debug" / "celeriac"))
REDIS_HOST = os.environ.get("CELERIAC_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CELERIAC_TEST_REDIS_PORT", "6379"))
# Passes that run side by side give each its own results database (CELERIAC_TEST_BACKEND_DB).
BROKER_DB = 10
BACKEND_DB = int(os.environ.get("CELERIAC_TEST_BACKEND_DB", "11"))
def sqs_options(prefix):
    """Transport options for moto's SQS server: queues named `prefix + name`, quick polling."""
    return {"region": "us-east-1", "queue_name_prefix": prefix, "wait_time_seconds": 1, "polling_interval": 0.1,
            "visibility_timeout": 30}


def sqs_client(endpoint):
    import boto3

    return boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


def folder_options(root):
    """The folder transport under `root` (its `queue` and `control` folders made here)."""
    for d in ("queue", "control"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return {"data_folder_in": str(root / "queue"), "data_folder_out": str(root / "queue"),
            "control_folder": str(root / "control"), "polling_interval": 0.1}


# The suite runs once per transport: CELERIAC_TEST_BROKER_KIND=redis (default), amqp, sqs (moto's
# server, started for the session) or filesystem (a folder made for the session).
BROKER_KIND = os.environ.get("CELERIAC_TEST_BROKER_KIND", "redis")
AMQP_VHOST = "celeriac-test"
TRANSPORT_OPTIONS = {}
if BROKER_KIND == "amqp":
    BROKER_URL = f"amqp://guest:guest@127.0.0.1:5672/{AMQP_VHOST}"
elif BROKER_KIND == "sqs":
    with socket.socket() as _s:
        _s.bind(("127.0.0.1", 0))
        MOTO_PORT = _s.getsockname()[1]
    MOTO_ENDPOINT = f"http://127.0.0.1:{MOTO_PORT}"
    BROKER_URL = f"sqs://test:test@127.0.0.1:{MOTO_PORT}"
    TRANSPORT_OPTIONS = sqs_options(f"s{uuid.uuid4().hex[:8]}-")
elif BROKER_KIND == "filesystem":
    FOLDER = Path(tempfile.mkdtemp(prefix="celeriac-folder-"))
    BROKER_URL = "filesystem://"
    TRANSPORT_OPTIONS = folder_options(FOLDER)
else:
    BROKER_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BROKER_DB}"
BACKEND_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{BACKEND_DB}"

# What each transport can do, as stock Celery documents it (kombu's transport comparison):
# SQS and the folder have no priorities, SQS has no broadcast (remote control, events, revoke),
# and mingle and gossip run on amqp and redis only (their bootsteps' `compatible_transport`).
FEATURES = {
    "amqp": {"priority", "remote_control", "events", "mingle", "gossip"},
    "redis": {"priority", "remote_control", "events", "mingle", "gossip"},
    "filesystem": {"remote_control", "events"},
    "sqs": set(),
}

# The scenarios every transport runs (Steps 1-3: tasks, semantics, pool, limits, content,
# backends, bad input, sharing a queue with a stock worker). RabbitMQ and Redis run the whole
# suite; SQS and the folder run these and their own modules.
SHARED_SCENARIOS = {
    "test_tasks.py", "test_semantics.py", "test_content_and_canvas.py", "test_backends.py", "test_bad_input.py",
    "test_pool.py", "test_signals.py", "test_limits.py", "test_queues_and_scaling.py", "test_shared_broker.py",
    "test_crafted_messages.py",
}
OWN_MODULES = {"filesystem": {"test_filesystem.py"}, "sqs": {"test_sqs.py"}}

os.environ["CELERIAC_TEST_BROKER"] = BROKER_URL
os.environ["CELERIAC_TEST_BACKEND"] = BACKEND_URL
if TRANSPORT_OPTIONS:
    os.environ["TESTAPP_TRANSPORT_OPTIONS"] = json.dumps(TRANSPORT_OPTIONS)
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))


class RedisBroker:
    """The broker's Redis database, as tests inspect it."""

    kind = "redis"

    def __init__(self):
        self.redis = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BROKER_DB)

    def purge(self):
        self.redis.flushdb()

    def ready(self, queue="celery"):
        """Messages waiting in a queue (all priority lists)."""
        return sum(self.redis.llen(k) for k in [queue] + [f"{queue}\x06\x16{p}" for p in (3, 6, 9)])

    def unacked(self):
        """Messages delivered to a worker and not yet acknowledged."""
        return self.redis.hlen("unacked")

    def put_raw(self, queue, envelope):
        """A message exactly as given (a kombu envelope, or not), as if a producer sent it."""
        self.redis.lpush(queue, envelope)

    def close(self):
        self.redis.close()


class AmqpBroker:
    """A RabbitMQ vhost of the tests' own, inspected with rabbitmqctl."""

    kind = "amqp"

    def _queues(self):
        out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", AMQP_VHOST,
                              "name", "messages_ready", "messages_unacknowledged"],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        rows = [line.split("\t") for line in out.splitlines() if line.strip()]
        return {r[0]: (int(r[1]), int(r[2])) for r in rows if len(r) == 3}

    def purge(self):
        import testapp

        # Exclusive queues (event receivers, mailboxes, reply queues) belong to live
        # connections and go away with them.
        names = [n for n in self._queues() if not n.startswith("celeryev.") and "pidbox" not in n]
        if names:
            with testapp.app.connection_for_write() as conn:
                channel = conn.default_channel
                for name in names:
                    channel.queue_delete(name)
                # The test's producer remembers having declared the default queue and would not
                # declare it again: messages sent before a worker starts would have no queue.
                testapp.app.amqp.queues["celery"].bind(channel).declare()

    def ready(self, queue="celery"):
        return self._queues().get(queue, (0, 0))[0]

    def unacked(self):
        return sum(u for _, u in self._queues().values())

    def close(self):
        pass


class FolderBroker:
    """The folder transport's session folder: `<ms>_<uuid>.<queue>.msg` files."""

    kind = "filesystem"

    def purge(self):
        # Exchange tables stay: they are idempotent bindings producers remember having made.
        for path in (FOLDER / "queue").rglob("*.msg"):
            path.unlink(missing_ok=True)

    def ready(self, queue="celery"):
        return len(list((FOLDER / "queue").glob(f"*.{queue}.msg")))

    def unacked(self):
        return len(list((FOLDER / "queue" / ".celeriac-unacked").rglob("*.msg")))

    def put_raw(self, queue, envelope):
        name = f"{time.monotonic_ns() // 1_000_000}_{uuid.uuid4()}.{queue}.msg"
        partial = FOLDER / f".{name}"
        partial.write_text(envelope)
        partial.rename(FOLDER / "queue" / name)

    def close(self):
        pass


class SqsBroker:
    """The session's queues on moto's SQS server, through boto3."""

    kind = "sqs"

    def __init__(self):
        self.client = sqs_client(MOTO_ENDPOINT)

    def _urls(self):
        return self.client.list_queues(QueueNamePrefix=TRANSPORT_OPTIONS["queue_name_prefix"]).get("QueueUrls", [])

    def _counts(self, url):
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attrs = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=names)["Attributes"]
        return int(attrs[names[0]]), int(attrs[names[1]])

    def purge(self):
        # Queues stay: producers cache their URLs.
        for url in self._urls():
            self.client.purge_queue(QueueUrl=url)

    def ready(self, queue="celery"):
        url = [u for u in self._urls() if u.rsplit("/", 1)[1] == TRANSPORT_OPTIONS["queue_name_prefix"] + queue]
        return self._counts(url[0])[0] if url else 0

    def unacked(self):
        return sum(self._counts(url)[1] for url in self._urls())

    def put_raw(self, queue, envelope):
        # kombu's SQS body is the envelope, base64-encoded.
        url = self.client.get_queue_url(QueueName=TRANSPORT_OPTIONS["queue_name_prefix"] + queue)["QueueUrl"]
        self.client.send_message(QueueUrl=url, MessageBody=base64.b64encode(envelope.encode()).decode())

    def close(self):
        self.client.close()


def start_moto(port):
    """moto's SQS server on 127.0.0.1:`port` (its operations made atomic: sqs_server.py), once it
    accepts connections."""
    # Each test purges the queues: lift real SQS's one purge a minute.
    env = {**os.environ, "MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR": "false"}
    server = Path(__file__).with_name("sqs_server.py")
    proc = subprocess.Popen([sys.executable, str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto's SQS server did not start")
            time.sleep(0.1)


def _ensure_vhost():
    subprocess.run(["rabbitmqctl", "add_vhost", AMQP_VHOST], capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", AMQP_VHOST, "guest", ".*", ".*", ".*"],
                   capture_output=True, check=True, timeout=60)


def wait_started(marker, count=1, timeout=20):
    """Wait until a task that logs to the Redis list `marker` (testapp.sleep) started `count` times."""
    import testapp

    deadline = time.time() + timeout
    while time.time() < deadline:
        if testapp._redis().lrange(marker, 0, -1).count(b"start") >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"task did not start {count} time(s)")


def share_one_queue(stock, ours, app, backend, tasks, timeout):
    """A stock worker and celeriac consume one queue: `tasks` tasks sent through `app` (each
    taking 20 ms, so neither worker can drain them all before the other polls) each run exactly
    once, both workers take a share, and celeriac stops cleanly."""
    stock.wait_ready(timeout=60)
    ours.wait_ready()
    key = f"shared:{uuid.uuid4()}"
    with app.producer_or_acquire() as producer:
        sent = [app.send_task("testapp.count_slowly", (key, 0.02), producer=producer).id for _ in range(tasks)]
    deadline = time.time() + timeout
    while backend.hlen(key) < len(sent):
        assert time.time() < deadline, f"only {backend.hlen(key)} of {len(sent)} tasks ran within {timeout}s"
        time.sleep(0.1)
    assert ours.stop() == 0
    stock.stop()
    runs = {k.decode(): int(v) for k, v in backend.hgetall(key).items()}
    assert set(runs) == set(sent) and set(runs.values()) == {1}
    assert "Task testapp.count_slowly[" in stock.log() and "Task testapp.count_slowly[" in ours.log()


def producer_app(name, backend=None):
    """A Celery app of a test's own on the suite's broker (URL and transport options)."""
    from celery import Celery

    app = Celery(name, broker=BROKER_URL, backend=backend or BACKEND_URL)
    app.conf.broker_transport_options = dict(TRANSPORT_OPTIONS)
    return app


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path):
    """(status, text) of a GET on 127.0.0.1:port (the worker's --http-port endpoint)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(port, name):
    """One unlabelled value of the worker's /metrics."""
    for line in http_get(port, "/metrics")[1].splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def pg_database():
    """A PostgreSQL database of this pass's own (passes run side by side), made if missing."""
    import psycopg2

    name = f"celeriac_test_{BROKER_KIND}"
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    try:
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            cur.execute("select 1 from pg_database where datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'create database "{name}"')
    finally:
        conn.close()
    return name


@pytest.fixture
def test_ca(tmp_path):
    """A CA of the test's own and a server certificate it signed for 127.0.0.1 and localhost:
    (ca.pem, server.pem, server.key)."""
    import shutil

    if not shutil.which("openssl"):
        pytest.fail("openssl is needed for the TLS tests (.ci/run installs it)")
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=celeriac test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def only_on(*kinds):
    """Mark a test that inspects one broker's own data layout."""
    return pytest.mark.skipif(BROKER_KIND not in kinds, reason=f"inspects {' or '.join(kinds)}'s own layout")


def needs(*features):
    """Mark a test of a feature some transports lack (see FEATURES)."""
    missing = sorted(set(features) - FEATURES[BROKER_KIND])
    return pytest.mark.skipif(bool(missing), reason=f"{BROKER_KIND} has no {', '.join(missing)} (as stock)")


BROKERS = {"amqp": AmqpBroker, "redis": RedisBroker, "filesystem": FolderBroker, "sqs": SqsBroker}


def wait_until(check, timeout=10.0, what="condition", interval=0.05):
    """Poll `check` until it returns something truthy, and return that; fail the test after
    `timeout` s with `what` (a string, or a callable giving one, evaluated only then)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what() if callable(what) else what} not reached within {timeout}s")
        time.sleep(interval)


@pytest.fixture
def broker():
    """The broker the suite runs on, emptied before the test (and the result backend too)."""
    b = BROKERS[BROKER_KIND]()
    b.purge()
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BACKEND_DB).flushdb()
    yield b
    b.close()


@pytest.fixture
def backend():
    r = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=BACKEND_DB)
    yield r
    r.close()


class Worker:
    """A celeriac (or stock celery) worker process started by a test."""

    def __init__(self, args, tmp_path, cwd=APPS, env=None, command=None, name="worker", stdin=None):
        self.logfile = tmp_path / f"{name}-{time.monotonic_ns()}.log"
        full_env = dict(os.environ)
        full_env.setdefault("VIRTUAL_ENV", sys.prefix)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.command = (command or [str(BIN)]) + list(args)
        self._log = open(self.logfile, "wb")
        self.proc = subprocess.Popen(
            self.command, cwd=str(cwd), env=full_env, stdin=stdin, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return self.logfile.read_text(errors="replace")

    def wait_for(self, text, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {text!r}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen within {timeout}s:\n{self.log()}")

    def wait_for_count(self, text, count, timeout=30.0):
        """Wait until `text` appears `count` times in the log."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} seen {self.log().count(text)} of {count} times in {timeout}s")
            time.sleep(0.05)

    def wait_ready(self, timeout=30.0):
        self.wait_for(" ready.", timeout)
        return self

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signals.SIGTERM, timeout=30.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"worker did not stop within {timeout}s:\n{self.log()}")
        self._log.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signals.SIGKILL)
            self.proc.wait(10)

    def wait_exit(self, timeout=30.0):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout}s:\n{self.log()}")


@pytest.fixture
def worker(tmp_path, broker):
    """Start celeriac: worker(["-A", "testapp", "worker", ...]). Stopped (killed if need be) at the end."""
    started = []

    def start(args, **kw):
        w = Worker(args, tmp_path, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.send_signal(signals.SIGTERM)
            try:
                w.proc.wait(15)
            except subprocess.TimeoutExpired:
                w.kill()
        else:
            try:
                os.killpg(w.proc.pid, signals.SIGKILL)  # children left behind, if any
            except ProcessLookupError:
                pass
        w._log.close()


def pytest_ignore_collect(collection_path, config):
    if BROKER_KIND in OWN_MODULES and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return collection_path.name not in SHARED_SCENARIOS | OWN_MODULES[BROKER_KIND]
    return None


def pytest_configure(config):
    if not BIN.exists():
        raise pytest.UsageError(f"celeriac binary not found at {BIN}: run `cargo build` first (scripts/test does)")
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2).ping()
    except Exception as exc:  # a missing broker fails the run, it never skips tests
        raise pytest.UsageError(f"Redis is required at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    if BROKER_KIND == "amqp":
        try:
            _ensure_vhost()
        except Exception as exc:
            raise pytest.UsageError(f"RabbitMQ is required at 127.0.0.1:5672 (rabbitmqctl): {exc}")
    if BROKER_KIND == "sqs":
        config._moto = start_moto(MOTO_PORT)


def pytest_unconfigure(config):
    moto = getattr(config, "_moto", None)
    if moto is not None:
        moto.terminate()
        moto.wait(10)
    if BROKER_KIND == "filesystem":
        import shutil

        shutil.rmtree(FOLDER, ignore_errors=True)


def pytest_report_header(config):
    return f"celeriac integration tests on {BROKER_KIND}: broker {BROKER_URL}, results {BACKEND_URL}"
