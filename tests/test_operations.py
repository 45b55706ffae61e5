"""Operations (issue: Step 4, points 6-8): JSON logs, --logfile, warm shutdown with a deadline,
--detach and the SIGHUP restart."""

import json
import os
import signal
import time
import uuid

import pytest
from billiard.exceptions import WorkerLostError

import testapp
from conftest import wait_started, wait_until


def test_json_log_format(worker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--log-format", "json"]).wait_ready()
    r = testapp.add.delay(2, 2)
    assert r.get(timeout=10) == 4
    w.wait_for('"state": "SUCCESS"')
    lines = [json.loads(line) for line in w.log().splitlines() if line.startswith("{")]
    received = [line for line in lines if line.get("task_id") == r.id and line.get("state") == "RECEIVED"]
    assert received and received[0]["process"] == "MainProcess" and received[0]["task"] == "testapp.add"
    done = [line for line in lines if line.get("task_id") == r.id and line.get("state") == "SUCCESS"]
    assert done and done[0]["process"] == "ForkPoolWorker-1" and done[0]["runtime"] >= 0
    assert "guest:guest" not in w.log()  # never a broker password


def test_logfile(worker, tmp_path):
    logfile = tmp_path / "worker.log"
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-f", str(logfile)])
    deadline = time.time() + 30
    while (not logfile.exists() or " ready." not in logfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    r = testapp.add.delay(3, 3)
    assert r.get(timeout=10) == 6
    time.sleep(0.3)
    text = logfile.read_text()
    assert f"Task testapp.add[{r.id}] received" in text  # the supervisor's line
    assert f"Task testapp.add[{r.id}] succeeded" in text  # the child's line
    assert "received" not in w.log()


def test_file_names_expand_as_celery_multi_writes_them(worker, tmp_path):
    """`%n` (node name), `%i` (pool process index: 0 in the main process), `%I`: each pool
    process logs to a file of its own, the main process to its, the pidfile is named for the
    node; nothing is written under the unexpanded name."""
    node = f"node{uuid.uuid4().hex[:6]}"
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "2", "-n", f"{node}@%h",
                "-f", str(tmp_path / "%n-%i.log"), "--pidfile", str(tmp_path / "%n%I.pid")])
    main_log = tmp_path / f"{node}-0.log"
    wait_until(lambda: main_log.exists() and " ready." in main_log.read_text(), timeout=30,
               what=lambda: f"a ready worker in {main_log}; files: {sorted(p.name for p in tmp_path.iterdir())}")
    assert (tmp_path / f"{node}.pid").read_text().strip() == str(w.pid)
    marker = uuid.uuid4().hex
    # Both busy at once: one task in each pool process.
    names = sorted(r.get(timeout=10) for r in [testapp.print_after.delay(marker, 0.5) for _ in range(2)])
    assert names == ["ForkPoolWorker-1", "ForkPoolWorker-2"]
    for i in (1, 2):
        text = (tmp_path / f"{node}-{i}.log").read_text()
        assert f"{marker} from ForkPoolWorker-{i}" in text, text
        assert f"{marker} from ForkPoolWorker-{3 - i}" not in text
    assert marker not in main_log.read_text()
    assert not [p.name for p in tmp_path.iterdir() if "%" in p.name]


def test_warm_shutdown_deadline(worker, broker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "2", "--shutdown-timeout", "1"]).wait_ready()
    late_marker, early_marker = f"m:{uuid.uuid4()}", f"m:{uuid.uuid4()}"
    late = testapp.late_sleep.delay(30, late_marker)
    early = testapp.sleep.delay(30, early_marker)
    deadline = time.time() + 10
    while time.time() < deadline and not (testapp._redis().llen(late_marker) and testapp._redis().llen(early_marker)):
        time.sleep(0.02)
    started = time.time()
    w.signal(signal.SIGTERM)
    assert w.wait_exit(15) == 0
    assert time.time() - started < 6
    # acks_late: back in the queue for another worker; early ack: recorded as lost.
    assert broker.ready("celery") == 1
    with pytest.raises(WorkerLostError):
        early.get(timeout=10)
    assert late.state == "PENDING"


def _alive(pid):
    """A live process, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_detach_with_pidfile_and_logfile(worker, tmp_path):
    pidfile, logfile = tmp_path / "w.pid", tmp_path / "w.log"
    launcher = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--detach",
                       "--pidfile", str(pidfile), "-f", str(logfile)])
    assert launcher.wait_exit(10) == 0  # the launching process returns at once
    wait_until(lambda: pidfile.exists() and logfile.exists() and " ready." in logfile.read_text(), timeout=30,
               interval=0.1, what=lambda: "a pidfile and a ready worker; log: "
               + (logfile.read_text() if logfile.exists() else "no log file"))
    pid = int(pidfile.read_text())
    try:
        assert pid != launcher.pid and _alive(pid)
        assert os.getsid(pid) not in (os.getsid(0), pid)  # its own session, and no terminal to take
        assert testapp.add.delay(20, 22).get(timeout=10) == 42
        assert launcher.log() == ""  # nothing went to the terminal it left
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), timeout=20, interval=0.1, what=f"worker {pid} gone after SIGTERM")
        assert not pidfile.exists()
        assert "Warm shutdown" in logfile.read_text()
    finally:
        if _alive(pid):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_detach_reports_an_unusable_logfile_before_leaving(worker, tmp_path):
    w = worker(["-A", "testapp", "worker", "--detach", "-f", str(tmp_path / "missing" / "w.log")])
    assert w.wait_exit(10) == 1
    assert "cannot open the log file" in w.log()


def test_sighup_restarts_in_place(worker):
    # stdout is a file here, not a terminal: SIGHUP restarts, as stock's detached workers do.
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1"]).wait_ready()
    marker = f"m:{uuid.uuid4()}"
    running = testapp.sleep.delay(1, marker)
    wait_started(marker)
    w.signal(signal.SIGHUP)
    w.wait_for("Restarting celeriac worker")
    assert running.get(timeout=15) == 1  # a warm shutdown first: the running task finished
    deadline = time.time() + 30
    while w.log().count(" ready.") < 2:
        assert time.time() < deadline and w.proc.poll() is None, w.log()
        time.sleep(0.1)
    assert w.proc.poll() is None  # the same process, executed anew
    assert testapp.add.delay(1, 2).get(timeout=10) == 3
    assert w.stop() == 0
