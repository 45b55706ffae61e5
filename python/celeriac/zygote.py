"""The zygote: imports the user's Celery app once, then forks pool children on request.

Runs inside the embedded interpreter of a process the Rust supervisor forked before it started
any thread. It does what the stock ``celery worker`` MainProcess does before it starts its pool
(app discovery, loader.init_worker, logging, worker signals), reports the app's configuration to
the supervisor, and then only forks. The supervisor never runs Python itself.
"""

import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback

from celeriac import frames

logger = logging.getLogger("celeriac.zygote")

LOG_LEVELS = {
    "CRITICAL": logging.CRITICAL, "FATAL": logging.FATAL, "ERROR": logging.ERROR,
    "WARNING": logging.WARNING, "WARN": logging.WARNING, "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
}


class WorkerShim:
    """Stands in for celery's WorkController as the sender of worker-level signals.

    Signal receivers (the Django fixup, user hooks) read ``app``, ``hostname`` and ``pool_cls``.
    """

    pool_cls = "celery.concurrency.prefork:TaskPool"

    def __init__(self, app, hostname, options):
        self.app = app
        self.hostname = hostname
        self.options = options
        self.concurrency = options.get("concurrency")


def _send(sock, kind, obj):
    data = obj if isinstance(obj, bytes) else json.dumps(obj, default=str).encode()
    sock.sendall(frames.pack(kind, data))


def _apply_environment(options):
    # The stock CLI copies -b/--result-backend into these variables, which override the app's
    # own configuration (celery/bin/celery.py); we do the same before the app is imported.
    if options.get("broker"):
        os.environ["CELERY_BROKER_URL"] = options["broker"]
    if options.get("result_backend"):
        os.environ["CELERY_RESULT_BACKEND"] = options["result_backend"]
    if options.get("config"):
        os.environ["CELERY_CONFIG_MODULE"] = options["config"]
    if options.get("loader"):
        os.environ["CELERY_LOADER"] = options["loader"]
    if options.get("skip_checks"):
        os.environ["CELERY_SKIP_CHECKS"] = "true"
    level = LOG_LEVELS.get(str(options.get("loglevel", "WARNING")).upper(), logging.WARNING)
    # Pool children read these in celery.concurrency.prefork.process_initializer.
    os.environ["CELERY_LOG_LEVEL"] = str(level)
    os.environ["CELERY_LOG_REDIRECT"] = "1"
    os.environ["CELERY_LOG_REDIRECT_LEVEL"] = "WARNING"
    if options.get("logfile"):
        os.environ["CELERY_LOG_FILE"] = str(options["logfile"])
    return level


def load_app(options):
    """Resolve -A the way `celery -A` does (celery/app/utils.py: find_app)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    from celery.app.utils import find_app

    return find_app(options["app"])


def _queues(app, options):
    """The queues to consume from (`-Q`/`-X` applied), and every queue the app defines
    (what `add_consumer` looks a queue up in)."""
    queues = app.amqp.queues
    known = [_queue_spec(q) for q in queues.values()]
    include = [q for q in (options.get("queues") or "").split(",") if q.strip()]
    exclude = [q for q in (options.get("exclude_queues") or "").split(",") if q.strip()]
    if include:
        queues.select([q.strip() for q in include])
    if exclude:
        queues.deselect([q.strip() for q in exclude])
    return [_queue_spec(q) for q in queues.consume_from.values()], known


def _queue_spec(q):
    from kombu.transport.base import to_rabbitmq_queue_arguments

    exchange = q.exchange
    return {
        "name": q.name,
        "exchange": exchange.name if exchange is not None else "",
        "exchange_type": (exchange.type if exchange is not None else None) or "direct",
        "routing_key": q.routing_key or "",
        "durable": bool(q.durable),
        "auto_delete": bool(q.auto_delete),
        "exclusive": bool(q.exclusive),
        "max_priority": q.max_priority,
        # What kombu's Queue.queue_declare sends (kombu/transport/base.py), so declaring
        # never clashes with a queue a stock worker created.
        "queue_arguments": to_rabbitmq_queue_arguments(
            q.queue_arguments or {}, expires=q.expires, message_ttl=q.message_ttl,
            max_length=q.max_length, max_length_bytes=q.max_length_bytes,
            max_priority=q.max_priority,
        ),
        "exchange_durable": bool(exchange.durable) if exchange is not None else True,
        "exchange_auto_delete": bool(exchange.auto_delete) if exchange is not None else False,
        "exchange_arguments": (exchange.arguments or {}) if exchange is not None else {},
        "binding_arguments": q.binding_arguments or {},
    }


def _task_options(app):
    tasks = {}
    for name, task in app.tasks.items():
        tasks[name] = {
            "acks_late": bool(task.acks_late),
            "acks_on_failure_or_timeout": bool(getattr(task, "acks_on_failure_or_timeout", True)),
            "acks_on_failure": getattr(task, "acks_on_failure", None),
            "acks_on_timeout": getattr(task, "acks_on_timeout", None),
            "reject_on_worker_lost": bool(task.reject_on_worker_lost),
            "ignore_result": bool(task.ignore_result),
            "rate_limit": task.rate_limit,
            "time_limit": task.time_limit,
            "soft_time_limit": task.soft_time_limit,
            "track_started": bool(task.track_started),
        }
    return tasks


def _json_safe(value):
    return json.loads(json.dumps(value, default=repr))


def bootstrap_info(app, hostname, options):
    import celery
    from kombu.serialization import prepare_accept_content

    conf = app.conf
    conn = app.connection_for_read()
    try:
        backend_uri = app.backend.as_uri() if conf.result_backend else None
    except Exception:  # a backend that cannot print itself must not stop the worker
        backend_uri = str(conf.result_backend)
    queues, known_queues = _queues(app, options)
    return {
        "hostname": hostname,
        "app": repr(app),
        "main": app.main,
        "pid": os.getpid(),
        "celery_version": celery.__version__,
        "python_version": sys.version.split()[0],
        "executable": sys.executable,
        # Failover: every URL of `broker_url` (a list or `;`-separated), first one first.
        "broker_url": ";".join(conn.alt) if conn.alt else conn.as_uri(include_password=True),
        "broker_display": conn.as_uri(),
        "broker_connection": {"userid": conn.userid, "password": conn.password, "hostname": conn.hostname,
                              "port": conn.port,
                              # TLS as kombu settled it (URL query, else broker_use_ssl; rediss://
                              # without options is CERT_NONE, with kombu's warning).
                              "ssl": _json_safe(conn.ssl) if conn.ssl else None},
        "transport": conn.transport_cls if isinstance(conn.transport_cls, str) else str(conn.transport_cls),
        "result_backend": backend_uri,
        "queues": queues,
        "known_queues": known_queues,
        # `celery inspect conf` and `stats.broker`, answered by the supervisor.
        "conf_table": _json_safe(conf.table(with_defaults=False, censored=True)),
        "broker_info": _json_safe(conn.info()),
        "tasks": _task_options(app),
        # Sending task_received costs a round trip per message: only when someone listens.
        "task_received_receivers": bool(__import__("celery").signals.task_received.receivers),
        "conf": {
            "worker_concurrency": conf.worker_concurrency,
            "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
            "worker_send_task_events": bool(conf.worker_send_task_events),
            "accept_content": sorted(prepare_accept_content(conf.accept_content)),
            "broker_transport_options": _json_safe(conn.transport_options or {}),
            "task_acks_late": bool(conf.task_acks_late),
            "broker_heartbeat": conf.broker_heartbeat,
            "broker_use_ssl": _json_safe(conf.broker_use_ssl) if isinstance(conf.broker_use_ssl, dict) else None,
            "broker_connection_timeout": conf.broker_connection_timeout,
            "broker_connection_max_retries": conf.broker_connection_max_retries,
            # None falls back to broker_connection_retry, as celery/worker/consumer/consumer.py does.
            "broker_connection_retry_on_startup": bool(
                conf.broker_connection_retry if conf.broker_connection_retry_on_startup is None
                else conf.broker_connection_retry_on_startup),
            "worker_disable_rate_limits": bool(conf.worker_disable_rate_limits),
            "control_exchange": conf.control_exchange,
            "control_queue_expires": conf.control_queue_expires,
            "control_queue_ttl": conf.control_queue_ttl,
            "control_queue_exclusive": bool(conf.control_queue_exclusive),
            "control_queue_durable": bool(conf.control_queue_durable),
            "worker_cancel_long_running_tasks_on_connection_loss": bool(
                conf.worker_cancel_long_running_tasks_on_connection_loss),
            "task_default_queue": conf.task_default_queue,
            "enable_utc": bool(conf.enable_utc),
            "timezone": str(conf.timezone) if conf.timezone else None,
        },
    }


class StateDB:
    """`--statedb`: celery's own `celery.worker.state.Persistent` shelve file (revoked ids, clock)."""

    def __init__(self, app, options, hostname):
        from celery.utils.nodenames import node_format
        from celery.worker import state as worker_state

        self.state = worker_state
        # As `celery worker -S`: the option or the app's setting, `%n`/`%h`/... expanded.
        self.filename = node_format(options.get("statedb") or app.conf.worker_state_db, hostname)
        self.persistent = worker_state.Persistent(worker_state, self.filename) if self.filename else None

    def revoked(self):
        return sorted(self.state.revoked) if self.persistent else []

    def save(self, revoked, clock):
        if not self.persistent:
            return
        self.state.revoked.update(revoked)

        class _Clock:
            def forward(self):
                return clock

        self.persistent.clock = _Clock()
        self.persistent.save()


def start_worker(app, hostname, options, level):
    """The MainProcess start-up of celery/worker/worker.py, minus the parts Rust owns."""
    from celery import signals
    from celery.app import trace

    from celery.platforms import check_privileges

    app.log.setup(level, options.get("logfile"), True, "WARNING", hostname=hostname)
    if options.get("log_format") == "json":
        from celeriac import jsonlog

        jsonlog.install()
    _lean_pdeathsig()
    # Every pool child connects to something (result backend, broker) by host name, and
    # socket.getaddrinfo encodes host names with the idna codec (stringprep, unicodedata):
    # imported here once, shared by all children instead of ~1 MiB in each.
    import encodings.idna  # noqa: F401
    # Also paid by each child on its first connection unless done here: redis-py imports
    # `secrets` (and `hmac`) when it connects (~1 MiB written in every child), and the first
    # getaddrinfo of a process sets up the C resolver's and the socket module's state
    # (~0.4 MiB). A numeric address: no name lookup, nothing sent anywhere.
    import secrets  # noqa: F401

    try:
        socket.getaddrinfo("127.0.0.1", None, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except OSError:
        pass
    # The pool child's own module and what it imports (the prefork initializer, billiard's
    # pieces): imported once here, before the fork, instead of in every child.
    from celeriac import child

    child.stdin_to_devnull()
    # As `celery worker`: refuse to run as root with pickle accepted, unless C_FORCE_ROOT.
    check_privileges(app.conf.accept_content)
    shim = WorkerShim(app, hostname, options)
    signals.celeryd_init.send(sender=hostname, instance=shim, conf=app.conf, options=options)
    _include(app, options.get("include"))
    app.loader.init_worker()
    trace.setup_worker_optimizations(app, hostname)
    signals.worker_init.send(sender=shim)
    signals.celeryd_after_setup.send(sender=hostname, instance=shim, conf=app.conf)
    try:
        # A cached property every stored result reads (`app.now()`): loading the zone's data
        # and filling zoneinfo's caches once here spares each child's first task doing it.
        app.timezone  # noqa: B018
    except Exception:  # as stock: whatever is wrong shows at the first stored result
        logger.debug("app.timezone not settled before the fork", exc_info=True)
    _share_redis_result_client(app)
    return shim


def _share_redis_result_client(app):
    """Make the Redis result backend's client object here, before the fork, instead of in
    every pool child at its first stored result: building it (redis-py's client, connection
    pool and their settings) writes into ~0.3 MiB of pages each child shares with the zygote.
    Nothing connects until a command is sent, and redis-py's pool starts afresh in a process
    other than the one that made it (it checks the pid), so children still open their own
    connections. Other backends are left as they are: not all of them are safe to share.

    For a plain Redis backend (a Sentinel one's connections need their pool), one throwaway
    connection is also opened and closed, outside the client's pool, with a half-second
    timeout: redis-py's first connection of a process fills module-level state (its
    observability and maintenance handlers' singletons, the abc and typing caches its checks
    go through) that each child's first stored result would otherwise write for itself."""
    try:
        backend = app.backend  # made here anyway, for the banner
        redis_backends = sys.modules.get("celery.backends.redis")  # imported if it is one
        if redis_backends is None or not isinstance(backend, redis_backends.RedisBackend):
            return
        pool = backend.client.connection_pool  # a cached property: made once, kept
        if type(backend) is not redis_backends.RedisBackend:
            return
        connection = pool.connection_class(
            **dict(pool.connection_kwargs, socket_connect_timeout=0.5, socket_timeout=0.5))
    except Exception:  # as stock: whatever is wrong shows at the first stored result
        logger.debug("Redis result client not made before the fork", exc_info=True)
        return
    try:
        connection.connect()
    except Exception:  # unreachable at start-up: the children say so when they store
        logger.debug("Redis result backend not reached before the fork", exc_info=True)
    finally:
        connection.disconnect()


def _lean_pdeathsig():
    """Pool children set their parent-death signal in celery's `process_initializer`; billiard
    does it through a cffi parser built anew in each child when cffi is loaded (~6 MiB of
    private memory per child). The same prctl, made by celeriac's native code."""
    import celeriac
    from celery import platforms

    if hasattr(platforms, "_set_pdeathsig"):
        platforms._set_pdeathsig = celeriac.set_pdeathsig


def start_plain(app, options, level):
    """Start-up of a process that is not a worker (`celeriac beat`, `celeriac config`), as
    `celery beat` does it (`celery/apps/beat.py`): import the task modules and set up logging;
    no worker signals."""
    app.log.setup(level, options.get("logfile"), True, "WARNING")
    if options.get("log_format") == "json":
        from celeriac import jsonlog

        jsonlog.install()
    app.loader.init_worker()
    app.finalize()


def _check_backend(app):
    """`celeriac doctor`: does the result backend answer? (One read of a state nobody has.)"""
    from celery.backends.base import DisabledBackend

    backend = app.backend
    if isinstance(backend, DisabledBackend):
        return {"ok": True, "detail": "none configured (results are not stored)"}
    where = backend.as_uri() if hasattr(backend, "as_uri") else type(backend).__name__
    try:
        backend.get_state("celeriac-doctor-probe")
    except Exception as exc:  # any failure is the answer
        return {"ok": False, "detail": f"{where}: {exc!r}"}
    return {"ok": True, "detail": f"{where} answers"}


def _include(app, include):
    """`-I/--include`: import more task modules, and remember them in `include`
    (`WorkController.setup_includes`)."""
    modules = [m.strip() for m in (include or "").split(",") if m.strip()]
    if not modules:
        return
    for module in modules:
        app.loader.import_task_module(module)
    app.conf.include = tuple(set(app.conf.include or ()) | set(modules))


def _purge(app):
    """`--purge`: empty the queues consumed from before starting (`Worker.purge_messages`)."""
    with app.connection_for_write() as connection:
        count = app.control.purge(connection=connection)
    if count:
        print(f"purge: Erased {count} {'message' if count == 1 else 'messages'} from the queue.\n", file=sys.__stdout__, flush=True)


def _hostname(options):
    from celery.utils.nodenames import default_nodename, host_format

    return host_format(default_nodename(options.get("hostname")))


def _describe_exit(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return {"exitcode": None, "signal": sig, "signal_name": name}
    return {"exitcode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "signal": None}


def main(control_fd, options_json):
    """Entry point, called by src/embed. Never returns normally in a forked child."""
    options = json.loads(options_json)
    control = socket.socket(fileno=control_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    # So is a SIGTERM sent to the whole process group (`timeout`, `kill -- -PGID`): the
    # supervisor ends the zygote by closing its socket once the warm shutdown is done.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    level = _apply_environment(options)
    try:
        hostname = _hostname(options)
        app = load_app(options)
        if options.get("role") in ("beat", "config", "doctor"):
            start_plain(app, options, level)
        else:
            start_worker(app, hostname, options, level)
        statedb = StateDB(app, options, hostname)
        info = bootstrap_info(app, hostname, options)
        if options.get("role") == "doctor":
            info["backend_check"] = _check_backend(app)
        info["revoked"] = statedb.revoked()
        if options.get("purge"):
            _purge(app)
    except BaseException as exc:  # one clear line for the user, the traceback at debug level
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        if options.get("loglevel", "").upper() == "DEBUG":
            traceback.print_exc()
        _send(control, frames.FATAL, f"Unable to load celery application {options.get('app')!r}: {detail}".encode())
        return 1
    _send(control, frames.BOOTSTRAP, info)
    # Children share the app's objects copy-on-write; keep the collector from touching them.
    gc.collect()
    gc.freeze()
    return _serve(control, app, hostname, options, statedb)


def _serve(control, app, hostname, options, statedb):
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # A stream: frames may arrive split or several at once; the fd of each FORK frame rides
    # along with its bytes (SCM_RIGHTS), in order.
    buffer, pending_fds = b"", []
    shim = WorkerShim(app, hostname, options)
    beat_pids = []
    while True:
        try:
            ready, _, _ = select.select([control, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            os.read(wake_r, 512)
            _reap(control)
        if control not in ready:
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(control, 65536, 16)
        except ConnectionResetError:
            msg, fds = b"", []
        if not msg:
            # The supervisor is gone or done: children die with us (pdeathsig), but the beat
            # process first saves its schedule.
            _stop_beat(beat_pids)
            return 0
        buffer += msg
        pending_fds.extend(fds)
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[:4], "big")
            if len(buffer) < 4 + length:
                break
            kind, payload, buffer = buffer[4], buffer[5:4 + length], buffer[4 + length:]
            if kind == frames.FORK and pending_fds:
                spec = json.loads(payload)
                pid = _fork_child(spec, pending_fds.pop(0), control, (wake_r, wake_w), app, hostname, options)
                if spec.get("role") == "beat":
                    beat_pids.append(pid)
            elif kind == frames.SAVE_STATE:
                try:
                    state = json.loads(payload)
                    statedb.save(state.get("revoked", []), state.get("clock", 0))
                except Exception:
                    logger.exception("Could not save the worker state to %s", statedb.filename)
            elif kind == frames.RECORD:
                # Outcomes left when no pool child remains (shutdown deadline): same code.
                from celeriac import child

                child.Child(None, app, hostname).mark_failure(json.loads(payload))
            elif kind == frames.TASK_RECEIVED:
                _send_task_received(payload, app, hostname, shim)
                _send(control, frames.SIGNAL_SENT, {"signal": "task_received"})
            elif kind == frames.WORKER_SIGNAL:
                event = json.loads(payload)
                _send_worker_signal(event, shim)
                _send(control, frames.SIGNAL_SENT, {"signal": event.get("signal")})


def _fork_child(spec, fd, control, wake, app, hostname, options):
    """Fork a pool child, or the beat process (`{"role": "beat"}`)."""
    index = spec.get("index", 0)
    pid = os.fork()
    if pid == 0:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for w in wake:
            os.close(w)
        control.close()
        code = 1
        try:
            if spec.get("role") == "beat":
                from celeriac import beat

                code = beat.run(fd, app, spec.get("beat") or {})
            else:
                from celeriac import child

                code = child.run(fd, index, app, hostname, options, spec.get("process_index"))
        except BaseException:
            logger.exception("Process %s failed", spec.get("role", "child"))
        logging.shutdown()
        os._exit(code)
    os.close(fd)
    _send(control, frames.FORKED, {"index": index, "pid": pid})
    return pid


def _stop_beat(pids, timeout=10.0):
    """SIGTERM the beat process (it saves its schedule, then exits) and wait for it."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.05)


def _send_task_received(payload, app, hostname, shim):
    """`task_received`, with a real celery Request built from the message, as the stock
    MainProcess sends it (`celery/worker/strategy.py`)."""
    from celery import signals
    from celery.worker.request import Request
    from kombu.message import Message

    try:
        name, _id, _proto, content_type, content_encoding, headers, extras, body, _ = frames.loads_task(payload)
        message = Message(body=body, content_type=content_type, content_encoding=content_encoding,
                          delivery_info=extras.get("delivery_info"), properties=extras.get("properties"),
                          headers=headers, delivery_tag=(extras.get("properties") or {}).get("delivery_tag"))
        request = Request(message, app=app, hostname=hostname, task=app.tasks[name])
        signals.task_received.send(sender=shim, request=request)
    except Exception:
        logger.exception("A task_received signal handler raised")


def _send_worker_signal(event, shim):
    """MainProcess signals, sent where the app's MainProcess-level Python lives: here."""
    from celery import signals

    name = event.get("signal")
    try:
        if name == "worker_ready":
            signals.worker_ready.send(sender=shim)
        elif name == "worker_shutting_down":
            signals.worker_shutting_down.send(sender=shim.hostname, sig=event.get("sig"), how=event.get("how"),
                                              exitcode=event.get("exitcode"))
        elif name == "worker_shutdown":
            signals.worker_shutdown.send(sender=shim)
    except Exception:
        logger.exception("A %s signal handler raised", name)


def _reap(control):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        report = {"pid": pid}
        report.update(_describe_exit(status))
        _send(control, frames.EXITED, report)
