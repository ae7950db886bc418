"""One exception tree for every 4xx/5xx the service answers, rendered as problem+json.

    ServiceError                      (status, code, title; detail says what and why)
    ├── MalformedBody         400     malformed_body
    ├── MalformedRequest      400     malformed_request    (not HTTP/1.1 the parser reads; the connection closes)
    ├── Unauthorized          401     unauthorized
    ├── Forbidden             403     forbidden
    ├── NotFound              404     not_found            (an unknown path)
    ├── FunctionNotFound      404     function_not_found
    ├── MethodNotAllowed      405     method_not_allowed
    ├── NotAcceptable         406     not_acceptable
    ├── RequestTimeout        408     request_timeout      (the body stalled; the connection closes)
    ├── PayloadTooLarge       413     payload_too_large
    ├── PreconditionFailed    412     precondition_failed  (an If-Match false: preconditions.py)
    ├── ResultTooLarge        413     result_too_large
    ├── UnsupportedMediaType  415     unsupported_media_type
    ├── ExpectationFailed     417     expectation_failed   (an Expect other than 100-continue)
    ├── InvalidInput          422     invalid_input
    ├── SparsityNotFound      422     sparsity_not_found   (no declared pattern of that name)
    ├── Overloaded            429     overloaded           (Retry-After)
    ├── HeadersTooLarge       431     headers_too_large    (the connection closes)
    ├── ClientGone            499     client_closed        (logged only: nobody is listening)
    ├── FunctionError         500     function_error       (the function raised)
    ├── InternalError         500     internal_error       (a bug of ours; logged, never shown)
    ├── UnsupportedTransferCoding 501 unsupported_transfer_coding (a transfer coding other than chunked)
    ├── Unavailable           503     unavailable          (not ready, draining, an engine restarting)
    ├── FunctionQuarantined   503     function_quarantined (crashed or hung its engine repeatedly)
    ├── Timeout               504     timeout
    └── OutOfMemory           507     out_of_memory

Handlers never put a traceback in a body: ``detail`` is built from the exception's type
and message only. An error may carry ``fields``, RFC 9457 extension members of its body
for a client's code to read where it would otherwise parse the detail's words (a vector
refused for its shape: ``field``, ``path``, ``expected_shape``, ``got_shape``; vectors of
more arrays than a body may carry: ``field``, ``limit``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

from jacobian_client.wire import PROBLEM_STATUS, WireError

__all__ = [
    "ClientGone",
    "Forbidden",
    "FunctionError",
    "FunctionNotFound",
    "FunctionQuarantined",
    "HeadersTooLarge",
    "InternalError",
    "ExpectationFailed",
    "InvalidInput",
    "MalformedBody",
    "MalformedRequest",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotFound",
    "OutOfMemory",
    "Overloaded",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RequestTimeout",
    "ResultTooLarge",
    "ServiceError",
    "SparsityNotFound",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UnsupportedTransferCoding",
    "exception_text",
    "from_wire",
    "no_answer_room",
    "use_words_maker",
]


MAX_DETAIL = 2000  # characters of a problem's detail


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None,
                 fields: dict[str, Any] | None = None) -> None:
        # Details quote what clients sent (argnums, input keys, names): cut, whatever the
        # message, so that no request makes its answer as large as itself (a 3 MB argnums
        # list came back whole in a 422).
        if len(detail) > MAX_DETAIL:
            detail = f"{detail[:MAX_DETAIL]}... ({len(detail) - MAX_DETAIL} more characters)"
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.fields = fields or {}  # extension members of the problem body (module docstring)


def _error(name: str, code: str, title: str) -> type[ServiceError]:
    status = PROBLEM_STATUS[code]  # the wire module's table: the SDK maps by the same one
    return type(name, (ServiceError,), {"status": status, "code": code, "title": title, "__module__": __name__})


MalformedBody = _error("MalformedBody", "malformed_body", "Malformed body")
MalformedRequest = _error("MalformedRequest", "malformed_request", "Malformed request")
Unauthorized = _error("Unauthorized", "unauthorized", "Unauthorized")
Forbidden = _error("Forbidden", "forbidden", "Forbidden")
NotFound = _error("NotFound", "not_found", "Not found")
FunctionNotFound = _error("FunctionNotFound", "function_not_found", "Function not found")
MethodNotAllowed = _error("MethodNotAllowed", "method_not_allowed", "Method not allowed")
NotAcceptable = _error("NotAcceptable", "not_acceptable", "Not acceptable")
RequestTimeout = _error("RequestTimeout", "request_timeout", "Request timeout")
PayloadTooLarge = _error("PayloadTooLarge", "payload_too_large", "Payload too large")
PreconditionFailed = _error("PreconditionFailed", "precondition_failed", "Precondition failed")
ResultTooLarge = _error("ResultTooLarge", "result_too_large", "Result too large")
UnsupportedMediaType = _error("UnsupportedMediaType", "unsupported_media_type", "Unsupported media type")
ExpectationFailed = _error("ExpectationFailed", "expectation_failed", "Expectation failed")
InvalidInput = _error("InvalidInput", "invalid_input", "Invalid input")
SparsityNotFound = _error("SparsityNotFound", "sparsity_not_found", "Sparsity pattern not found")
Overloaded = _error("Overloaded", "overloaded", "Overloaded")
HeadersTooLarge = _error("HeadersTooLarge", "headers_too_large", "Request header fields too large")
ClientGone = _error("ClientGone", "client_closed", "Client closed request")
FunctionError = _error("FunctionError", "function_error", "Function error")
InternalError = _error("InternalError", "internal_error", "Internal error")
UnsupportedTransferCoding = _error("UnsupportedTransferCoding", "unsupported_transfer_coding", "Not implemented")
Unavailable = _error("Unavailable", "unavailable", "Service unavailable")
FunctionQuarantined = _error("FunctionQuarantined", "function_quarantined", "Function quarantined")
Timeout = _error("Timeout", "timeout", "Timeout")
OutOfMemory = _error("OutOfMemory", "out_of_memory", "Out of memory")



def no_answer_room(nbytes: int) -> ServiceError:
    """An engine's refusal, after the forward pass and before computing the derivative,
    of a gathered answer of ``nbytes`` that its front end had no room to hold while it is
    sent (``Call.answer_room``). The front end answers it in its stream budget's own
    words (``StreamBudget.refuse_answer``): 429 for the client's share, 503 for the
    budget. ``answer_bytes`` is how the front end knows it."""
    return Unavailable(f"no room to send an answer of {nbytes} bytes now (refused as soon as its size was known); "
                       "retry shortly",
                       headers={"Retry-After": "1"}, fields={"answer_bytes": nbytes})


_BY_WIRE_CODE = {"malformed_body": MalformedBody, "invalid_input": InvalidInput, "payload_too_large": PayloadTooLarge}


def from_wire(exc: WireError) -> ServiceError:
    return _BY_WIRE_CODE[exc.code](str(exc))


# What of an exception's words is kept (a problem's detail shows 2,000 characters of its
# first line): a __str__ of 64 MB on one line was split, re-encoded and copied whole.
_TEXT_LIMIT = 8192
# How long a function's own __str__ (or its arguments' str or repr) may take to make its
# words: one that never returned held the engine until the hang watch killed it, the
# request a 504 at its deadline, the engine replaced and those queued behind it 503s.
_WORDS_WITHIN_S = 0.5
# The exceptions' own __str__ that call no user code when their arguments (and fields)
# are of these types: a str, a number, bytes, None.
_PLAIN = (str, int, float, bool, bytes, type(None))
_ARGS = BaseException.__dict__["args"].__get__


class _WordsTooSlow(BaseException):
    """Raised into a __str__ past ``_WORDS_WITHIN_S`` (a BaseException: past ``except Exception``)."""


def _builtin_words(exc: BaseException) -> bool:
    """Whether ``str(exc)`` runs no user code: the __str__ found is Python's own
    (BaseException's, KeyError's, OSError's, ImportError's) over arguments (and fields) of
    plain types. Read through the types' own descriptors: an exception's class may have a
    ``__getattribute__`` of its own."""
    cls = type(exc)
    for klass in type.__getattribute__(cls, "__mro__"):
        words = type.__getattribute__(klass, "__dict__").get("__str__")
        if words is not None:
            break
    else:
        return False
    if words is OSError.__dict__["__str__"]:
        fields = (OSError.__dict__["filename"].__get__(exc), OSError.__dict__["filename2"].__get__(exc),
                  OSError.__dict__["strerror"].__get__(exc), OSError.__dict__["errno"].__get__(exc))
    elif words is ImportError.__dict__["__str__"]:
        fields = (ImportError.__dict__["msg"].__get__(exc),)
    elif words is BaseException.__dict__["__str__"] or words is KeyError.__dict__["__str__"]:
        fields = ()
    else:
        return False
    args = _ARGS(exc)
    return type(args) is tuple and all(type(a) in _PLAIN for a in (*args, *fields))


def _timed_words(exc: BaseException) -> str:
    """``str(exc)`` where it runs user code: cut by a SIGALRM timer past ``_WORDS_WITHIN_S``
    (and every 50 ms after, should the __str__ catch the first), where this thread can
    take a signal and no one else uses the timer (the in-process layout's host may);
    else as it comes."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL or any(signal.getitimer(signal.ITIMER_REAL))):
        return str(exc)
    armed = [True]

    def cut(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _WordsTooSlow

    signal.signal(signal.SIGALRM, cut)
    try:
        signal.setitimer(signal.ITIMER_REAL, _WORDS_WITHIN_S, 0.05)
        try:
            text = str(exc)
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0.0)
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    return text


# Where the engine owns its process: what makes words that run user code, in a child
# process killed past the bound (``engine.words``), whose code cannot lift it as it can
# SIGALRM's. None: ``_timed_words`` (the in-process layout, which must not fork its host).
_words_maker: Callable[[BaseException], str | None] | None = None


def use_words_maker(make: Callable[[float, int], Callable[[BaseException], str | None]]) -> None:
    """Set by an engine process as it takes its settings (``engine.words.forked_words``):
    ``make(within_s, limit)`` gives the maker, held to this module's bound and length."""
    global _words_maker
    _words_maker = make(_WORDS_WITHIN_S, _TEXT_LIMIT)


def _made_words(exc: BaseException) -> str:
    """The words of ``exc`` by ``_words_maker``: where no child could be made (no memory,
    no process left), none, said so; past the bound, the bound's exception."""
    assert _words_maker is not None
    try:
        text = _words_maker(exc)
    except TimeoutError:
        raise _WordsTooSlow from None
    except ValueError:
        return _NOT_TEXT
    except RuntimeError:
        return _RAISED
    return "(its message was not made: no process to make it in)" if text is None else text


_RAISED = "(its message could not be made: its __str__ raised)"
_NOT_TEXT = "(its message is not text)"


def exception_text(exc: BaseException, *, user_code: bool = True) -> str:
    """``str(exc)`` of an exception a user's function raised, bounded. Its ``__str__``
    (and its arguments' ``__str__`` or ``__repr__``, which Python's own call) is the
    user's code too: one that raised made our 500 ``internal_error`` instead of the
    function's ``function_error``; one that never returned held the engine to the hang
    watch (a 504 at the deadline, the engine replaced, the requests behind it 503s;
    measured). Now user code making the words runs for ``_WORDS_WITHIN_S`` at most (in an
    engine process, in a child process killed past it: ``use_words_maker``; elsewhere cut
    by SIGALRM where the thread can take it), and the words are cut to ``_TEXT_LIMIT``
    characters. ``user_code=False``: none is run
    (an empty text where it would be: what torch raises never needs any)."""
    try:
        if _builtin_words(exc):
            text = str(exc)
        elif not user_code:
            return ""
        elif _words_maker is not None:
            text = _made_words(exc)
        else:
            text = _timed_words(exc)
    except _WordsTooSlow:
        return f"(its message was not made: its __str__ took more than {_WORDS_WITHIN_S:g} s)"
    except BaseException:  # SystemExit from __str__ too: still the function's error, not ours
        return _RAISED
    if not isinstance(text, str):
        return _NOT_TEXT
    text = str.__str__(text)[:_TEXT_LIMIT]  # (a str subclass's own methods are user code too)
    # Lone surrogates (os.fsdecode of an undecodable file name) are not UTF-8: the reply
    # carrying them could not be encoded, and the request waited for its deadline.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
