"""A plain py-amqp consumer for the RabbitMQ latency floor's reference (bench/run.py).

It takes the paced stamp tasks the way the bare consumer does (prefetch 8, acking each on
arrival) and appends `<task id> <arrival time>` to a file, so the floor measured with
celeriac's own AMQP client can be set beside the one measured with the client stock Celery uses:
what is left is the broker and the machine.

    python bench/pyamqp_floor.py AMQP_URL STAMPS_FILE
"""

import os
import sys
import time
from urllib.parse import unquote, urlparse

import amqp


def main():
    url, path = urlparse(sys.argv[1]), sys.argv[2]
    stamps = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    connection = amqp.Connection(f"{url.hostname}:{url.port or 5672}", userid=unquote(url.username or "guest"),
                                 password=unquote(url.password or "guest"),
                                 virtual_host=unquote(url.path[1:]) or "/")
    connection.connect()
    channel = connection.channel()
    channel.basic_qos(0, 8, True)  # channel-wide, as Celery sets it on RabbitMQ

    def on_message(message):
        arrived = time.time()
        os.write(stamps, f"{message.headers.get('id')} {arrived}\n".encode())
        channel.basic_ack(message.delivery_tag)

    channel.basic_consume("celery", callback=on_message)
    while True:
        connection.drain_events()


if __name__ == "__main__":
    main()
