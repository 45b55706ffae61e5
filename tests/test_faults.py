"""Faults under load (issue Step 8): every task sent is accounted for.

Each scenario sends a couple of thousand tasks with the real celery producer and keeps a ledger:
the task ids sent, how many times each ran (a Redis hash the task increments when it starts)
and the state its result ends in. At the end every id must have completed (exactly once for
early-ack tasks where the fault allows, at least once for `acks_late`), nothing may be missing
without a reason the fault explains, and the worker must still serve. RabbitMQ and Redis.
"""

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

import testapp
from conftest import BROKER_KIND, BROKER_URL, REDIS_PORT, free_port, http_get, wait_until

pytestmark = pytest.mark.skipif(BROKER_KIND not in ("amqp", "redis"), reason="fault scenarios run on RabbitMQ and Redis")

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]
# Messages of a killed Redis worker come back after the visibility timeout: keep it short.
FAST_RESTORE = {"TESTAPP_TRANSPORT_OPTIONS": json.dumps({"visibility_timeout": 2})} if BROKER_KIND == "redis" else {}


def _parents():
    """pid -> parent pid of every process."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return parents


def alive(pid):
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def zygotes(worker_pid):
    """The worker's zygote (the supervisor's only child process)."""
    return {p for p, pp in _parents().items() if pp == worker_pid}


def pool_children(worker_pid):
    """The pool children: the zygote's children (supervisor -> zygote -> children)."""
    parents = _parents()
    ours = {p for p, pp in parents.items() if pp == worker_pid}
    return [p for p, pp in parents.items() if pp in ours]


class Ledger:
    """Task ids sent, runs per id, and final states from the result backend."""

    def __init__(self, backend):
        self.backend = backend
        self.key = f"ledger:{uuid.uuid4()}"
        self.ids = []

    def send(self, task, n, seconds):
        self.ids += [task.delay(self.key, seconds).id for _ in range(n)]

    def runs(self):
        return {k.decode(): int(v) for k, v in testapp._redis().hgetall(self.key).items()}

    def wait_runs(self, at_least, timeout=60):
        wait_until(lambda: testapp._redis().hlen(self.key) >= at_least, timeout=timeout, interval=0.01,
                   what=lambda: f"{at_least} runs (only {testapp._redis().hlen(self.key)} ran)")

    def states(self):
        """id -> stored meta (None: no result)."""
        metas = {}
        for i in range(0, len(self.ids), 500):
            chunk = self.ids[i:i + 500]
            for task_id, raw in zip(chunk, self.backend.mget([f"celery-task-meta-{t}" for t in chunk])):
                metas[task_id] = json.loads(raw) if raw else None
        return metas

    def wait_done(self, settled, timeout=120):
        """Wait until settled(states) holds; returns the states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if settled(states):
                return states
            if time.monotonic() > deadline:
                missing = [t for t, m in states.items() if not m or m["status"] not in ("SUCCESS", "FAILURE")]
                raise AssertionError(f"{len(missing)} of {len(self.ids)} tasks never finished, e.g. {missing[:3]}")
            time.sleep(0.2)


def all_finished(states):
    return all(m and m["status"] in ("SUCCESS", "FAILURE") for m in states.values())


def all_succeeded(states):
    return all(m and m["status"] == "SUCCESS" for m in states.values())


class ChildKiller(threading.Thread):
    """SIGKILLs a random pool child of a worker every `every` seconds."""

    def __init__(self, worker_pid, every):
        super().__init__(daemon=True)
        self.worker_pid, self.every, self.kills = worker_pid, every, 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.every):
            children = pool_children(self.worker_pid)
            if children:
                try:
                    os.kill(random.choice(children), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.join(5)


@pytest.mark.parametrize("late", [False, True], ids=["early-ack", "acks-late"])
def test_pool_children_killed_mid_task_repeatedly(worker, broker, backend, late):
    """Fault 1. Early ack: a task whose child is killed is FAILURE (WorkerLostError), as stock,
    and nothing runs twice; acks_late with reject_on_worker_lost: it runs again and succeeds."""
    w = worker(WORKER).wait_ready()
    ledger = Ledger(backend)
    ledger.send(testapp.late_ledger if late else testapp.ledger, 2000, 0.004)
    with ChildKiller(w.pid, every=0.25) as killer:
        ledger.wait_runs(1800)
    states = ledger.wait_done(all_succeeded if late else all_finished)
    runs = ledger.runs()
    assert killer.kills >= 5, killer.kills
    failed = {t for t, m in states.items() if m["status"] == "FAILURE"}
    if late:
        assert not failed
        assert all(runs.get(t, 0) >= 1 for t in ledger.ids)
    else:
        assert {states[t]["result"]["exc_type"] for t in failed} <= {"WorkerLostError"}
        assert 0 < len(failed) <= killer.kills
        assert all(runs.get(t) == 1 for t in ledger.ids if t not in failed)
        assert max(runs.values()) == 1  # early ack: nothing ran twice
    assert testapp.add.delay(1, 1).get(timeout=10) == 2


def test_a_task_whose_write_to_a_dying_child_fails_runs_whole_in_the_next(worker):
    """The supervisor hands an idle child a task just as the child goes away (its socket
    closed for reading): the write fails, and the task, body and all, runs in the next child."""
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1"]).wait_ready()
    cut = testapp.cut_own_pool_socket.delay(0.5)
    r = testapp.add.delay(20, 22)  # waits for the only child, then is written to its cut socket
    assert cut.get(timeout=20) >= 1
    assert r.get(timeout=20) == 42
    assert "handing the job to another child" in w.log()


@pytest.mark.parametrize("late", [False, True], ids=["early-ack", "acks-late"])
def test_worker_killed_under_load_then_restarted(worker, broker, backend, late):
    """Fault 2. SIGKILL of the whole worker twice under load; a third drains the rest. What the
    dead workers held comes back (RabbitMQ at once, Redis after the visibility timeout) and runs.
    Early ack: only tasks a child had taken at a kill may be missing (acked when they started,
    as stock), and one whose ack was still on its way may run twice; acks_late: every task
    succeeds."""
    ledger = Ledger(backend)
    worker(WORKER, env=FAST_RESTORE).wait_ready().stop()  # declares the queue
    ledger.send(testapp.late_ledger if late else testapp.ledger, 1500, 0.005)
    for share in (0.3, 0.6):
        w = worker(WORKER, env=FAST_RESTORE).wait_ready()
        ledger.wait_runs(int(len(ledger.ids) * share))
        w.kill()
    worker(WORKER, env=FAST_RESTORE).wait_ready()
    at_most_lost = 0 if late else 2 * 2 * 2  # kills x children x (running + queued behind)
    states = ledger.wait_done(
        lambda s: sum(1 for m in s.values() if not m or m["status"] != "SUCCESS") <= at_most_lost, timeout=120)
    time.sleep(3)  # anything restored late still runs
    states, runs = ledger.states(), ledger.runs()
    unfinished = [t for t, m in states.items() if not m or m["status"] != "SUCCESS"]
    if late:
        assert not unfinished, f"acks_late tasks lost: {where(broker, unfinished)}"
    else:
        # Only what a child had taken (acked) when its worker was killed: none of it is left
        # in the broker, and it is at most the children's running and queued-behind tasks.
        assert len(unfinished) <= at_most_lost, where(broker, unfinished)
        if BROKER_KIND == "redis":
            assert set(where(broker, unfinished).values()) <= {"nowhere"}
        assert sum(1 for n in runs.values() if n > 1) <= at_most_lost
    assert testapp.add.delay(1, 1).get(timeout=10) == 2


def test_zygote_killed_under_load(worker, broker, backend):
    """The zygote (it imported the app and forks the pool children) SIGKILLed under load, as
    an OOM killer might: its children die with it, the worker says why and exits at once with
    code 1 for its process manager to restart it, and after the restart every acks_late task
    succeeds."""
    w = worker(WORKER, env=FAST_RESTORE).wait_ready()
    ledger = Ledger(backend)
    ledger.send(testapp.late_ledger, 800, 0.005)
    ledger.wait_runs(200)
    children = pool_children(w.pid)
    (zygote,) = zygotes(w.pid)
    os.kill(zygote, signal.SIGKILL)
    killed = time.monotonic()
    assert w.wait_exit(timeout=10) == 1
    assert time.monotonic() - killed < 5, "the worker took its time to notice"
    assert "The zygote process died" in w.log()
    wait_until(lambda: not any(alive(c) for c in children), timeout=5,
               what="pool children gone (they outlived their zygote)")
    worker(WORKER, env=FAST_RESTORE).wait_ready()
    ledger.wait_done(all_succeeded, timeout=120)
    assert testapp.add.delay(1, 1).get(timeout=10) == 2


def where(broker, task_ids):
    """Where the broker still holds these tasks' messages (for a failure's message)."""
    if BROKER_KIND != "redis":
        return task_ids
    r = broker.redis
    places = {}
    for t in task_ids:
        in_queue = any(t.encode() in m for m in r.lrange("celery", 0, -1))
        in_unacked = any(t.encode() in m for m in r.hvals("unacked"))
        places[t] = "queue" if in_queue else "unacked" if in_unacked else "nowhere"
    return places


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 between the worker and the broker that can cut every
    connection, and refuse new ones for a while (the broker seems down)."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs, self.lock = [], threading.Lock()
        self.refuse_until = 0.0
        self.closed = False
        self.armed = None  # see lose_reply_to
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            state = {"swallow": False}
            for a, b, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(a, b, replies, state), daemon=True).start()

    def _pump(self, src, dst, replies, state):
        try:
            while data := src.recv(65536):
                if not replies and self.armed and self.armed in data:
                    # This command reaches the broker, its reply never comes back; then the cut.
                    self.armed = None
                    state["swallow"] = True
                    threading.Timer(0.3, self.cut).start()
                if not (replies and state["swallow"]):
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def lose_reply_to(self, marker: bytes):
        """The next command that contains `marker` reaches the broker, which runs it, but its
        reply is dropped and the connections are cut: a connection lost at the worst moment."""
        self.armed = marker

    def cut(self, refuse_for=0.0):
        self.refuse_until = time.monotonic() + refuse_for
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.listener.close()
        self.cut()


@pytest.fixture
def cutting_proxy():
    upstream = 5672 if BROKER_KIND == "amqp" else REDIS_PORT
    proxy = CuttingProxy(upstream)
    yield proxy
    proxy.close()


def test_broker_connection_cut_under_load(worker, broker, backend, cutting_proxy):
    """Fault 3. The worker's broker connections are cut three times under load, each time with
    the broker unreachable for 2 s: /readyz says not ready meanwhile, the worker reconnects and
    every task runs (at least once: an ack lost with the connection means a second run)."""
    upstream = ":5672/" if BROKER_KIND == "amqp" else f":{REDIS_PORT}/"
    url = BROKER_URL.replace(upstream, f":{cutting_proxy.port}/")
    assert url != BROKER_URL
    port = free_port()
    w = worker(WORKER + ["--http-port", str(port), "--http-bind", "127.0.0.1"],
               env=dict(FAST_RESTORE, CELERIAC_TEST_BROKER=url)).wait_ready()
    ledger = Ledger(backend)
    ledger.send(testapp.ledger, 2000, 0.002)
    for i in range(3):
        ledger.wait_runs(400 * (i + 1))
        cutting_proxy.cut(refuse_for=2.0)
        wait_until(lambda: http_get(port, "/readyz")[0] == 503, timeout=2.0,
                   what="/readyz unready with the broker unreachable")
    ledger.wait_done(all_succeeded, timeout=120)
    runs = ledger.runs()
    assert all(runs.get(t, 0) >= 1 for t in ledger.ids)
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=10, interval=0.1,
               what="/readyz ready again after reconnecting")
    assert testapp.add.delay(1, 1).get(timeout=10) == 2
    assert w.proc.poll() is None


@pytest.mark.skipif(BROKER_KIND != "redis", reason="Redis: a take is a script the broker may run without us hearing")
def test_takes_whose_reply_was_lost_are_taken_up_again(worker, broker, backend, cutting_proxy):
    """A batch the broker took for the worker (popped, recorded as unacked) whose reply never
    arrived is taken up again as soon as the worker reconnects, not after the visibility
    timeout (an hour here)."""
    url = BROKER_URL.replace(f":{REDIS_PORT}/", f":{cutting_proxy.port}/")
    env = {"CELERIAC_TEST_BROKER": url, "TESTAPP_TRANSPORT_OPTIONS": json.dumps({"visibility_timeout": 3600})}
    w = worker(WORKER, env=env).wait_ready()
    ledger = Ledger(backend)
    ledger.send(testapp.ledger, 1500, 0.002)
    for i in range(3):
        ledger.wait_runs(300 * (i + 1))
        cutting_proxy.lose_reply_to(b"celeriac.taken.")  # the receipt key: takes name it
        # Taken up once reconnected (and only then armed again: the recovery names it too).
        w.wait_for_count("whose take was cut off with the connection", i + 1, timeout=15)
    try:
        ledger.wait_done(all_succeeded, timeout=60)
    except AssertionError:
        states = ledger.states()
        stuck = [t for t, m in states.items() if not m or m["status"] != "SUCCESS"]
        raise AssertionError(f"stuck: {where(broker, stuck)}\n{w.log()[-4000:]}")
    assert w.log().count("whose take was cut off with the connection") == 3
    assert broker.unacked() == 0


class RestartableBroker:
    """The broker, stopped and started again under the worker: RabbitMQ's application on this
    node (durable queues and persistent messages survive it), or a Redis server of the test's
    own that keeps its data in an append-only file, as a production Redis broker would."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.server = None
        if BROKER_KIND == "amqp":
            self.url = BROKER_URL
        else:
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            self._start_redis()

    def _start_redis(self):
        import redis

        self.server = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.tmp_path),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port).ping()
                return
            except redis.exceptions.ConnectionError:
                assert self.server.poll() is None and time.monotonic() < deadline, "Redis did not start"
                time.sleep(0.05)

    def stop(self):
        if BROKER_KIND == "amqp":
            subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=120)
        else:
            self.server.terminate()  # SIGTERM: Redis syncs its append-only file and exits
            self.server.wait(20)

    def start(self):
        if BROKER_KIND == "amqp":
            subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=120)
            subprocess.run(["rabbitmqctl", "await_startup"], check=True, capture_output=True, timeout=120)
        else:
            self._start_redis()

    def close(self):
        if BROKER_KIND == "amqp":
            self.start()  # never leave the node stopped for the tests after this one
        elif self.server and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(20)


@pytest.fixture
def restartable_broker(tmp_path):
    b = RestartableBroker(tmp_path)
    yield b
    b.close()


def test_broker_restarted_under_load(worker, broker, backend, restartable_broker):
    """Fault 3. The broker itself stopped and started again, twice, under load: the worker
    reports not ready while it is down, reconnects with back-off, and every task runs (at
    least once: acks lost with the old connection mean second runs)."""
    from conftest import producer_app

    env = dict(FAST_RESTORE, CELERIAC_TEST_BROKER=restartable_broker.url)
    port = free_port()
    w = worker(WORKER + ["--http-port", str(port), "--http-bind", "127.0.0.1"], env=env).wait_ready()
    producer = producer_app("restart_producer")
    producer.conf.broker_url = restartable_broker.url
    ledger = Ledger(backend)
    with producer.producer_or_acquire() as p:
        ledger.ids = [producer.send_task("testapp.ledger", (ledger.key, 0.003), producer=p).id for _ in range(1500)]
    producer.close()
    for i in range(2):
        ledger.wait_runs(400 * (i + 1))
        restartable_broker.stop()
        wait_until(lambda: http_get(port, "/readyz")[0] == 503, timeout=10,
                   what="/readyz unready with the broker stopped")
        time.sleep(1)
        restartable_broker.start()
    ledger.wait_done(all_succeeded, timeout=180)
    assert all(n >= 1 for n in ledger.runs().values()) and len(ledger.runs()) == len(ledger.ids)
    wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=20, interval=0.1,
               what="/readyz ready again after the broker came back")
    assert w.proc.poll() is None
    assert "Trying to re-establish the connection" in w.log() or "reconnect" in w.log().lower()


def test_faulty_tasks_among_a_load(worker, broker, backend):
    """Fault 4. Among 1,200 ordinary tasks: tasks that leak memory (the child is recycled past
    --max-memory-per-child), hang (the hard time limit kills them), segfault in C code, and
    leave processes behind that outlive them. Each faulty task ends as stock ends it, every
    ordinary task runs exactly once, and the worker serves on and stops cleanly."""
    w = worker(WORKER + ["--max-memory-per-child", "120000"]).wait_ready()
    ledger = Ledger(backend)
    faulty = {"leak": [], "hang": [], "segfault": [], "orphans": []}
    for i in range(12):
        ledger.send(testapp.ledger, 100, 0.002)
        faulty["leak"].append(testapp.grow.delay(150))
        faulty["hang"].append(testapp.hard_limited_by_option.delay(30))
        faulty["segfault"].append(testapp.segfault.delay())
        if i % 4 == 0:
            faulty["orphans"].append(testapp.leaves_orphans.delay(20))
    states = ledger.wait_done(all_succeeded, timeout=120)
    assert all(m["status"] == "SUCCESS" for m in states.values())
    assert set(ledger.runs().values()) == {1}, "an ordinary task ran twice"
    orphans = [pid for r in faulty["orphans"] for pid in r.get(timeout=30)]
    try:
        assert all(isinstance(r.get(timeout=30), str) for r in faulty["leak"])
        for r in faulty["hang"]:
            with pytest.raises(Exception) as hung:
                r.get(timeout=60)
            assert type(hung.value).__name__ == "TimeLimitExceeded"
        for r in faulty["segfault"]:
            with pytest.raises(Exception) as crashed:
                r.get(timeout=30)
            assert type(crashed.value).__name__ == "WorkerLostError"
        log = w.log()
        assert log.count("exceeding memory limit") >= 6, "leaking children were not recycled"
        assert "signal 11 (SIGSEGV)" in log
        assert testapp.add.delay(1, 1).get(timeout=10) == 2
        stopped = time.monotonic()
        assert w.stop() == 0
        assert time.monotonic() - stopped < 10, "the orphans held up the shutdown"
    finally:
        for pid in orphans:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def backend_server(tmp_path):
    """A Redis server of the test's own for results, which the test can pause."""
    import redis

    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "Redis did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", client
    server.terminate()
    server.wait(20)


def test_slow_result_backend_applies_back_pressure(worker, broker, backend_server):
    """Fault 6. The result backend stops answering for 8 s (CLIENT PAUSE) with 3,000 tasks
    waiting: the children wait on it, the worker takes no more than its prefetch window from
    the broker meanwhile (the rest stays in the queue) and its memory stays flat; when the
    backend answers again every task completes."""
    from conftest import producer_app

    url, results = backend_server
    worker(WORKER, env={"CELERIAC_TEST_BACKEND": url}).wait_ready().stop()  # declares the queue
    app = producer_app("slow_backend_producer", backend=url)
    with app.producer_or_acquire() as p:
        sent = [app.send_task("testapp.add", (i, i), producer=p) for i in range(3000)]
    results.execute_command("CLIENT", "PAUSE", 8000)
    w = worker(WORKER, env={"CELERIAC_TEST_BACKEND": url}).wait_ready()
    supervisor_rss = lambda: int(open(f"/proc/{w.pid}/status").read().split("VmRSS:")[1].split()[0])  # noqa: E731
    time.sleep(1.5)  # the window fills, the children block on their first results
    waiting, rss_before = broker.ready("celery"), supervisor_rss()
    time.sleep(3)
    assert broker.ready("celery") == waiting, "the worker kept taking messages it could not finish"
    # Taken: the prefetch window (2 x 4), a task running in each child and one queued behind it.
    assert waiting >= 3000 - 2 * 4 - 2 * 2, waiting
    assert supervisor_rss() - rss_before < 2048, "the supervisor grew while the backend was paused"
    assert [r.get(timeout=120) for r in sent] == [2 * i for i in range(3000)]
    assert w.proc.poll() is None
