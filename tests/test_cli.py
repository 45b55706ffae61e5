"""The command line behaves like `celery worker`'s (issue: Step 1, points 2 and 3)."""

import os
import subprocess
import time
import sys

from conftest import APPS, BIN, only_on

import testapp


def run(args, env=None, timeout=60):
    full_env = dict(os.environ, VIRTUAL_ENV=sys.prefix)
    full_env.update(env or {})
    return subprocess.run([str(BIN), *args], cwd=APPS, env=full_env, capture_output=True, text=True, timeout=timeout)


def only_error_line(p):
    """The process failed with exit code 1 and exactly one ERROR line; return it."""
    assert p.returncode == 1
    errors = [line for line in p.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1, p.stderr
    return errors[0]


def test_missing_app_module_is_one_clear_line_and_exit_1(broker):
    line = only_error_line(run(["-A", "no_such_module_here", "worker"]))
    assert "Unable to load celery application" in line
    assert "no_such_module_here" in line


def test_broken_app_is_one_clear_line_and_exit_1(broker):
    assert "this_dependency_is_missing" in only_error_line(run(["-A", "brokenapp", "worker"]))


def test_no_app_at_all(broker):
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_APP", "APP")}
    p = subprocess.run([str(BIN), "worker"], cwd=APPS, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "-A/--app" in p.stderr


def test_usage_errors_exit_2(broker):
    p = run(["-A", "testapp", "worker", "--no-such-flag"])
    assert p.returncode == 2


def test_app_from_environment_and_options_from_celeriac_variables(worker):
    w = worker(["worker"], env={"CELERY_APP": "testapp", "CELERIAC_LOGLEVEL": "INFO", "CELERIAC_CONCURRENCY": "3",
                                "CELERIAC_HOSTNAME": "envnode@%h"})
    w.wait_ready()
    log = w.log()
    assert ".> concurrency: 3" in log
    assert "envnode@" in log
    assert testapp.add.delay(1, 1).get(timeout=10) == 2


def test_app_after_subcommand_and_module_attr_form(worker):
    w = worker(["worker", "--app=testapp:app", "-l", "info", "-c", "1"]).wait_ready()
    assert testapp.add.delay(2, 2).get(timeout=10) == 4
    assert "testapp.add" in w.log()  # the banner lists registered tasks


def test_stock_flags_not_implemented_warn(worker):
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "-P", "solo", "-O", "fair",
                "--without-mingle", "--without-gossip", "--without-heartbeat", "-E"]).wait_ready()
    assert "--pool is accepted for compatibility" in w.log()
    assert testapp.add.delay(2, 2).get(timeout=10) == 4


@only_on("redis")
def test_broker_flag_overrides_app_config(worker, broker):
    other = "redis://127.0.0.1:6379/9"
    import redis

    r9 = redis.Redis.from_url(other)
    r9.delete("celery", "unacked", "unacked_index")
    w = worker(["-A", "testapp", "-b", other, "worker", "-l", "info", "-c", "1"]).wait_ready()
    assert "127.0.0.1:6379/9" in w.log()
    from celery import Celery

    producer = Celery("p", broker=other, backend=testapp.app.conf.result_backend)
    assert producer.send_task("testapp.add", (5, 5)).get(timeout=10) == 10


def test_pidfile(worker, tmp_path):
    pidfile = tmp_path / "w.pid"
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--pidfile", str(pidfile)]).wait_ready()
    assert int(pidfile.read_text()) == w.pid
    second = run(["-A", "testapp", "worker", "-c", "1", "--pidfile", str(pidfile)])
    assert second.returncode == 1 and "held by running process" in second.stderr
    assert w.stop() == 0
    assert not pidfile.exists()


def test_unreachable_broker_at_start_up(broker):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    for url in (f"redis://127.0.0.1:{port}/0", f"amqp://guest:guest@127.0.0.1:{port}//"):
        # broker_connection_retry_on_startup=False: one try, one clear error, exit 1.
        p = run(["-A", "testapp", "worker", "-c", "1"], env={"CELERIAC_TEST_BROKER": url, "TESTAPP_NO_STARTUP_RETRY": "1"})
        assert p.returncode == 1, p.stderr
        assert "Cannot connect to" in p.stderr and "Trying again" not in p.stderr
        # With retries, it says it is retrying, and gives up after broker_connection_max_retries.
        p = run(["-A", "testapp", "worker", "-c", "1"], env={"CELERIAC_TEST_BROKER": url, "TESTAPP_MAX_RETRIES": "1"})
        assert p.returncode == 1 and "Trying again in" in p.stderr


def test_config_prints_the_effective_settings_and_their_sources(broker):
    import json

    p = run(["-A", "testapp", "-b", "redis://:s3cret@127.0.0.1:6379/10", "config", "-c", "3", "--json",
             "--autoscale", "6,2"], env={"CELERIAC_PREFETCH_MULTIPLIER": "2"})
    assert p.returncode == 0, p.stderr
    conf = json.loads(p.stdout)
    assert conf["concurrency"] == {"value": 2, "source": "command line"}  # autoscale's minimum
    assert conf["autoscale"] == {"value": [6, 2], "source": "command line"}
    assert conf["prefetch_multiplier"] == {"value": 2, "source": "environment (CELERIAC_PREFETCH_MULTIPLIER)"}
    assert conf["prefetch_count"]["value"] == 12
    assert conf["accept_content"] == {"value": ["application/json"], "source": "app (accept_content)"}
    assert conf["result_backend"]["source"] == "app (result_backend)"
    assert conf["broker_url"]["source"] == "command line"
    assert conf["mingle"] == {"value": True, "source": "default"}
    assert "s3cret" not in p.stdout + p.stderr
    # The table form says the same; nothing was started or consumed.
    table = run(["-A", "testapp", "config", "--without-gossip"])
    assert table.returncode == 0, table.stderr
    assert any(line.split()[:2] == ["gossip", "false"] and line.endswith("command line")
               for line in table.stdout.splitlines()), table.stdout
    assert broker.ready("celery") == 0


def test_purge_and_include(worker, broker):
    waiting = [testapp.add.delay(1, 1) for _ in range(3)]
    time.sleep(0.5)
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--purge", "-I", "extra_tasks"]).wait_ready()
    assert "purge: Erased 3 messages from the queue." in w.log()
    time.sleep(1)
    assert all(r.state == "PENDING" for r in waiting)  # gone, never run
    assert broker.ready("celery") == 0
    assert "extra_tasks.triple" in w.log()  # the included module's task is registered
    assert testapp.app.send_task("extra_tasks.triple", (3,)).get(timeout=10) == 9


def other_minor_python():
    """An interpreter of another Python minor version than the one celeriac is built for."""
    import glob
    import shutil

    built = f"{sys.version_info[0]}.{sys.version_info[1]}"
    found = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    found += [p for p in (shutil.which(f"python3.{m}") for m in range(8, 15)) if p]
    for python in found:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() != built:
            return python, out.stdout.strip()
    raise AssertionError("no Python of another minor version on this machine (pyenv installs several)")


def test_another_python_is_refused_naming_both_versions(broker):
    """celeriac never mixes two Pythons: an interpreter of another version is refused before
    anything starts, with both versions named."""
    python, version = other_minor_python()
    line = only_error_line(run(["--python", python, "-A", "testapp", "worker"]))
    built = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert f"built for Python {built}" in line and f"is Python {version}" in line, line


def test_version_names_celeriac_python_and_celery(broker):
    import celery

    p = run(["--version"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("celeriac ") and f"built for Python {sys.version_info[0]}.{sys.version_info[1]}" in lines[0]
    assert lines[1].startswith(f"python {sys.version.split()[0]} ({sys.prefix}/bin/python; libpython in ")
    assert lines[2] == f"celery {celery.__version__}"


def test_doctor_says_what_is_wrong_and_how_to_fix_it(broker):
    from conftest import BROKER_URL

    p = run(["-A", "testapp", "doctor"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "All good" in p.stdout and p.stdout.count("  ok    ") == 6, p.stdout
    # Nothing listens on the port of a socket we just closed.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = run(["-A", "testapp", "--result-backend", f"redis://127.0.0.1:{port}/0", "doctor"],
            env={"TESTAPP_NO_STARTUP_RETRY": "1"})
    assert p.returncode == 1
    assert "FAIL  result backend" in p.stdout and "fix: start it" in p.stdout, p.stdout
    assert "ok    broker" in p.stdout and BROKER_URL.split("@")[-1].split("://")[-1] in p.stdout
    p = run(["-A", "no_such_app_module", "doctor"])
    assert p.returncode == 1
    assert "FAIL  app no_such_app_module" in p.stdout and "No module named 'no_such_app_module'" in p.stdout
    p = run(["-b", f"redis://127.0.0.1:{port}/0", "-A", "testapp", "doctor"])
    assert p.returncode == 1 and "FAIL  broker" in p.stdout and "Connection refused" in p.stdout, p.stdout
