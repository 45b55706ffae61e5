"""The built-in HTTP endpoint (issue: Step 4, point 5): /healthz, /readyz, /metrics."""

import time

import testapp
from conftest import free_port, wait_until
from conftest import http_get as get


def test_health_readiness_and_metrics(worker):
    port = free_port()
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "2", "--http-bind", "127.0.0.1"],
               env={"CELERIAC_HTTP_PORT": str(port)})
    w.wait_ready()
    assert get(port, "/healthz") == (200, "ok\n")
    wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=5, interval=0.1, what="/readyz ready")
    assert get(port, "/readyz") == (200, "ready\n")
    assert testapp.add.delay(1, 2).get(timeout=10) == 3
    import pytest

    with pytest.raises(testapp.TestError):
        testapp.fail.delay("x").get(timeout=10)
    time.sleep(0.3)
    status, text = get(port, "/metrics")
    assert status == 200
    assert 'celeriac_tasks_total{task="testapp.add",event="received"} 1' in text
    assert 'celeriac_tasks_total{task="testapp.add",event="succeeded"} 1' in text
    assert 'celeriac_tasks_total{task="testapp.fail",event="failed"} 1' in text
    assert 'celeriac_task_runtime_seconds_count{task="testapp.add"} 1' in text
    assert 'celeriac_task_queue_wait_seconds_count{task="testapp.add"} 1' in text
    assert "celeriac_children_alive 2" in text
    assert "celeriac_ready 1" in text
    assert get(port, "/nope")[0] == 404


def test_reconnects_are_counted(worker):
    from conftest import BROKER_KIND

    if BROKER_KIND != "amqp":
        import pytest

        pytest.skip("closes the connection from RabbitMQ's side")
    from test_amqp import celeriac_connections, rabbitmqctl

    port = free_port()
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1", "--http-port", str(port),
                "--http-bind", "127.0.0.1"]).wait_ready()
    for pid in celeriac_connections():
        rabbitmqctl("close_connection", pid, "test")
    w.wait_for("Connection to broker lost")
    wait_until(lambda: "celeriac_broker_reconnects_total 1" in get(port, "/metrics")[1], timeout=10, interval=0.1,
               what="celeriac_broker_reconnects_total 1 in /metrics")
    assert testapp.add.delay(1, 1).get(timeout=10) == 2
