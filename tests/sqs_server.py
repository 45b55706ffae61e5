"""moto's SQS server with each queue operation made atomic, as real SQS's are.

moto serves every request on its own thread, but `SQSBackend.receive_message` checks that a
message is visible and then marks it received without a lock, and a delete rebuilds the queue's
message list while a send may be appending to it. Two consumers polling one queue at once (a
stock worker and celeriac sharing it) then both receive the same message now and then, which
real SQS never does within the visibility timeout, and a test of exactly-once delivery fails on
the emulator rather than on the worker. Here every operation runs under one lock; a long poll
waits outside it, between quick (non-waiting) receives.

Run as `python tests/sqs_server.py -H 127.0.0.1 -p PORT` (moto.server's arguments).
"""

import functools
import threading
import time

from moto.server import main
from moto.sqs.models import SQSBackend

LOCK = threading.RLock()
ATOMIC = ["create_queue", "delete_queue", "purge_queue", "set_queue_attributes", "get_queue_attributes",
          "send_message", "send_message_batch", "delete_message", "delete_message_batch",
          "change_message_visibility", "change_message_visibility_batch"]


def atomic(method):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with LOCK:
            return method(*args, **kwargs)

    return locked


def long_poll(receive):
    """`receive(self, queue_name, count, wait_seconds_timeout, visibility_timeout, attrs)`: each
    attempt atomic and non-waiting, repeated until a message comes or the wait is over."""

    @functools.wraps(receive)
    def receive_message(self, queue_name, count, wait_seconds_timeout, *rest, **kwargs):
        deadline = time.monotonic() + (wait_seconds_timeout or 0)
        while True:
            with LOCK:
                got = receive(self, queue_name, count, 0, *rest, **kwargs)
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            self.get_queue(queue_name).wait_for_messages(min(left, 1.0))
            # wait_for_messages returns at once while messages are visible but not receivable
            # (a FIFO group in flight): do not spin on the lock.
            time.sleep(0.005)

    return receive_message


for name in ATOMIC:
    setattr(SQSBackend, name, atomic(getattr(SQSBackend, name)))
SQSBackend.receive_message = long_poll(SQSBackend.receive_message)

if __name__ == "__main__":
    main()
