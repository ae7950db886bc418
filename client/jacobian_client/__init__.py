"""jacobian_client: the Python SDK of jacobian-service (httpx + numpy, never torch).

::

    from jacobian_client import Client

    with Client("http://localhost:8000") as client:
        J = client.jacobian("sin", x)                     # numpy array
        client.jacobian("softmax", big_x, out="J.npy")    # streamed to a file

:class:`AsyncClient` has the same methods as coroutines. Errors are typed (see
:mod:`jacobian_client._errors` for the tree). Torch tensors are accepted as inputs when
the caller has imported torch; this package never imports it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (what the lazy names below resolve to, for type checkers)
    from ._async import AsyncClient
    from ._errors import (
        APIError,
        ClientClosed,
        ExpectationFailed,
        Forbidden,
        FunctionError,
        FunctionNotFound,
        FunctionQuarantined,
        HeadersTooLarge,
        IncompleteResponse,
        InternalError,
        InvalidInput,
        JacobianServiceError,
        MalformedBody,
        MalformedRequest,
        MethodNotAllowed,
        NotAcceptable,
        NotFound,
        OutOfMemory,
        Overloaded,
        PayloadTooLarge,
        PreconditionFailed,
        RequestTimeout,
        ResponseTooLarge,
        ResultTooLarge,
        ServiceUnreachable,
        SparsityNotFound,
        Timeout,
        TransportError,
        Unauthorized,
        Unavailable,
        UnsupportedMediaType,
        UnsupportedTransferCoding,
    )
    from ._models import FunctionInfo, InputInfo
    from ._protocol import RetryPolicy
    from ._sync import Client

# Imported on first use (PEP 562): the service takes ``jacobian_client.wire`` (the wire
# format's one source) in every process it starts, and this package's clients would
# bring httpx and the whole SDK into each of them (a server's start imported it four
# times over); a user's ``from jacobian_client import Client`` is unchanged.
_HOMES = {
    "AsyncClient": "_async",
    "Client": "_sync",
    "FunctionInfo": "_models",
    "InputInfo": "_models",
    "RetryPolicy": "_protocol",
}  # (every other name of __all__ is an error class, from _errors)


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_HOMES.get(name, '_errors')}", __name__), name)
    globals()[name] = value  # (once: later uses are a plain lookup)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "ClientClosed",
    "ExpectationFailed",
    "Forbidden",
    "FunctionError",
    "FunctionInfo",
    "FunctionNotFound",
    "FunctionQuarantined",
    "HeadersTooLarge",
    "IncompleteResponse",
    "InputInfo",
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
    "RetryPolicy",
    "ServiceUnreachable",
    "SparsityNotFound",
    "Timeout",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "UnsupportedMediaType",
    "UnsupportedTransferCoding",
]
