"""One exception tree for everything the SDK raises.

::

    JacobianServiceError                    anything this SDK raises on purpose
    ├── TransportError                      the bytes did not arrive intact: connect / read
    │   │                                   failures, client-side timeouts, a body that
    │   │                                   cannot be decoded
    │   ├── ServiceUnreachable              no connection could be made (refused, a host that
    │   │                                   does not resolve), retries spent; also a builtin
    │   │                                   ConnectionError
    │   ├── IncompleteResponse              a body cut short (connection aborted mid-stream,
    │   │                                   or fewer bytes than its header declared)
    │   └── ResponseTooLarge                a body over the client's max_response_bytes
    │                                       (decoded, or as its .npy/.npz declares it)
    └── APIError                            the server answered 4xx/5xx (problem+json)
        ├── MalformedBody          400      malformed_body
        ├── MalformedRequest       400      malformed_request (a header the server's parser cannot read)
        ├── Unauthorized           401      unauthorized
        ├── Forbidden              403      forbidden
        ├── NotFound               404      not_found         (no such path: base_url's path is wrong)
        ├── FunctionNotFound       404      function_not_found
        ├── MethodNotAllowed       405      method_not_allowed
        ├── NotAcceptable          406      not_acceptable
        ├── RequestTimeout         408      request_timeout   (the request was sent too slowly)
        ├── PreconditionFailed     412      precondition_failed (an If-Match in headers=)
        ├── PayloadTooLarge        413      payload_too_large
        ├── ResultTooLarge         413      result_too_large
        ├── UnsupportedMediaType   415      unsupported_media_type
        ├── ExpectationFailed      417      expectation_failed (an Expect other than 100-continue)
        ├── InvalidInput           422      invalid_input
        │   └── SparsityNotFound   422      sparsity_not_found (no declared pattern of that name)
        ├── Overloaded             429      overloaded        (retried; .retry_after)
        ├── HeadersTooLarge        431      headers_too_large
        ├── ClientClosed           499      client_closed     (logged by the server, never sent)
        ├── FunctionError          500      function_error
        ├── InternalError          500      internal_error    (a fault of the service's own)
        ├── UnsupportedTransferCoding 501   unsupported_transfer_coding
        ├── Unavailable            503      unavailable       (retried)
        │   └── FunctionQuarantined 503     function_quarantined (crashed or hung its engine
        │                                   repeatedly; .retry_after: seconds it is refused)
        ├── Timeout                504      timeout
        └── OutOfMemory            507      out_of_memory

Why one tree: callers catch ``JacobianServiceError`` for "the call failed", ``APIError``
for "the server said no" and a leaf for one precise reason. The class is chosen by the
problem document's stable ``code`` (SPEC 3.4); only a response without a code (a proxy's
HTML page, say) falls back to its HTTP status. Every code of the wire's table
(``wire.PROBLEM_STATUS``, which the server raises by) has its class here; a code this SDK
does not know yet gives a plain :class:`APIError`, so a newer server never breaks an older
client.
"""

from __future__ import annotations

from typing import Any

import httpx

from .wire import PROBLEM_STATUS

__all__ = [
    "APIError",
    "ClientClosed",
    "ExpectationFailed",
    "Forbidden",
    "FunctionError",
    "FunctionNotFound",
    "FunctionQuarantined",
    "HeadersTooLarge",
    "IncompleteResponse",
    "InternalError",
    "InvalidInput",
    "JacobianServiceError",
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
    "ResponseTooLarge",
    "ResultTooLarge",
    "ServiceUnreachable",
    "SparsityNotFound",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UnsupportedTransferCoding",
    "error_from_response",
]


class JacobianServiceError(Exception):
    """Base of every error this SDK raises."""


class TransportError(JacobianServiceError):
    """The request or its response did not travel intact (the cause is chained)."""


class ServiceUnreachable(TransportError, ConnectionError):
    """No connection to the server could be made (refused, no route, a host name that does
    not resolve), after the client's retries: the service is down or the URL is wrong.
    Also a builtin :class:`ConnectionError`, what code written for sockets catches (a
    training loop that waits for the service to come back, say): a plain
    ``TransportError`` slipped past ``except ConnectionError``."""


class IncompleteResponse(TransportError):
    """A response body ended before all the bytes it announced had arrived."""


class ResponseTooLarge(TransportError):
    """A response larger than the client's ``max_response_bytes`` (decoded: a gzip body
    counts as what it expands to; an ``.npy`` or ``.npz`` by the size it declares),
    refused before it fills memory. Not the server's 413 ``result_too_large``
    (:class:`ResultTooLarge`)."""


class APIError(JacobianServiceError):
    """The server answered with an error status.

    Attributes: ``response`` (the :class:`httpx.Response`, body already read; ``None``
    in a copy unpickled in another process), ``status_code``, ``code`` (the problem's
    stable code, or ``None``), ``problem`` (the problem+json document as a dict, empty
    when the body was not one), ``detail`` and ``request_id``.
    """

    status: int | None = None
    code_name: str | None = None

    def __init__(self, response: httpx.Response, problem: dict[str, Any]) -> None:
        self.response: httpx.Response | None = response
        self.status_code = response.status_code
        self.problem = problem
        code = problem.get("code")
        self.code: str | None = code if isinstance(code, str) else None
        detail = problem.get("detail")
        if not isinstance(detail, str):
            detail = problem.get("title") if isinstance(problem.get("title"), str) else None
        if detail is None:
            detail = _text_excerpt(response)
        self.detail: str = detail
        request_id = problem.get("request_id")
        self.request_id: str | None = (request_id if isinstance(request_id, str) else None) or response.headers.get(
            "x-request-id")
        label = f"{self.status_code} {self.code}" if self.code else str(self.status_code)
        suffix = f" (request {_cut(self.request_id, 200)})" if self.request_id else ""
        # kept apart from the response so that an unpickled copy still has it
        self._retry_after_header: str | None = response.headers.get("retry-after")
        super().__init__(f"{label}: {_cut(self.detail, MAX_MESSAGE_DETAIL)}{suffix}")

    @property
    def retry_after(self) -> float | None:
        """The server's ``Retry-After`` in seconds (429, 503), or None."""
        from ._protocol import parse_retry_after  # late: _protocol imports this module

        return parse_retry_after(self._retry_after_header)

    def __reduce__(self) -> tuple[Any, ...]:
        # The default, cls(*self.args), cannot rebuild an APIError: its __init__ takes a
        # response, and a response (with its stream and request) is not worth pickling.
        # Rebuilt from its attributes instead, so that a worker's error reaches the parent
        # of a ProcessPoolExecutor or multiprocessing.Pool with status, code, problem and
        # message (unpicklable, it broke the pool or hung it).
        state = {k: v for k, v in self.__dict__.items() if k != "response"}
        return _rebuild_api_error, (type(self), self.args), state


def _rebuild_api_error(cls: type[APIError], args: tuple[Any, ...]) -> APIError:
    """An unpickled :class:`APIError`: its message, then (by pickle) its attributes."""
    err = cls.__new__(cls, *args)
    Exception.__init__(err, *args)
    err.response = None
    return err


#: characters of a problem's detail an error's message shows (the server cuts its own
#: details to this; another server's megabyte of detail went whole into the message, and
#: so into every log line and traceback that printed it). ``detail`` keeps it all.
MAX_MESSAGE_DETAIL = 2000


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _text_excerpt(response: httpx.Response, limit: int = 300) -> str:
    try:
        text = response.text.strip()
    except Exception:  # undecodable bytes, or a body never read
        text = ""
    return text[:limit] or (response.reason_phrase or "error")


def _leaf(name: str, code: str, doc: str) -> type[APIError]:
    status = PROBLEM_STATUS[code]  # the wire module's table, which the server raises by
    attrs = {"status": status, "code_name": code, "__doc__": f"{status}: {doc}", "__module__": __name__}
    return type(name, (APIError,), attrs)


MalformedBody = _leaf("MalformedBody", "malformed_body", "the server could not read the body.")
MalformedRequest = _leaf("MalformedRequest", "malformed_request",
                         "the server's HTTP parser could not read the request (a header line, say).")
Unauthorized = _leaf("Unauthorized", "unauthorized", "an API key is required.")
Forbidden = _leaf("Forbidden", "forbidden", "the API key is wrong.")
NotFound = _leaf("NotFound", "not_found", "no such path (is base_url's path the service's?).")
FunctionNotFound = _leaf("FunctionNotFound", "function_not_found", "no function of that name.")
MethodNotAllowed = _leaf("MethodNotAllowed", "method_not_allowed", "the path does not take this method.")
NotAcceptable = _leaf("NotAcceptable", "not_acceptable", "the Accept type cannot carry this result.")
RequestTimeout = _leaf("RequestTimeout", "request_timeout", "the request's headers or body came too slowly.")
PreconditionFailed = _leaf("PreconditionFailed", "precondition_failed",
                           "an If-Match (sent with headers=) that the resource does not match.")
PayloadTooLarge = _leaf("PayloadTooLarge", "payload_too_large", "the request body is over the limit.")
ResultTooLarge = _leaf("ResultTooLarge", "result_too_large", "the result is over the limit and cannot be streamed.")
UnsupportedMediaType = _leaf("UnsupportedMediaType", "unsupported_media_type", "the Content-Type is not accepted.")
ExpectationFailed = _leaf("ExpectationFailed", "expectation_failed", "an Expect other than 100-continue.")
InvalidInput = _leaf("InvalidInput", "invalid_input", "wrong arity, shape, dtype or argnums.")
HeadersTooLarge = _leaf("HeadersTooLarge", "headers_too_large", "the request's headers are over the limit.")
ClientClosed = _leaf("ClientClosed", "client_closed", "the client went away (the server logs it; nobody is sent it).")
InternalError = _leaf("InternalError", "internal_error", "a fault of the service's own (logged there).")
UnsupportedTransferCoding = _leaf("UnsupportedTransferCoding", "unsupported_transfer_coding",
                                  "a Transfer-Encoding other than chunked.")


class SparsityNotFound(InvalidInput):
    """422: the function declares no sparsity pattern of that name (an InvalidInput too)."""

    code_name = "sparsity_not_found"


FunctionError = _leaf("FunctionError", "function_error", "the registered function raised.")
Unavailable = _leaf("Unavailable", "unavailable", "the server is not ready or is draining.")
Timeout = _leaf("Timeout", "timeout", "the request ran past its deadline on the server.")
OutOfMemory = _leaf("OutOfMemory", "out_of_memory", "out of memory even in the smallest chunks.")


class FunctionQuarantined(Unavailable):  # type: ignore[misc,valid-type]
    """503: the function crashed or hung its engine repeatedly and is refused until its
    cooldown ends; ``retry_after`` is the seconds left (or None). An Unavailable too, but
    not for the server as a whole: other functions still answer."""

    code_name = "function_quarantined"


class Overloaded(APIError):
    """429: the server's queue is full; ``retry_after`` is its hint in seconds (or None)."""

    status = PROBLEM_STATUS["overloaded"]
    code_name = "overloaded"


_LEAVES: tuple[type[APIError], ...] = (
    MalformedBody,
    MalformedRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    FunctionNotFound,
    MethodNotAllowed,
    NotAcceptable,
    RequestTimeout,
    PreconditionFailed,
    PayloadTooLarge,
    ResultTooLarge,
    UnsupportedMediaType,
    ExpectationFailed,
    InvalidInput,
    SparsityNotFound,
    Overloaded,
    HeadersTooLarge,
    ClientClosed,
    FunctionError,
    InternalError,
    UnsupportedTransferCoding,
    Unavailable,
    FunctionQuarantined,
    Timeout,
    OutOfMemory,
)
_BY_CODE: dict[str, type[APIError]] = {cls.code_name: cls for cls in _LEAVES if cls.code_name}
# Only for bodies without a code. 413 and 500 are ambiguous: take the commoner reading
# for 413 (a proxy's body limit) and none for 500 (a crash is not a function error).
# 400 and 404 keep their older readings (the body; the function) for code that catches them.
_BY_STATUS: dict[int, type[APIError]] = {
    400: MalformedBody,
    401: Unauthorized,
    403: Forbidden,
    404: FunctionNotFound,
    405: MethodNotAllowed,
    406: NotAcceptable,
    408: RequestTimeout,
    412: PreconditionFailed,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    417: ExpectationFailed,
    422: InvalidInput,
    429: Overloaded,
    431: HeadersTooLarge,
    501: UnsupportedTransferCoding,
    503: Unavailable,
    504: Timeout,
    507: OutOfMemory,
}


def _problem_of(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except Exception:  # not JSON at all: a proxy page, an empty body
        return {}
    return doc if isinstance(doc, dict) else {}


def error_from_response(response: httpx.Response) -> APIError:
    """The exception for an error response whose body has been read."""
    problem = _problem_of(response)
    code = problem.get("code")
    if isinstance(code, str):
        cls = _BY_CODE.get(code, APIError)
    else:
        cls = _BY_STATUS.get(response.status_code, APIError)
    return cls(response, problem)
