#!/usr/bin/env python
"""celeriac vs the stock `celery worker`, side by side on one machine, one broker, one app.

A measurement, not a test. For each broker (Redis, RabbitMQ) and each round, every scenario runs
the stock worker and celeriac one after the other (the order alternates between rounds) with
the same flags (`-A benchapp worker -c 2 --prefetch-multiplier 4 -l warning`, cwd bench/), the
same pre-filled queue and the same way of seeing completions:

  drain      N no-op tasks (ignore_result) pre-filled; from the first message taken until the
             queue is empty (the <= 8 prefetched tasks still running then take about a
             millisecond; the run then waits, untimed, until nothing is unacknowledged, which
             RabbitMQ only tells through rabbitmqctl, a command that takes ~0.5 s and a core to
             answer). Also run by the *bare consumer*
             (celeriac's own transport and acker, acking each message as it arrives, no Python):
             the ceiling with the same ack guarantees.
  io         tasks that sleep 10 ms; each does one Redis INCR at its end, counted.
  cpu        pure-Python CPU-bound tasks (~2 ms); counted the same way.
  result     tasks returning 10 KB, stored in the Redis result backend; counted by DBSIZE.
  latency    200 tasks/s for 10 s into a running worker, after 1 s of the same not counted;
             from apply_async's return (the message is in the broker) to the task's end (it
             RPUSHes its id and the time); p50/p99. Also the floor: the bare consumer fed the
             same way, from apply_async's return to the delivery in its hands (no worker can
             be faster), and on RabbitMQ the same through a plain py-amqp consumer
             (bench/pyamqp_floor.py), to tell the broker's share from the client's.
  roundtrip  `add.delay(1, 1).get()` in a loop against a running worker; median ms per call.
  startup    one task waiting; from starting the worker (default flags, so mingle runs) until
             its result is stored.
  memory     peak RSS and PSS of the worker's whole process tree during the drain (-c 2), and
             idle after 100 tasks at -c 8.

CPU time is user+sys of the worker's whole process tree over the measured span; memory is
sampled every 100 ms from /proc/<pid>/smaps_rollup. The table gives medians over the rounds and
celeriac/stock ratios, with the targets of issue Step 7.

    .venv/bin/python bench/run.py [--brokers redis,amqp] [--rounds 3] [--tasks 100000]
                                  [--scenarios drain,io,...] [--bin PATH] [--quick]
    .venv/bin/python bench/run.py --soak 1000000 [--brokers redis,amqp]   # supervisor RSS over 1M tasks
    .venv/bin/python bench/run.py --soak 1000000 --mixed                  # 1M mixed outcomes, every id checked

Uses Redis databases 14 (broker) and 15 (results) and the RabbitMQ vhost `celeriac-bench`,
flushing them; only 127.0.0.1; only processes this script started are signalled.
"""

import argparse
import atexit
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from uuid import uuid4

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
REDIS = "redis://127.0.0.1:6379"
BROKER_DB, BACKEND_DB = 14, 15
AMQP_VHOST = "celeriac-bench"
BACKEND = f"{REDIS}/{BACKEND_DB}"
BROKER_URLS = {"redis": f"{REDIS}/{BROKER_DB}", "amqp": f"amqp://guest:guest@127.0.0.1:5672/{AMQP_VHOST}"}
FLAGS = ["-A", "benchapp", "worker", "-c", "2", "--prefetch-multiplier", "4", "-l", "warning"]
CLK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ["drain", "io", "cpu", "result", "latency", "roundtrip", "startup", "memory"]
TASK_ID, TAG = "@@TASK_ID@@", "@@DELIVERY_TAG@@"
# The CPU-bound task's loop: about 2 ms of pure Python here. Much longer tasks leave both workers
# bound by the cores alone (at -c 2 on 2 CPUs); the stock MainProcess's cost per task shows at
# this size.
CPU_LOOP = 30_000


def redis_client(url=BACKEND):
    import redis

    return redis.Redis.from_url(url)


# -- the process tree: CPU and memory -------------------------------------------------------------

def tree_pids(root):
    """root and its live descendants."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    children = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu(root):
    total = 0.0
    for pid in tree_pids(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / CLK
    return total


def tree_memory(root):
    """(RSS, PSS) of the tree in MiB."""
    rss = pss = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


class MemorySampler:
    """Peak tree RSS/PSS, sampled every 100 ms in a thread of this process."""

    def __init__(self, root):
        self.root, self.peak_rss, self.peak_pss = root, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            rss, pss = tree_memory(self.root)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._stop.wait(0.1)

    def stop(self):
        self._stop.set()
        self._thread.join()
        return self.peak_rss, self.peak_pss


# -- brokers -----------------------------------------------------------------------------------------

def benchapp(broker_url):
    os.environ["BENCH_BROKER"], os.environ["BENCH_BACKEND"] = broker_url, BACKEND
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import importlib

    import benchapp as module

    # A fresh app for each broker: the app reads its URLs at import and keeps its connections.
    return importlib.reload(module)


class RedisBroker:
    """kombu's Redis layout: filled by pipelined LPUSH of one real message with fresh ids."""

    kind = "redis"

    def __init__(self, app):
        self.app, self.url = app, BROKER_URLS["redis"]
        self.r = redis_client(self.url)
        self.templates = {}

    def _template(self, task, args):
        self.r.flushdb()
        result = getattr(self.app, task).apply_async(args)
        raw = self.r.rpop("celery")
        msg = json.loads(raw)
        assert msg["headers"]["id"] == result.id, msg
        msg["headers"]["id"] = msg["headers"]["root_id"] = msg["properties"]["correlation_id"] = TASK_ID
        msg["properties"]["delivery_tag"] = TAG
        return json.dumps(msg)

    def purge(self):
        self.r.flushdb()

    def fill(self, task, args, n):
        key = (task, tuple(args))
        if key not in self.templates:
            self.templates[key] = self._template(task, args)
        self.purge()
        self.append(task, args, n)

    def append(self, task, args, n):
        """n more messages, without emptying the queue."""
        template = self.templates[(task, tuple(args))]
        pipe = self.r.pipeline(transaction=False)
        for i in range(n):
            pipe.lpush("celery", template.replace(TASK_ID, str(uuid4())).replace(TAG, str(uuid4())))
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()

    def ready(self):
        return self.r.llen("celery")

    def unacked(self):
        return self.r.hlen("unacked")


class AmqpBroker:
    """RabbitMQ: filled by one kombu producer publishing one pre-serialised body with fresh ids."""

    kind = "amqp"

    def __init__(self, app):
        from kombu import Connection

        for cmd in (["add_vhost", AMQP_VHOST], ["set_permissions", "-p", AMQP_VHOST, "guest", ".*", ".*", ".*"]):
            subprocess.run(["rabbitmqctl", *cmd], capture_output=True, timeout=60)
        self.app, self.url = app, BROKER_URLS["amqp"]
        self.conn = Connection(self.url)
        self.channel = self.conn.channel()

    def _declare(self):
        from kombu import Exchange, Queue

        Queue("celery", Exchange("celery", "direct"), routing_key="celery")(self.channel).declare()

    def purge(self):
        self._declare()
        self.channel.queue_purge("celery")

    def fill(self, task, args, n):
        self.purge()
        self.append(task, args, n)
        deadline = time.monotonic() + 60
        while self.ready() < n and time.monotonic() < deadline:
            time.sleep(0.05)

    def append(self, task, args, n):
        """n more messages, without emptying the queue."""
        from kombu import Producer
        from kombu.utils.json import dumps

        amqp = self.app.app.amqp
        # The headers apply_async would send: a task's own ignore_result goes in the message
        # (a header of False would make the worker store every no-op's result).
        msg = amqp.as_task_v2(str(uuid4()), f"benchapp.{task}", args=args, kwargs={},
                              ignore_result=getattr(self.app, task).ignore_result)
        body = dumps(msg.body)
        producer = Producer(self.channel)
        for _ in range(n):
            task_id = str(uuid4())
            headers = dict(msg.headers, id=task_id, root_id=task_id)
            producer.publish(body, routing_key="celery", exchange="", headers=headers,
                             content_type="application/json", content_encoding="utf-8", delivery_mode=2,
                             correlation_id=task_id, reply_to=msg.properties.get("reply_to"))

    def ready(self):
        return self.channel.queue_declare("celery", passive=True).message_count

    def unacked(self):
        out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", AMQP_VHOST,
                              "name", "messages_unacknowledged"], capture_output=True, text=True, timeout=60).stdout
        return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


# -- workers -------------------------------------------------------------------------------------------

STARTED = []


def stop_all():
    """Whatever this script started and did not stop (a scenario that failed): SIGKILL."""
    for w in STARTED:
        if w.proc.poll() is None:
            try:
                os.killpg(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


atexit.register(stop_all)


class Worker:
    def __init__(self, kind, binary, broker_url, logdir, extra=(), concurrency=2):
        if kind == "pyamqp":  # not a worker: the plain consumer of latency_floor
            cmd, flags = [sys.executable, str(BENCH / "pyamqp_floor.py"), broker_url], []
        else:
            cmd = [sys.executable, "-m", "celery"] if kind == "stock" else [str(binary)]
            flags = list(FLAGS)
            flags[flags.index("-c") + 1] = str(concurrency)
            if kind == "bare":
                flags.append("--bare-consumer")
            # A node name of its own: RabbitMQ drops the last worker's exclusive mailbox a moment late.
            flags += ["-n", f"{kind}-{uuid4().hex[:8]}@%h"]
        env = dict(os.environ, BENCH_BROKER=broker_url, BENCH_BACKEND=BACKEND, VIRTUAL_ENV=str(ROOT / ".venv"),
                   PYTHONPATH=str(BENCH))
        self.kind = kind
        self.logpath = Path(logdir) / f"{kind}-{time.monotonic_ns()}.log"
        self._log = open(self.logpath, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd + flags + list(extra), cwd=BENCH, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        STARTED.append(self)

    def alive(self, what):
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.kind} exited ({self.proc.returncode}) {what}:\n{self.log()[-3000:]}")

    def log(self):
        return self.logpath.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: whatever is left of it
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()
        problems = [line for line in self.log().splitlines() if "ERROR" in line or "Traceback" in line]
        return problems


def wait_for(predicate, worker, what, timeout=600, interval=0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        worker.alive(what)
        if time.monotonic() > deadline:
            raise SystemExit(f"{worker.kind}: {what} not reached in {timeout}s:\n{worker.log()[-3000:]}")
        time.sleep(interval)


def warm(worker, app):
    """Wait until the worker serves: one add round trip."""
    deadline = time.monotonic() + 60
    while True:
        worker.alive("before serving")
        try:
            if app.add.delay(1, 1).get(timeout=2) == 2:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit(f"{worker.kind} did not serve within 60s:\n{worker.log()[-3000:]}")


# -- scenarios ------------------------------------------------------------------------------------------

def counted(broker, ctx, kind, task, args, n, done, settled=None):
    """Pre-fill n messages, start the worker, time from its first take until done() reaches n;
    then wait, untimed, for settled() if given."""
    broker.fill(task, args, n)
    ctx.backend.flushdb()
    w = Worker(kind, ctx.binary, broker.url, ctx.logdir)
    sampler = MemorySampler(w.proc.pid)
    wait_for(lambda: broker.ready() < n, w, "first message taken", timeout=120, interval=0.002)
    t0, cpu0 = time.monotonic(), tree_cpu(w.proc.pid)
    wait_for(lambda: done() >= n, w, "all done")
    elapsed, cpu = time.monotonic() - t0, tree_cpu(w.proc.pid) - cpu0
    if settled is not None:
        wait_for(settled, w, "nothing left unacknowledged", interval=0.1)
    rss, pss = sampler.stop()
    problems = w.stop()
    return {"rate": n / elapsed, "cpu_us": cpu / n * 1e6, "rss": rss, "pss": pss, "problems": problems}


def drain(broker, ctx, kind):
    n = ctx.tasks
    return counted(broker, ctx, kind, "noop", (0,), n, lambda: n - broker.ready(), lambda: broker.unacked() == 0)


def io(broker, ctx, kind):
    return counted(broker, ctx, kind, "io", (0.01,), ctx.io_tasks, lambda: int(ctx.backend.get("bench:done") or 0))


def cpu(broker, ctx, kind):
    return counted(broker, ctx, kind, "cpu", (CPU_LOOP,), ctx.cpu_tasks, lambda: int(ctx.backend.get("bench:done") or 0))


def result(broker, ctx, kind):
    return counted(broker, ctx, kind, "result_10k", (0,), ctx.result_tasks, ctx.backend.dbsize)


def running(broker, ctx, kind, concurrency=2):
    broker.purge()
    ctx.backend.flushdb()
    w = Worker(kind, ctx.binary, broker.url, ctx.logdir, concurrency=concurrency)
    warm(w, ctx.app)
    return w


class RedisStamps:
    """Where the stamp task notes its id and time: a Redis list on the results database."""

    def __init__(self, backend):
        self.backend = backend

    def reset(self):
        self.backend.delete("bench:latency")

    def count(self):
        return self.backend.llen("bench:latency")

    def read(self):
        return dict(x.decode().split() for x in self.backend.lrange("bench:latency", 0, -1))


class FileStamps:
    """Where the bare consumer notes each delivery's task id and arrival time (`--bare-stamps`)."""

    def __init__(self, path):
        self.path = path
        path.touch()

    def reset(self):
        self.path.write_text("")  # the consumer appends (O_APPEND): its next line lands at the start

    def read(self):
        return dict(line.split() for line in self.path.read_text().splitlines() if line.count(" ") == 1)

    def count(self):
        return len(self.read())


def paced_stamps(ctx, w, stamps, rate, total):
    """`total` stamp tasks at `rate`/s; returns {task id: time enqueued} once all are stamped."""
    stamps.reset()
    t0 = time.monotonic()
    enqueued = {}
    with ctx.app.app.producer_or_acquire() as producer:
        for i in range(total):
            pause = t0 + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            # Enqueued once apply_async returns: the producer's own serialising is not the worker's.
            task_id = ctx.app.stamp.apply_async(producer=producer).id
            enqueued[task_id] = time.time()
    wait_for(lambda: stamps.count() >= total, w, "all latency tasks stamped", timeout=120)
    return enqueued


def paced_latency(ctx, w, stamps):
    """200 stamp tasks/s for 10 s, after one second of the same not counted: p50 and p99 ms."""
    rate, seconds = 200, 10
    # The first second: each child's first runs of the task (its own Redis connection, CPython's
    # first specialising of the code) are start-up, not latency.
    paced_stamps(ctx, w, stamps, rate, rate)
    enqueued = paced_stamps(ctx, w, stamps, rate, rate * seconds)
    done = stamps.read()
    samples = sorted(max(0.0, float(done[i]) - enqueued[i]) * 1000 for i in enqueued if i in done)
    return {"p50": samples[len(samples) // 2], "p99": samples[int(len(samples) * 0.99)]}


def latency(broker, ctx, kind):
    w = running(broker, ctx, kind)
    r = paced_latency(ctx, w, RedisStamps(ctx.backend))
    return dict(r, problems=w.stop())


def latency_floor(broker, ctx, kind="bare"):
    """The same paced stamp tasks taken by the bare consumer (celeriac's transport and acker, no
    Python, no pool), from apply_async's return to the delivery in its hands: what the broker,
    the producer and the machine leave for any worker. With kind "pyamqp", by a plain py-amqp
    consumer (bench/pyamqp_floor.py) instead: the same floor through stock's client."""
    broker.purge()
    stamps = FileStamps(Path(ctx.logdir) / f"stamps-{uuid4().hex[:8]}.txt")
    extra = [str(stamps.path)] if kind == "pyamqp" else ["--bare-stamps", str(stamps.path)]
    w = Worker(kind, ctx.binary, broker.url, ctx.logdir, extra=extra)
    r = paced_latency(ctx, w, stamps)
    w.stop()
    stamps.path.unlink()
    return r


def roundtrip(broker, ctx, kind):
    w = running(broker, ctx, kind)
    times = []
    for _ in range(ctx.roundtrips):
        t = time.perf_counter()
        assert ctx.app.add.delay(1, 1).get(timeout=10) == 2
        times.append((time.perf_counter() - t) * 1000)
    problems = w.stop()
    return {"rt_ms": statistics.median(times), "problems": problems}


def startup(broker, ctx, kind):
    broker.purge()
    ctx.backend.flushdb()
    r = ctx.app.add.delay(2, 2)
    key = f"celery-task-meta-{r.id}"
    w = Worker(kind, ctx.binary, broker.url, ctx.logdir)
    wait_for(lambda: ctx.backend.exists(key), w, "first task done", timeout=120, interval=0.005)
    seconds = time.monotonic() - w.started
    problems = w.stop()
    return {"startup_s": seconds, "problems": problems}


def memory(broker, ctx, kind):
    w = running(broker, ctx, kind, concurrency=8)
    with ctx.app.app.producer_or_acquire() as producer:
        results = [ctx.app.add.apply_async((i, i), producer=producer) for i in range(100)]
    for r in results:
        r.get(timeout=30)
    sampler = MemorySampler(w.proc.pid)
    time.sleep(2)
    rss, pss = sampler.stop()
    problems = w.stop()
    return {"rss8": rss, "pss8": pss, "problems": problems}


def soak(broker, ctx, total):
    """celeriac alone through `total` no-op tasks, the queue kept topped up; the supervisor's
    RSS (its own process, not the pool) after each tenth. Flat means no growth per task."""
    chunk = max(total // 10, 1)
    broker.fill("noop", (0,), chunk)
    pushed = chunk
    w = Worker("celeriac", ctx.binary, broker.url, ctx.logdir)
    wait_for(lambda: broker.ready() < chunk, w, "first message taken", timeout=120, interval=0.01)
    t0 = time.monotonic()
    samples = []
    while True:
        w.alive("during the soak")
        ready = broker.ready()
        # Unacked counts are dear on RabbitMQ (rabbitmqctl): while the queue is long, the few
        # prefetched messages are left out of the count.
        done = pushed - ready - (broker.unacked() if ready < 100 else 0)
        if len(samples) < done // chunk:
            rss = rss_of(w.proc.pid)
            samples.append((done, rss))
            print(f"  soak {done:>9} tasks  supervisor RSS {rss:6.1f} MiB  {done / (time.monotonic() - t0):7.0f}/s",
                  flush=True)
        if done >= total:
            break
        if ready < chunk // 2 and pushed < total:
            broker.append("noop", (0,), min(chunk, total - pushed))
            pushed += min(chunk, total - pushed)
        time.sleep(0.2)
    problems = w.stop()
    first, last = samples[0][1], samples[-1][1]
    print(f"soak: {total} tasks; supervisor RSS {first:.1f} MiB after the first tenth, {last:.1f} MiB at the end "
          f"({last - first:+.1f} MiB); {len(problems)} error lines")


# The mixed soak: of every ten tasks, six succeed, one fails, one retries once and then
# succeeds, two wait for an ETA half a second away.
MIXED = ["success"] * 6 + ["failure", "retry", "eta", "eta"]
MIXED_STATE = {"success": "SUCCESS", "failure": "FAILURE", "retry": "SUCCESS", "eta": "SUCCESS"}


def soak_mixed(broker, ctx, total):
    """celeriac alone through `total` tasks of mixed outcomes sent by the celery producer (the
    queue kept topped up); every id must end in its expected state; the supervisor's RSS after
    each tenth. Results go to the backend database, which holds one key per task id."""
    chunk = max(total // 10, 1)
    app, task = ctx.app.app, ctx.app.mixed
    broker.purge()
    ctx.backend.flushdb()
    sent = []

    def send(n):
        with app.producer_or_acquire() as producer:
            for _ in range(n):
                kind = MIXED[len(sent) % len(MIXED)]
                options = {"countdown": 0.5} if kind == "eta" else {}
                sent.append((task.apply_async((kind,), producer=producer, **options).id, kind))

    send(min(chunk, total))
    w = Worker("celeriac", ctx.binary, broker.url, ctx.logdir)
    t0 = time.monotonic()
    samples = []
    while True:
        w.alive("during the soak")
        done = ctx.backend.dbsize()
        if len(samples) < done // chunk:
            rss = rss_of(w.proc.pid)
            samples.append((done, rss))
            print(f"  soak {done:>9} tasks  supervisor RSS {rss:6.1f} MiB  {done / (time.monotonic() - t0):7.0f}/s",
                  flush=True)
        if done >= total:
            break
        if len(sent) < total and broker.ready() < chunk // 2:
            send(min(chunk, total - len(sent)))
        time.sleep(0.2)
    # Every id accounted for: the state each kind must end in (retries may still be finishing).
    deadline = time.monotonic() + 120
    while True:
        wrong = {}
        for i in range(0, len(sent), 1000):
            part = sent[i:i + 1000]
            for (task_id, kind), raw in zip(part, ctx.backend.mget([f"celery-task-meta-{t}" for t, _ in part])):
                state = json.loads(raw)["status"] if raw else "MISSING"
                if state != MIXED_STATE[kind]:
                    wrong[state] = wrong.get(state, 0) + 1
        if not wrong or time.monotonic() > deadline:
            break
        time.sleep(2)
    problems = [p for p in w.stop() if "ERROR" in p and "a failure the soak asked for" not in p]
    elapsed = time.monotonic() - t0
    first, last = samples[0][1], samples[-1][1]
    counts = {k: sum(1 for _, kind in sent if kind == k) for k in MIXED_STATE}
    print(f"soak (mixed): {len(sent)} tasks {counts} in {elapsed:.0f} s ({len(sent) / elapsed:.0f}/s); "
          f"{'every id in its expected state' if not wrong else f'NOT in their expected state: {wrong}'}; "
          f"supervisor RSS {first:.1f} MiB after the first tenth, {last:.1f} MiB at the end "
          f"({last - first:+.1f} MiB); {len(problems)} unexpected error lines")
    ctx.backend.flushdb()
    return not wrong


def rss_of(pid):
    """RSS of one process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- report ---------------------------------------------------------------------------------------------

# (scenario, metric, label, better: "high"/"low", target for celeriac/stock or None)
METRICS = [
    ("drain", "rate", "no-op drain, tasks/s", "high", {"redis": 8.0, "amqp": 4.0}),
    ("drain", "cpu_us", "CPU per no-op task, µs", "low", 0.2),
    ("drain", "rss", "peak RSS -c 2 (drain), MiB", "low", None),
    ("drain", "pss", "peak PSS -c 2 (drain), MiB", "low", 0.5),
    ("io", "rate", "I/O-bound (10 ms sleep), tasks/s", "high", None),
    ("cpu", "rate", "CPU-bound (~2 ms), tasks/s", "high", 1.5),
    ("cpu", "cpu_us", "CPU per CPU-bound task, µs", "low", None),
    ("result", "rate", "10 KB results, tasks/s", "high", None),
    ("latency", "p50", "latency at 200/s, p50 ms", "low", None),
    ("latency", "p99", "latency at 200/s, p99 ms", "low", 1 / 3),
    ("roundtrip", "rt_ms", "delay().get() round trip, ms", "low", None),
    ("startup", "startup_s", "start-up to first task done, s", "low", 1 / 3),
    ("memory", "rss8", "idle RSS -c 8, MiB", "low", None),
    ("memory", "pss8", "idle PSS -c 8, MiB", "low", 1 / 3),
]


def verdict(better, ratio, target):
    if target is None:
        return ""
    met = ratio >= target if better == "high" else ratio <= target
    want = f"≥ {target:g}×" if better == "high" else f"≤ {target:.2g}×"
    return f"{want} {'met' if met else 'NOT met'}"


def report(broker_kind, results, bare_rates, floors=(), py_floors=()):
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    rounds = max((len(v) for v in results["stock"].values()), default=0)
    print(f"\n{broker_kind}: medians of {rounds} round(s)")
    header = f"{'':38} {'stock':>10} {'celeriac':>10} {'ratio':>7}  target"
    print(header)
    print("-" * (len(header) + 16))
    for scenario, metric, label, better, target in METRICS:
        s = [r[metric] for r in results["stock"].get(scenario, [])]
        c = [r[metric] for r in results["celeriac"].get(scenario, [])]
        if not s or not c:
            continue
        ratio = med(c) / med(s) if med(s) else float("nan")
        t = target.get(broker_kind) if isinstance(target, dict) else target
        print(f"{label:38} {med(s):>10.1f} {med(c):>10.1f} {ratio:>6.2f}×  {verdict(better, ratio, t)}")
    if bare_rates and results["celeriac"].get("drain"):
        bare = med(bare_rates)
        share = med([r["rate"] for r in results["celeriac"]["drain"]]) / bare
        print(f"{'bare consumer (ceiling), tasks/s':38} {'':>10} {bare:>10.1f} {share:>6.2f}×  "
              f"celeriac/bare {'≥ 0.5 met' if share >= 0.5 else '≥ 0.5 NOT met'}")
    lat = results["celeriac"].get("latency")
    if lat:
        p99 = med([r["p99"] for r in lat])
        print(f"{'celeriac p99 latency ≤ 1 ms':38} {'':>10} {p99:>10.2f} {'':>7}  {'met' if p99 <= 1 else 'NOT met'}")
    for rows, label, what in ((floors, "bare consumer at 200/s, p50 / p99 ms", "the floor: no task runs"),
                              (py_floors, "py-amqp consumer at 200/s, p50 / p99", "the same floor, stock's client")):
        if rows:
            p50, p99 = med([f["p50"] for f in rows]), med([f["p99"] for f in rows])
            print(f"{label:38} {'':>10} {p50:>5.2f}/{p99:.2f}  ({what})")


class Context:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--brokers", default="redis,amqp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=100_000, help="no-op drain size")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--bin", type=Path, help="celeriac binary (default: target/release/celeriac)")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: to check the script")
    ap.add_argument("--soak", type=int, metavar="N",
                    help="instead: celeriac alone through N no-op tasks on --brokers, supervisor RSS over time")
    ap.add_argument("--mixed", action="store_true",
                    help="with --soak: tasks that succeed, fail, retry and wait for ETAs, sent by the celery "
                         "producer; every id must end in its expected state")
    args = ap.parse_args()
    binary = args.bin or ROOT / "target" / "release" / "celeriac"
    if not binary.exists():
        raise SystemExit(f"celeriac binary not found at {binary}: `cargo build --release` or pass --bin")
    ctx = Context()
    ctx.binary, ctx.logdir = binary, tempfile.mkdtemp(prefix="celeriac-bench-")
    ctx.tasks, ctx.io_tasks, ctx.cpu_tasks, ctx.result_tasks, ctx.roundtrips = 100_000, 1000, 2000, 5000, 300
    ctx.tasks = args.tasks
    if args.quick:
        args.rounds = 1
        ctx.tasks, ctx.io_tasks, ctx.cpu_tasks, ctx.result_tasks, ctx.roundtrips = 5000, 200, 300, 500, 50
    ctx.backend = redis_client()
    if args.soak:
        for broker_kind in args.brokers.split(","):
            ctx.app = benchapp(BROKER_URLS[broker_kind])
            print(f"{broker_kind}:")
            broker = RedisBroker(ctx.app) if broker_kind == "redis" else AmqpBroker(ctx.app)
            if args.mixed and not soak_mixed(broker, ctx, args.soak):
                raise SystemExit(1)
            if not args.mixed:
                soak(broker, ctx, args.soak)
        return
    scenarios = [s for s in args.scenarios.split(",") if s]
    funcs = {f.__name__: f for f in (drain, io, cpu, result, latency, roundtrip, startup, memory)}
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; "
          f"python {platform.python_version()}; load {os.getloadavg()[0]:.2f}")
    print(f"celeriac: {binary}; flags: {' '.join(FLAGS)}; logs: {ctx.logdir}")
    notes = []
    for broker_kind in args.brokers.split(","):
        ctx.app = benchapp(BROKER_URLS[broker_kind])
        broker = RedisBroker(ctx.app) if broker_kind == "redis" else AmqpBroker(ctx.app)
        results = {"stock": {}, "celeriac": {}}
        bare_rates, floors, py_floors = [], [], []
        for rnd in range(1, args.rounds + 1):
            order = ("stock", "celeriac") if rnd % 2 else ("celeriac", "stock")
            for scenario in scenarios:
                for kind in order:
                    r = funcs[scenario](broker, ctx, kind)
                    results[kind].setdefault(scenario, []).append(r)
                    shown = {k: round(v, 2) for k, v in r.items() if k != "problems"}
                    print(f"  {broker_kind} round {rnd} {scenario:9} {kind:8} {shown}", flush=True)
                    if r["problems"]:
                        notes.append(f"{broker_kind} {scenario} {kind}: {len(r['problems'])} error lines, "
                                     f"first: {r['problems'][0]}")
                if scenario == "drain":
                    r = drain(broker, ctx, "bare")
                    bare_rates.append(r["rate"])
                    print(f"  {broker_kind} round {rnd} drain     bare     rate {r['rate']:.0f}/s", flush=True)
                if scenario == "latency":
                    floors.append(latency_floor(broker, ctx))
                    print(f"  {broker_kind} round {rnd} latency   bare     {floors[-1]}", flush=True)
                    if broker_kind == "amqp":
                        py_floors.append(latency_floor(broker, ctx, "pyamqp"))
                        print(f"  {broker_kind} round {rnd} latency   pyamqp   {py_floors[-1]}", flush=True)
        report(broker_kind, results, bare_rates, floors, py_floors)
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
