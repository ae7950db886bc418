"""Logging set-up: ``text`` for people, ``json`` (one object a line) for collectors.

Log records never carry array data: only names, shapes, codes and timings.
"""

from __future__ import annotations

import logging
import time

import orjson

__all__ = ["configure_logging"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def configure_logging(fmt: str) -> None:
    """Configure the ``jacobian_service`` logger tree once (idempotent)."""
    logger = logging.getLogger("jacobian_service")
    handler = next((h for h in logger.handlers if getattr(h, "_jacobian_service", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler._jacobian_service = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.setLevel(logging.INFO)
