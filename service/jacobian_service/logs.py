"""Logging set-up: ``text`` for people, ``json`` (one object a line) for collectors.

Log records never carry array data: only names, shapes, codes and timings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import time
from typing import Any

import orjson

__all__ = ["BatchedStreamHandler", "FdStream", "JsonFormatter", "RepeatFilter", "TextFormatter", "configure_logging",
           "quick_record", "service_loggers"]

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class _Seconds:
    """A time stamp's text to the second, kept for the second it was made for: every
    line (an access line per request) wrote it anew (``strftime`` of a ``localtime`` or
    ``gmtime``, ~2 us), where lines of one second share it. (One tuple, replaced
    whole: the formatter is shared by handlers under different locks.)"""

    __slots__ = ("_convert", "_format", "_kept")

    def __init__(self, fmt: str, convert: Any) -> None:
        self._format = fmt
        self._convert = convert
        self._kept: tuple[int, str] = (-1, "")

    def text(self, created: float) -> str:
        second = int(created)  # (a whole second: both converters drop the fraction)
        kept = self._kept
        if kept[0] != second or created < 0:
            kept = self._kept = (second, time.strftime(self._format, self._convert(created)))
        return kept[1]


# The text log's line.
LINE = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Control characters but tab, as escapes: a line of the text log is one record.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f) if c != 0x09}


class TextFormatter(logging.Formatter):
    """``logging.Formatter`` whose default time stamp is made once a second, and whose
    message is one line: what a function or client chose (an exception's text, a path)
    reaches messages, and its newline began a line of its own (a forged "INFO
    jacobian_service.access" line, say), its ESC sequences rewrote an operator's
    terminal. (A traceback stays on the lines after, as ``logging`` writes it.)"""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._seconds = _Seconds(self.default_time_format, time.localtime)

    def format(self, record: logging.LogRecord) -> str:
        # The service's own line (LINE), time stamp and no traceback, the access log's every
        # line: made at once, as logging.Formatter.format makes it (record.message and
        # record.asctime set, the message escaped), without the three %-formattings and
        # five calls of the long way (~22,000 instructions a line, a request's 3 %).
        style = self._style
        if (record.exc_info or record.exc_text or record.stack_info or style._fmt != LINE
                or style.__class__ is not logging.PercentStyle or style._defaults):
            return super().format(record)
        record.message = message = record.getMessage()
        record.asctime = asctime = self.formatTime(record, self.datefmt)
        if not message.isprintable():
            record.message = message = message.translate(_CONTROLS)
        return f"{asctime} {record.levelname} {record.name}: {message}"

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():
            record.message = message.translate(_CONTROLS)
        return super().formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt or self.converter is not time.localtime or not self.default_msec_format:
            return super().formatTime(record, datefmt)  # (set otherwise since: the long way)
        return self.default_msec_format % (self._seconds.text(record.created), record.msecs)


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self._seconds.text(record.created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class RepeatFilter(logging.Filter):
    """The same line from the same place said once per ``interval_s``, then counted.

    A function or client could make some lines at the rate it chose (an engine's
    connection written on in a loop: a traceback a message in the front end's log, a
    disk filled at will). Here a place (logger, file, line, level) says each distinct
    message once in its window of ``interval_s`` from its first line, and at most
    ``distinct`` messages in all (its arguments may be a function's text); the rest are
    counted, and said at the first record of any place after the window ends: "... 1,234
    more times in the last 10 s". The first of each is never lost; the access log has a
    handler of its own, outside this. A record with ``said_once`` passes: its caller
    bounds it (and would not say it again)."""

    def __init__(self, interval_s: float = 10.0, distinct: int = 100, clock: Any = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self.interval_s = interval_s
        self.distinct = distinct
        self._lock = threading.Lock()
        # place -> [window start, hashes of the messages said, count not said, first message,
        # (logger, level): no record kept, nor its traceback's frames]
        self._places: dict[tuple[Any, ...], list[Any]] = {}
        self._swept = clock()
        self._pid = _pid[0]

    def filter(self, record: logging.LogRecord) -> bool:
        # A summary, or a line its caller says once for each of a bounded set of names
        # (``said_once``: an engine's put-back settings, once per function and setting):
        # one dropped here would be lost for good, the caller saying it no more.
        if getattr(record, "repeats_summary", False) or getattr(record, "said_once", False):
            return True
        if self._pid != _pid[0]:  # a forked child's: the lock as another thread held it, the parent's counts
            self._lock, self._places, self._pid = threading.Lock(), {}, _pid[0]
        now = self.clock()
        place = (record.name, record.pathname, record.lineno, record.levelno)
        message = hash(record.getMessage())
        with self._lock:
            due = self._sweep(now) if now - self._swept >= self.interval_s else []
            state = self._places.get(place)
            if state is None or now - state[0] >= self.interval_s:
                if state is not None and state[2]:
                    due.append(state)
                state = self._places[place] = [now, set(), 0, record.getMessage()[:300],
                                               (record.name, record.levelno)]
            said = message not in state[1] and len(state[1]) < self.distinct
            if said:
                state[1].add(message)
            else:
                state[2] += 1
        for window in due:
            self._say(window, now)
        return said

    def _sweep(self, now: float) -> list[list[Any]]:
        """The windows ended with lines not said (theirs to summarise), removed: the
        places kept are those of the last ``interval_s``."""
        self._swept = now
        ended = [place for place, state in self._places.items() if now - state[0] >= self.interval_s]
        return [state for place in ended if (state := self._places.pop(place))[2]]

    def _say(self, window: list[Any], now: float) -> None:
        name, level = window[4]
        summary = logging.makeLogRecord({
            "name": name, "levelno": level, "levelname": logging.getLevelName(level), "repeats_summary": True,
            "msg": "... %s more times in the last %.0f s: %s", "args": (f"{window[2]:,}", now - window[0], window[3])})
        logging.getLogger(name).handle(summary)


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


_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
# (pid, thread, logger, level) -> the attributes a record made there always has
_templates: dict[tuple[int, int, str, int], dict[str, Any]] = {}


def quick_record(logger: logging.Logger, level: int, msg: str, args: tuple[Any, ...], extra: dict[str, Any]) -> logging.LogRecord:
    """``logger.makeRecord(...)`` for a line with no caller, exception or stack (an access
    line), the same record at a fraction of the cost: ``LogRecord.__init__`` asks the
    process id (a system call), the thread's name, the process's name and splits a path
    for every line, all of which are the same for every line of one thread. Those are
    taken from one real record per process, thread, logger and level; only the time,
    the message and ``extra`` are new. Where records are made otherwise (a record factory
    of the user's, Python 3.12's task names, 3.13's nanosecond clock) it is makeRecord."""
    key = (_pid[0], threading.get_ident(), logger.name, level)
    template = _templates.get(key)
    if template is None:
        real = logger.makeRecord(logger.name, level, "", 0, msg, args, None, extra=extra)
        if (logging.getLogRecordFactory() is not logging.LogRecord or "taskName" in vars(real)
                or not isinstance(logging._startTime, float)):  # type: ignore[attr-defined]
            return real
        template = {k: v for k, v in vars(real).items() if k not in extra}
        if len(_templates) > 64:  # threads come and go (a thread pool's): bounded
            _templates.clear()
        _templates[key] = template
    elif logging.getLogRecordFactory() is not logging.LogRecord:
        return logger.makeRecord(logger.name, level, "", 0, msg, args, None, extra=extra)
    record = logging.LogRecord.__new__(logging.LogRecord)
    attrs = record.__dict__
    attrs.update(template)
    created = time.time()
    attrs["created"] = created
    attrs["msecs"] = int((created - int(created)) * 1000) + 0.0
    attrs["relativeCreated"] = (created - logging._startTime) * 1000  # type: ignore[attr-defined]
    attrs["msg"] = msg
    attrs["args"] = args
    attrs.update(extra)
    return record


def service_loggers() -> tuple[logging.Logger, ...]:
    """The ``jacobian_service`` logger and those made under it so far."""
    return tuple(logger for name, logger in list(logging.root.manager.loggerDict.items())
                 if isinstance(logger, logging.Logger) and (name == "jacobian_service" or
                                                            name.startswith("jacobian_service.")))


class FdStream:
    """A stream onto a descriptor of the process's own: an engine's log pipe to serve
    (``output_relay``), apart from its stdout and stderr, which its functions write to.
    Each record is one ``write`` (``StreamHandler`` writes a line at once): whole in the
    pipe, never mixed into a line a function left unended. Where the descriptor fails
    (a function closed it), the line goes to stderr, as before there was one."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        data = memoryview(text.encode("utf-8", "backslashreplace"))
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except InterruptedError:
            return self.write(bytes(data).decode("utf-8", "replace"))
        except OSError:
            if sys.stderr is not None:
                sys.stderr.write(bytes(data).decode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        pass


def configure_logging(fmt: str, stream: Any = None, repeats: bool = True) -> None:
    """Configure the ``jacobian_service`` logger tree once (idempotent). The access log
    (a line per request) has its own batched handler; everything else is written as it
    happens. Again after the functions' modules are imported: one that configures
    logging as it is imported (``logging.config.dictConfig``, which disables every
    logger made before it by default) silenced the service's loggers for good. ``stream``: where its lines go (stderr
    unless given: an engine's log pipe). ``repeats``: lines other than the access log's
    (and uvicorn's) pass a ``RepeatFilter`` (``serve``'s do not: see ``server.serve``)."""
    formatter = JsonFormatter() if fmt == "json" else TextFormatter(LINE)
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
        if kind is logging.StreamHandler:  # (the access log: a line a request, as the request rate allows)
            _repeat_filter(handler, repeats)
        if stream is not None and handler.stream is not stream:
            handler.setStream(stream)
        handler.setFormatter(formatter)
        logger.setLevel(logging.INFO)
    # uvicorn's own lines: "Invalid HTTP request received." once a request a client chose
    # to garble (200 garbled requests, 200 lines, from one client). A filter of its
    # logger's, which uvicorn's logging set-up keeps (dictConfig replaces handlers only).
    _repeat_filter(logging.getLogger("uvicorn.error"), repeats)


def _repeat_filter(where: logging.Filterer, wanted: bool) -> None:
    """``where`` with one ``RepeatFilter`` (``wanted``), or none. (Kept where it is: a
    front end set up again after its functions' modules were imported keeps its counts.)"""
    held = [f for f in where.filters if isinstance(f, RepeatFilter)]
    for extra in held[1:] if wanted else held:
        where.removeFilter(extra)
    if wanted and not held:
        where.addFilter(RepeatFilter())
