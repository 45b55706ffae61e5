"""The benchmark's bare consumer (`--bare-consumer`, bench/run.py's ceiling and latency floor):
it takes and acks what a Celery producer sends, runs nothing, and with `--bare-stamps` notes
each delivery's task id and arrival time (run on RabbitMQ and Redis, the benchmark's brokers)."""

import time

import testapp
from conftest import wait_until


def test_bare_consumer_acks_everything_and_stamps_each_arrival(worker, broker, backend, tmp_path):
    stamps = tmp_path / "stamps.txt"
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--bare-consumer", "--bare-stamps", str(stamps)])
    sent = {}  # sent before or after it subscribes: it logs no "ready."
    for i in range(20):
        sent[testapp.add.delay(i, i).id] = time.time()

    def arrived():
        lines = stamps.read_text().splitlines() if stamps.exists() else []
        return dict(line.split() for line in lines)

    wait_until(lambda: len(arrived()) == 20, timeout=30, what="20 stamps")
    got = arrived()
    assert set(got) == set(sent)
    # A stamp is taken when the delivery reaches the consumer, after the producer sent it.
    assert all(float(got[i]) >= sent[i] - 0.001 for i in sent)
    wait_until(lambda: broker.ready() == 0 and broker.unacked() == 0, timeout=20, what="everything acked")
    assert w.stop() == 0
    # Nothing ran: no result was stored.
    assert not [k for k in backend.keys("celery-task-meta-*")]
