"""What a leaving engine names as unanswered (``EngineServer._unanswered``): only the
requests of the batch it ran. A job refused from its queue meanwhile (a 429 for a full
share, a 504 before its turn) never ran: named, its front end took it for the batch's and
answered a retryable 503 where the 429 or 504 was owed."""

from types import SimpleNamespace

from jacobian_service.engine.process import EngineServer
from jacobian_service.errors import Timeout


def _server(ran_tags):
    server = EngineServer.__new__(EngineServer)  # only what settling and leaving read
    server.pending, server._answers, server._ran_tags = {}, [], list(ran_tags)
    server._ran_out = False
    server._send = lambda peer, frames: None
    return server


def test_a_leave_names_the_batchs_unsent_answers_not_jobs_refused_from_the_queue():
    server = _server(["fe-1"])
    stuck = SimpleNamespace(gone=False, out=[b"unsent"])  # a reply its socket had not taken
    server._settle(stuck, 1, "fe-1")(None, Timeout("ran past its deadline"), None)  # the batch's own job
    server._settle(stuck, 2, "fe-2")(None, Timeout("the request ran past its deadline"), None)  # refused in the queue
    assert server._unanswered({}) == ["fe-1"]
    assert server._unanswered({"tags": ["fe-1"]}) == []  # named already: nothing to add


def test_a_leave_names_nothing_once_the_answers_went_out():
    server = _server(["fe-1"])
    sent = SimpleNamespace(gone=False, out=[])
    server._settle(sent, 1, "fe-1")(None, Timeout("ran past its deadline"), None)
    assert server._unanswered({}) == []
