from celery.result import AsyncResult
from flask import Blueprint, request

from . import tasks

bp = Blueprint("tasks", __name__)


@bp.post("/add")
def start_add() -> dict[str, object]:
    result = tasks.add.delay(int(request.form["a"]), int(request.form["b"]))
    return {"result_id": result.id}


@bp.post("/greet")
def start_greet() -> dict[str, object]:
    result = tasks.greet.delay(request.form.get("name", "world"))
    return {"result_id": result.id}


@bp.post("/process")
def start_process() -> dict[str, object]:
    result = tasks.process.delay(int(request.form.get("total", 10)))
    return {"result_id": result.id}


@bp.get("/result/<id>")
def task_result(id: str) -> dict[str, object]:
    result = AsyncResult(id)
    # Ask ready() first: a ready result keeps its final state, so the fields below agree with it
    # (read the other way round, a task finishing in between gives a stale state marked ready).
    ready = result.ready()
    return {
        "state": result.state,
        "ready": ready,
        "successful": result.successful() if ready else None,
        "value": result.result if ready else (result.info if isinstance(result.info, dict) else None),
    }
