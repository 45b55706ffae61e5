"""The Flask and FastAPI examples run under celeriac as their READMEs say: the web app is started,
called over HTTP, and the tasks it enqueued are run by celeriac's pool (issue: Step 9, point 2).
Only the worker's command differs from stock; the apps know nothing of celeriac."""

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import BACKEND_URL, BROKER_URL, ROOT, free_port, http_get

EXAMPLES = ROOT / "examples"


@pytest.fixture
def web(tmp_path):
    """Start a web app: web(command, cwd) -> its port. Stopped at the end."""
    started = []

    def start(command, cwd):
        port = free_port()
        log = open(tmp_path / f"web-{port}.log", "wb")
        env = dict(os.environ, CELERY_BROKER_URL=BROKER_URL, CELERY_RESULT_BACKEND=BACKEND_URL, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", *command, "--port", str(port)], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, log))
        deadline = time.monotonic() + 30
        while True:
            try:
                http_get(port, "/")  # any answer (404 at /) means it is up
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / f"web-{port}.log").read_text()
                assert time.monotonic() < deadline, "the web app did not start listening"
                time.sleep(0.1)
        return port

    yield start
    for proc, log in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def call(port, method, path, form=None, body=None):
    """(status, JSON answer) of an HTTP request to the web app."""
    data, headers = None, {}
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read())


def poll(port, path, done, timeout=30):
    """GET path until done(answer) holds; every answer seen on the way is returned."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        seen.append(call(port, "GET", path)[1])
        if done(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"{path}: still {seen[-1]}"
        time.sleep(0.05)


def pool_children(pid):
    """Every process under pid (the supervisor, its zygote, the pool children)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True).stdout
    parents = {child: parent for child, parent in (map(int, line.split()) for line in out.splitlines())}
    below, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in below} - below
        grew = bool(more)
        below |= more
    return below - {pid}


def test_flask_example(worker, web):
    cwd = EXAMPLES / "flask_app"
    w = worker(["-A", "make_celery", "worker", "-l", "info", "-c", "2"], cwd=cwd,
               env={"CELERY_BROKER_URL": BROKER_URL, "CELERY_RESULT_BACKEND": BACKEND_URL,
                    "FLASK_GREETING": "Bonjour"}).wait_ready()
    port = web(["flask", "--app", "flask_app", "run"], cwd)

    status, started = call(port, "POST", "/add", form={"a": 2, "b": 3})
    assert status == 200
    answer = poll(port, f"/result/{started['result_id']}", lambda a: a["ready"])[-1]
    assert answer == {"state": "SUCCESS", "ready": True, "successful": True, "value": 5}

    # The task reads current_app.config: it ran inside the Flask app context (celery_init_app).
    _, started = call(port, "POST", "/greet", form={"name": "Ada"})
    answer = poll(port, f"/result/{started['result_id']}", lambda a: a["ready"])[-1]
    assert answer["value"] == "Bonjour, Ada! (from flask_app)"

    # update_state progress is visible to the web app while the task runs.
    _, started = call(port, "POST", "/process", form={"total": 20})
    seen = poll(port, f"/result/{started['result_id']}", lambda a: a["ready"])
    assert any(a["state"] == "PROGRESS" and 0 < a["value"]["current"] < 20 for a in seen), seen
    assert seen[-1]["value"] == {"current": 20, "total": 20}

    log = w.log()
    assert f"Task flask_app.tasks.process[{started['result_id']}] succeeded" in log
    assert "flask_app.tasks.greet" in log  # listed in the banner: shared_task bound to the app
    assert w.stop() == 0


def test_fastapi_example(worker, web):
    cwd = EXAMPLES / "fastapi_app"
    w = worker(["-A", "worker", "worker", "-l", "info", "-c", "2"], cwd=cwd,
               env={"CELERY_BROKER_URL": BROKER_URL, "CELERY_RESULT_BACKEND": BACKEND_URL}).wait_ready()
    port = web(["uvicorn", "main:app"], cwd)

    status, started = call(port, "POST", "/tasks/digest", body={"text": "hi", "rounds": 3})
    assert status == 201
    answer = poll(port, f"/tasks/{started['task_id']}", lambda a: a["task_status"] == "SUCCESS")[-1]
    result = answer["task_result"]
    expected = b"hi"
    for _ in range(3):
        expected = hashlib.sha256(expected).digest()
    assert result["sha256"] == expected.hex()
    assert result["pid"] in pool_children(w.pid)  # run by one of celeriac's pool children

    # task_track_started: STARTED is seen while it sleeps, then SUCCESS.
    _, started = call(port, "POST", "/tasks/sleep", body={"seconds": 0.5})
    seen = poll(port, f"/tasks/{started['task_id']}", lambda a: a["task_status"] == "SUCCESS")
    assert "STARTED" in [a["task_status"] for a in seen], seen
    assert seen[-1]["task_result"] is True

    _, started = call(port, "POST", "/tasks/divide", body={"a": 1, "b": 0})
    answer = poll(port, f"/tasks/{started['task_id']}", lambda a: a["task_status"] == "FAILURE")[-1]
    assert answer["task_result"]["error"] == "ZeroDivisionError"

    assert f"Task divide[{started['task_id']}] raised unexpected: ZeroDivisionError" in w.log()
    assert w.stop() == 0
