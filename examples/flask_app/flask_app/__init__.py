"""A Flask app with Celery, set up as Flask's own docs do ("Background Tasks with Celery"):
`celery_init_app` makes every task run inside the app context, `create_app` is the factory."""

import os

from celery import Celery, Task
from flask import Flask


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY=dict(
            broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            result_backend=os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
            task_ignore_result=True,
        ),
        # Read by the tasks through `current_app`: they only see it inside the app context.
        GREETING=os.environ.get("FLASK_GREETING", "Hello"),
    )
    app.config.from_prefixed_env()
    celery_init_app(app)

    from . import views

    app.register_blueprint(views.bp)
    return app
