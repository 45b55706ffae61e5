"""Bad input never crashes the worker or loses a message silently (issue: Step 1, point 8)."""

import base64
import json
import uuid

import pytest
from celery.exceptions import NotRegistered

import testapp
from conftest import only_on, wait_until

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "1"]


def envelope(body: bytes, headers, content_type="application/json", properties=None):
    """A kombu envelope (reference §2.1), as a stock producer writes it to Redis, SQS or a folder."""
    props = {
        "correlation_id": headers.get("id") if isinstance(headers, dict) else None,
        "reply_to": "r",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": "celery"},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    props.update(properties or {})
    return json.dumps({
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
        "properties": props,
    })


def v2_headers(task, task_id):
    return {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
            "root_id": task_id, "parent_id": None, "argsrepr": "()", "kwargsrepr": "{}",
            "origin": "gen1@test", "ignore_result": False}


def failure_of(task_id, timeout=10):
    """The exception type stored for a task that could not run."""
    result = testapp.app.AsyncResult(task_id)
    wait_until(lambda: result.state == "FAILURE", timeout=timeout,
               what=lambda: f"FAILURE for {task_id} (is {result.state})")
    return type(result.result).__name__


def still_serving():
    assert testapp.add.delay(1, 2).get(timeout=10) == 3


def test_unregistered_task_is_rejected_and_stored_as_failure(worker, broker):
    w = worker(WORKER).wait_ready()
    r = testapp.app.send_task("no.such.task", (1,))
    with pytest.raises(NotRegistered):
        r.get(timeout=10)
    assert "Received unregistered task of type 'no.such.task'" in w.log()
    still_serving()
    wait_until(lambda: broker.unacked() == 0 and broker.ready("celery") == 0, what="an empty queue")


@only_on("redis", "filesystem", "sqs")  # crafts raw kombu envelopes (AMQP has none)
def test_body_that_is_not_json(worker, broker):
    w = worker(WORKER).wait_ready()
    task_id = str(uuid.uuid4())
    broker.put_raw("celery", envelope(b"{this is not json", v2_headers("testapp.add", task_id)))
    still_serving()
    w.wait_for("Can't decode message body")
    wait_until(lambda: broker.unacked() == 0, what="nothing unacked")  # acked, as stock does, so it does not loop
    # Beyond stock (PENDING forever): the failure is stored for whoever waits on the result.
    assert failure_of(task_id) == "DecodeError"


@only_on("redis", "filesystem", "sqs")  # crafts raw kombu envelopes (AMQP has none)
def test_unsupported_content_type_is_rejected(worker, broker):
    w = worker(WORKER).wait_ready()
    task_id = str(uuid.uuid4())
    broker.put_raw("celery", envelope(b"\x80\x04garbage", v2_headers("testapp.add", task_id),
                                    content_type="application/x-python-serialize"))
    still_serving()
    w.wait_for("Refusing to deserialize untrusted content of type application/x-python-serialize")
    wait_until(lambda: broker.unacked() == 0, what="nothing unacked")
    assert failure_of(task_id) == "ContentDisallowed"


@only_on("redis", "filesystem", "sqs")  # crafts raw kombu envelopes (AMQP has none)
def test_missing_headers_unknown_message(worker, broker):
    w = worker(WORKER).wait_ready()
    broker.put_raw("celery", envelope(b"[[1, 2], {}, {}]", {}))
    broker.put_raw("celery", envelope(b"[[1, 2], {}, {}]", ["not", "a", "mapping"]))
    still_serving()
    w.wait_for("Received and deleted unknown message")
    assert w.log().count("Received and deleted unknown message") == 2
    wait_until(lambda: broker.unacked() == 0, what="nothing unacked")


@only_on("redis", "filesystem", "sqs")  # crafts raw kombu envelopes (AMQP has none)
def test_bad_eta_and_missing_id(worker, broker):
    w = worker(WORKER).wait_ready()
    headers = v2_headers("testapp.add", str(uuid.uuid4()))
    headers["eta"] = "next tuesday"
    broker.put_raw("celery", envelope(b"[[1, 2], {}, {}]", headers))
    headers = v2_headers("testapp.add", "x")
    del headers["id"]
    broker.put_raw("celery", envelope(b"[[1, 2], {}, {}]", headers))
    still_serving()
    w.wait_for("invalid eta value")
    w.wait_for("has no id")
    wait_until(lambda: broker.unacked() == 0, what="nothing unacked")


@only_on("redis", "filesystem", "sqs")  # crafts raw kombu envelopes (AMQP has none)
def test_kwargs_not_a_mapping_is_reported_as_stock_does(worker, broker):
    # Stock: the tracer raises InvalidTaskError outside the task body, logs it as an internal
    # error and stores nothing (the result stays PENDING); the message is acked. celeriac also
    # stores the failure.
    w = worker(WORKER).wait_ready()
    task_id = str(uuid.uuid4())
    broker.put_raw("celery", envelope(b'[[1, 2], "kwargs should be a map", {}]', v2_headers("testapp.add", task_id)))
    still_serving()
    w.wait_for("Task keyword arguments is not a mapping")
    assert failure_of(task_id) == "InvalidTaskError"
    wait_until(lambda: broker.unacked() == 0, what="nothing unacked")


@only_on("redis", "filesystem", "sqs")  # crafts raw kombu envelopes (AMQP has none)
def test_envelope_that_is_not_kombu(worker, broker):
    w = worker(WORKER).wait_ready()
    broker.put_raw("celery", "definitely not an envelope")
    broker.put_raw("celery", json.dumps({"body": "!!!notbase64", "properties": {"body_encoding": "base64"}}))
    still_serving()
    w.wait_for("is not a kombu envelope")
    if broker.kind == "sqs":
        # kombu's SQS channel takes a body that is not JSON for a foreign producer's plain body.
        assert w.log().count("is not a kombu envelope") == 1
        w.wait_for("Can't decode message body")
    else:
        assert w.log().count("is not a kombu envelope") == 2
