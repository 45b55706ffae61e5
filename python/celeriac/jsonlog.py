"""`--log-format json`: one JSON object per log line, with the task's id, name, state and
runtime when the line is about a task (celery's trace log records carry them in `data`)."""

import datetime
import json
import logging

# celery/app/trace.py log messages → the state they report.
_STATES = (("succeeded in", "SUCCESS"), ("raised unexpected", "FAILURE"), ("raised expected", "FAILURE"),
           ("retry:", "RETRY"), ("ignored", "IGNORED"), ("reject", "REJECTED"))


class JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname,
            "process": record.processName,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            for key, out in (("id", "task_id"), ("name", "task"), ("runtime", "runtime")):
                if data.get(key) is not None:
                    line[out] = data[key]
            for needle, state in _STATES:
                if needle in record.msg:
                    line["state"] = state
                    break
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def install():
    """Put the JSON formatter on every handler celery's logging setup installed."""
    formatter = JsonFormatter()
    for name in (None, "celery", "celery.task", "celery.app.trace"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)
