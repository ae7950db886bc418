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
