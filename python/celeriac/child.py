"""A pool child: runs tasks exactly as a stock prefork child does.

Forked from the zygote. It initialises itself with celery's own
``celery.concurrency.prefork.process_initializer`` and runs every task through
``celery.app.trace.fast_trace_task`` with the raw message body, so decoding, the tracer,
signals, result backends, callbacks and chords are Celery's own code. It reports to the
supervisor only what the supervisor needs to settle the message (ack, reject, requeue).
"""

import json
import logging
import multiprocessing
import os
import socket
import sys
from multiprocessing import util as _mp_util

import celery
from billiard import process as billiard_process
from billiard.einfo import ExceptionWithTraceback
from celery import exceptions as cexc
from celery import signals
from celery.app import trace
from celery.concurrency.prefork import process_destructor, process_initializer
from celery.utils.serialization import get_pickleable_exception
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import loads as loads_message
from kombu.serialization import registry as _kombu_registry
from kombu.utils.json import loads as json_loads

from celeriac import frames

logger = logging.getLogger("celery.worker")

# Log texts of celery/worker/consumer/consumer.py and celery/worker/request.py, so users'
# log filters and alerts keep matching.
MESSAGE_DECODE_ERROR = (
    "Can't decode message body: %r [type:%r encoding:%r headers:%s]\n\nbody: %s"
)
INVALID_TASK_ERROR = "Received invalid task message: %s\nThe message has been ignored and discarded.\n\n"

CELERY_5_7 = tuple(celery.VERSION[:2]) >= (5, 7)


_SUCCEEDED_KEYS = {"outcome", "runtime", "result", "exiting"}


def _kombu_would_decode_json(accept):
    """kombu's own decoder is the registered one for JSON, and kombu's ``loads`` would accept
    JSON (`accept_content`, else the registry's disabled types): the child may decode plain
    JSON bodies itself."""
    if _kombu_registry._decoders.get("application/json") is not json_loads:
        return False
    if accept is not None:
        return "application/json" in accept
    return "application/json" not in _kombu_registry._disabled_content_types


def _decode_json_body(body):
    """What kombu's ``loads`` returns for a JSON task body, without its per-object Python hook.

    Only where that hook cannot act (no ``__type__`` key, not even one spelled with ``\\u``
    escapes); otherwise (and on any error, so kombu raises its own DecodeError) ``None``: the
    caller lets kombu decode.
    """
    if not body or b"__type__" in body or b"\\u00" in body:
        return None
    try:
        return json.loads(body.decode("utf-8"))
    except ValueError:
        return None


# Exceptions the tracer raised outside the task body, by task id (`task_internal_error`).
_internal_errors = {}


def _note_internal_error(sender=None, task_id=None, exception=None, **kwargs):
    _internal_errors[task_id] = exception


class _MessageShim:
    """What ``hybrid_to_proto2`` reads of a kombu Message."""

    def __init__(self, headers):
        self.headers = headers


def _dump_body(body):
    text = body[:1024] if isinstance(body, (bytes, bytearray)) else body
    return repr(text)


def _soft_time_limit(signum, frame):
    # billiard.pool.soft_timeout_sighandler: raised inside the running task, which may catch it.
    from billiard.exceptions import SoftTimeLimitExceeded

    raise SoftTimeLimitExceeded()


class Child:
    def __init__(self, sock, app, hostname, max_tasks=None, max_memory_kib=None):
        self.sock = sock
        self.app = app
        self.hostname = hostname
        self.accept = trace._localized[1] if len(trace._localized) > 1 else None
        self.fast_json_bodies = _kombu_would_decode_json(self.accept)
        self.max_tasks = max_tasks or 0
        self.max_memory_kib = max_memory_kib or 0
        self.completed = 0

    def should_retire(self):
        """billiard's worker loop: leave after max tasks, or when memory grew past the limit."""
        if self.max_tasks and self.completed >= self.max_tasks:
            return True
        if self.max_memory_kib:
            from billiard.compat import mem_rss

            used = mem_rss()
            if used > self.max_memory_kib:
                logger.warning("child process exiting after exceeding memory limit (%sKiB / %sKiB)",
                               used, self.max_memory_kib)
                return True
        return False

    def send(self, kind, obj):
        self.sock.sendall(frames.pack(kind, json.dumps(obj).encode()))

    def send_report(self, report):
        if report.get("outcome") == "success" and report.keys() <= _SUCCEEDED_KEYS:
            runtime = report.get("runtime") or 0.0
            self.sock.sendall(frames.pack_succeeded(runtime, report["exiting"], report.get("result") or ""))
        else:
            self.send(frames.DONE, report)

    def serve(self):
        self.send(frames.READY, {"pid": os.getpid()})
        # Buffered: a frame's header and payload (and any frame queued behind it) in one read.
        reader = self.sock.makefile("rb", buffering=1 << 16)
        read_frame, run_task = frames.read_frame_buffered, self.run_task
        limited = bool(self.max_tasks or self.max_memory_kib)
        while True:
            frame = read_frame(reader)
            if frame is None:
                return 0
            kind, payload = frame
            if kind == frames.TASK:
                report = run_task(payload)
                self.completed += 1
                retire = limited and self.should_retire()
            elif kind == frames.MARK_FAILURE:
                report = self.mark_failure(json.loads(payload))
                retire = False
            else:
                logger.error("celeriac child: unknown frame kind %r ignored", kind)
                continue
            report["exiting"] = retire
            self.send_report(report)
            if retire:
                return 0

    def run_task(self, payload):
        name, task_id, proto, content_type, content_encoding, request, extras, body, decoded = frames.loads_task(
            payload)
        try:
            compression = request.get("compression") if isinstance(request, dict) else None
            if compression:
                # kombu's Message decompresses before anything decodes (`task_compression`).
                from kombu.compression import decompress

                body = decompress(body, compression)
            if proto == 1:
                decoded = loads_message(body, content_type, content_encoding, accept=self.accept)
                from celery.worker.strategy import hybrid_to_proto2

                body, request, _decoded, _utc = hybrid_to_proto2(_MessageShim(request), decoded)
                content_type = content_encoding = None
            elif content_type == "application/json" and self.fast_json_bodies:
                # The supervisor decoded small plain bodies already (`write_decoded_body`).
                if decoded is None:
                    decoded = _decode_json_body(body)
                if decoded is not None:
                    body, content_type, content_encoding = decoded, None, None
            request.update(extras)
            failed, retval, runtime = trace.fast_trace_task(
                name, task_id, request, body, content_type, content_encoding,
            )
        except DecodeError as exc:
            logger.critical(MESSAGE_DECODE_ERROR, exc, content_type, content_encoding,
                            request, _dump_body(body), exc_info=True)
            # Beyond stock (which leaves the result PENDING forever): the caller gets the error.
            self._store_failure(task_id, name, request, exc)
            return {"outcome": "decode_error", "runtime": 0.0}
        except (ContentDisallowed, cexc.InvalidTaskError) as exc:
            logger.error(INVALID_TASK_ERROR, exc, exc_info=True)
            self._store_failure(task_id, name, request, exc)
            return {"outcome": "invalid", "runtime": 0.0}
        except Exception as exc:  # outside the task body: stock's Request.on_failure path
            logger.error("Task handler raised error: %r", exc, exc_info=True)
            self._store_failure(task_id, name, request, exc)
            return {"outcome": "failure", "runtime": 0.0}
        refused = _internal_errors.pop(task_id, None) if _internal_errors else None
        if not failed:
            if refused is not None:
                # The tracer gave up before the task ran (kwargs not a mapping, ...) and, as
                # stock, reports success with nothing stored; celeriac stores the failure.
                self._store_failure(task_id, name, request, refused)
                return self._failure_report(None, refused, runtime)
            return {"outcome": "success", "runtime": runtime, "result": retval}
        exc = getattr(retval, "exception", None)
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, cexc.Reject):
            if not exc.requeue and CELERY_5_7:
                # 5.7's Request.on_failure records a terminal FAILURE for Reject(requeue=False).
                self._store_failure(task_id, name, request, exc)
            return {"outcome": "rejected", "requeue": bool(exc.requeue), "runtime": runtime}
        if isinstance(exc, cexc.Ignore):
            return {"outcome": "ignored", "runtime": runtime}
        return self._failure_report(retval, exc, runtime)

    @staticmethod
    def _failure_report(einfo, exc, runtime):
        """Failure and retry outcomes, with what `task-failed` / `task-retried` events carry."""
        from celery.utils.saferepr import saferepr

        if isinstance(exc, cexc.Retry):
            return {"outcome": "retry", "runtime": runtime, "exception": saferepr(exc.exc if exc.exc is not None else exc),
                    "traceback": str(getattr(einfo, "traceback", "") or "")}
        return {"outcome": "failure", "runtime": runtime, "exception": saferepr(exc),
                "traceback": str(getattr(einfo, "traceback", "") or "")}

    def _store_failure(self, task_id, name, request, exc):
        task = self.app.tasks.get(name)
        backend = task.backend if task is not None else self.app.backend
        try:
            from celery.app.task import Context

            context = Context(request or {})
            store = True
            if task is not None:
                ignored = context.ignore_result if context.ignore_result is not None else task.ignore_result
                store = not ignored or task.store_errors_even_if_ignored
            backend.mark_as_failure(task_id, get_pickleable_exception(exc), request=context,
                                    store_result=store)
        except Exception:
            logger.exception("celeriac: could not store the failure of task %s[%s]", name, task_id)

    def mark_failure(self, job):
        """Record an outcome no task run produced, as the stock MainProcess does."""
        reason = job.get("reason")
        try:
            if reason == "unregistered":
                self._record_unregistered(job)
            elif reason == "revoked":
                self._record_revoked(job)
            elif reason == "revoke_ids":
                self._revoke_ids(job)
            elif reason == "worker_lost":
                self._record_worker_lost(job)
            elif reason == "cancelled":
                self._record_cancelled(job)
            elif reason == "time_limit":
                self._record_time_limit(job)
            elif reason == "invalid":
                kind = ContentDisallowed if job.get("exception") == "ContentDisallowed" else cexc.InvalidTaskError
                self._store_failure(job["id"], job.get("name"), dict(vars(self._context(job))),
                                    kind(job.get("detail") or "invalid task message"))
            else:
                logger.error("celeriac: unknown outcome record %r", reason)
        except Exception:
            logger.exception("celeriac: could not record %s for task %s", reason, job.get("id"))
        return {"outcome": "recorded", "runtime": 0.0}

    @staticmethod
    def _context(job):
        from celery.app.task import Context

        meta = job.get("meta") or {}
        headers, extras = meta.get("headers"), meta.get("extras")
        request = dict(headers) if isinstance(headers, dict) else {}
        request.update(extras if isinstance(extras, dict) else {})
        return Context(request)

    def _record_unregistered(self, job):
        # celery/worker/consumer/consumer.py: Consumer.on_unknown_task
        from celery.utils.objects import Bunch

        request = Bunch(
            name=job["name"], chord=None, root_id=job.get("root_id"),
            correlation_id=job.get("correlation_id"), reply_to=job.get("reply_to"),
            errbacks=None,
        )
        self.app.backend.mark_as_failure(job["id"], cexc.NotRegistered(job["name"]), request=request)

    def _record_revoked(self, job):
        # celery/worker/request.py: Request._announce_revoked ('expired', 'revoked', 'terminated')
        why = job.get("why", "revoked")
        task = self.app.tasks.get(job["name"])
        context = self._context(job)
        backend = task.backend if task is not None else self.app.backend
        backend.mark_as_revoked(job["id"], why, request=context)
        signals.task_revoked.send(sender=task, request=context, terminated=why == "terminated",
                                  signum=job.get("signum"), expired=why == "expired")

    def _revoke_ids(self, job):
        # celery/worker/control.py: _revoke, for ids not running here (5.7 semantics)
        from celery import states

        for task_id, name in job.get("ids", {}).items():
            task = self.app.tasks.get(name) if name else None
            backend = task.backend if task is not None else self.app.backend
            try:
                state = backend.get_state(task_id)
                if state in states.READY_STATES:
                    continue
                if state not in (states.PENDING, states.RECEIVED, states.RETRY, states.REJECTED):
                    continue
                backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
            except Exception as exc:
                logger.warning("Failed to mark task %s as revoked in backend: %s", task_id, exc)

    def _record_time_limit(self, job):
        # celery/worker/request.py: Request.on_timeout(soft=False)
        from billiard.exceptions import TimeLimitExceeded
        task = self.app.tasks.get(job["name"])
        limit = job.get("limit")
        exc = TimeLimitExceeded(int(limit) if limit is not None and float(limit).is_integer() else limit)
        context = self._context(job)
        self._store_failure(job["id"], job["name"], dict(vars(context)), exc)
        if task is not None:
            try:
                task.on_failure(exc, job["id"], context.args, context.kwargs, None)
            except Exception:
                logger.exception("on_failure handler of %s raised", job["name"])
        signals.task_failure.send(sender=task, task_id=job["id"], exception=exc,
                                  args=context.args, kwargs=context.kwargs, traceback=None, einfo=None)

    def _record_cancelled(self, job):
        # celery/worker/request.py: Request._announce_cancelled
        task = self.app.tasks.get(job["name"])
        context = self._context(job)
        exc = cexc.Retry(message="cancelled by Celery")
        backend = task.backend if task is not None else self.app.backend
        backend.mark_as_retry(job["id"], exc, request=context)
        if task is not None:
            task.on_retry(exc, job["id"], context.args, context.kwargs, None)
        signals.task_retry.send(sender=task, request=context, reason=exc, einfo=None)

    def _record_worker_lost(self, job):
        # celery/worker/request.py: Request.on_failure for WorkerLostError
        from billiard.exceptions import WorkerLostError
        task = self.app.tasks.get(job["name"])
        exc = WorkerLostError(job.get("detail") or "Worker exited prematurely.")
        context = self._context(job)
        self._store_failure(job["id"], job["name"], dict(vars(context)), exc)
        signals.task_failure.send(sender=task, task_id=job["id"], exception=exc,
                                  args=context.args, kwargs=context.kwargs, traceback=None, einfo=None)


def run(fd, index, app, hostname, options, process_index=None):
    """Body of a forked child; returns the process exit code."""
    import signal

    multiprocessing.current_process().name = f"ForkPoolWorker-{index}"
    if process_index is not None:
        # What a billiard pool process has, and Celery's `%i`/`%I` in a log file name read.
        billiard_process.current_process().index = process_index
    sock = socket.socket(fileno=fd)
    _keep_socket_to_ourselves(fd)
    _bootstrap_as_billiard()
    _initialize_child(app, hostname)
    signal.signal(signal.SIGUSR1, _soft_time_limit)
    max_tasks = options.get("max_tasks_per_child") or app.conf.worker_max_tasks_per_child
    max_memory = options.get("max_memory_per_child") or app.conf.worker_max_memory_per_child
    code = 0
    try:
        code = Child(sock, app, hostname, max_tasks, max_memory).serve()
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
    finally:
        try:
            process_destructor(os.getpid(), code)
        except Exception:
            logger.exception("worker_process_shutdown handler failed")
        _mp_util._exit_function()
    return code


def _memoize_custom_headers():
    """Make ``Context._get_custom_headers`` cheap for the header names it has seen.

    Celery's tracer builds a ``Context`` for every task, and the Context's ``headers`` (the
    message's own, non-Celery headers) come from copying the request and popping each of the
    ~55 names Celery knows, a set rebuilt on every call: a sixth of the tracer's time for a
    no-op task. The outcome depends only on which names are there, so Celery's own method
    decides once for each name, and later calls reuse its verdicts: the same dict (or None)
    for ~2 us less per task. Left as it is if Celery's method does not behave as a filter on
    names (another Celery version)."""
    from celery.app.task import Context

    original = Context.__dict__.get("_get_custom_headers")
    if original is None or not _filters_names(original, Context):
        return
    seen, custom = set(), set()

    def _get_custom_headers(self, *args, **kwargs):
        headers = {}
        headers.update(*args, **kwargs)
        if headers.keys() <= seen:
            if headers.keys().isdisjoint(custom):
                return None
            return {key: value for key, value in headers.items() if key in custom}
        verdict = original(self, *args, **kwargs)
        if len(seen) < _MAX_HEADER_NAMES:  # names from messages: a bound on what is kept
            kept = verdict.keys() if verdict else ()
            for key in headers:
                seen.add(key)
                if key in kept:
                    custom.add(key)
        return verdict

    Context._get_custom_headers = _get_custom_headers


_MAX_HEADER_NAMES = 4096


def _filters_names(method, context_class):
    """Does ``method`` return its input without Celery's own names, values untouched (None if
    nothing is left)?"""
    ours, theirs = object(), object()
    probe = {name: ours for name in context_class.__dict__ if not name.startswith("__")}
    probe["x-celeriac-probe"] = theirs
    try:
        kept = method(context_class.__new__(context_class), probe)
        nothing = method(context_class.__new__(context_class), {"id": ours})
    except Exception:
        return False
    return kept == {"x-celeriac-probe": theirs} and kept["x-celeriac-probe"] is theirs and nothing is None


class _LazyTracer:
    """Stands in for a task's tracer until the task first runs in this child, then builds it
    with the same arguments and puts the real one in its place.

    Celery's ``process_initializer`` builds a tracer for every registered task in every pool
    child, though a child may only ever run a few of them, and each build writes into pages the
    child shares with the zygote (0.3 MiB a child for the 16 tasks of the benchmark's app,
    measured before any task ran; apps with hundreds of tasks pay more). Built on first use,
    the tracer is the same: its arguments, the signal receiver lists it holds (the same live
    lists) and the child's pid."""

    __slots__ = ("build", "args", "kwargs")

    def __init__(self, build, args, kwargs):
        self.build, self.args, self.kwargs = build, args, kwargs

    def __call__(self, *args, **kwargs):
        task = self.args[1]
        tracer = self.build(*self.args, **self.kwargs)
        if task.__trace__ is self:
            task.__trace__ = tracer
        return tracer(*args, **kwargs)


def _initialize_child(app, hostname):
    """celery's own ``process_initializer``, with each task's tracer built on first use and
    logging not set up a second time.

    The zygote set logging up before the fork with the arguments the initializer reads back
    from the environment (``CELERY_LOG_*``). Called again in a child whose logging is set up
    (``already_setup``: the initializer clears it when the log file is per process, ``%i``),
    ``app.log.setup`` would only redo what the child inherited: stdout/stderr proxies like
    the ones it has, the same environment variables, warning filters already in place; and
    doing so writes into ~0.3 MiB of pages each child shares with the zygote."""
    _memoize_custom_headers()
    build = trace.build_tracer
    trace.build_tracer = lambda *args, **kwargs: _LazyTracer(build, args, kwargs)
    log = app.log
    setup = log.setup
    log.setup = lambda *args, **kwargs: None if log.already_setup else setup(*args, **kwargs)
    try:
        process_initializer(app, hostname)
    finally:
        trace.build_tracer = build
        del log.setup


def _keep_socket_to_ourselves(fd):
    """Processes a task starts must not hold this child's end of its socket: the supervisor
    learns that a child is gone when that end closes, so a grandchild that kept it open (a
    task that forks a worker process and returns) would hide the child's death, and the
    supervisor would neither replace the child nor settle what it was running. Programs a
    task executes never get it (close-on-exec); a bare fork gets /dev/null in its place
    (`_hide_socket_after_fork`, registered once in the zygote)."""
    global _socket_fd
    os.set_inheritable(fd, False)
    _socket_fd = fd


_socket_fd = None


def _hide_socket_after_fork():
    if _socket_fd is None:  # the zygote forking a pool child
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, _socket_fd, inheritable=False)
    os.close(devnull)


# Registered here, when the zygote imports this module before forking, rather than in each
# child: what a child does before its first task writes into pages it shares with the zygote.
os.register_at_fork(after_in_child=_hide_socket_after_fork)
signals.task_internal_error.connect(_note_internal_error, weak=False)


def stdin_to_devnull():
    """billiard's ``Process._bootstrap`` gives each pool child /dev/null as stdin; the zygote
    does it once before forking them (it never reads stdin), so children inherit it."""
    if sys.stdin is not None:
        try:
            sys.stdin.close()
            sys.stdin = open(os.devnull)
        except (OSError, ValueError):
            pass


def _bootstrap_as_billiard():
    """The rest of what billiard's ``Process._bootstrap`` does in a new pool child before it
    runs: finalizers registered in the parent are dropped, and the after-fork hooks run
    (``app._after_fork``: the broker connection and producer pools made before the fork are
    forgotten, and ``app.on_after_fork`` receivers, such as the Redis result consumer's,
    reset their connections)."""
    _mp_util._finalizer_registry.clear()
    _mp_util._run_after_forkers()
