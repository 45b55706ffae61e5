import time

from celery import shared_task
from flask import current_app


@shared_task(ignore_result=False)
def add(a: int, b: int) -> int:
    return a + b


@shared_task(ignore_result=False)
def greet(name: str) -> str:
    # current_app works because FlaskTask runs every task inside the Flask app context.
    return f"{current_app.config['GREETING']}, {name}! (from {current_app.name})"


@shared_task(bind=True, ignore_result=False)
def process(self, total: int) -> object:
    for i in range(total):
        self.update_state(state="PROGRESS", meta={"current": i + 1, "total": total})
        time.sleep(0.05)
    return {"current": total, "total": total}
