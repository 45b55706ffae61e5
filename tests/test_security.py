"""Security (issue Step 8, point 9): a broker password and a result backend password appear in
no log line, banner, `inspect conf` reply, `celeriac config` output or metric; TLS to Redis
(`rediss://`) verifies the server's certificate against the app's CA (amqps: test_amqp.py)."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import testapp
from conftest import APPS, BIN, BROKER_KIND, BROKER_URL, REDIS_HOST, REDIS_PORT, free_port, http_get, only_on

pytestmark = pytest.mark.skipif(BROKER_KIND not in ("amqp", "redis"), reason="needs a broker with passwords")

NODE = "secretive@testhost"


@pytest.fixture
def redis_user():
    """A Redis user of our own with a password (ACL, Redis >= 6); removed afterwards."""
    r = testapp._redis()
    name, password = f"celeriac-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    r.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all")
    yield name, password
    r.execute_command("ACL", "DELUSER", name)


def test_passwords_never_shown(worker, broker, redis_user):
    user, password = redis_user
    backend = f"redis://{user}:{password}@{REDIS_HOST}:{REDIS_PORT}/{testapp.app.conf.result_backend.rsplit('/', 1)[1]}"
    env = {"CELERIAC_TEST_BACKEND": backend}
    secrets = [password]
    if BROKER_KIND == "redis":
        env["CELERIAC_TEST_BROKER"] = BROKER_URL.replace("redis://", f"redis://{user}:{password}@")
    else:
        secrets.append(":guest@")  # guest's password in amqp://guest:guest@...
    port = free_port()
    w = worker(["-A", "testapp", "worker", "-l", "debug", "-c", "1", "-n", NODE, "--http-port", str(port),
                "--http-bind", "127.0.0.1"], env=env).wait_ready()
    assert testapp.add.delay(2, 2).get(timeout=10) == 4
    conf = testapp.app.control.inspect(destination=[NODE], timeout=3).conf(with_defaults=False)
    assert conf and NODE in conf, conf
    config = subprocess.run([str(BIN), "-A", "testapp", "config", "--json"], cwd=str(APPS), capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, VIRTUAL_ENV=sys.prefix, **env))
    assert config.returncode == 0, config.stderr
    shown = {"log": w.log(), "inspect conf": json.dumps(conf), "metrics": http_get(port, "/metrics")[1],
             "config": config.stdout + config.stderr}
    for where, text in shown.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} shown in {where}"
    assert "**@" in w.log()  # the banner shows the URLs, masked


@pytest.fixture
def tls_redis(test_ca, tmp_path):
    """A Redis server of the test's own that speaks TLS only, with a certificate from the test's CA."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is needed for the rediss test")
    ca, cert, key = test_ca
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    probe = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca), ssl_cert_reqs="required")
    deadline = time.monotonic() + 20
    while True:
        try:
            probe.ping()
            break
        except redis.exceptions.ConnectionError:
            assert server.poll() is None and time.monotonic() < deadline, "the TLS Redis server did not start"
            time.sleep(0.1)
    yield port, ca
    server.terminate()
    server.wait(10)


@only_on("redis")
def test_rediss_verifies_the_server_against_the_apps_ca(worker, tls_redis):
    """Broker and result backend over TLS with `ssl_cert_reqs=required` and the app's CA: tasks
    and remote control work. Without the CA (the system's roots) the certificate is refused and
    the worker says so; without any ssl option it connects unverified with a warning, as kombu."""
    from celery import Celery

    port, ca = tls_redis
    verified = f"rediss://127.0.0.1:{port}/{{db}}?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    env = {"CELERIAC_TEST_BROKER": verified.format(db=0), "CELERIAC_TEST_BACKEND": verified.format(db=1)}
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1"], env=env).wait_ready()
    assert "rediss://" in w.log() and f"127.0.0.1:{port}/0" in w.log()
    producer = Celery("tls_producer", broker=verified.format(db=0), backend=verified.format(db=1))
    try:
        assert producer.send_task("testapp.add", (20, 22)).get(timeout=15) == 42
        assert producer.control.ping(timeout=2)
    finally:
        producer.close()
    assert w.stop() == 0

    untrusted = {"CELERIAC_TEST_BROKER": f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required",
                 "TESTAPP_NO_STARTUP_RETRY": "1"}
    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1"], env=untrusted)
    assert w.wait_exit(timeout=30) != 0
    assert "certificate" in w.log().lower() and " ready." not in w.log()

    w = worker(["-A", "testapp", "worker", "-l", "info", "-c", "1"],
               env={"CELERIAC_TEST_BROKER": f"rediss://127.0.0.1:{port}/0"}).wait_ready()
    assert "without certificate verification" in w.log()
    assert w.stop() == 0
