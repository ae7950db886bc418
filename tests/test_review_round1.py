"""Review, round one: a second reader of a session's changes (the supervisor's blame by
the front ends' word, the broken connection's grace, conditional requests, the sparsity
tracer's type watch, the SDK's memos), each case a defect found reading them.

In-process where the defect is in what one side says to the other (the words are the
signed messages the real processes exchange, fed to a real ``Supervisor`` and a real
``RemoteEngines``); each case names what was seen before its fix.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jacobian_service.settings import Settings
from jacobian_service.types import Call

from ._fault_support import supervisor_of_a_dead_engine



def _registry() -> dict:
    """A front end's registry (what it learns from an engine) of two functions."""
    from jacobian_service.registry import FunctionSpec, Input

    specs = [FunctionSpec(name, None, (Input("x", shape=(2,)),)) for name in ("crashes_r1", "innocent_r1")]
    return {"functions": [spec.describe() for spec in specs], "devices": ["cpu"]}


@pytest.mark.asyncio
async def test_a_crash_whose_caller_left_is_not_put_down_to_the_request_queued_behind_it(tmp_path) -> None:
    """crashes_r1's caller left (or its deadline passed) while it ran; the engine then
    crashed in it, innocent_r1's request queued behind. The board named crashes_r1, which
    the front end's ``held`` confirmed (a cancelled request is held until the engine
    answers it), so crashes_r1 was struck; but the front end's word of what it still held
    as it read of the death (``held_at_death``) named only its requests still awaited,
    innocent_r1, and the verdict (``Supervisor._judge``) took crashes_r1's strike back and
    struck innocent_r1 in its place: "the front ends held innocent_r1 unanswered as it
    died, not crashes_r1 ...: innocent_r1 struck in place of crashes_r1", which had not
    run (at three such deaths, quarantined: 503 ``function_quarantined`` to its callers)
    while the crashing function went free. What a front end holds includes the cancelled
    requests the dead engine had yet to answer, as its ``held`` words already did."""
    from jacobian_service.engine_client import RemoteEngines

    from .test_engine_client import _Connection, _state

    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=3) as (sup, _, proc):
        words: list[bytes] = []
        front_end = RemoteEngines(Settings(), Path("."), sup.channel, registry=_registry())
        front_end._control = SimpleNamespace(send=words.append)
        conn = _Connection()
        front_end._socks = [conn]  # type: ignore[list-item]
        front_end._event(_state(1, proc.pid, ready=True))

        def call(name: str) -> Call:
            spec = front_end.registry.get(name)
            return Call(spec, [np.zeros(2, np.float32)], ["float32"], deadline=time.monotonic() + 10)

        crash = asyncio.create_task(front_end.run("jacobian", call("crashes_r1")))
        crash_id = await conn.next_job(1)
        crash.cancel()  # its client left
        with pytest.raises(asyncio.CancelledError):
            await crash
        tag = front_end._cancelled[crash_id][4]
        queued = asyncio.create_task(front_end.run("jacobian", call("innocent_r1")))
        await conn.next_job(2)

        def tell() -> None:  # the front end's words, as the supervisor's control socket reads them
            for raw in words:
                sup._control(raw)
            words.clear()

        tell()
        sup._died(sup.engines[0], 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": "crashes_r1",
                                      "tags": [tag]})
        front_end._event({"t": "died", "engine": 0, "generation": 1, "pid": proc.pid, "tags": [tag],
                          "function": "crashes_r1", "reason": "the engine process exited with status 5",
                          "hang": False, "planned": False, "ready_in": 0.1})
        with pytest.raises(Exception, match="the engine restarted while this request waited; retry"):
            await queued  # (not the one running: retryable)
        tell()
        sup._judge(time.monotonic())
        assert sup._verdicts == {}  # (judged: every front end has told)
        assert {f: len(s) for f, s in sup.strikes.items() if s} == {"crashes_r1": 1}


def test_a_docs_files_if_match_is_evaluated_before_its_if_none_match(client) -> None:
    """RFC 9110 13.2.2: If-Match first; false, the answer is a 412 whatever If-None-Match
    says. The docs files answered If-None-Match themselves (docs_ui.asset, a second
    reader of the field) and their 304 passed the router's evaluation by (no 2xx): a GET
    naming the file's own tag in If-None-Match and another in If-Match got a 304 (a
    client guarding its revalidation by a tag was told its copy was current). Now the
    one evaluation (preconditions.evaluated) reads both, the file's other content
    coding's tag among those If-None-Match may hold (304 with the tag held)."""
    from .conftest import assert_problem

    ref = "/docs-assets/swagger-ui.css"
    plain = client.get(ref, headers={"accept-encoding": "identity"}).headers["etag"]
    gzipped = client.get(ref, headers={"accept-encoding": "gzip"}).headers["etag"]
    assert plain != gzipped
    problem = assert_problem(client.get(ref, headers={"accept-encoding": "identity", "if-none-match": plain,
                                                      "if-match": '"other"'}), 412, "precondition_failed")
    assert f"(it is {plain})" in problem["detail"], problem
    for held in (plain, gzipped):  # either form: these bytes, 304 with the tag held
        r = client.get(ref, headers={"accept-encoding": "identity", "if-none-match": f'"other", W/{held}',
                                     "if-match": plain})
        assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", held), r.headers
        assert r.headers["cache-control"] == "no-cache"  # (the 200's caching fields: RFC 9110 15.4.5)
    r = client.get(ref, headers={"accept-encoding": "identity", "if-none-match": '"other"'})
    assert (r.status_code, r.headers["etag"]) == (200, plain) and r.content.startswith(b".swagger-ui"), r.content[:40]


def test_each_deaths_verdict_takes_the_front_ends_word_of_that_death(tmp_path) -> None:
    """Two deaths of engine 0 in a row, the front ends' ``held_at_death`` words of the first
    still on their way as the second came (a busy machine: their words can trail by a
    second; a warm spare takes over at once). The verdicts were kept by engine index: the
    second's replaced the first's, whose innocent strike was never judged, and the first
    death's words were then read as the second's: innocent_r1 (named by forges_r1's
    forged board, answered a moment before) stayed struck, crashes_r1 (the second death's
    own, held) was let off and forges_r1 struck for the second death ("the front ends
    held forges_r1 unanswered as it died, not crashes_r1"). The word names the engine
    process that died (``pid``) and each death's verdict takes its own."""
    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=3) as (sup, engine, first):
        procs = [first, subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)]
        procs[1].wait()
        sign = sup.channel.sign

        def word(t: str, front_end: int, *functions: str, pid: int | None = None) -> None:
            sup._control(sign({"t": t, "from": front_end, "engine": 0, "functions": list(functions),
                               **({"pid": pid} if pid is not None else {})}))

        word("held", 1, "innocent_r1")
        word("held", 1)  # answered, a moment before the death (within the grace)
        word("held", 2, "forges_r1")
        sup._died(engine, 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": "innocent_r1",
                              "tags": ["t1"]})
        engine.proc = procs[1]  # its successor
        word("held", 1, "crashes_r1")
        sup._died(engine, 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": "crashes_r1",
                              "tags": ["t2"]})
        word("held_at_death", 1, pid=procs[0].pid)  # the first death's words, read only now
        word("held_at_death", 2, "forges_r1", pid=procs[0].pid)
        sup._judge(time.monotonic())
        word("held_at_death", 1, "crashes_r1", pid=procs[1].pid)
        word("held_at_death", 2, pid=procs[1].pid)
        sup._judge(time.monotonic())
        assert sup._verdicts == {}
        assert {f: len(s) for f, s in sup.strikes.items() if s} == {"forges_r1": 1, "crashes_r1": 1}


def test_a_strike_taken_back_takes_back_the_isolation_it_brought(tmp_path) -> None:
    """A board naming a function answered a moment before (within the grace) as running a
    batch (several tags): the function was struck as a batch's, which also isolates it
    (its requests run alone in every engine from then on: no batching, for good). The
    front ends' word took the strike back, and the isolation stayed: the innocent
    function ran unbatched for the service's life. Now the isolation the strike brought
    goes with it (one the function had before stays)."""
    with supervisor_of_a_dead_engine(tmp_path, quarantine_after=3) as (sup, engine, proc):
        sign = sup.channel.sign
        sup.isolate.add("isolated_r1")  # (a batch of its own crashed before: isolated for that)
        for struck in ("innocent_r1", "isolated_r1"):
            engine.proc = proc
            for functions in ([struck], [], ["forges_r1"]):  # answered a moment before; the forger held
                sup._control(sign({"t": "held", "from": 1, "engine": 0, "functions": functions}))
            sup._died(engine, 5, {"beat": 1.0, "ready": True, "deadline": 0.0, "function": struck,
                                  "tags": ["t1", "t2"]})
            assert struck in sup.isolate
            sup._control(sign({"t": "held_at_death", "from": 1, "engine": 0, "pid": proc.pid,
                               "functions": ["forges_r1"]}))
            sup._judge(time.monotonic())
            assert not sup.strikes.get(struck), sup.strikes
        assert sup.isolate == {"isolated_r1"}
