"""Task semantics a task author relies on (issue: Step 3): retries, rate limits, worker loss,
ETA ordering — on every broker, sent by the real celery package."""

import time
import uuid

import pytest
from billiard.exceptions import WorkerLostError
from celery.exceptions import MaxRetriesExceededError

import testapp
from conftest import wait_until

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]


def test_autoretry_for_with_retry_kwargs(worker):
    worker(WORKER).wait_ready()
    key = f"auto:{uuid.uuid4()}"
    assert testapp.autoretried.delay(key).get(timeout=20) == 2  # third run: request.retries == 2


def test_max_retries_exceeded(worker):
    worker(WORKER).wait_ready()
    with pytest.raises(MaxRetriesExceededError):
        testapp.always_retries.delay().get(timeout=20)


def test_retry_state_is_visible_then_success(worker):
    w = worker(WORKER).wait_ready()
    key = f"slow:{uuid.uuid4()}"
    r = testapp.slow_retry.delay(key)
    wait_until(lambda: r.state == "RETRY", timeout=10, interval=0.02, what=lambda: f"state RETRY (is {r.state})")
    assert r.get(timeout=15) == "done"
    assert w.log().count(f"[{r.id}] received") == 2  # the retry is a new message, same id


def test_rate_limit_spaces_tasks(worker):
    w = worker(WORKER).wait_ready()
    started = time.time()
    times = sorted(r.get(timeout=20) for r in [testapp.limited.delay(i) for i in range(6)])
    # 4/s with a bucket of one: the six runs span at least 5 × 0.25 s.
    assert times[-1] - times[0] >= 1.2, times
    assert time.time() - started < 10
    assert testapp.add.delay(1, 1).get(timeout=5) == 2  # other tasks are not held back
    assert w.proc.poll() is None


def test_disable_rate_limits(worker):
    worker(WORKER, env={"TESTAPP_DISABLE_RATE_LIMITS": "1"}).wait_ready()
    times = sorted(r.get(timeout=20) for r in [testapp.limited.delay(i) for i in range(6)])
    assert times[-1] - times[0] < 1.0, times


@pytest.mark.parametrize("task,expected", [("exit_hard", "exitcode 3"), ("segfault", "signal 11 (SIGSEGV)")])
def test_child_that_exits_or_segfaults(worker, task, expected):
    w = worker(WORKER).wait_ready()
    sig = getattr(testapp, task)
    r = sig.delay(3) if task == "exit_hard" else sig.delay()
    with pytest.raises(WorkerLostError) as info:
        r.get(timeout=15)
    assert expected in str(info.value)
    assert testapp.add.delay(2, 2).get(timeout=10) == 4
    assert w.proc.poll() is None


def test_eta_tasks_run_in_due_order_close_to_their_time(worker):
    worker(WORKER).wait_ready()
    now = time.time()
    offsets = [1.2, 0.4, 0.8]
    results = [(o, testapp.sleep.apply_async((0,), countdown=o)) for o in offsets]
    for offset, r in results:
        r.get(timeout=10)
    done = sorted((r.date_done.timestamp(), o) for o, r in results)
    assert [o for _, o in done] == sorted(offsets)
    for ts, offset in done:
        assert ts - now >= offset - 0.05
        assert ts - now < offset + 0.5


def test_thousands_of_waiting_eta_tasks(worker):
    w = worker(WORKER).wait_ready()
    rs = [testapp.add.apply_async((i, 0), countdown=3) for i in range(2000)]
    assert testapp.add.delay(5, 5).get(timeout=10) == 10  # not starved by the waiting ones
    assert [r.get(timeout=60) for r in rs] == list(range(2000))
    assert w.proc.poll() is None


def test_a_retry_never_finishes_before_the_run_that_sent_it(worker):
    """`self.retry(countdown=0)` publishes the retry before its run stores the RETRY state. An
    idle child taking the retry at once could finish it first, and the RETRY stored after
    would overwrite its SUCCESS (the result stays RETRY for good). A task id that runs in a
    child waits until that run reports: every retried task ends SUCCESS."""
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "2"]).wait_ready()
    results = [testapp.retry_at_once.delay() for _ in range(400)]
    assert [r.get(timeout=60) for r in results] == ["retried"] * 400
    wait_until(lambda: all(r.state == "SUCCESS" for r in results), timeout=5, interval=0.1,
               what=lambda: f"every result SUCCESS (states: {set(r.state for r in results)})")
