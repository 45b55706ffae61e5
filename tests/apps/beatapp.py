"""A Celery app with a beat schedule, for the beat tests (celeriac `-B` / `celeriac beat`).

Which entries exist comes from the environment, so each test picks its schedule:
BEATAPP_INTERVAL (seconds, the `every` entry), BEATAPP_CRON=1 (crontab entries on an
accelerated clock), BEATAPP_SOLAR=1. Every run is recorded in the Redis list `beat:runs`
of the result backend's database.
"""

import json
import os
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from celery import Celery
from celery.schedules import crontab, solar
from celery.signals import before_task_publish

app = Celery("beatapp")
app.conf.update(
    broker_url=os.environ.get("CELERIAC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CELERIAC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    timezone=os.environ.get("BEATAPP_TIMEZONE", "UTC"),
    beat_max_loop_interval=float(os.environ.get("BEATAPP_MAX_INTERVAL", "1")),
)

if os.environ.get("TESTAPP_TRANSPORT_OPTIONS"):
    app.conf.broker_transport_options = json.loads(os.environ["TESTAPP_TRANSPORT_OPTIONS"])

# A clock that starts at BEATAPP_CLOCK_START (ISO 8601, with offset) when the process starts
# and runs BEATAPP_CLOCK_SPEED times faster than real time: crontab entries are evaluated
# against chosen clock times without waiting for real hours.
_clock_start = os.environ.get("BEATAPP_CLOCK_START")
_speed = float(os.environ.get("BEATAPP_CLOCK_SPEED", "1"))
_real_start = time.time()


def fake_now():
    start = datetime.fromisoformat(_clock_start)
    return (start + timedelta(seconds=(time.time() - _real_start) * _speed)).astimezone(ZoneInfo(app.conf.timezone))


schedule = {}
if os.environ.get("BEATAPP_INTERVAL"):
    schedule["every"] = {
        "task": "beatapp.record",
        "schedule": float(os.environ["BEATAPP_INTERVAL"]),
        "args": ("every",),
        "options": {"expires": 30},
    }
if os.environ.get("BEATAPP_CRON"):
    schedule["quarter-hours"] = {
        "task": "beatapp.record",
        "schedule": crontab(minute="*/15", nowfun=fake_now),
        "args": ("quarter-hours",),
        "kwargs": {"clock": True},
    }
    # Every field: on the hour, on 29 March only (the fake clock's day) ...
    schedule["hourly-on-the-29th"] = {
        "task": "beatapp.record",
        "schedule": crontab(minute=0, hour="*", day_of_month="29", month_of_year="3", nowfun=fake_now),
        "args": ("hourly-on-the-29th",),
        "kwargs": {"clock": True},
    }
    # ... and one that must never fire: the 28th, in a list of months, on Monday to Friday.
    schedule["never"] = {
        "task": "beatapp.record",
        "schedule": crontab(minute="*", day_of_month="28", month_of_year="1-3,12", day_of_week="mon-fri",
                            nowfun=fake_now),
        "args": ("never",),
        "kwargs": {"clock": True},
    }
    schedule["weekday-mornings"] = {
        "task": "beatapp.record",
        "schedule": crontab(minute=30, hour="1-3", day_of_week="sun", nowfun=fake_now),
        "args": ("weekday-mornings",),
        "kwargs": {"clock": True},
    }
if os.environ.get("BEATAPP_SOLAR"):
    # solar schedules lose `nowfun` when the scheduler stores them (`solar.__reduce__`): the
    # whole app runs on the fake clock instead.
    app.now = fake_now
    schedule["sunrise"] = {
        "task": "beatapp.record",
        "schedule": solar("sunrise", 51.5, -0.12, nowfun=fake_now),
        "args": ("sunrise",),
        "kwargs": {"clock": True},
    }
if os.environ.get("BEATAPP_RELATIVE"):
    # `relative`: runs are aligned to the interval (whole seconds here), as `schedule(relative=True)`.
    schedule["relative"] = {
        "task": "beatapp.record",
        "schedule": timedelta(seconds=float(os.environ["BEATAPP_RELATIVE"])),
        "args": ("relative",),
        "relative": True,
    }
if os.environ.get("BEATAPP_ROUTED"):
    schedule["routed"] = {
        "task": "beatapp.record",
        "schedule": float(os.environ["BEATAPP_ROUTED"]),
        "args": ("routed",),
        "kwargs": {"extra": {"n": 1}},
        "options": {"queue": "beatq", "priority": 5, "expires": 60},
    }
app.conf.beat_schedule = schedule


@app.on_after_configure.connect
def _add_periodic(sender, **kwargs):
    if os.environ.get("BEATAPP_ADDED"):
        sender.add_periodic_task(float(os.environ["BEATAPP_ADDED"]), record.s("added"), name="added")


@before_task_publish.connect
def _stamp_send_time(headers=None, **kwargs):
    """Beat sends in its own process: note when (on the accelerated clock, if one runs), so
    tests look at send times rather than at when a busy or starting worker ran the task."""
    if headers is not None:
        headers["sent_at"] = (fake_now() if _clock_start else datetime.now(timezone.utc)).isoformat()


def _redis():
    import redis

    return redis.Redis.from_url(app.conf.result_backend)


@app.task(bind=True)
def record(self, name, clock=False, extra=None):  # noqa: ARG001 - `clock` marks fake-clock entries
    """Note who ran which entry, when (on the fake clock, for crontab entries), and whether the
    message carried beat's header."""
    entry = {
        "name": name,
        "id": self.request.id,
        "hostname": self.request.hostname,
        "queue": (self.request.delivery_info or {}).get("routing_key"),
        "extra": extra,
        "beat_header": bool(getattr(self.request, "celery_beat_task", False)),
        "at": getattr(self.request, "sent_at", None) or datetime.now(timezone.utc).isoformat(),
    }
    _redis().rpush("beat:runs", json.dumps(entry))
    return name
