"""An app module that fails on import, as a typo in a user's project would."""

from celery import Celery

app = Celery("brokenapp")
raise ImportError("No module named 'this_dependency_is_missing'")
