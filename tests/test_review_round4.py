"""Review, round four: a fourth pair of eyes on the session's later merges, as an outside
red team would read them. Each test names what a user saw before.
"""

from __future__ import annotations

import collections
import time
from types import SimpleNamespace

from jacobian_service import supervisor
from jacobian_service.engine_client import _client_marks


def test_a_front_ends_client_marks_travel_with_its_oldest_job_and_go_with_it() -> None:
    """The supervisor keeps each front end's client marks in its ``oldest`` entry (one
    map, not two kept in step by hand): the marks a word brought are weighed while its
    report is fresh, and go with it when the front end says it holds nothing more."""
    held = {"innocent", "hangs"}  # (the functions the front ends held there: ``held`` words)
    sup = SimpleNamespace(engines=[None], _oldest=collections.defaultdict(dict), _confirmed=lambda index: held)
    told, hung_in = supervisor.Supervisor._told_oldest, supervisor.Supervisor._hung_in
    now = time.monotonic()
    a, b = _client_marks({"key-a"}), _client_marks({"key-b"})
    # Front end 111 holds client A's job of ``innocent``, sent first.
    assert told(sup, {"engine": 0, "from": 111, "pid": 4242, "sent": now - 6.0, "tag": "a:1",
                      "function": "innocent", "clients": a})
    word = {"t": "overdue", "from": 222, "engine": 0, "pid": 4242, "since": now - 2.0, "function": "hangs",
            "sent": now - 3.0, "tag": "b:2", "hung": "hangs", "clients": b}
    # Two clients, two functions: the engine took them in turns, so no one is blamed.
    assert hung_in(sup, 0, 4242, word) == {"function": "", "tags": []}
    # Front end 111 has had its job answered (a word with "sent": None): its marks go too,
    # and the hang is the word's own oldest job's, of one client.
    assert told(sup, {"engine": 0, "from": 111, "sent": None})
    assert sup._oldest[0] == {}
    assert hung_in(sup, 0, 4242, word) == {"function": "hangs", "tags": ["b:2"]}
    # A report of the same client as the word's: one client, FIFO, the oldest is the hang's.
    assert told(sup, {"engine": 0, "from": 111, "pid": 4242, "sent": now - 6.0, "tag": "b:1",
                      "function": "earlier", "clients": b})
    assert hung_in(sup, 0, 4242, word) == {"function": "earlier", "tags": ["b:1"]}
