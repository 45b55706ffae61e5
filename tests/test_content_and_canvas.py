"""Content types, compression and the task API surface that runs in the child: states,
replace, Ignore, link/link_error, chord errors (issue: Step 3, points 9, 11, 12)."""

import datetime
import decimal
import time
import uuid

import pytest
from celery import chord, group
from celery.exceptions import ChordError

import testapp
from conftest import BROKER_KIND, wait_until
from test_faults import pool_children

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]


@pytest.mark.parametrize("compression", ["zlib", "bzip2"])
def test_compressed_bodies(worker, compression):
    worker(WORKER).wait_ready()
    assert testapp.add.apply_async((20, 22), compression=compression).get(timeout=10) == 42


def test_kombu_json_type_markers(worker):
    worker(WORKER).wait_ready()
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    ident = uuid.UUID(int=5)
    out = testapp.types_echo.delay(when, ident, decimal.Decimal("1.5"), b"\x00\x01").get(timeout=10)
    assert out == ["2024-01-02T03:04:05", str(ident), "2.5", "\x00\x01"]


def test_json_bodies_decode_as_kombu_decodes_them(worker):
    """The child decodes plain JSON bodies without kombu's per-object hook; bodies that hook
    could act on (type markers, \\u escapes) still go through kombu, with the same result."""
    worker(WORKER).wait_ready()
    cases = [
        (("🎉 ok", [1.5, None, True, 2**70, -3], {"nested": {"k": "v"}, "": []}), {"plain": "text"}),  # decoded by the child
        (("é ü→",), {}),  # \u00.. escapes: kombu
        ((), {"when": datetime.datetime(2024, 1, 2, 3, 4, 5), "id": uuid.UUID(int=7)}),  # type markers: kombu
    ]
    for args, kwargs in cases:
        out = testapp.echo.apply_async(args, kwargs).get(timeout=10)
        assert out == {"args": list(args), "kwargs": kwargs}


def test_custom_headers_reach_the_request_as_stock_decodes_them(worker):
    """The request meta goes to the child in marshal, or in JSON for kombu's decoder when a
    header holds a type marker (a datetime on the JSON-envelope brokers)."""
    worker(WORKER).wait_ready()
    plain = {"h_text": "é 🎉", "h_big": 2**62, "h_neg": -5, "h_float": 0.25, "h_list": [1, None, True],
             "h_map": {"k": ["v"]}, "h_none": None}
    out = testapp.header_values.apply_async(tuple(plain), headers=plain).get(timeout=10)
    assert out == {k: [type(v).__name__, repr(v)] for k, v in plain.items()}
    if BROKER_KIND != "amqp":  # AMQP tables carry a timestamp type of their own
        when = datetime.datetime(2024, 1, 2, 3, 4, 5)
        out = testapp.header_values.apply_async(("h_when", "h_text"), headers={"h_when": when, "h_text": "x"}).get(
            timeout=10
        )
        assert out == {"h_when": ["datetime", repr(when)], "h_text": ["str", "'x'"]}


def test_request_headers_hold_only_the_messages_own_headers(worker):
    """`self.request.headers` as Celery's Context makes it: the headers Celery does not know,
    or None. Each case runs twice: the child remembers which names are Celery's."""
    worker(WORKER).wait_ready()
    for _ in range(2):
        assert testapp.request_headers.delay().get(timeout=10) is None
        custom = {"x-trace": "abc", "h_n": 5}
        assert testapp.request_headers.apply_async(headers=custom).get(timeout=10) == custom
        assert testapp.request_headers.apply_async(headers={"x-other": [1]}).get(timeout=10) == {"x-other": [1]}


def test_pickle_when_accepted(worker):
    worker(WORKER, env={"TESTAPP_ACCEPT": "json,pickle", "C_FORCE_ROOT": "1"}).wait_ready()
    assert testapp.add.apply_async((40, 2), serializer="pickle").get(timeout=10) == 42


def test_pickle_refused_when_not_accepted(worker):
    w = worker(WORKER).wait_ready()
    r = testapp.add.apply_async((1, 1), serializer="pickle")
    w.wait_for("Refusing to deserialize untrusted content of type application/x-python-serialize")
    # Beyond stock (PENDING forever): the refusal is stored for whoever waits on the result.
    with pytest.raises(Exception) as refused:
        r.get(timeout=10)
    assert type(refused.value).__name__ == "ContentDisallowed"
    assert testapp.add.delay(2, 2).get(timeout=10) == 4


def test_root_with_pickle_is_refused_as_stock(worker):
    import os

    if os.getuid() != 0:
        pytest.skip("only root is refused")
    w = worker(WORKER, env={"TESTAPP_ACCEPT": "json,pickle", "C_FORCE_ROOT": ""})
    assert w.wait_exit(30) == 1
    assert "pickle" in w.log().lower() and "root" in w.log().lower()


def test_track_started_and_custom_states(worker):
    w = worker(WORKER, env={"TESTAPP_TRACK_STARTED": "1"}).wait_ready()
    r = testapp.sleep.delay(1)
    wait_until(lambda: r.state == "STARTED", timeout=5, interval=0.02, what=lambda: f"state STARTED (is {r.state})")
    # The tracer, built in the child on the task's first run, names the child that runs it.
    assert r.info["pid"] in pool_children(w.pid), r.info
    assert r.get(timeout=10) == 1
    p = testapp.progress.delay(3)
    seen = set()
    while not p.ready():
        if p.state == "PROGRESS":
            seen.add(p.info["done"])
        time.sleep(0.05)
    assert p.get() == 3 and seen and seen <= {1, 2, 3}


def test_replace_and_ignore(worker):
    worker(WORKER).wait_ready()
    assert testapp.replaced.delay(5).get(timeout=10) == 105
    r = testapp.ignore_me.delay()
    assert testapp.add.delay(1, 1).get(timeout=10) == 2
    time.sleep(0.3)
    assert r.state == "PENDING"  # Ignore stores nothing


def test_link_and_link_error(worker):
    worker(WORKER).wait_ready()
    r = testapp.add.apply_async((1, 1), link=testapp.add.s(10))
    assert r.get(timeout=10) == 2
    child = r.children[0]
    assert child.get(timeout=10) == 12
    bad = testapp.fail.apply_async(("nope",), link_error=testapp.on_error.s())
    with pytest.raises(testapp.TestError):
        bad.get(timeout=10)
    errback = wait_until(lambda: testapp._redis().get(f"errback:{bad.id}"), timeout=10, what="the errback's record")
    assert b"nope" in errback


def test_nested_workflow_and_chord_error(worker):
    worker(WORKER).wait_ready()
    nested = chord(group(testapp.add.s(i, i) for i in range(3)), testapp.echo.s())
    assert nested().get(timeout=20) == {"args": [[0, 2, 4]], "kwargs": {}}
    broken = chord([testapp.add.s(1, 1), testapp.fail.s("in chord")], testapp.echo.s())
    with pytest.raises((ChordError, testapp.TestError)):
        broken().get(timeout=20)
