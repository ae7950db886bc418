"""A front end's account of the supervisor's word (``RemoteEngines._event``), without
engines or a supervisor: a stand-in connection records what is sent, and the test
answers it as the engine would."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from jacobian_service import ipc
from jacobian_service.engine_client import RemoteEngines
from jacobian_service.errors import FunctionError, ServiceError, Unavailable
from jacobian_service.registry import FunctionSpec, Input
from jacobian_service.settings import Settings
from jacobian_service.types import Call, JobInfo, Result


class _Connection:
    """Stands in for ``channel.Connection``: what was sent, by message id."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.at_once: list[bool] = []  # each job's ``now``: written at once (nothing else in flight there)
        self.arrived = asyncio.Event()

    def send(self, frames: list[Any], now: bool = False) -> None:
        header, _ = ipc.parse(frames)
        if header["t"] == "job":
            self.sent.append(header["id"])
            self.at_once.append(now)
            self.arrived.set()

    def gone(self, pid: int) -> None:
        pass

    def count(self) -> None:  # (channel.Connection's count of what it sent: nothing to count here)
        pass

    async def next_job(self, count: int) -> int:
        while len(self.sent) < count:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), 5)
        return self.sent[count - 1]


def _state(generation: int, pid: int | None, ready: bool) -> dict[str, Any]:
    return {"t": "state", "quarantined": {}, "quarantines": 0,
            "engines": [{"index": 0, "device": "cpu", "generation": generation, "up": pid is not None,
                         "ready": ready, "restarts": generation - 1, "spare": False, "pid": pid, "ready_in": 0.1}]}


def _died(generation: int, pid: int, planned: bool) -> dict[str, Any]:
    return {"t": "died", "engine": 0, "generation": generation, "pid": pid, "tags": [], "function": "",
            "reason": "left as planned" if planned else "the engine process was killed by SIGSEGV", "hang": False,
            "planned": planned, "ready_in": 0.1}


@pytest.fixture
def engines(tmp_path: Path) -> RemoteEngines:
    spec = FunctionSpec("sin", None, (Input("x", shape=(2,)),))
    (tmp_path / "registry.json").write_bytes(orjson.dumps({"functions": [spec.describe()], "devices": ["cpu"]}))
    remote = RemoteEngines(Settings(), tmp_path)
    remote._socks = [_Connection()]  # type: ignore[list-item]
    return remote


def _call(remote: RemoteEngines) -> Call:
    return Call(remote.registry.get("sin"), [np.zeros(2, np.float32)], ["float32"], deadline=time.monotonic() + 10)


def _answer(remote: RemoteEngines, msg_id: int) -> None:
    result = Result(value=np.eye(2, dtype=np.float32))
    remote._reply_handler(0)(ipc.encode_reply(msg_id, result, JobInfo(device="cpu")))


@pytest.mark.asyncio
async def test_a_request_sent_on_to_the_next_engine_is_not_failed_by_the_state_that_names_it(engines):
    """An engine left as planned: the request it had not started goes to the engine that
    takes over. The state naming that new generation came after, and the front end took
    the new generation for a death it had not heard of: the request sent on, waiting on
    the new engine, got 503 "the engine restarted while this request waited" (seen in a
    full-suite run of the memory-recycle test)."""
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))
    request = asyncio.create_task(engines.run("jacobian", _call(engines)))
    await conn.next_job(1)
    engines._event(_died(1, 100, planned=True))
    resent = await conn.next_job(2)  # the state still says ready: it goes at once, and waits for the new engine
    engines._event(_state(1, None, ready=False))
    engines._event(_state(2, 101, ready=True))
    await asyncio.sleep(0)
    assert not request.done(), request.exception() if request.done() else None
    _answer(engines, resent)
    result, info = await asyncio.wait_for(request, 5)
    np.testing.assert_array_equal(result.value, np.eye(2, dtype=np.float32))


@pytest.mark.asyncio
async def test_a_request_sent_on_waits_for_the_next_engine_past_the_ready_wait(engines, monkeypatch):
    """The same, when the state saying no engine is up is read before the request is sent
    on: it waited ``_READY_WAIT_S`` (1 s) for the next engine, and a start taking longer
    (a fork and a restart backoff, on CI's busy machine) made its caller's request a 503
    "no engine is up right now" (seen in CI: round 28's crashes33, run again after a
    death beside another function's thread). A request its engine left unstarted waits
    for the next one up to its own deadline."""
    monkeypatch.setattr("jacobian_service.engine_client._READY_WAIT_S", 0.05)
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))
    request = asyncio.create_task(engines.run("jacobian", _call(engines)))
    await conn.next_job(1)
    engines._event(_died(1, 100, planned=True))
    engines._event(_state(1, None, ready=False))
    await asyncio.sleep(0.3)  # six times the wait a fresh request gets
    assert not request.done(), request.exception() if request.done() else None
    assert len(conn.sent) == 1
    engines._event(_state(2, 101, ready=True))
    _answer(engines, await conn.next_job(2))
    result, _ = await asyncio.wait_for(request, 5)
    np.testing.assert_array_equal(result.value, np.eye(2, dtype=np.float32))
    fresh = asyncio.create_task(engines.run("jacobian", _call(engines)))  # a fresh one still waits 0.05 s only
    engines._event(_state(2, None, ready=False))
    with pytest.raises(Unavailable, match="no engine is up right now"):
        await asyncio.wait_for(fresh, 5)


@pytest.mark.asyncio
async def test_a_death_whose_word_was_missed_still_fails_what_the_dead_engine_held(engines):
    """The generation check stays for what it is for: a ``died`` the subscription
    dropped. The request the dead engine held gets a retryable 503, not its deadline."""
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))
    request = asyncio.create_task(engines.run("jacobian", _call(engines)))
    await conn.next_job(1)
    engines._event(_state(2, 101, ready=True))  # no "died" came through
    with pytest.raises(Unavailable, match="the engine restarted while this request waited"):
        await asyncio.wait_for(request, 5)


@pytest.mark.asyncio
@pytest.mark.parametrize("function", ["closes_its_sockets", ""])
async def test_a_request_a_leaving_engine_names_is_answered_not_sent_on(engines, function):
    """An engine leaving as planned names the requests whose answers it could not send
    (engine.process ``_unanswered``): started, so never sent on (to close the next
    engine's sockets too). The function its leave names is that request's 500; a leave
    naming none (a leak recycled, the reply lost as the engine exited) is a retryable 503."""
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))
    request = asyncio.create_task(engines.run("jacobian", _call(engines)))
    msg_id = await conn.next_job(1)
    engines._event({**_died(1, 100, planned=True), "tags": [engines._pending[msg_id].tag], "function": function})
    with pytest.raises(ServiceError) as raised:
        await asyncio.wait_for(request, 5)
    assert len(conn.sent) == 1  # not sent on
    if function:
        assert isinstance(raised.value, FunctionError)
        assert str(raised.value) == "left as planned while running this request; the engine was restarted"
    else:
        assert isinstance(raised.value, Unavailable) and raised.value.headers == {"Retry-After": "1"}


@pytest.mark.asyncio
async def test_a_request_sent_on_keeps_its_tag_and_is_the_culprit_of_the_next_death(engines):
    """A death put down to another function's threads (a library's idle pool) sends the
    running request on to the next engine. It went with a new tag, so the supervisor
    could not tell it was the same request when the next engine died running it too (the
    pool is in every warmed engine): the request was sent on again, a third engine ended,
    and the pool's owner was struck. The tag is the request's now, the same at each try:
    the supervisor names it as the culprit of the second death, and it is its 500."""
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))
    request = asyncio.create_task(engines.run("jacobian", _call(engines)))
    tag = engines._pending[await conn.next_job(1)].tag
    engines._event({**_died(1, 100, planned=True), "function": "sin"})  # (theirs: tags [], planned)
    resent = await conn.next_job(2)
    engines._event(_state(2, 101, ready=True))
    assert engines._pending[resent].tag == tag
    engines._event({**_died(2, 101, planned=False), "tags": [tag], "function": "sin"})
    with pytest.raises(FunctionError, match="killed by SIGSEGV while running this request"):
        await asyncio.wait_for(request, 5)
    assert len(conn.sent) == 2


@pytest.mark.asyncio
async def test_a_lone_job_is_written_at_once_and_one_beside_it_with_its_tick(engines):
    """A job with nothing else of this front end in flight on its engine goes at once
    (``now``: the engine waits for it alone; left for the end of the loop's tick, it
    waited a loop iteration, a poll, on the latency path); one sent while another is in
    flight there goes with its tick's others, in one write."""
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))
    first = asyncio.create_task(engines.run("jacobian", _call(engines)))
    one = await conn.next_job(1)
    second = asyncio.create_task(engines.run("jacobian", _call(engines)))
    two = await conn.next_job(2)
    assert conn.at_once == [True, False]
    for msg_id in (one, two):
        _answer(engines, msg_id)
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    third = asyncio.create_task(engines.run("jacobian", _call(engines)))  # none in flight again
    _answer(engines, await conn.next_job(3))
    await asyncio.wait_for(third, 5)
    assert conn.at_once == [True, False, True]
