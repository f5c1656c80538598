"""Structured logs: one JSON object per line, each carrying the RPC's request id (``contextvars``).

Patient data never reaches a log: UIDs are logged as :func:`preprocessing.pipeline.uid_hash` tags and
messages come from typed errors that name problems, not patients.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "request_id": request_id_var.get(),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = getattr(record, "fields", None)
        extra = " " + " ".join(f"{k}={v}" for k, v in fields.items()) if isinstance(fields, dict) else ""
        return f"{base} [{request_id_var.get()}]{extra}"


def configure(log_format: str = "json", level: int = logging.INFO) -> None:
    """Route the root logger to stderr in ``log_format`` (``json`` or ``text``)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
