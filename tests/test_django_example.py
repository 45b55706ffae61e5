"""The example Django project runs under celeriac, configured by environment variables alone,
exactly as the Dockerfile's final stage runs it (issue: Step 1, points 11 and 13)."""

import os
import subprocess
import sys

import pytest

from conftest import BACKEND_URL, BROKER_KIND, BROKER_URL, ROOT, pg_database

PROJECT = ROOT / "examples" / "django_project"


def test_django_example_end_to_end(worker, tmp_path):
    env = {
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_RESULT_BACKEND": BACKEND_URL,
        "DJANGO_DB_PATH": str(tmp_path / "db.sqlite3"),
        "CELERIAC_LOGLEVEL": "INFO",
        "CELERIAC_CONCURRENCY": "2",
    }
    full_env = dict(os.environ, **env)
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=full_env, check=True,
                   capture_output=True)
    # The image's CMD: no flags beyond the app, everything else from the environment.
    w = worker(["-A", "core", "worker"], cwd=PROJECT, env=env).wait_ready()
    out = subprocess.run([sys.executable, "manage.py", "enqueue", "--count", "4"], cwd=PROJECT, env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + w.log()
    assert "add(2, 3) = 5" in out.stdout
    assert "process_notes() = 4" in out.stdout
    assert "fail() raised NoteError(on purpose)" in out.stdout
    assert "count_notes = 4" in out.stdout
    log = w.log()
    assert "notes.tasks.create_note" in log  # autodiscovered and listed in the banner
    assert ".> concurrency: 2" in log
    assert w.stop() == 0


@pytest.mark.skipif(BROKER_KIND != "redis", reason="needs no broker: run once, in the Redis pass")
def test_first_run_needs_no_server(worker, tmp_path):
    """The README's first run: the example's defaults put messages in a folder
    (filesystem://) and results in files, so nothing but Python and Rust is needed."""
    env = {"CELERY_DATA_DIR": str(tmp_path / "celery"), "DJANGO_DB_PATH": str(tmp_path / "db.sqlite3"),
           "CELERIAC_LOGLEVEL": "INFO", "CELERIAC_CONCURRENCY": "2"}
    full_env = {k: v for k, v in os.environ.items() if k not in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")}
    full_env.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=PROJECT, env=full_env, check=True,
                   capture_output=True)
    w = worker(["-A", "core", "worker"], cwd=PROJECT, env=env).wait_ready()
    assert "transport:   filesystem://" in w.log()
    out = subprocess.run([sys.executable, "manage.py", "enqueue"], cwd=PROJECT, env=full_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + w.log()
    assert "add(2, 3) = 5" in out.stdout and "count_notes = 3" in out.stdout
    assert list((tmp_path / "celery" / "results").glob("celery-task-meta-*"))  # Celery's file backend
    assert w.stop() == 0


def test_django_on_postgresql_closes_connections_like_stock(worker, tmp_path):
    database = pg_database()
    env = {
        "CELERY_BROKER_URL": BROKER_URL,
        "CELERY_RESULT_BACKEND": BACKEND_URL,
        "DJANGO_DB_ENGINE": "postgresql",
        "DJANGO_DB_NAME": database,
        "CELERIAC_LOGLEVEL": "INFO",
        "CELERIAC_CONCURRENCY": "2",
    }
    full_env = dict(os.environ, **env)
    manage = lambda *a, **kw: subprocess.run([sys.executable, "manage.py", *a], cwd=PROJECT, env=full_env,  # noqa: E731
                                             capture_output=True, text=True, timeout=120, **kw)
    assert manage("migrate", "--noinput").returncode == 0
    try:
        manage("shell", "-c", "from notes.models import Note; Note.objects.all().delete()")
        worker(["-A", "core", "worker"], cwd=PROJECT, env=env).wait_ready()
        out = manage("enqueue", "--count", "3")
        assert out.returncode == 0, out.stderr
        assert "count_notes = 3" in out.stdout
        # The Django fixup closes each task's connection at task_postrun (CONN_MAX_AGE=0):
        # no idle connection is left in the pool children.
        import time

        import psycopg2

        time.sleep(0.5)
        with psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database) as conn, conn.cursor() as cur:
            cur.execute("select count(*) from pg_stat_activity where application_name = 'celeriac-example'"
                        " and datname = %s", (database,))
            assert cur.fetchone()[0] == 0
    finally:
        manage("migrate", "notes", "zero", "--noinput")
