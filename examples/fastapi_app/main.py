"""An API that enqueues work and polls its results: `uvicorn main:app`."""

from celery import states
from celery.result import AsyncResult
from fastapi import FastAPI
from pydantic import BaseModel

from worker import celery, create_task, digest, divide

app = FastAPI(title="celeriac FastAPI example")


class Sleep(BaseModel):
    seconds: float = 1.0


class Digest(BaseModel):
    text: str
    rounds: int = 1000


class Division(BaseModel):
    a: float
    b: float


@app.post("/tasks/sleep", status_code=201)
def run_sleep(payload: Sleep) -> dict:
    return {"task_id": create_task.delay(payload.seconds).id}


@app.post("/tasks/digest", status_code=201)
def run_digest(payload: Digest) -> dict:
    return {"task_id": digest.delay(payload.text, payload.rounds).id}


@app.post("/tasks/divide", status_code=201)
def run_divide(payload: Division) -> dict:
    return {"task_id": divide.delay(payload.a, payload.b).id}


@app.get("/tasks/{task_id}")
def get_status(task_id: str) -> dict:
    result = AsyncResult(task_id, app=celery)
    # Decide on the one status read here: asking result.ready() afterwards reads the backend
    # again, and a task that finished in between would hand back its exception as the value.
    status = result.status
    if status in states.EXCEPTION_STATES:
        value = {"error": type(result.result).__name__, "detail": str(result.result)}
    elif status == states.SUCCESS:
        value = result.result
    else:
        value = None
    return {"task_id": task_id, "task_status": status, "task_result": value}
