#!/usr/bin/env python
"""Side-by-side no-op drain: stock `celery worker` vs celeriac, alternating rounds.

A measurement, not a test. For each round and each worker (stock first, then celeriac):

  * empties the broker (Redis db 10, or the `celeriac-bench` vhost with `--broker amqp`) and the
    result backend (Redis db 11) -- the test suite's databases: with a test run going on at the
    same time, pass other ones (--broker-db 12 --backend-db 13); the script waits for other
    clients of its databases to go before each round and notes any it sees;
  * pre-fills the `celery` queue with N `testapp.ignored` messages (ignore_result=True, so only
    the worker's own overhead is measured). The envelope is the one Celery itself produces: one
    message is sent with `apply_async` and copied with a fresh task id and delivery tag each;
  * starts the worker (`-c 2 --prefetch-multiplier 4 --without-mingle --without-gossip
    --without-heartbeat -l warning`, cwd tests/apps);
  * times from the moment it consumed its first message until the queue is empty and nothing
    is left unacknowledged (polled every 20 ms);
  * sums the CPU time (user+sys) of the worker's whole process tree just before stopping it
    with SIGTERM: the total (start-up included) and the part spent while draining.

Prints a table and the celeriac/stock ratios of the medians.

    .venv/bin/python bench/quick_drain.py [--tasks 20000] [--rounds 3] [--bin PATH] [--broker redis|amqp]
                                          [--broker-db 10] [--backend-db 11]

The binary is --bin, else target/release/celeriac if it exists, else target/debug/celeriac.
Only 127.0.0.1 is used, and only processes this script started are signalled.
"""

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from uuid import uuid4

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
REDIS = "redis://127.0.0.1:6379"
AMQP_VHOST = "celeriac-bench"
AMQP_BROKER = f"amqp://guest:guest@127.0.0.1:5672/{AMQP_VHOST}"
# Redis databases: the tests' own by default; --broker-db/--backend-db to keep clear of a
# test run going on at the same time (each round flushes both).
DB = {"broker": 10, "backend": 11}
CLK = os.sysconf("SC_CLK_TCK")
POLL = 0.02
FLAGS = ["-A", "testapp", "worker", "-c", "2", "--prefetch-multiplier", "4", "-l", "warning",
         "--without-mingle", "--without-gossip", "--without-heartbeat"]
TASK_ID, TAG = "@@TASK_ID@@", "@@DELIVERY_TAG@@"


def backend_url():
    return f"{REDIS}/{DB['backend']}"


def own_ports(pids=()):
    """Local TCP ports of the sockets of this process and of `pids`."""
    inodes = set()
    for pid in ["self", *pids]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def foreign_clients(pids=()):
    """Other processes' connections to our two Redis databases (a test run going on at the same time?)."""
    import redis

    with redis.Redis.from_url(REDIS) as r:
        clients = r.client_list()
    mine = own_ports(pids)
    return [c for c in clients if int(c.get("db", -1)) in DB.values() and int(c["addr"].rsplit(":", 1)[1]) not in mine]


def import_testapp(broker_url):
    """The test app, configured for the benchmark's broker (it reads the URLs at import)."""
    os.environ["CELERIAC_TEST_BROKER"] = broker_url
    os.environ["CELERIAC_TEST_BACKEND"] = backend_url()
    if str(APPS) not in sys.path:
        sys.path.insert(0, str(APPS))
    import testapp

    return testapp


class RedisQueue:
    def __init__(self):
        import redis

        self.url = f"{REDIS}/{DB['broker']}"
        self.r = redis.Redis.from_url(self.url)
        self.template = None

    def _template(self):
        """One real `testapp.ignored` message as Celery/kombu write it, ids turned into placeholders."""
        testapp = import_testapp(self.url)
        self.r.flushdb()
        with testapp.app.producer_or_acquire() as producer:
            result = testapp.ignored.apply_async((0,), producer=producer)
        raw = self.r.rpop("celery")
        if raw is None:
            raise SystemExit("could not capture a message: nothing arrived in the `celery` list")
        msg = json.loads(raw)
        assert msg["headers"]["id"] == result.id, msg
        msg["headers"]["id"] = TASK_ID
        if msg["headers"].get("root_id") == result.id:
            msg["headers"]["root_id"] = TASK_ID
        msg["properties"]["correlation_id"] = TASK_ID
        msg["properties"]["delivery_tag"] = TAG
        return json.dumps(msg)

    def reset_and_fill(self, n):
        if self.template is None:
            self.template = self._template()
        self.r.flushdb()
        pipe = self.r.pipeline(transaction=False)
        for i in range(n):
            pipe.lpush("celery", self.template.replace(TASK_ID, str(uuid4())).replace(TAG, str(uuid4())))
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
        assert self.ready() == n, (self.ready(), n)

    def ready(self):
        return self.r.llen("celery")

    def unacked(self):
        return self.r.hlen("unacked")


class AmqpQueue:
    """RabbitMQ: filled with one kombu producer; ready count by passive declare, unacked by rabbitmqctl."""

    url = AMQP_BROKER

    def __init__(self):
        from kombu import Connection

        subprocess.run(["rabbitmqctl", "add_vhost", AMQP_VHOST], capture_output=True, timeout=60)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", AMQP_VHOST, "guest", ".*", ".*", ".*"],
                       capture_output=True, check=True, timeout=60)
        self.conn = Connection(AMQP_BROKER)
        self.channel = self.conn.channel()
        self.testapp = import_testapp(self.url)

    def reset_and_fill(self, n):
        from kombu import Exchange, Producer, Queue

        Queue("celery", Exchange("celery", "direct"), routing_key="celery")(self.channel).declare()
        self.channel.queue_purge("celery")
        amqp = self.testapp.app.amqp
        producer = Producer(self.channel)
        for i in range(n):
            msg = amqp.as_task_v2(str(uuid4()), "testapp.ignored", args=(i,), kwargs={}, ignore_result=True)
            producer.publish(msg.body, routing_key="celery", exchange="", headers=msg.headers,
                             serializer="json", delivery_mode=2, **msg.properties)
        deadline = time.monotonic() + 30
        while self.ready() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.ready() == n, (self.ready(), n)

    def ready(self):
        return self.channel.queue_declare("celery", passive=True).message_count

    def unacked(self):
        out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", AMQP_VHOST,
                              "name", "messages_unacknowledged"], capture_output=True, text=True,
                             timeout=60).stdout
        return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def tree_cpu(pid):
    """utime+stime, in seconds, of pid and all its live descendants; and their pids."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
        procs[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK)
    children = {}
    for p, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(p)
    total, todo, tree = 0.0, [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        total += procs.get(p, (0, 0.0))[1]
        todo.extend(children.get(p, ()))
    return total, tree


def clear_backend():
    import redis

    r = redis.Redis.from_url(backend_url())
    r.flushdb()
    return r


def wait_quiet(timeout):
    """Wait (up to timeout) for other clients of our Redis databases to go; return those still there."""
    deadline, said = time.monotonic() + timeout, False
    while True:
        others = foreign_clients()
        if not others or time.monotonic() > deadline:
            return others
        if not said:
            print(f"  (waiting for {len(others)} other client(s) of Redis db {DB['broker']}/{DB['backend']} to go: "
                  f"{', '.join(c.get('name') or c['addr'] for c in others[:4])})", file=sys.stderr, flush=True)
            said = True
        time.sleep(1)


def run_once(kind, binary, n, q, logdir, rnd, quiet_wait):
    disturbed = []
    if isinstance(q, RedisQueue):
        others = wait_quiet(quiet_wait)
        if others:
            disturbed.append(f"{len(others)} other Redis client(s) on our databases before the start")
    backend = clear_backend()
    q.reset_and_fill(n)
    env = dict(os.environ, CELERIAC_TEST_BROKER=q.url, CELERIAC_TEST_BACKEND=backend_url(),
               VIRTUAL_ENV=str(ROOT / ".venv"))
    cmd = ([sys.executable, "-m", "celery"] if kind == "stock" else [str(binary)]) + FLAGS
    logpath = Path(logdir) / f"{kind}-{rnd}.log"
    log = open(logpath, "wb")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=APPS, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def check_alive(what):
        if proc.poll() is not None:
            raise SystemExit(f"{kind} exited ({proc.returncode}) {what}:\n{logpath.read_text(errors='replace')[-3000:]}")

    try:
        deadline = started + 120
        while q.ready() >= n:  # the first message taken marks the start of the drain
            check_alive("before consuming anything")
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} consumed nothing in 120s:\n{logpath.read_text(errors='replace')[-3000:]}")
            time.sleep(0.002)
        t0 = time.monotonic()
        cpu0, _ = tree_cpu(proc.pid)
        deadline = t0 + 600
        while q.ready() or q.unacked():
            check_alive("while draining")
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind} did not drain in 600s (ready {q.ready()}, unacked {q.unacked()})")
            time.sleep(POLL)
        elapsed = time.monotonic() - t0
        cpu_total, tree = tree_cpu(proc.pid)
        if isinstance(q, RedisQueue):
            others = foreign_clients(tree)
            if others:
                disturbed.append(f"{len(others)} other Redis client(s) on our databases at the end")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: whatever of it is still there
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()
    problems = [line for line in logpath.read_text(errors="replace").splitlines()
                if "ERROR" in line or "CRITICAL" in line or "Traceback" in line]
    stored = backend.dbsize()
    return {"startup": t0 - started, "seconds": elapsed, "cpu_total": cpu_total, "cpu_drain": cpu_total - cpu0,
            "exit": proc.returncode, "problems": problems, "stored": stored, "log": logpath, "disturbed": disturbed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bin", type=Path, help="celeriac binary (default: target/release, else target/debug)")
    ap.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    ap.add_argument("--broker-db", type=int, default=DB["broker"], help="Redis db of the broker (flushed!)")
    ap.add_argument("--backend-db", type=int, default=DB["backend"], help="Redis db of the results (flushed!)")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="seconds to wait for other clients of those databases to go before each round")
    args = ap.parse_args()
    DB.update(broker=args.broker_db, backend=args.backend_db)
    binary = args.bin or next((p for p in [ROOT / "target/release/celeriac", ROOT / "target/debug/celeriac"]
                               if p.exists()), None)
    if binary is None or not Path(binary).exists():
        raise SystemExit(f"celeriac binary not found ({binary}): build it or pass --bin")
    q = AmqpQueue() if args.broker == "amqp" else RedisQueue()
    logdir = tempfile.mkdtemp(prefix="quick_drain-")
    n = args.tasks
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"broker: {args.broker} ({q.url}); results: {backend_url()}; celeriac: {binary}; logs: {logdir}")
    print(f"flags: {' '.join(FLAGS)}")
    print()
    header = (f"{'worker':<9} {'round':>5} {'tasks':>7} {'seconds':>8} {'tasks/s':>9} {'CPU µs/task':>12} "
              f"{'(drain only)':>12} {'startup s':>9}")
    print(header)
    print("-" * len(header))
    rows = {"stock": [], "celeriac": []}
    notes = []
    for rnd in range(1, args.rounds + 1):
        for kind in ("stock", "celeriac"):
            r = run_once(kind, binary, n, q, logdir, rnd, args.quiet_wait)
            r["rate"] = n / r["seconds"]
            r["cpu_us"] = r["cpu_total"] / n * 1e6
            r["cpu_drain_us"] = r["cpu_drain"] / n * 1e6
            rows[kind].append(r)
            print(f"{kind:<9} {rnd:>5} {n:>7} {r['seconds']:>8.2f} {r['rate']:>9.0f} {r['cpu_us']:>12.0f} "
                  f"{r['cpu_drain_us']:>12.0f} {r['startup']:>9.2f}", flush=True)
            if r["exit"] != 0:
                notes.append(f"{kind} round {rnd}: exit code {r['exit']} after SIGTERM ({r['log']})")
            if r["problems"]:
                notes.append(f"{kind} round {rnd}: {len(r['problems'])} error lines, first: {r['problems'][0]}")
            for d in r["disturbed"]:
                notes.append(f"{kind} round {rnd}: {d} (another test run?): this round may be disturbed")
            if r["stored"]:
                notes.append(f"{kind} round {rnd}: {r['stored']} keys in the result backend (expected none)")
    print()
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "rate", "cpu_us", "cpu_drain_us")}
           for k, v in rows.items()}
    for kind in ("stock", "celeriac"):
        m = med[kind]
        print(f"median {kind + ':':<9} {m['seconds']:.2f} s, {m['rate']:.0f} tasks/s, {m['cpu_us']:.0f} µs CPU/task "
              f"({m['cpu_drain_us']:.0f} while draining)")
    s, c = med["stock"], med["celeriac"]
    print(f"celeriac/stock (medians): throughput {c['rate'] / s['rate']:.2f}x, wall time {c['seconds'] / s['seconds']:.2f}x, "
          f"CPU/task {c['cpu_us'] / s['cpu_us']:.2f}x ({c['cpu_drain_us'] / s['cpu_drain_us']:.2f}x while draining)")
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    main()
