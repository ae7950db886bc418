"""Logging set-up: ``text`` for people, ``json`` (one object a line) for collectors.

Log records never carry array data: only names, shapes, codes and timings.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

__all__ = ["BatchedStreamHandler", "JsonFormatter", "configure_logging", "service_loggers"]

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


class BatchedStreamHandler(logging.StreamHandler):
    """A stream handler that writes its lines a batch at a time, for the access log.

    A line per request, each written and flushed on its own, was a system call per
    request: ~5 % of a front end's CPU on a small request (measured under wrk). Here a
    line waits at most ``delay_s`` (a loop timer from the first line of a batch) or
    until ``max_lines`` are waiting. Lines are written at exit (logging's own flush
    then); a process killed outright loses at most ``delay_s`` of them. Outside an
    event loop a line is written at once.
    """

    def __init__(self, delay_s: float = 0.05, max_lines: int = 256) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.max_lines = max_lines
        self._records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:  # under the handler's lock
        # Kept as it is, formatted with its batch: the access line of a response is
        # emitted just before the response's last bytes leave, and formatting it there
        # (the time stamp's strftime above all) sat between a small Jacobian and its
        # caller. (What an access line carries is strings and numbers, fixed once made.)
        self._records.append(record)
        if len(self._records) >= self.max_lines:
            self._write()
        elif len(self._records) == 1:
            try:
                asyncio.get_running_loop().call_later(self.delay_s, self.flush)
            except RuntimeError:  # no loop in this thread: nothing would come back to flush
                self._write()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write()

    def _write(self) -> None:
        records, self._records = self._records, []
        lines = []
        for record in records:
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
        if lines:
            self.stream.write("\n".join(lines) + "\n")
        super().flush()


def service_loggers() -> tuple[logging.Logger, ...]:
    """The ``jacobian_service`` logger and those made under it so far."""
    return tuple(logger for name, logger in list(logging.root.manager.loggerDict.items())
                 if isinstance(logger, logging.Logger) and (name == "jacobian_service" or
                                                            name.startswith("jacobian_service.")))


def configure_logging(fmt: str) -> None:
    """Configure the ``jacobian_service`` logger tree once (idempotent). The access log
    (a line per request) has its own batched handler; everything else is written as it
    happens. Again after the functions' modules are imported: one that configures
    logging as it is imported (``logging.config.dictConfig``, which disables every
    logger made before it by default) silenced the service's loggers for good."""
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for logger in service_loggers():
        logger.disabled = False
    for name, kind in (("jacobian_service", logging.StreamHandler), ("jacobian_service.access", BatchedStreamHandler)):
        logger = logging.getLogger(name)
        handler = next((h for h in logger.handlers if getattr(h, "_jacobian_service", False)), None)
        if handler is None:
            handler = kind()
            handler._jacobian_service = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
        handler.setFormatter(formatter)
        logger.setLevel(logging.INFO)
