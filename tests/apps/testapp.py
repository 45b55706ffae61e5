"""The Celery app the integration tests run under celeriac (and stock celery, for comparison)."""

import os
import time
import uuid

from celery import Celery
from celery.exceptions import Reject
from celery.signals import task_prerun, worker_process_init

app = Celery("testapp")
app.conf.update(
    broker_url=os.environ.get("CELERIAC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CELERIAC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_acks_late=os.environ.get("TESTAPP_ACKS_LATE") == "1",
    worker_prefetch_multiplier=int(os.environ.get("TESTAPP_PREFETCH_MULTIPLIER", "4")),
    worker_cancel_long_running_tasks_on_connection_loss=os.environ.get("TESTAPP_CANCEL_ON_LOSS") == "1",
    worker_disable_rate_limits=os.environ.get("TESTAPP_DISABLE_RATE_LIMITS") == "1",
    accept_content=os.environ.get("TESTAPP_ACCEPT", "json").split(","),
    broker_connection_retry_on_startup=os.environ.get("TESTAPP_NO_STARTUP_RETRY") != "1",
    broker_connection_max_retries=int(os.environ.get("TESTAPP_MAX_RETRIES", "100")),
    task_track_started=os.environ.get("TESTAPP_TRACK_STARTED") == "1",
)
if os.environ.get("TESTAPP_BROKER_HEARTBEAT"):
    app.conf.broker_heartbeat = float(os.environ["TESTAPP_BROKER_HEARTBEAT"])
if os.environ.get("TESTAPP_BROKER_CA"):
    import ssl

    app.conf.broker_use_ssl = {"ca_certs": os.environ["TESTAPP_BROKER_CA"], "cert_reqs": ssl.CERT_REQUIRED}
if os.environ.get("TESTAPP_TRANSPORT_OPTIONS"):
    import json

    app.conf.broker_transport_options = json.loads(os.environ["TESTAPP_TRANSPORT_OPTIONS"])
if os.environ.get("TESTAPP_QUEUES"):
    from kombu import Queue

    app.conf.task_queues = [Queue(q) for q in os.environ["TESTAPP_QUEUES"].split(",")]


def special_queues():
    """Queues with arguments RabbitMQ compares on every declaration."""
    from kombu import Queue

    return [
        Queue("celery"),
        Queue("prio", max_priority=10),
        Queue("quorum_q", queue_arguments={"x-queue-type": "quorum"}),
        Queue("ttl_q", message_ttl=60, expires=600),
    ]


if os.environ.get("TESTAPP_SPECIAL_QUEUES"):
    app.conf.task_queues = special_queues()

_events = {"process_init": 0, "after_fork": 0}


def _log_signal(name):
    """Append the signal name (and the process) to $TESTAPP_SIGNAL_LOG, if set."""
    path = os.environ.get("TESTAPP_SIGNAL_LOG")
    if path:
        import multiprocessing

        with open(path, "a") as f:
            f.write(f"{name} {multiprocessing.current_process().name} {os.getpid()}\n")


def _connect_signal_log():
    from celery import signals

    if not os.environ.get("TESTAPP_SIGNAL_LOG"):
        return  # a task_received receiver makes celeriac send it per task: only when asked
    for name in ("worker_init", "worker_process_init", "worker_ready", "worker_shutting_down",
                 "worker_shutdown", "worker_process_shutdown", "task_received", "task_prerun",
                 "task_postrun", "task_success", "task_failure", "task_revoked"):
        getattr(signals, name).connect(lambda *a, _n=name, **k: _log_signal(_n), weak=False)
    signals.task_received.connect(_check_received_request, weak=False)


def _check_received_request(sender=None, request=None, **kwargs):
    # A real celery Request, as the stock MainProcess passes it.
    args = ",".join(str(a) for a in request.args)
    _log_signal(f"request:{type(request).__name__}:{request.name}:[{args}]")


_connect_signal_log()


@worker_process_init.connect
def _on_process_init(**kwargs):
    _events["process_init"] += 1


@app.on_after_fork.connect
def _on_after_fork(**kwargs):
    _events["after_fork"] += 1


if os.environ.get("TESTAPP_SEND_AT_INIT"):
    from celery.signals import worker_init

    @worker_init.connect
    def _send_at_init(**kwargs):
        # A start-up hook that sends a task: the app's broker connection pool exists (and is
        # connected) before the pool children are forked; each child must start its own.
        add.delay(40, 2)


@task_prerun.connect
def _on_prerun(task_id=None, task=None, **kwargs):
    # A user signal handler in the child: prove it ran by writing to Redis.
    if task is not None and task.name == "testapp.signal_probe":
        _redis().set(f"prerun:{task_id}", "1")


def _redis():
    import redis

    return redis.Redis.from_url(app.conf.result_backend)


class TestError(Exception):
    pass


@app.task
def add(x, y):
    return x + y


@app.task
def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


@app.task
def fail(message):
    raise TestError(message)


@app.task(bind=True)
def whoami(self):
    return {
        "id": self.request.id,
        "hostname": self.request.hostname,
        "retries": self.request.retries,
        "delivery_info": self.request.delivery_info,
        "process_init": _events["process_init"],
        "after_fork": _events["after_fork"],
    }


@app.task
def send_add(x, y):
    """Send a task from inside a task, through the app's own producer pool."""
    return add.delay(x, y).id


@app.task
def signal_probe():
    return _redis().get(f"prerun:{signal_probe.request.id}") == b"1"


@app.task
def sleep(seconds, marker=None):
    if marker:
        _redis().rpush(marker, "start")
    time.sleep(seconds)
    if marker:
        _redis().rpush(marker, "end")
    return seconds


@app.task
def count(key):
    """Record a run in Redis: how many times each task id ran."""
    return _redis().hincrby(key, count.request.id, 1)


@app.task
def count_slowly(key, seconds):
    """`count`, taking a while: for loads interrupted by shutdowns and faults."""
    time.sleep(seconds)
    return _redis().hincrby(key, count_slowly.request.id, 1)


@app.task(acks_late=True)
def late_count_slowly(key, seconds):
    time.sleep(seconds)
    return _redis().hincrby(key, late_count_slowly.request.id, 1)


def _ledger_entry(request, key, seconds):
    _redis().hincrby(key, request.id, 1)
    time.sleep(seconds)
    return request.id


@app.task(bind=True)
def ledger(self, key, seconds):
    """One entry of a fault test's ledger: counts its runs by task id, then works a while."""
    return _ledger_entry(self.request, key, seconds)


@app.task(bind=True, acks_late=True, reject_on_worker_lost=True)
def late_ledger(self, key, seconds):
    """`ledger` acked once it returned, and requeued when its child dies: it runs at least once."""
    return _ledger_entry(self.request, key, seconds)


@app.task(ignore_result=True)
def ignored(x):
    return x


@app.task(acks_late=True)
def late_sleep(seconds, marker=None):
    return sleep(seconds, marker)


@app.task(acks_late=True, reject_on_worker_lost=True)
def die_once(key):
    """Kill our own process the first time; succeed when redelivered."""
    if _redis().incr(key) == 1:
        os.kill(os.getpid(), 9)
    return "survived"


@app.task
def die():
    os.kill(os.getpid(), 9)


@app.task
def die_at(i, n):
    """Quick, except that run n kills its own child."""
    if i == n:
        os.kill(os.getpid(), 9)
    return i


@app.task(bind=True)
def retrying(self, key):
    n = _redis().incr(key)
    if n < 3:
        raise self.retry(countdown=0.1, max_retries=5)
    return n


@app.task
def reject(requeue):
    raise Reject("no thanks", requeue=requeue)


@app.task
def stdin_and_output(marker):
    """What a task sees of stdin, after printing `marker` (stdout goes to the worker's log)."""
    import sys

    print(marker)
    return [sys.stdin.name, sys.stdin.read()]


@app.task
def print_after(marker, seconds):
    """Prints `marker` and which pool process runs it, after `seconds`; returns that name."""
    import multiprocessing

    time.sleep(seconds)
    name = multiprocessing.current_process().name
    print(f"{marker} from {name}")
    return name


@app.task
def sys_info():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    return {"executable": sys.executable, "prefix": sys.prefix, "subprocess_prefix": out.stdout.strip(),
            "argv": sys.argv, "ld_library_path": os.environ.get("LD_LIBRARY_PATH")}


def _child_exit(code):
    os._exit(code)


@app.task
def uses_multiprocessing():
    import multiprocessing

    p = multiprocessing.Process(target=_child_exit, args=(7,))
    p.start()
    p.join(10)
    return p.exitcode


@app.task(acks_late=True)
def reject_once(key):
    """Reject(requeue=True) the first time: the message goes back to the queue and runs again."""
    if _redis().incr(key) == 1:
        raise Reject("not yet", requeue=True)
    return "second time"


@app.task
def procname(delay=0.0):
    """Which pool process ran this (after an optional sleep, to keep every child busy)."""
    import multiprocessing

    time.sleep(delay)
    return multiprocessing.current_process().name


@app.task
def soft_limited(seconds, catch):
    """Sleeps past its soft time limit; returns 'caught' if it handles SoftTimeLimitExceeded."""
    from celery.exceptions import SoftTimeLimitExceeded

    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        if catch:
            return "caught"
        raise
    return "not interrupted"


@app.task(time_limit=1)
def hard_limited_by_option(seconds):
    time.sleep(seconds)
    return "finished"


@app.task
def grow(megabytes):
    """Keep memory allocated so the child's resident size grows."""
    global _ballast
    _ballast = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(_ballast), 4096):
        _ballast[i] = 1
    import multiprocessing

    return multiprocessing.current_process().name


@app.task
def stubborn(seconds):
    """Ignores its soft time limit and keeps going, so only the hard limit stops it."""
    from celery.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    # The whole loop inside the try: the soft limit's signal is handled wherever the child is
    # when it gets the CPU back, and on a busy machine that can be the loop's own jump.
    while True:
        try:
            while time.monotonic() < deadline:
                time.sleep(0.05)
            return "finished"
        except SoftTimeLimitExceeded:
            continue


@app.task(rate_limit="4/s")
def limited(i):
    return time.time()


@app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"countdown": 0.1, "max_retries": 5})
def autoretried(self, key):
    if _redis().incr(key) < 3:
        raise KeyError("not yet")
    return self.request.retries


@app.task(bind=True, max_retries=2, default_retry_delay=0.1)
def always_retries(self):
    raise self.retry()


@app.task(bind=True, max_retries=1)
def retry_at_once(self):
    """Retries once with no countdown: the retry is in the queue before this run stores RETRY."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "retried"


@app.task(bind=True)
def slow_retry(self, key):
    if _redis().incr(key) == 1:
        raise self.retry(countdown=1.5)
    return "done"


@app.task
def exit_hard(code):
    os._exit(code)


@app.task
def leaves_orphans(seconds):
    """Starts two processes that outlive the task: a subprocess, and a bare fork of the pool
    child (which inherits its sockets); returns their pids."""
    import subprocess

    orphan = subprocess.Popen(["sleep", str(seconds)])
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    return [orphan.pid, pid]


@app.task
def segfault():
    import ctypes

    ctypes.string_at(0)


@app.task
def types_echo(when, ident, amount, raw):
    """kombu's JSON type markers survive the trip: datetime, UUID, Decimal, bytes."""
    import datetime
    import decimal

    assert isinstance(when, datetime.datetime), type(when)
    assert isinstance(ident, uuid.UUID), type(ident)
    assert isinstance(amount, decimal.Decimal), type(amount)
    assert isinstance(raw, bytes), type(raw)
    return [when.isoformat(), str(ident), str(amount + 1), raw.decode()]


@app.task(bind=True)
def progress(self, steps):
    for i in range(steps):
        self.update_state(state="PROGRESS", meta={"done": i + 1, "of": steps})
        time.sleep(0.3)
    return steps


@app.task(bind=True)
def replaced(self, x):
    raise self.replace(add.s(x, 100))


@app.task
def ignore_me():
    from celery.exceptions import Ignore

    raise Ignore()


@app.task
def on_error(request, exc, traceback):
    """A new-style errback: called inline in the worker with the failed request."""
    _redis().set(f"errback:{request.id}", repr(exc))


@app.task(bind=True)
def header_values(self, *names):
    """Custom message headers as the task sees them on its request: (type name, repr) each."""
    return {n: [type(getattr(self.request, n, None)).__name__, repr(getattr(self.request, n, None))] for n in names}


@app.task(bind=True)
def request_headers(self):
    """The request's `headers`: the message's own headers, without Celery's (None if none)."""
    return self.request.headers


@app.task
def cut_own_pool_socket(seconds):
    """Shut the reading side of this pool child's socket to the supervisor, as a dying child
    leaves it: the supervisor's next write to this child fails (EPIPE). Returns how many
    sockets were cut."""
    import socket
    import stat

    cut = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family == socket.AF_UNIX:
                sock.shutdown(socket.SHUT_RD)
                cut += 1
        finally:
            sock.close()  # the duplicate only
    time.sleep(seconds)
    return cut
