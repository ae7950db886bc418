"""Helpers for the autodiff-adapter tests: a real server and a client that counts requests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import httpx
import pytest

import jacobian_client as jc

from ._client_support import real_server


class Counted:
    """A :class:`jacobian_client.Client` whose requests are recorded (method and path,
    plus the query for batched options) by an httpx event hook."""

    def __init__(self, url: str, **kwargs: object) -> None:
        self.requests: list[str] = []
        self.client = jc.Client(url, **kwargs)  # type: ignore[arg-type]
        self.client._http.event_hooks["request"] = [self._record]

    def _record(self, request: httpx.Request) -> None:
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


# The fixtures every adapter test module imports: one real server per module, and a
# request-counting client per test.


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with real_server(max_batch_size=1) as u:  # no cross-request batching: counts are per call
        yield u


@pytest.fixture
def cc(url: str) -> Iterator[Counted]:
    with counted(url) as c:
        yield c
