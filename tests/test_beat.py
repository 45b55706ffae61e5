"""Beat (issue: Step 5): `celeriac worker -B` and `celeriac beat` run the app's own schedule
with Celery's scheduler, send exactly what stock beat sends, keep their state across restarts,
and — beyond stock — send each due task once even with beat on several replicas."""

import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import redis

from conftest import BACKEND_URL, wait_until

NODE = "beat@testhost"


@pytest.fixture
def runs():
    """The runs recorded by beatapp.record, oldest first."""
    r = redis.Redis.from_url(BACKEND_URL)
    r.delete("beat:runs")

    def read(name=None):
        out = [json.loads(x) for x in r.lrange("beat:runs", 0, -1)]
        return [x for x in out if name is None or x["name"] == name]

    yield read
    r.close()


def env(**kw):
    e = {"BEATAPP_MAX_INTERVAL": "0.2"}
    e.update({k: str(v) for k, v in kw.items()})
    return e


def times(entries):
    return [datetime.fromisoformat(e["at"]) for e in entries]


def wait_runs(runs, name, n, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = runs(name)
        if len(got) >= n:
            return got
        time.sleep(0.1)
    raise AssertionError(f"{name}: {len(runs(name))} run(s) within {timeout}s, wanted {n}")


def worker_b(worker, schedule_dir, node=NODE, extra=(), **kw):
    args = ["-A", "beatapp", "worker", "-l", "info", "-c", "1", "-n", node, "-B",
            "-s", str(schedule_dir / "schedule"), *extra]
    return worker(args, env=env(**kw), name=node.split("@")[0])


def test_worker_B_sends_each_due_task_once(worker, tmp_path, runs):
    w = worker_b(worker, tmp_path, BEATAPP_INTERVAL=1).wait_ready()
    got = wait_runs(runs, "every", 5)
    w.wait_for("Scheduler: Sending due task every (beatapp.record)")
    assert "beat: Starting..." in w.log()
    assert all(r["beat_header"] for r in got)  # celery 5.7's `celery_beat_task` header
    assert len({r["id"] for r in got}) == len(got)
    gaps = [(b - a).total_seconds() for a, b in zip(times(got), times(got)[1:])]
    assert all(0.7 < g < 1.6 for g in gaps), gaps
    assert w.stop() == 0
    assert (tmp_path / "schedule").exists() or list(tmp_path.glob("schedule*"))


def test_options_route_and_decorate_the_message(worker, tmp_path, runs):
    # Entry options (queue, priority, expires) and kwargs reach the message; only a worker
    # consuming `beatq` gets it.
    worker_b(worker, tmp_path, BEATAPP_ROUTED=1, extra=["-Q", "celery,beatq"]).wait_ready()
    got = wait_runs(runs, "routed", 2)
    assert got[0]["queue"] == "beatq" and got[0]["extra"] == {"n": 1}


def test_relative_timedelta_entries(worker, tmp_path, runs):
    worker_b(worker, tmp_path, BEATAPP_RELATIVE=1).wait_ready()
    got = wait_runs(runs, "relative", 3)
    gaps = [(b - a).total_seconds() for a, b in zip(times(got), times(got)[1:])]
    assert all(0.5 < g < 1.6 for g in gaps), gaps


def test_add_periodic_task_entries(worker, tmp_path, runs):
    worker_b(worker, tmp_path, BEATAPP_ADDED=1).wait_ready()
    assert len(wait_runs(runs, "added", 2)) >= 2


def test_standalone_beat_with_a_stock_worker(worker, tmp_path, runs):
    beat = worker(["-A", "beatapp", "beat", "-l", "info", "-s", str(tmp_path / "schedule")],
                  env=env(BEATAPP_INTERVAL=1), name="beat")
    beat.wait_for("beat: Starting...")
    log = beat.log()
    assert "celery beat v5.7" in log and "is starting." in log
    assert "LocalTime ->" in log and "Configuration ->" in log and "celery.beat.PersistentScheduler" in log
    # Stock's own worker runs what celeriac's beat sends.
    stock = worker(["-A", "beatapp", "worker", "-c", "1", "-l", "info", "-n", "stock@testhost"],
                   command=[sys.executable, "-m", "celery"], env=env(), name="stock")
    got = wait_runs(runs, "every", 3, timeout=60)
    assert {r["hostname"] for r in got} == {"stock@testhost"}
    assert all(r["beat_header"] for r in got)
    assert beat.stop() == 0
    stock.stop()


def test_restart_neither_repeats_nor_skips(worker, tmp_path, runs):
    w = worker_b(worker, tmp_path, BEATAPP_INTERVAL=4).wait_ready()
    first = wait_runs(runs, "every", 1)
    time.sleep(0.5)
    assert w.stop() == 0
    # Restarted at once: the next run comes 4 s after the last, not at start-up.
    w = worker_b(worker, tmp_path, BEATAPP_INTERVAL=4).wait_ready()
    second = wait_runs(runs, "every", 2)
    gap = (times(second)[1] - times(first)[0]).total_seconds()
    assert 3.5 < gap < 5.5, gap
    assert w.stop() == 0
    # Down for longer than the interval: the missed run is sent once at start-up, not again.
    time.sleep(5)
    w = worker_b(worker, tmp_path, BEATAPP_INTERVAL=4).wait_ready()
    third = wait_runs(runs, "every", 3)
    time.sleep(2)
    assert len(runs("every")) == 3
    assert (times(third)[2] - times(third)[1]).total_seconds() > 5


def test_corrupt_schedule_file_is_rebuilt(worker, tmp_path, runs):
    (tmp_path / "schedule").write_bytes(b"this is not a shelve file" * 10)
    w = worker_b(worker, tmp_path, BEATAPP_INTERVAL=1).wait_ready()
    wait_runs(runs, "every", 2)
    assert "Removing corrupted schedule file" in w.log()


def test_crontab_across_a_dst_change(worker, tmp_path, runs):
    # Europe/London springs forward at 01:00 UTC on Sunday 2026-03-29 (01:00 GMT → 02:00 BST).
    # The clock starts at 00:35 GMT and runs 300× faster: 1 s = 5 minutes.
    w = worker_b(worker, tmp_path, BEATAPP_CRON=1, BEATAPP_TIMEZONE="Europe/London",
                 BEATAPP_CLOCK_START="2026-03-29T00:35:00+00:00", BEATAPP_CLOCK_SPEED=300)
    w.wait_ready()
    quarters = wait_runs(runs, "quarter-hours", 6, timeout=40)
    w.stop()
    utc = [t.astimezone(timezone.utc) for t in times(runs("quarter-hours"))]
    slots = [t.replace(minute=t.minute - t.minute % 15, second=0, microsecond=0) for t in utc]
    # Every quarter hour once: consecutive slots, no repeats, none skipped — across the change.
    assert all(b - a == timedelta(minutes=15) for a, b in zip(slots, slots[1:])), slots
    assert len(quarters) >= 6
    london = [s.astimezone(ZoneInfo("Europe/London")) for s in slots]
    assert any(t.utcoffset() == timedelta(0) for t in london) and any(t.utcoffset() == timedelta(hours=1) for t in london)
    # minute=30, hour=1-3 on Sundays: 01:30 does not exist that night; 02:30 BST runs once.
    mornings = [t.astimezone(ZoneInfo("Europe/London")) for t in times(runs("weekday-mornings"))]
    hours = [(t.hour, t.minute - t.minute % 15) for t in mornings]
    assert len(hours) == len(set(hours)), hours
    assert (2, 30) in hours
    # day_of_month and month_of_year: on the hour on the 29th of March, never on the 28th.
    on_the_hour = [t.astimezone(timezone.utc) for t in times(runs("hourly-on-the-29th"))]
    slots = [(t.hour, t.minute - t.minute % 15) for t in on_the_hour]  # sent within a fake minute
    assert slots and slots[0] == (1, 0) and len(set(slots)) == len(slots), on_the_hour
    assert all(minute == 0 for _, minute in slots), on_the_hour
    assert runs("never") == []


def test_solar_sunrise(worker, tmp_path, runs):
    # Sunrise in London on 2026-06-21 is about 04:43 BST (03:43 UTC); start shortly before it.
    w = worker_b(worker, tmp_path, BEATAPP_SOLAR=1, BEATAPP_CLOCK_START="2026-06-21T03:30:00+00:00",
                 BEATAPP_CLOCK_SPEED=120)
    w.wait_ready()
    got = wait_runs(runs, "sunrise", 1, timeout=30)
    at = times(got)[0].astimezone(timezone.utc)
    assert datetime(2026, 6, 21, 3, 38, tzinfo=timezone.utc) < at < datetime(2026, 6, 21, 3, 50, tzinfo=timezone.utc), at
    time.sleep(3)
    assert len(runs("sunrise")) == 1


def test_one_sender_among_replicas_and_takeover(worker, tmp_path, runs):
    # Each replica has its own schedule file, as separate containers would.
    for d in "ab":
        (tmp_path / d).mkdir()
    a = worker_b(worker, tmp_path / "a", node="a@testhost", BEATAPP_INTERVAL=1).wait_ready()
    b = worker_b(worker, tmp_path / "b", node="b@testhost", BEATAPP_INTERVAL=1).wait_ready()
    time.sleep(6)
    got = runs("every")
    gaps = [(y - x).total_seconds() for x, y in zip(times(got), times(got)[1:])]
    assert all(g > 0.7 for g in gaps), gaps  # one sender: never two runs at once
    leader, follower = (a, b) if "took the leader lock" in a.log() else (b, a)
    assert "took the leader lock" not in follower.log()
    # The leader dies without a word; the other takes over within seconds, without a burst.
    before = len(runs("every"))
    killed_at = datetime.now(timezone.utc)
    os.killpg(leader.pid, signal.SIGKILL)
    follower.wait_for("took the leader lock", timeout=15)
    wait_runs(runs, "every", before + 3, timeout=20)
    after = [t for t in times(runs("every")) if t > killed_at]
    assert (after[0] - killed_at).total_seconds() < 10
    gaps = [(y - x).total_seconds() for x, y in zip(after, after[1:])]
    assert all(g > 0.7 for g in gaps), gaps


def test_django_celery_beat_schedules_edited_while_running(worker, tmp_path):
    """`--scheduler django_celery_beat.schedulers:DatabaseScheduler` runs in the beat process:
    periodic tasks edited in the database (as in the Django admin) apply without a restart."""
    import subprocess

    from conftest import BACKEND_URL, BROKER_URL, ROOT

    project = ROOT / "examples" / "django_project"
    env = {"CELERY_BROKER_URL": BROKER_URL, "CELERY_RESULT_BACKEND": BACKEND_URL,
           "DJANGO_DB_PATH": str(tmp_path / "db.sqlite3"), "CELERIAC_LOGLEVEL": "INFO", "CELERIAC_CONCURRENCY": "1"}
    full_env = dict(os.environ, **env)

    def shell(code):
        out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=project, env=full_env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr

    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=project, env=full_env, check=True,
                   capture_output=True, timeout=120)
    models = "from django_celery_beat.models import IntervalSchedule, PeriodicTask\n"
    shell(models + "every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)\n"
          "PeriodicTask.objects.create(name='count', task='notes.tasks.count_notes', interval=every)\n")
    w = worker(["-A", "core", "worker", "-B", "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"],
               cwd=project, env=env).wait_ready()
    wait_until(lambda: w.log().count("Sending due task count (notes.tasks.count_notes)") >= 3, timeout=30,
               interval=0.2, what="three sends of `count`")
    assert "succeeded" in w.log()
    # Edited while running: `count` disabled, `add` created.
    shell(models + "task = PeriodicTask.objects.get(name='count'); task.enabled = False; task.save()\n"
          "every = IntervalSchedule.objects.get(every=1)\n"
          "PeriodicTask.objects.create(name='add', task='notes.tasks.add', args='[2, 3]', interval=every)\n")
    w.wait_for("Sending due task add (notes.tasks.add)", timeout=20)
    time.sleep(1)
    counted = w.log().count("Sending due task count (notes.tasks.count_notes)")
    time.sleep(3)
    assert w.log().count("Sending due task count (notes.tasks.count_notes)") == counted
    assert w.stop() == 0


def test_unusable_schedule_file_is_reported_not_fatal(worker, tmp_path, runs):
    (tmp_path / "not-a-dir").write_text("")
    args = ["-A", "beatapp", "worker", "-l", "info", "-c", "1", "-n", NODE, "-B",
            "-s", str(tmp_path / "not-a-dir" / "schedule")]
    w = worker(args, env=env(BEATAPP_INTERVAL=1)).wait_ready()
    wait_runs(runs, "every", 2)
    assert "beat: cannot use the schedule file" in w.log()


def test_standalone_beat_max_interval_and_env(worker, tmp_path, runs):
    # Every option has its variable; --max-interval caps the sleep between looks at the schedule.
    beat = worker(["-A", "beatapp", "beat", "-l", "debug", "--max-interval", "0.5"],
                  env=dict(env(BEATAPP_INTERVAL=30), CELERIAC_BEAT_SCHEDULE=str(tmp_path / "sched")), name="beat")
    beat.wait_for("maxinterval -> now (0.5s)")
    beat.wait_for("beat: Starting...")
    assert f". db -> {tmp_path / 'sched'}" in beat.log()
    assert beat.stop() == 0
