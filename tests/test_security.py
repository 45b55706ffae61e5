"""Secrets stay secret (issue Step 8, point 9): a broker password and a result backend password
appear in no log line, banner, `inspect conf` reply, `celeriac config` output or metric."""

import json
import os
import subprocess
import sys
import uuid

import pytest

import testapp
from conftest import APPS, BIN, BROKER_KIND, BROKER_URL, REDIS_HOST, REDIS_PORT, free_port, http_get

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
