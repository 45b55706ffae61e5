"""The beat process: Celery's own scheduler (`celery.beat`), run by the supervisor.

Forked from the zygote (the app is already imported), it loads the schedule with the app's
scheduler class (`PersistentScheduler` by default, or `--scheduler`, such as
django-celery-beat's `DatabaseScheduler`) and ticks it exactly as `celery.beat.Service.start`
does — but only while the supervisor says this replica leads (it holds the leader lock in the
broker). The leader shares each entry's last run after every send, so a replica that takes over
neither repeats what was just sent nor fires everything at once.
"""

import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import sys
from datetime import datetime

from celeriac import frames

logger = logging.getLogger("celery.beat")


def run(fd, app, options):
    """Body of the forked beat process; returns its exit code."""
    from celery import beat as celery_beat
    from celery import signals

    multiprocessing.current_process().name = "Beat"
    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    service = celery_beat.Service(
        app=app,
        max_interval=options.get("max_interval"),
        schedule_filename=options.get("schedule_filename"),
        scheduler_cls=options.get("scheduler") or app.conf.beat_scheduler,
    )
    if options.get("standalone"):
        _print_banner(app, service, options)
    logger.info("beat: Starting...")
    scheduler = _load_scheduler(service, celery_beat)
    signals.beat_init.send(sender=service)
    if not options.get("standalone"):
        signals.beat_embedded_init.send(sender=service)
    sock.sendall(frames.pack(frames.READY, json.dumps({"pid": os.getpid()}).encode()))
    leading = False
    try:
        while True:
            timeout = None
            if leading:
                sent_before = _run_counts(scheduler)
                interval = scheduler.tick()
                if _run_counts(scheduler) != sent_before:
                    sock.sendall(frames.pack(frames.BEAT_STATE, json.dumps(_state(scheduler)).encode()))
                if scheduler.should_sync():
                    scheduler._do_sync()
                timeout = interval if interval and interval > 0 else 0
            ready, _, _ = select.select([sock], [], [], timeout)
            if not ready:
                continue
            frame = frames.read_frame(sock)
            if frame is None:
                break  # the supervisor is gone or done
            kind, payload = frame
            if kind == frames.BEAT_LEAD and not leading:
                _adopt(scheduler, json.loads(payload or b"{}"))
                leading = True
                logger.info("beat: this node sends the periodic tasks now")
            elif kind == frames.BEAT_FOLLOW and leading:
                leading = False
                scheduler.sync()
                logger.info("beat: another node sends the periodic tasks now")
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        service.sync()  # closes the scheduler, which writes the schedule
    return 0


def _load_scheduler(service, celery_beat):
    """The service's scheduler. Celery rebuilds a corrupt schedule file itself; one that cannot
    be opened at all (no such directory, no permission) would stop stock beat. Here the
    schedule is kept in memory instead — last runs still come from the leader's shared state."""
    try:
        return service.scheduler
    except Exception as exc:
        scheduler_cls = service.scheduler_cls
        default = scheduler_cls is celery_beat.PersistentScheduler or str(scheduler_cls).endswith("PersistentScheduler")
        if not default:
            raise
        logger.error("beat: cannot use the schedule file %r (%r): keeping the schedule in memory instead",
                     service.schedule_filename, exc)
        scheduler = celery_beat.Scheduler(app=service.app, max_interval=service.max_interval)
        service.__dict__["scheduler"] = scheduler
        return scheduler


def _exit(signum, frame):
    raise SystemExit(0)


def _print_banner(app, service, options):
    """What `celery beat` prints at start-up (`celery/apps/beat.py`)."""
    from celery.apps.beat import Beat

    b = Beat(app=app, max_interval=options.get("max_interval"), schedule=options.get("schedule_filename"),
             scheduler=options.get("scheduler"), loglevel=options.get("loglevel") or "WARN",
             logfile=options.get("logfile"), no_color=True)
    # Straight to the terminal, as stock prints it before logging takes stdout over.
    print(f"celery beat v{_version()} is starting.", file=sys.__stdout__, flush=True)
    print(b.banner(service), file=sys.__stdout__, flush=True)


def _version():
    from celery import VERSION_BANNER

    return VERSION_BANNER


def _run_counts(scheduler):
    return {name: entry.total_run_count for name, entry in scheduler.schedule.items()}


def _state(scheduler):
    """Each entry's last run, to hand to the next leader."""
    out = {}
    for name, entry in scheduler.schedule.items():
        last = entry.last_run_at
        out[name] = {
            "last_run_at": last.isoformat() if isinstance(last, datetime) else None,
            "total_run_count": entry.total_run_count,
        }
    return out


def _adopt(scheduler, shared):
    """Take the previous leader's last runs where they are newer than ours."""
    changed = False
    for name, entry in scheduler.schedule.items():
        theirs = shared.get(name) or {}
        try:
            last = datetime.fromisoformat(theirs["last_run_at"]) if theirs.get("last_run_at") else None
        except (TypeError, ValueError):
            last = None
        if last is None:
            continue
        ours = entry.last_run_at
        if ours is None or _aware(scheduler, ours) < _aware(scheduler, last):
            entry.last_run_at = last
            entry.total_run_count = max(entry.total_run_count, int(theirs.get("total_run_count") or 0))
            changed = True
    if changed:
        scheduler._heap = None  # next tick rebuilds the heap from the adopted times
        logger.debug("beat: adopted the last leader's schedule state")


def _aware(scheduler, dt):
    from celery.utils.time import maybe_make_aware

    return maybe_make_aware(dt, scheduler.app.timezone)

