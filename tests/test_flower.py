"""A real Flower watches celeriac (issue: Step 4, point 2): the worker appears, tasks appear
with their states and runtimes, and Flower's inspect calls get answers."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

import testapp
from conftest import APPS, free_port

NODE = "flowered@testhost"


def api(port, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def flower(broker, tmp_path):
    pytest.importorskip("flower", reason="flower is installed by requirements-dev.txt")
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "testapp", "flower", f"--port={port}",
                             "--address=127.0.0.1", "--inspect_timeout=3000"],
                            cwd=APPS, env=dict(os.environ, FLOWER_UNAUTHENTICATED_API="true"), stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            api(port, "/api/workers?refresh=0")
            break
        except Exception:
            time.sleep(0.3)
    yield port
    proc.terminate()
    proc.wait(10)
    log.close()


def test_flower_sees_worker_and_tasks(worker, flower):
    worker(["-A", "testapp", "worker", "-l", "info", "-c", "2", "-n", NODE, "-E"]).wait_ready()
    ok = testapp.add.delay(2, 3)
    assert ok.get(timeout=10) == 5
    deadline = time.time() + 30
    task = {}
    while time.time() < deadline:
        tasks = api(flower, "/api/tasks")
        task = tasks.get(ok.id, {})
        if task.get("state") == "SUCCESS":
            break
        time.sleep(0.5)
    assert task.get("state") == "SUCCESS" and task.get("worker") == NODE
    assert task.get("name") == "testapp.add" and task.get("runtime") is not None
    workers = {}
    deadline = time.time() + 20
    while NODE not in workers and time.time() < deadline:
        workers = api(flower, "/api/workers?refresh=1")  # Flower broadcasts its inspect commands
        time.sleep(0.5)
    assert NODE in workers and workers[NODE].get("stats", {}).get("pool", {}).get("max-concurrency") == 2
