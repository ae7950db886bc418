"""Red team, round fourteen: hostile clients and limits (a request that gives up as its
answer comes; a stream refused for the stream budget; work for a client that left).

Each names what a user saw before. The front end's bookkeeping is tested without
engines where a race decides (a stand-in connection, as test_engine_client.py does);
the rest on one real server for the module.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from jacobian_service import ipc

from .test_engine_client import _answer, _call, _state, engines  # noqa: F401 (engines: a fixture)


class _Recording:
    """A stand-in engine connection that records every message sent: (kind, id)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def send(self, frames: list[Any]) -> None:
        header, _ = ipc.parse(frames)
        self.sent.append((header["t"], header["id"]))

    def gone(self, pid: int) -> None:
        pass


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["client gone", "deadline already past"])
async def test_an_answer_read_as_its_caller_gives_up_leaves_no_cancel_to_wait_for(engines, how):  # noqa: F811
    """Found by a red team: ``X-Request-Timeout: 1e-308`` (or 0.0001), a few times: each
    request got its 504, and five seconds later the supervisor killed the engine as hung
    ("held a cancelled request of sin for 5.6 s while its status board said it was
    idle"); every request it held got a 503, and its restart took seconds. The engine's
    answer had been read between the request's cancellation (its deadline, or its client
    leaving) and the front end's cancel: the cancel went to an engine that had finished
    the job and so never answered it, and the front end, waiting for that answer, reported
    the engine overdue. Now an answer read first leaves nothing to cancel or wait for."""
    conn = engines._socks[0] = _Recording()
    engines._event(_state(1, 100, ready=True))
    call = _call(engines)
    if how == "deadline already past":
        call.deadline = 0.0  # the timer fires at the loop's next turn, as the answer comes
    request = asyncio.create_task(engines.run("jacobian", call))
    for _ in range(100):
        await asyncio.sleep(0)
        if conn.sent:
            break
    kind, msg_id = conn.sent[0]
    assert kind == "job"
    if how == "client gone":
        request.cancel()  # (routes._cancellable's watcher, on the client's disconnect)
        _answer(engines, msg_id)  # the engine's answer, read before the request's task runs again
    else:
        # The deadline's timer, set as the job went, fires at the loop's next turn; the
        # answer is read in that same turn, before the request's task runs again.
        asyncio.get_running_loop().call_later(0, _answer, engines, msg_id)
    with pytest.raises((asyncio.CancelledError, Exception)):
        await request
    assert ("cancel", msg_id) not in conn.sent, conn.sent
    assert engines._cancelled == {}, "a cancel nobody will answer: the engine would be reported hung"
