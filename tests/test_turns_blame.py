"""An engine takes its queue in turns among clients (round 28 of the hostile clients:
``scheduler.Worker._next_job``), first come first served only within one client. The
supervisor's fallback for a hang its status board hid (``Supervisor._hung_in``, on a front
end's ``overdue`` word) put the hang on the oldest job the front ends held there, "the
engine takes its jobs in order": no longer so. A function that hung and wrote its board
(round 11's kind) with another client's innocent request queued before its own had that
innocent function struck (quarantined the third time). The front ends now say whose jobs
they hold (digests of the clients, at most two), and where several clients' jobs were held
the hang is put on a function only if it is the only one held there.
"""

from __future__ import annotations

import asyncio
import collections
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from jacobian_service import supervisor
from jacobian_service.engine_client import _client_marks
from jacobian_service.types import Call

from .test_engine_client import _state, engines  # noqa: F401 (fixture)


def _sup(reports: dict[int, tuple[int, float, str, str, float]], marks: dict[int, list[str]], held: set[str]) -> Any:
    return SimpleNamespace(
        _oldest=collections.defaultdict(dict, {0: {k: (*v, frozenset(marks.get(k, ()))) for k, v in reports.items()}}),
        _confirmed=lambda index: set(held),
    )


def _hung_in(sup: Any, word: dict) -> dict:
    return supervisor.Supervisor._hung_in(sup, 0, 4242, word)


A, B = _client_marks({"key-a"}), _client_marks({"key-b"})


def test_a_hang_behind_another_clients_older_job_is_put_on_no_innocent_function() -> None:
    now = time.monotonic()
    # Front end 111 holds client A's ``innocent`` job, sent first; front end 222's word:
    # its own oldest, client B's ``hangs``, sent after, the one the engine took in turn.
    innocent = (4242, now - 6.0, "a:1", "innocent", now - 0.5)
    word = {"t": "overdue", "from": 222, "engine": 0, "pid": 4242, "since": now - 2.0, "function": "hangs",
            "sent": now - 3.0, "tag": "b:2", "hung": "hangs", "clients": B}
    # Before: the oldest, ``innocent``, was struck. Now no one: two clients, two functions.
    assert _hung_in(_sup({111: innocent}, {111: A}, {"innocent", "hangs"}), word) == {"function": "", "tags": []}
    # One front end holding both clients' jobs says so itself.
    both = {**word, "hung": "innocent", "sent": now - 6.0, "tag": "b:1", "clients": sorted(A + B)}
    assert _hung_in(_sup({}, {}, {"innocent", "hangs"}), both) == {"function": "", "tags": []}
    # Several clients, one function held there: whichever job it hangs in is that function's.
    assert _hung_in(_sup({111: (*innocent[:3], "hangs", innocent[4])}, {111: A}, {"hangs"}), word) == \
        {"function": "hangs", "tags": ["a:1"]}
    # One client (FIFO within it): the oldest, as before.
    assert _hung_in(_sup({111: innocent}, {111: B}, {"innocent", "hangs"}), word) == \
        {"function": "innocent", "tags": ["a:1"]}
    # A front end's word without marks (an older front end): as before.
    assert _hung_in(_sup({111: innocent}, {}, {"innocent", "hangs"}), {**word, "clients": None}) == \
        {"function": "innocent", "tags": ["a:1"]}
    # A stale report's marks are not weighed (its job is judged by the stale rule).
    fresh_word = {**word, "sent": now - 7.0}  # the word's own job now the oldest
    stale = (4242, now - 6.0, "a:1", "innocent", now - supervisor._OLDEST_FRESH_S - 1)
    assert _hung_in(_sup({111: stale}, {111: A}, {"innocent", "hangs"}), fresh_word) == \
        {"function": "hangs", "tags": ["b:2"]}


def test_client_marks_tell_one_client_from_several_and_say_nothing_of_who() -> None:
    assert _client_marks({"key-a"}) == _client_marks({"key-a"}) != _client_marks({"key-b"})
    assert len(_client_marks({"a", "b", "c", None})) == 2
    assert all("key" not in m for m in _client_marks({"key-a", "key-b"}))


@pytest.mark.asyncio
async def test_a_front_end_tells_the_clients_of_the_jobs_it_holds(engines):  # noqa: F811
    """The ``oldest`` word carries the marks of the clients whose jobs the front end holds
    on that engine (two here, one once the other's is answered)."""
    said: list[dict] = []
    engines._control = SimpleNamespace(send=said.append)
    engines.channel = SimpleNamespace(sign=lambda msg: msg)
    conn = engines._socks[0]
    engines._event(_state(1, 100, ready=True))

    def call(client: str) -> Call:
        return Call(engines.registry.get("sin"), [np.zeros(2, np.float32)], ["float32"],
                    deadline=time.monotonic() + 10, client=client)

    first = asyncio.create_task(engines.run("jacobian", call("key-a")))
    second = asyncio.create_task(engines.run("jacobian", call("key-b")))
    await conn.next_job(2)
    engines._tell_overdue(time.monotonic() + 1.0)
    oldest = [m for m in said if m.get("t") == "oldest"]
    assert oldest and oldest[-1]["clients"] == sorted(A + B)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    engines._cancelled.clear()  # (the cancel's answer, which no engine here sends)
    engines._tell_overdue(time.monotonic() + 1.0)
    assert [m for m in said if m.get("t") == "oldest"][-1]["clients"] == B
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)


def test_a_job_with_an_answer_room_is_batched_when_its_answers_are_known_small() -> None:
    """A front end sends its client's answer room (``Call.answer_room``) whenever anything
    is held on its stream budget; the engine refused every such job a batch, so one large
    answer being sent turned cross-request batching off for everyone. Now only a job whose
    answer could be held on the budget (1 MiB or more, or not known yet) runs alone."""
    from jacobian_service.engine.profile import BatchStats
    from jacobian_service.registry import FunctionSpec, Input
    from jacobian_service.scheduler import Job, Worker
    from jacobian_service.types import HELD_ANSWER_BYTES

    spec = FunctionSpec("sin", None, (Input("x", shape=(2,)),))
    profile = SimpleNamespace(batches={}, output_rows={})
    engine = SimpleNamespace(device="cpu", profiles=collections.defaultdict(lambda: profile))
    worker = Worker(engine, max_queue=10, max_batch=8)

    def key(room: int | None) -> Any:
        call = Call(spec, [np.zeros(2, np.float32)], ["float32"], deadline=time.monotonic() + 10, answer_room=room)
        return worker._batch_key(Job("jacobian", call, lambda *a: None, deadline=call.deadline))

    plain = key(None)
    assert plain is not None
    assert key(0) is None  # nothing known of its answers yet: alone
    profile.batches[plain] = BatchStats(result_bytes=16, batch_size=4)
    assert key(0) == plain  # known small: no room refuses it, batched as before
    profile.batches[plain] = BatchStats(result_bytes=HELD_ANSWER_BYTES, batch_size=4)
    assert key(10 << 20) is None  # one that could be held: its own room decides, alone
