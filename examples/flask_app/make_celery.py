"""The worker's entry point, as in Flask's docs: `celeriac -A make_celery worker -l info`."""

from flask_app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
