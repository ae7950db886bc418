"""Helpers for the autodiff-adapter tests: a real server and a client that counts requests.

The server is ``jacobian-service serve`` in its process layout (supervisor, two HTTP
front ends, an engine process), started once per test session by the ``remote_server``
fixture in conftest.py and shared by test_remote_torch/jax/scipy. Everything the tests
call is loadable by module name (:data:`FUNCTIONS`), because the engine process imports
the functions itself. Requests are counted client-side, so which front end answers
does not matter.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import httpx
import pytest

import jacobian_client as jc



def close_trees(got: Any, want: Any, tol: float) -> None:
    """``got`` and ``want`` are the same pytree (torch's pytree: tuples stay tuples) of
    tensors (or numbers) of the same shapes and dtypes, equal within ``tol``."""
    import torch  # only the torch adapter's tests call this; the scipy ones need no torch

    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
    assert got_spec == want_spec, (got_spec, want_spec)
    for g, w in zip(got_leaves, want_leaves):
        g, w = torch.as_tensor(g), torch.as_tensor(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


class Counted:
    """A :class:`jacobian_client.Client` whose requests are recorded (method and path,
    plus the query for batched options) by an httpx event hook."""

    def __init__(self, url: str, **kwargs: object) -> None:
        self.requests: list[str] = []
        self.client = jc.Client(url, **kwargs)  # type: ignore[arg-type]
        self.client._http.event_hooks["response"] = [self._record]

    def _record(self, response: httpx.Response) -> None:
        # The answers, not the attempts: a 429/503 with Retry-After is retried by the SDK
        # (the session's server is shared: round 6 ends its engine, and a test in the
        # same worker just after saw one request more than it made).
        if response.status_code in (429, 503) and "retry-after" in response.headers:
            return
        request = response.request
        endpoint = request.url.path.rsplit("/", 1)[-1]
        flags = sorted(k for k in ("batched", "batched_vectors", "return_output")
                       if request.url.params.get(k) == "true")
        body = request.content if request.headers.get("content-type") == "application/json" else b""
        flags += sorted(k for k in ("batched", "batched_vectors", "return_output") if f'"{k}":true'.encode() in body)
        self.requests.append(endpoint + "".join(f"+{f}" for f in sorted(set(flags))))

    def take(self) -> list[str]:
        """The requests since the last take()."""
        out, self.requests = self.requests, []
        return out

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def counted(url: str, **kwargs: object) -> Iterator[Counted]:
    c = Counted(url, **kwargs)
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def counting(client: jc.Client) -> Iterator[Counted]:
    """``client`` (a module's own, kept open) with its requests recorded, as
    :class:`Counted` records them, until the block ends."""
    c = Counted.__new__(Counted)
    c.requests, c.client = [], client
    client._http.event_hooks["response"] = [c._record]
    try:
        yield c
    finally:
        client._http.event_hooks["response"] = []


# The modules the adapter tests call into, by name: the engine process loads them.
FUNCTIONS = ("jacobian_service.examples,tests.user_functions,tests._client_functions,tests.pytree_functions,"
             "tests.remote8_functions,tests.remote9_functions,tests.remote12_functions,tests.parity16_functions,"
             "tests.remote14_functions,tests.remote15_functions,tests.remote20_functions,tests.remote21_functions")

# The server's settings: no cross-request batching (counts are per call); no warm-up,
# which only costs start-up time here (a run of every function on a 2-core CI box); two
# front ends so requests cross processes. A spare engine: two tests end the engine (round
# 6 kills it, round 9's call outlives its client's timeout), and a cold start took them
# 8-10 s on a loaded box, where the spare takes over at once (its own start runs beside
# the tests). A call past its deadline is stopped 1 s after it (round 9), not 5.
SERVER_SETTINGS = {"functions": FUNCTIONS, "max_batch_size": 1, "warmup": "false", "workers": 2,
                   "hang_grace_s": 1}


# The fixtures every adapter test module imports: the session's server (remote_server in
# conftest.py) and a request-counting client per test.


@pytest.fixture
def url(remote_server: str) -> str:
    return remote_server


@pytest.fixture
def cc(url: str) -> Iterator[Counted]:
    with counted(url) as c:
        yield c


@pytest.fixture
def jx() -> Iterator[Any]:
    """jax with float64 on (as the remote function computes), put back after; the test
    skips where jax is not installed."""
    jax = pytest.importorskip("jax")
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield jax
    jax.config.update("jax_enable_x64", before)


# A module that registers functions of its own (aux of plain numbers, ...) serves them
# from a server of its own: these two, imported, serve the module that uses them.


@pytest.fixture(scope="module")
def own_url(request: pytest.FixtureRequest) -> Iterator[str]:
    from ._client_support import real_server

    with real_server(functions=request.module.__name__, max_batch_size=1) as u:
        yield u


@pytest.fixture
def oc(own_url: str) -> Iterator[Counted]:
    with counted(own_url) as c:
        yield c
