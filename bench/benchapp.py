"""The Celery app the benchmark runs under both workers: the same tasks, the same configuration.

Completions are counted where a worker's own bookkeeping cannot be: a task that must be seen to
finish does one Redis INCR (or RPUSH of its latency) on the results database at its end, the
same few microseconds under either worker.
"""

import os
import time

import redis
from celery import Celery

app = Celery("benchapp")
app.conf.update(
    broker_url=os.environ["BENCH_BROKER"],
    result_backend=os.environ["BENCH_BACKEND"],
    worker_prefetch_multiplier=4,
    task_acks_late=False,
)

_client = None


def _redis():
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["BENCH_BACKEND"])
    return _client


@app.task(ignore_result=True)
def noop(i):
    return None


@app.task(ignore_result=True)
def io(seconds):
    time.sleep(seconds)
    _redis().incr("bench:done")


@app.task(ignore_result=True)
def cpu(n):
    total = 0
    for i in range(n):
        total += i * i % 7
    _redis().incr("bench:done")
    return total


@app.task
def result_10k(i):
    return "x" * 10240


@app.task(bind=True, ignore_result=True)
def stamp(self):
    """Latency from enqueue to completion: the producer notes when each id was in the broker."""
    _redis().rpush("bench:latency", f"{self.request.id} {time.time()}")


@app.task
def add(x, y):
    return x + y


@app.task(bind=True, max_retries=1)
def mixed(self, kind):
    """The mixed soak's task: succeeds, fails, or retries once and then succeeds."""
    if kind == "failure":
        raise ValueError("a failure the soak asked for")
    if kind == "retry" and self.request.retries == 0:
        raise self.retry(countdown=0)
    return kind
