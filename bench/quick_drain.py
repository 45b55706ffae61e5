#!/usr/bin/env python
"""Side-by-side no-op drain: stock `celery worker` vs celeriac, alternating rounds, on Redis or
RabbitMQ (`--broker amqp`).

Pre-fills the `celery` queue with N messages of `testapp.ignored` (ignore_result=True, so only
the worker's own overhead is measured), starts one worker, times the drain from its first
consumed message until the queue and the unacked hash are empty, and sums the CPU time of the
worker's whole process tree. Prints a table and the celeriac/stock ratios of the medians.

    .venv/bin/python bench/quick_drain.py [--broker redis|amqp] [--tasks 20000] [--rounds 3] [--bin PATH]
"""

import argparse
import base64
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
BROKER = "redis://127.0.0.1:6379/10"
AMQP_BROKER = "amqp://guest:guest@127.0.0.1:5672/celeriac-bench"
BACKEND = "redis://127.0.0.1:6379/11"
CLK = os.sysconf("SC_CLK_TCK")


def envelope(task_id):
    body = base64.b64encode(b'[[1], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]').decode()
    headers = {"lang": "py", "task": "testapp.ignored", "id": task_id, "shadow": None, "eta": None, "expires": None,
               "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
               "parent_id": None, "argsrepr": "(1,)", "kwargsrepr": "{}", "origin": "gen0@bench",
               "ignore_result": False, "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}
    props = {"correlation_id": task_id, "reply_to": "bench", "delivery_mode": 2,
             "delivery_info": {"exchange": "", "routing_key": "celery"}, "priority": 0,
             "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}
    return json.dumps({"body": body, "content-encoding": "utf-8", "content-type": "application/json",
                       "headers": headers, "properties": props})


def fill(r, n):
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush("celery", envelope(str(uuid.uuid4())))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


class RedisQueue:
    url = BROKER

    def __init__(self):
        self.r = redis.Redis.from_url(BROKER)

    def reset_and_fill(self, n):
        self.r.flushdb()
        fill(self.r, n)

    def ready(self):
        return self.r.llen("celery")

    def unacked(self):
        return self.r.hlen("unacked")


class AmqpQueue:
    """RabbitMQ: filled with kombu's producer; ready count by passive declare, unacked by rabbitmqctl."""

    url = AMQP_BROKER

    def __init__(self):
        from kombu import Connection

        subprocess.run(["rabbitmqctl", "add_vhost", "celeriac-bench"], capture_output=True)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", "celeriac-bench", "guest", ".*", ".*", ".*"],
                       capture_output=True, check=True)
        self.conn = Connection(AMQP_BROKER)
        self.channel = self.conn.channel()

    def reset_and_fill(self, n):
        from kombu import Exchange, Producer, Queue

        queue = Queue("celery", Exchange("celery", "direct"), routing_key="celery")
        queue(self.channel).declare()
        self.channel.queue_purge("celery")
        producer = Producer(self.channel)
        for _ in range(n):
            task_id = str(uuid.uuid4())
            env = json.loads(envelope(task_id))
            producer.publish(base64.b64decode(env["body"]), routing_key="celery", exchange="",
                             headers=env["headers"], content_type="application/json", content_encoding="utf-8",
                             correlation_id=task_id, reply_to="bench", delivery_mode=2)

    def ready(self):
        return self.channel.queue_declare("celery", passive=True).message_count

    def unacked(self):
        out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "-p", "celeriac-bench",
                              "name", "messages_unacknowledged"], capture_output=True, text=True).stdout
        return sum(int(line.split()[1]) for line in out.splitlines() if line.strip())


def tree_cpu(pid):
    """utime+stime (seconds) of pid and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            parents[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += parents.get(p, (0, 0.0))[1]
        todo.extend(c for c, (pp, _) in parents.items() if pp == p)
    return total


def run_once(kind, binary, n, q):
    q.reset_and_fill(n)
    env = dict(os.environ, CELERIAC_TEST_BROKER=q.url, CELERIAC_TEST_BACKEND=BACKEND, VIRTUAL_ENV=sys.prefix)
    flags = ["-A", "testapp", "worker", "-c", "2", "--prefetch-multiplier", "4", "-l", "warning",
             "--without-mingle", "--without-gossip", "--without-heartbeat"]
    cmd = ([sys.executable, "-m", "celery"] if kind == "stock" else [str(binary)]) + flags
    proc = subprocess.Popen(cmd, cwd=APPS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while q.ready() >= n:
            time.sleep(0.002)
        t0 = time.monotonic()
        cpu0 = tree_cpu(proc.pid)
        while q.ready():
            time.sleep(0.02)
        while q.unacked():
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = tree_cpu(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return elapsed, cpu


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bin", type=Path)
    ap.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    args = ap.parse_args()
    binary = args.bin or next(p for p in [ROOT / "target/release/celeriac", ROOT / "target/debug/celeriac"] if p.exists())
    q = AmqpQueue() if args.broker == "amqp" else RedisQueue()
    print(f"broker: {args.broker}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; python {platform.python_version()}; binary {binary}")
    print(f"{'worker':<9} {'round':>5} {'tasks':>7} {'seconds':>8} {'tasks/s':>9} {'CPU µs/task':>12}")
    rows = {"stock": [], "celeriac": []}
    for rnd in range(1, args.rounds + 1):
        for kind in ("stock", "celeriac"):
            elapsed, cpu = run_once(kind, binary, args.tasks, q)
            rate, cpu_us = args.tasks / elapsed, cpu / args.tasks * 1e6
            rows[kind].append((rate, cpu_us))
            print(f"{kind:<9} {rnd:>5} {args.tasks:>7} {elapsed:>8.2f} {rate:>9.0f} {cpu_us:>12.0f}")
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in rows.items()}
    print(f"median stock:    {med['stock'][0]:.0f} tasks/s, {med['stock'][1]:.0f} µs CPU/task")
    print(f"median celeriac: {med['celeriac'][0]:.0f} tasks/s, {med['celeriac'][1]:.0f} µs CPU/task")
    print(f"ratio celeriac/stock: throughput {med['celeriac'][0] / med['stock'][0]:.2f}x, "
          f"CPU per task {med['celeriac'][1] / med['stock'][1]:.2f}x")


if __name__ == "__main__":
    main()
