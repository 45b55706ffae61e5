"""A stock `celery worker` and celeriac consume one queue at the same time, on every broker.

Both are ordinary consumers of the same queue (on Redis: kombu's `celery` list, the `unacked`
hash and its index), so with both running every task must run exactly once: none lost, none
run by both, nothing left behind in the broker, and celeriac still shuts down cleanly.
"""

import re
import signal
import sys
import uuid

import pytest

import testapp
from conftest import BROKER_KIND, wait_until

TASKS = 2000
SUCCEEDED = re.compile(r"Task testapp\.count\[([0-9a-f-]{36})\] succeeded in")


# kombu's folder transport writes a message file in place and its consumer reads without the
# lock, so a stock worker that keeps up with the producer crashes on a half-written file
# (JSONDecodeError in kombu/transport/filesystem.py `_get`); test_filesystem shares a queue with
# slower tasks instead.
@pytest.mark.skipif(BROKER_KIND == "filesystem", reason="kombu's folder consumer races its producer")
def test_stock_worker_and_celeriac_share_a_queue(worker, broker, backend):
    stock = worker(["-A", "testapp", "worker", "-c", "2", "-l", "info", "-n", "stock@%h",
                    "--without-mingle", "--without-gossip"],
                   command=[sys.executable, "-m", "celery"], name="stock")
    ours = worker(["-A", "testapp", "worker", "-c", "2", "-l", "info", "-n", "celeriac@%h"], name="celeriac")
    stock.wait_ready(timeout=60)
    ours.wait_ready()

    key = f"shared:{uuid.uuid4()}"
    with testapp.app.producer_or_acquire() as producer:
        sent = [testapp.count.apply_async((key,), producer=producer).id for _ in range(TASKS)]
    assert len(set(sent)) == TASKS

    def logs():
        return f"--- stock ---\n{stock.log()[-3000:]}\n--- celeriac ---\n{ours.log()[-3000:]}"

    wait_until(lambda: backend.hlen(key) >= TASKS, timeout=45, interval=0.1,
               what=lambda: f"{TASKS} tasks run (only {backend.hlen(key)})\n{logs()}")
    # The last acknowledgements can trail the last task's HINCRBY by a moment.
    wait_until(lambda: broker.ready("celery") == 0 and broker.unacked() == 0,
               what=lambda: f"an empty broker (ready={broker.ready('celery')} unacked={broker.unacked()})\n{logs()}")
    assert broker.ready("celery") == 0
    assert broker.unacked() == 0

    assert ours.stop(signal.SIGTERM) == 0, f"celeriac exit code {ours.proc.returncode}:\n{ours.log()[-3000:]}"
    stock.stop(signal.SIGTERM)

    # Counted after both workers are gone, so a late duplicate run would show up too.
    runs = {k.decode(): int(v) for k, v in backend.hgetall(key).items()}
    assert set(runs) == set(sent), (
        f"never ran: {len(set(sent) - set(runs))}, unknown ids: {len(set(runs) - set(sent))}")
    twice = {i: n for i, n in runs.items() if n != 1}
    assert not twice, f"{len(twice)} tasks ran more than once, e.g. {list(twice.items())[:5]}"

    by_stock = SUCCEEDED.findall(stock.log())
    by_ours = SUCCEEDED.findall(ours.log())
    assert by_stock, f"the stock worker ran no task:\n{logs()}"
    assert by_ours, f"celeriac ran no task:\n{logs()}"
    assert not set(by_stock) & set(by_ours), "some task ids succeeded in both workers"
    assert sorted(by_stock + by_ours) == sorted(sent), (
        f"'succeeded in' lines: stock {len(by_stock)} + celeriac {len(by_ours)} != {TASKS}")
