import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "dev-only-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django_celery_beat",  # periodic tasks edited in the Django admin (celeriac -B --scheduler ...)
    "notes",
]

ROOT_URLCONF = "core.urls"
WSGI_APPLICATION = "core.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH", BASE_DIR / "db.sqlite3"),
    }
}
if os.environ.get("DJANGO_DB_ENGINE") == "postgresql":
    DATABASES["default"] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("DJANGO_DB_NAME", "postgres"),
        "USER": os.environ.get("DJANGO_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("DJANGO_DB_PASSWORD", ""),
        "HOST": os.environ.get("DJANGO_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("DJANGO_DB_PORT", "5432"),
        "OPTIONS": {"application_name": "celeriac-example"},
    }

USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Celery, read with namespace="CELERY" by core/celery.py. The defaults need no server at all:
# messages in a folder (kombu's filesystem transport) and results in files (CELERY_DATA_DIR,
# default .celery/ beside manage.py). Set CELERY_BROKER_URL / CELERY_RESULT_BACKEND for Redis
# or RabbitMQ.
_data = Path(os.environ.get("CELERY_DATA_DIR", BASE_DIR / ".celery"))
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "filesystem://")
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", f"file://{_data / 'results'}")
if CELERY_BROKER_URL.startswith("filesystem://"):
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_data / "queue"),
        "data_folder_out": str(_data / "queue"),
        "control_folder": str(_data / "control"),
    }
    # kombu's producer and Celery's file backend want their folders to exist.
    for _folder in ("queue", "control"):
        (_data / _folder).mkdir(parents=True, exist_ok=True)
if CELERY_RESULT_BACKEND == f"file://{_data / 'results'}":
    (_data / "results").mkdir(parents=True, exist_ok=True)
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_EXTENDED = True
