#!/usr/bin/env python
"""Write the fuzz targets' seed corpora (fuzz/seeds/<target>/) from real stock messages.

Every seed is something a real peer sends: task messages produced by the `celery` package
(protocol v2 and v1, json/msgpack/pickle bodies, ETA, expiry, retries, time limits, canvas,
priorities, compression, stamped headers) as kombu stores them on Redis, and the frames a
celeriac pool child writes (python/celeriac/frames.py). Run it again after the message
formats change:

    .venv/bin/python fuzz/make_seeds.py        # uses Redis database 5 on 127.0.0.1, flushed
"""

import base64
import hashlib
import json
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import redis
from celery import Celery, chain, chord, group

ROOT = Path(__file__).resolve().parent
SEEDS = ROOT / "seeds"
URL = "redis://127.0.0.1:6379/5"
CONTENT_TYPES = ["application/json", "", "application/x-msgpack", "application/x-python-serialize"]


def write(target, data: bytes):
    folder = SEEDS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / hashlib.sha1(data).hexdigest()).write_bytes(data)


def stock_envelopes():
    """Envelopes exactly as kombu's producer LPUSHes them to Redis."""
    r = redis.Redis.from_url(URL)
    r.flushdb()
    envelopes = []
    for protocol in (2, 1):
        app = Celery("seeds", broker=URL, backend="redis://127.0.0.1:6379/5")
        app.conf.task_protocol = protocol
        app.conf.accept_content = ["json", "msgpack", "pickle"]

        @app.task(name="seeds.add")
        def add(x, y):
            return x + y

        s = add.s
        sends = [
            lambda: add.delay(1, 2),
            lambda: add.apply_async((1, 2), countdown=30, expires=60, retries=3),
            lambda: add.apply_async((1,), {"y": 2}, eta=datetime.now(timezone.utc) + timedelta(hours=1)),
            lambda: add.apply_async(("é", "\u2603"), serializer="msgpack"),
            lambda: add.apply_async(([1, 2], {"a": None}), serializer="pickle"),
            lambda: add.apply_async((datetime.now(timezone.utc), [UUID(int=7), Decimal("1.5"), b"\x00\xff"]), serializer="json"),
            lambda: add.apply_async((1, 2), time_limit=10, soft_time_limit=5, priority=7, compression="zlib"),
            lambda: add.apply_async((1, 2), shadow="seeds.shadowed", headers={"custom": {"nested": [1]}}),
            lambda: chain(s(1, 2), s(3), s(4)).apply_async(),
            lambda: group(s(1, 1), s(2, 2)).apply_async(),
            lambda: chord([s(1, 1), s(2, 2)], s(0)).apply_async(),
            lambda: add.apply_async((1, 2), link=s(10), link_error=s(20), ignore_result=True),
            lambda: add.apply_async((1, 2), stamped_headers=["tier"], tier="gold") if protocol == 2 else None,
        ]
        for send in sends:
            send()
        for queue in r.keys("celery*"):
            if r.type(queue) == b"list":
                envelopes += [raw for raw in r.lrange(queue, 0, -1)]
        r.flushdb()
        app.close()
    return envelopes


def task_message_seed(envelope):
    env = json.loads(envelope)
    props = env.get("properties", {})
    body = env.get("body", "")
    body = base64.b64decode(body) if props.get("body_encoding") == "base64" else body.encode()
    ct = env.get("content-type", "")
    selector = CONTENT_TYPES.index(ct) if ct in CONTENT_TYPES else 0
    return bytes([selector]) + json.dumps(env.get("headers")).encode() + b"\x01" + json.dumps(props).encode() + b"\x01" + body


def child_frames():
    sys.path.insert(0, str(ROOT.parent / "python"))
    from celeriac import frames

    reports = [
        {"outcome": "failure", "runtime": 0.01, "exception": "ValueError('x')", "traceback": "Traceback ...", "exiting": False},
        {"outcome": "retry", "runtime": 0.2, "exception": "Retry(...)", "traceback": "", "exiting": False},
        {"outcome": "rejected", "requeue": True, "runtime": 0.0, "exiting": True},
        {"outcome": "decode_error", "runtime": 0.0, "exiting": False},
        {"outcome": "recorded", "runtime": 0.0},
    ]
    yield frames.pack(frames.READY, json.dumps({"pid": 4242}).encode())
    for report in reports:
        yield frames.pack(frames.DONE, json.dumps(report).encode())
    yield frames.pack_succeeded(0.000123, False, "None")
    yield frames.pack_succeeded(1.5, True, "{'k': 'é' * 3}")
    # A child's whole conversation: ready, then several reports back to back.
    yield b"".join([frames.pack(frames.READY, b'{"pid": 1}'), frames.pack_succeeded(0.1, False, "3"),
                    frames.pack(frames.DONE, json.dumps(reports[0]).encode())])


def main():
    envelopes = stock_envelopes()
    assert len(envelopes) >= 20, len(envelopes)
    for raw in envelopes:
        write("kombu_envelope", raw)
        write("task_message", task_message_seed(raw))
    for frame in child_frames():
        write("child_frames", frame)
    for target in ("kombu_envelope", "task_message", "child_frames"):
        print(target, len(list((SEEDS / target).iterdir())), "seeds")


if __name__ == "__main__":
    main()
