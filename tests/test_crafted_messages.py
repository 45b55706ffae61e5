"""Crafted messages published straight to the broker (issue Step 8, point 8): wrong types in
every header, huge headers and bodies, invalid UTF-8, unknown formats, ETAs far in the past or
future or unparsable, negative retries, time limits that are not a pair. One worker takes
them all; none may crash it or vanish silently: each ends as a stored state where it has a
task id (SUCCESS when the task can still run, FAILURE when it cannot, never PENDING forever),
is logged with that id when it cannot run, and leaves nothing unacknowledged behind."""

import json
import time
import uuid

import testapp
from conftest import BROKER_KIND

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]
GOOD_BODY = json.dumps([[1, 2], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()
# One of each JSON type that a header is not supposed to be.
WRONG = {"str": "x", "int": 7, "negative": -3, "float": 1.5, "list": [1, {"a": 2}], "map": {"k": [None]},
         "bool": True, "null": None}


def v2_headers(task_id, task="testapp.add"):
    return {"lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None, "expires": None,
            "group": None, "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": task_id,
            "parent_id": None, "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "crafted@test",
            "ignore_result": False}


def publish(body, headers, content_type="application/json", content_encoding="utf-8"):
    """One message exactly as given, through kombu's producer (no serializing)."""
    with testapp.app.connection_for_write() as conn:
        conn.Producer().publish(body, exchange="", routing_key="celery", headers=headers, content_type=content_type,
                                content_encoding=content_encoding, retry=True)


class Crafted:
    """Messages sent, with the state each must end in (`None`: it has no usable id)."""

    def __init__(self):
        self.expect, self.label = {}, {}

    def send(self, label, expect, mutate=None, body=GOOD_BODY, content_type="application/json", task="testapp.add",
             content_encoding="utf-8"):
        task_id = str(uuid.uuid4())
        headers = v2_headers(task_id, task)
        if mutate:
            mutate(headers)
        publish(body, headers, content_type, content_encoding)
        self.expect[task_id], self.label[task_id] = expect, label
        return task_id


def wait_states(expect, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        states = {t: testapp.app.AsyncResult(t).state for t in expect}
        wrong = {t: (states[t], e) for t, e in expect.items() if states[t] not in e}
        if not wrong or time.monotonic() > deadline:
            return wrong
        time.sleep(0.2)


def test_crafted_messages_never_crash_or_vanish(worker, broker):
    w = worker(WORKER).wait_ready()
    sent = Crafted()
    done = {"SUCCESS", "FAILURE"}
    failure, success = {"FAILURE"}, {"SUCCESS"}

    # Wrong types in every header the worker reads (the task and id headers apart: below).
    for key in ("lang", "shadow", "group", "group_index", "retries", "timelimit", "root_id", "parent_id",
                "argsrepr", "kwargsrepr", "origin", "ignore_result", "stamps"):
        for value in WRONG.values():
            # A true ignore_result is honoured, whatever its type: no result to see.
            expect = {"PENDING"} if key == "ignore_result" and value else done
            sent.send(f"{key}={value!r}", expect, lambda h, k=key, v=value: h.__setitem__(k, v))
    for key in ("eta", "expires"):
        for label, value in WRONG.items():
            if label != "null":
                sent.send(f"{key}={value!r}", failure, lambda h, k=key, v=value: h.__setitem__(k, v))
    for value in (7, [1], {"a": 1}, True):
        sent.send(f"task={value!r}", failure, lambda h, v=value: h.__setitem__("task", v))
    # An id that is not a string: there is no id to store a state under, and no crash either.
    for value in (7, [1], {"a": 1}):
        sent.send(f"id={value!r}", set(), lambda h, v=value: h.__setitem__("id", v))

    # Negative retries, and time limits that are not a pair of positive numbers: no limit.
    sent.send("retries=-5", success, lambda h: h.__setitem__("retries", -5))
    for limit in ("10", [1], [1, 2, 3], [-1, "x"], [0, 0], [None, None], {"hard": 1}):
        sent.send(f"timelimit={limit!r}", success, lambda h, v=limit: h.__setitem__("timelimit", v))

    # ETAs: far past (runs now), unparsable (cannot run), far future (held, then given back).
    sent.send("eta in 1970", success, lambda h: h.__setitem__("eta", "1970-01-01T00:00:01+00:00"))
    for eta in ("next tuesday", "2026-13-45T99:99:99", "", "9" * 40):
        sent.send(f"eta={eta!r}", failure, lambda h, v=eta: h.__setitem__("eta", v))
    held = sent.send("eta in 9999", {"PENDING"}, lambda h: h.__setitem__("eta", "9999-12-31T23:59:59+00:00"))
    sent.send("expired in 1970", {"REVOKED"}, lambda h: h.__setitem__("expires", "1970-01-01T00:00:01+00:00"))

    # Bodies: invalid UTF-8 and not JSON (cannot be decoded), the wrong shape, huge.
    sent.send("invalid utf-8 body", failure, body=b"\xff\xfe\x00not utf-8 at all")
    sent.send("truncated json body", failure, body=b'[[1, 2], {}, {}')
    sent.send("body [args] only", failure, body=b'[[1, 2]]')
    sent.send("body a map", failure, body=b'{"args": "not a list"}')
    sent.send("unknown content type", failure, body=b"[[1, 2], {}, {}]", content_type="application/x-unknown")
    sent.send("unknown content encoding", done, body=b"[[1, 2], {}, {}]", content_encoding="no-such-codec")
    big = "é" * (60 * 1024 if BROKER_KIND == "sqs" else 2 * 1024 * 1024)  # SQS takes 256 KiB at most
    big_id = sent.send("huge body", success, body=json.dumps([[big, "!"], {}, {}], ensure_ascii=False).encode())
    # Huge headers: 64 KiB of one header, and many headers (more than an AMQP frame holds).
    sent.send("64 KiB header", success, lambda h: h.__setitem__("argsrepr", "x" * 65536))
    sent.send("500 headers", success, lambda h: h.update({f"x-extra-{i}": "y" * 100 for i in range(500)}))

    assert testapp.add.delay(2, 2).get(timeout=30) == 4, w.log()[-3000:]
    wrong = wait_states({t: e for t, e in sent.expect.items() if e}, timeout=60)
    assert not wrong, "crafted messages in the wrong state (is, should be):\n" + "\n".join(
        f"{sent.label[t]}: {state} {sorted(expected)}" for t, (state, expected) in wrong.items())
    assert testapp.app.AsyncResult(big_id).get(timeout=10) == big + "!"
    log = w.log()
    unnamed = [sent.label[t] for t, e in sent.expect.items() if e == {"FAILURE"} and t not in log]
    assert not unnamed, f"failed without a log line naming the task: {unnamed}"
    assert w.proc.poll() is None, "the worker died"
    assert testapp.add.delay(3, 3).get(timeout=10) == 6
    assert w.stop() == 0
    # Nothing left unacknowledged; the far-future ETA was given back to the queue, whole.
    assert broker.unacked() == 0
    if BROKER_KIND != "sqs":  # SQS counts are approximate
        assert broker.ready("celery") == 1
    assert testapp.app.AsyncResult(held).state == "PENDING"
