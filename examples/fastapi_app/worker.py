"""The Celery app and its tasks; the worker runs `celeriac -A worker worker -l info`."""

import hashlib
import os
import time

from celery import Celery

celery = Celery(__name__)
celery.conf.broker_url = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
celery.conf.result_backend = os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1")
celery.conf.task_track_started = True


@celery.task(name="create_task")
def create_task(seconds: float) -> bool:
    time.sleep(seconds)
    return True


@celery.task(name="digest")
def digest(text: str, rounds: int = 1000) -> dict:
    value = text.encode()
    for _ in range(rounds):
        value = hashlib.sha256(value).digest()
    return {"text": text, "rounds": rounds, "sha256": value.hex(), "pid": os.getpid()}


@celery.task(name="divide")
def divide(a: float, b: float) -> float:
    return a / b
