"""Result backends beyond Redis, and msgpack (issue: Step 3, points 11 and 12): the database
backend (SQLAlchemy on PostgreSQL), where chords have no native join and `celery.chord_unlock`
polls, run by celeriac like any task."""

import pytest
from celery import chain, chord

import testapp
from conftest import pg_database, producer_app

WORKER = ["-A", "testapp", "worker", "-l", "info", "-c", "2"]


@pytest.fixture
def db_backend():
    return f"db+postgresql+psycopg2://postgres@127.0.0.1:5432/{pg_database()}"


@pytest.fixture
def db_app(broker, db_backend):
    app = producer_app("db_producer", backend=db_backend)
    app.conf.result_chord_retry_interval = 0.2
    yield app


def test_database_backend_with_chains_and_chord_unlock(worker, db_app, db_backend):
    w = worker(WORKER, env={"CELERIAC_TEST_BACKEND": db_backend}).wait_ready()
    add, echo, fail = (db_app.signature(f"testapp.{n}") for n in ("add", "echo", "fail"))
    assert db_app.send_task("testapp.add", (1, 2)).get(timeout=15) == 3
    assert chain(add.clone((1, 2)), add.clone((3,)))().get(timeout=20) == 6
    assert chord([add.clone((1, 1)), add.clone((2, 2))], echo)().get(timeout=30) == {"args": [[2, 4]], "kwargs": {}}
    assert "celery.chord_unlock" in w.log()  # no native join: the unlock task polled
    with pytest.raises(Exception) as info:
        chord([add.clone((1, 1)), fail.clone(("in a chord",))], echo)().get(timeout=30)
    assert "in a chord" in str(info.value) or "ChordError" in type(info.value).__name__


def test_msgpack(worker):
    worker(WORKER, env={"TESTAPP_ACCEPT": "json,msgpack"}).wait_ready()
    assert testapp.add.apply_async((40, 2), serializer="msgpack").get(timeout=10) == 42
