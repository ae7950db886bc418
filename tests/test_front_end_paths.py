"""The front end's per-request shortcuts (issue 9: its CPU per request) give what the
long way gave: the access record, the routing table's kept matches, the request's
header map and a body read without a clock. Unit tests, no server."""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.requests import Request

from jacobian_service.connections import _within
from jacobian_service.logs import quick_record
from jacobian_service.routes import ROUTES, Router, _header

_EXTRA = {"request_id": "r-1", "method": "POST", "path": "/v1/functions/sin/jacobian", "status": 200,
          "duration_ms": 1.5}


def _made(logger: logging.Logger) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, "", 0, "%s %s %s", ("POST", "/p", "200"), None, extra=_EXTRA)


def test_quick_record_is_the_record_make_record_makes() -> None:
    logger = logging.getLogger("jacobian_service.access")
    quick_record(logger, logging.INFO, "%s %s %s", ("POST", "/p", "200"), _EXTRA)  # the first one: the long way
    quick = quick_record(logger, logging.INFO, "%s %s %s", ("POST", "/p", "200"), _EXTRA)
    made = _made(logger)
    assert quick.__class__ is logging.LogRecord
    times = {"created", "msecs", "relativeCreated"}
    assert vars(quick).keys() == vars(made).keys()
    assert {k: v for k, v in vars(quick).items() if k not in times} == {k: v for k, v in vars(made).items()
                                                                       if k not in times}
    assert abs(quick.created - made.created) < 5 and quick.getMessage() == "POST /p 200"
    assert quick.msecs == int((quick.created - int(quick.created)) * 1000)
    # a record of another level, or another logger, is not this one's
    warning = quick_record(logger, logging.WARNING, "x", (), {})
    assert (warning.levelname, warning.levelno, warning.request_id if hasattr(warning, "request_id") else None) \
        == ("WARNING", logging.WARNING, None)


def test_quick_record_follows_a_record_factory_set_later() -> None:
    logger = logging.getLogger("jacobian_service.access")
    quick_record(logger, logging.INFO, "m", (), _EXTRA)
    made = logging.getLogRecordFactory()

    class Mine(logging.LogRecord):
        pass

    logging.setLogRecordFactory(lambda *args, **kwargs: Mine(*args, **kwargs))
    try:
        record = quick_record(logger, logging.INFO, "m", (), _EXTRA)
    finally:
        logging.setLogRecordFactory(made)
    assert type(record) is Mine and record.request_id == "r-1"


def _scope(path: str, method: str = "POST", raw: bytes | None = None) -> dict:
    return {"type": "http", "method": method, "path": path, "raw_path": raw or path.encode(), "root_path": "",
            "headers": [], "state": {}}


def test_router_keeps_matches_per_path_and_bounded() -> None:
    router = Router(ROUTES)
    first = router.match(_scope("/v1/functions/sin/jacobian"))
    again = router.match(_scope("/v1/functions/sin/jacobian"))
    other = router.match(_scope("/v1/functions/cos/jacobian"))
    assert [(r.operation_id, p) for r, p in first] == [("jacobian", {"name": "sin"})]
    assert again is first  # kept, not matched again
    assert [(r.operation_id, p) for r, p in other] == [("jacobian", {"name": "cos"})]
    # an encoded '/' names nothing, whether or not its decoded path was seen
    assert router.match(_scope("/v1/functions/sin/jacobian", raw=b"/v1/functions/sin%2Fjacobian")) == []
    assert router.match(_scope("/nowhere")) == []
    for i in range(Router.CACHED_PATHS + 5):
        router.match(_scope(f"/v1/functions/f{i}"))
    assert len(router._cache) <= Router.CACHED_PATHS
    assert [(r.operation_id, p) for r, p in router.match(_scope("/v1/functions/f3", "GET"))] == \
        [("getFunction", {"name": "f3"})]


def test_header_map_gives_the_first_value_and_defaults() -> None:
    scope = _scope("/v1/functions/sin/jacobian")
    scope["headers"] = [(b"origin", b"https://a.example"), (b"accept", b"application/json"),
                        (b"origin", b"https://b.example"), (b"x-latin", "caf\xe9".encode("latin-1"))]
    request = Request(scope)
    assert _header(request, b"origin") == request.headers.get("origin") == "https://a.example"
    assert _header(request, b"x-latin") == "caf\xe9"
    assert _header(request, b"sec-fetch-site") is None
    assert _header(request, b"sec-fetch-mode", "") == ""


@pytest.mark.parametrize("delay, expected", [(None, "now"), (0.01, "later"), (5.0, None)])
def test_within_reads_at_once_or_within_its_time(delay: float | None, expected: str | None) -> None:
    async def main() -> object:
        loop = asyncio.get_running_loop()
        if delay is None:
            async def ready() -> str:
                return "now"

            return await _within(ready(), 0.2)
        fut = loop.create_future()
        loop.call_later(delay, fut.set_result, "later")
        return await _within(fut, 0.2)

    assert asyncio.run(main()) == expected


def test_within_passes_on_an_outside_cancellation() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(_within(loop.create_future(), 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_job_header_carries_every_field_of_the_call() -> None:
    """encode_call writes the job's header out field by field: each field the engine
    reads back (decode_call) arrives as sent, given or left at its default."""
    import dataclasses
    import math

    import numpy as np

    from jacobian_service import ipc
    from jacobian_service.registry import FunctionSpec, Input
    from jacobian_service.types import Call

    spec = FunctionSpec.from_description({"name": "f", "description": "", "has_aux": False, "inputs": [Input("x", ("n",)).describe()]})
    x = np.arange(3, dtype=np.float32)
    given = Call(spec=spec, args=[x], dtypes=["float32"], argnums=(0,), as_tuple=True, positions=(0,), chunk_size=2,
                 batched=True, mode="fwd", rows=(1, 2), return_output=True, vectors=(x, {"a": x}),
                 batched_vectors=True, deadline=123.5, max_result_bytes=99, sparsity="auto", sparse_format="coo")
    for call in (given, Call(spec=spec, args=[x], dtypes=["float32"])):
        frames = ipc.encode_call(5, "jacobian", call, tag="t:5", deadline=7.0)
        header, arrays = ipc.parse([bytes(memoryview(f)) for f in frames])
        assert (header["id"], header["kind"], header["tag"], header["fn"]) == (5, "jacobian", "t:5", "f")
        back = ipc.decode_call(header, arrays, spec)
        for field in dataclasses.fields(Call):
            if field.name in ("spec", "args", "vectors", "cancelled"):
                continue
            assert getattr(back, field.name) == getattr(call, field.name), field.name
        np.testing.assert_array_equal(back.args[0], x)
        assert (back.vectors is None) == (call.vectors is None)
    assert header["deadline"] is None and math.isinf(back.deadline)  # the default: none
    stream = ipc.parse(ipc.encode_call(6, "stream_next", None, stream_id=3, deadline=9.0))[0]
    assert (stream["sid"], stream["deadline"]) == (3, 9.0)


def test_metrics_observe_writes_what_prometheus_observe_writes() -> None:
    """Metrics.observe (the latency histograms' short way) leaves the samples that
    ``labels(...).observe`` leaves: every bucket edge, between edges, past the last,
    zero, negative and NaN alike."""
    from prometheus_client import generate_latest

    from jacobian_service.metrics import _LATENCY_BUCKETS, Metrics

    edges = [b for b in _LATENCY_BUCKETS]
    amounts = [0.0, -1.0, float("nan"), 1e9, *edges, *(b * 0.999 for b in edges), *(b * 1.001 for b in edges)]
    short, long = Metrics(), Metrics()
    for i, amount in enumerate(amounts):
        phase = ("queue", "compute", "encode", "total")[i % 4]
        short.observe(short.latency, amount, "jacobian", phase)
        long.latency.labels("jacobian", phase).observe(amount)

    def samples(m: Metrics) -> list[str]:
        return [line for line in generate_latest(m.registry).decode().splitlines()
                if line.startswith("jacobian_service_latency_seconds") and "_created" not in line]

    assert samples(short) == samples(long) and len(samples(short)) > 4 * len(edges)


def test_accept_is_read_once_per_header_and_refusals_still_refuse() -> None:
    from jacobian_service.errors import NotAcceptable
    from jacobian_service.responses import _kept_acceptable, acceptable

    header = "application/x-npy, application/json;q=0.5"
    first = acceptable(header)
    first.append("changed by a caller")  # a copy each time: the kept answer is not changed
    hits = _kept_acceptable.cache_info().hits
    assert acceptable(header) == ["application/x-npy", "application/json"]
    assert _kept_acceptable.cache_info().hits == hits + 1
    for _ in range(2):
        with pytest.raises(NotAcceptable):
            acceptable("text/html")
    long = ", ".join(["text/html"] * 40 + ["application/x-npz;q=0.2"])  # past what is kept: read each time
    assert acceptable(long) == ["application/x-npz"]
    assert acceptable(None) == acceptable("") == ["application/json"]


def test_the_header_clock_restarts_per_response_without_a_new_timer() -> None:
    """A keep-alive connection's header deadline restarts after each response; the one
    loop timer running finds the deadline moved and waits the rest, and the connection
    is still closed once the full time has passed with no new request."""
    from jacobian_service.connections import guarded_protocol

    class Loop:
        def __init__(self) -> None:
            self.now, self.timers = 0.0, []

        def time(self) -> float:
            return self.now

        def call_later(self, delay: float, callback: object) -> object:
            self.timers.append((self.now + delay, callback))
            return self

        def cancel(self) -> None:
            pass

    class Transport:
        closed = False

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    class Base:
        pass

    protocol = guarded_protocol(10.0, base=Base)()
    protocol.loop, protocol.transport = Loop(), Transport()
    for second in range(20):  # a response a second
        protocol.loop.now = float(second)
        protocol._arm_header_timer()
    assert len(protocol.loop.timers) == 1  # one timer, not one per response
    due, fire = protocol.loop.timers[-1]
    protocol.loop.now = due  # 10 s after the first response: the clock restarted at 19 s
    fire()
    assert not protocol.transport.closed and protocol.loop.timers[-1][0] == 29.0
    protocol.loop.now = 29.0
    protocol.loop.timers[-1][1]()
    assert protocol.transport.closed  # an idle keep-alive connection, closed at its deadline


def test_metrics_observe_takes_the_librarys_way_where_its_attributes_are_not_there(monkeypatch) -> None:
    """The short way reads prometheus_client's own attributes (``_upper_bounds``,
    ``_buckets``, ``_sum``), which its public API does not promise: a release without
    them gets ``observe`` itself, not an AttributeError on every computing request."""
    from jacobian_service.metrics import Metrics

    seen: list[float] = []

    class Child:  # a histogram child of a prometheus_client that keeps its state elsewhere
        def observe(self, amount: float) -> None:
            seen.append(amount)

    m = Metrics()
    monkeypatch.setattr(m, "child", lambda *args: Child())
    m.observe(m.latency, 0.25, "jacobian", "total")
    assert seen == [0.25]


def test_dtype_name_is_numpys_and_keeps_only_numpys_own() -> None:
    """wire.dtype_name (kept per dtype: numpy computes ``.name`` in Python at every
    read), which parsing names requests' arrays and encode_tree answers' arrays by,
    names every dtype as numpy does, and keeps only numpy's own dtypes."""
    import numpy as np

    from jacobian_client import wire
    from jacobian_service import parsing

    kinds = ["<f4", ">f4", "f8", "f2", "i1", "<i8", ">i8", "u1", "?", "c8", "c16", "O", "<U3", "S5", "V8", "M8[s]",
             "m8[ms]", [("a", "<f4"), ("b", "<i2")]]
    for kind in kinds:
        dtype = np.dtype(kind)
        assert parsing.dtype_name(dtype) == wire.dtype_name(dtype) == dtype.name, kind
        assert wire.encode_tree(np.zeros(0, dtype))["dtype"] == dtype.name, kind
    kept = wire._DTYPE_NAMES
    assert np.dtype("<f4") in kept and np.dtype(">f4") not in kept
    assert all(dtype.isbuiltin for dtype in kept)


def test_an_npy_answer_does_not_walk_the_result_and_json_walks_it_once(client, monkeypatch) -> None:
    """``Result.nbytes`` (a walk of the result's tree) decides whether an answer is
    encoded on a thread: an .npy answer never is, and is not walked; a JSON one is
    walked once (its encoding took the caller's count, not a second walk)."""
    import io
    import sys

    import numpy as np
    import torch

    from jacobian_client import wire
    from jacobian_service.examples import mlp
    from jacobian_service.types import Result

    from .conftest import npy_bytes

    walks: list[int] = []
    walk = Result.nbytes

    def counted(self: Result) -> int:  # the front end's walks (an in-process engine's own check is not one)
        if sys._getframe(1).f_code.co_filename.endswith(("routes.py", "responses.py")):
            walks.append(1)
        return walk(self)

    monkeypatch.setattr(Result, "nbytes", counted)
    x = np.random.default_rng(3).standard_normal(128).astype(np.float32)
    want = torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()
    r = client.post("/v1/functions/mlp/jacobian", content=npy_bytes(x),
                    headers={"content-type": wire.NPY, "accept": wire.NPY})
    assert r.status_code == 200 and np.allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-5, atol=1e-6)
    assert walks == []
    r = client.post("/v1/functions/mlp/jacobian", json={"inputs": [x.tolist()]})
    assert r.status_code == 200 and np.allclose(np.asarray(r.json()["jacobian"]["data"], np.float32), want,
                                                rtol=1e-5, atol=1e-6)
    assert walks == [1]


def test_a_request_waits_on_its_engine_under_one_loop_timer_and_still_hears_its_client_leave() -> None:
    """routes._cancellable and the engine client's deadline share one loop timer: a job
    answered at once makes one timer, and starts no watcher; one that waits past
    _WATCH_AFTER_S starts watching for the client's disconnect on that same timer,
    which then still ends the wait at the deadline; a client that leaves cancels the
    job (the engine is told) with a ClientGone."""
    import time

    from jacobian_service import routes
    from jacobian_service.engine_client import _await
    from jacobian_service.errors import ClientGone, Timeout

    async def scenario(answer_after: float | None, leave_after: float | None, deadline_s: float) -> dict:
        loop = asyncio.get_running_loop()
        timers: list[float] = []
        call_later = loop.call_later

        def counted(delay, callback, *args, **kwargs):
            timers.append(delay)
            return call_later(delay, callback, *args, **kwargs)

        loop.call_later = counted  # type: ignore[method-assign]
        left = asyncio.Event()
        receives = []

        class Client:  # a request whose client leaves (http.disconnect) when told
            async def receive(self) -> dict:
                receives.append(1)
                await left.wait()
                return {"type": "http.disconnect"}

        abandoned = []

        async def run(kind: str, call: object, on_slow: object = None) -> object:
            fut = loop.create_future()
            if answer_after == 0:  # at once: before any timer can be due, however late the loop runs
                loop.call_soon(fut.set_result, ("result", "info"))
            elif answer_after is not None:
                call_later(answer_after, fut.set_result, ("result", "info"))
            return await _await(fut, time.monotonic() + deadline_s, lambda: abandoned.append(kind), on_slow)

        if leave_after is not None:
            call_later(leave_after, left.set)
        outcome: object
        try:
            outcome = await routes._cancellable(Client(), run, "jacobian", None)
        except (ClientGone, Timeout) as exc:
            outcome = type(exc).__name__
        finally:
            loop.call_later = call_later  # type: ignore[method-assign]
        return {"outcome": outcome, "timers": timers, "watched": bool(receives), "abandoned": abandoned}

    quick = asyncio.run(scenario(0, None, 30))
    assert quick == {"outcome": ("result", "info"), "timers": [routes._WATCH_AFTER_S], "watched": False,
                     "abandoned": []}
    gone = asyncio.run(scenario(None, 0.1, 30))
    assert gone["outcome"] == "ClientGone" and gone["watched"] and gone["abandoned"] == ["jacobian"]
    assert gone["timers"][0] == routes._WATCH_AFTER_S and len(gone["timers"]) == 2  # the rest of the way, re-armed
    late = asyncio.run(scenario(None, None, 0.1))  # no answer, the client stays: the deadline still ends it
    assert late["outcome"] == "Timeout" and late["watched"] and late["abandoned"] == ["jacobian"]
    assert abs(sum(late["timers"]) - 0.1) < 0.05


@pytest.mark.parametrize("path", ["/v1/functions/sin/jacobian", "/v1/functions/a\\b", "/v1/\x01x", "/v1/caf\u00e9",
                                  "/v1/\u2028", "/v1/a b'\"", "/" + "y" * 600])
def test_the_access_line_and_the_answer_headers_are_what_they_were(path: str) -> None:
    """AccessMiddleware's one-pass header rewrite and its path escape (a printable ASCII
    path without a backslash is its own escape) give what the long way gave: the path
    as ``unicode_escape`` writes it, at most 500 characters; the app's X-Request-ID
    replaced by the request's, its Cache-Control kept, no-store added where it set none."""
    from jacobian_service.metrics import Metrics
    from jacobian_service.middleware import AccessMiddleware

    def app_with(headers: list) -> object:
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
            await send({"type": "http.response.body", "body": b"ok"})
        return app

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    async def call(headers: list) -> tuple[list, list]:
        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode("utf-8", "replace"),
                 "root_path": "", "query_string": b"", "http_version": "1.1", "state": {},
                 "headers": [(b"host", b"t"), (b"x-request-id", b"rid-1")]}
        sent: list = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        keep = Keep()
        logger = logging.getLogger("jacobian_service.access")
        logger.addHandler(keep)
        level = logger.level
        logger.setLevel(logging.INFO)
        try:
            await AccessMiddleware(app_with(headers), Metrics(), Router(ROUTES))(scope, receive, send)
        finally:
            logger.removeHandler(keep)
            logger.setLevel(level)
        return sent[0]["headers"], keep.records

    own = [(b"content-type", b"text/plain"), (b"x-request-id", b"the-apps"), (b"content-length", b"2")]
    headers, records = asyncio.run(call(own))
    assert headers == [own[0], own[2], (b"x-request-id", b"rid-1"), (b"x-content-type-options", b"nosniff"),
                       (b"cache-control", b"no-store")]
    cached = [(b"Cache-Control", b"max-age=60"), (b"content-length", b"2")]
    headers, _ = asyncio.run(call(cached))
    assert headers == [*cached, (b"x-request-id", b"rid-1"), (b"x-content-type-options", b"nosniff")]
    want = path.encode("unicode_escape").decode("ascii")[:500]
    assert [(r.path, r.getMessage()) for r in records] == [(want, f"GET {want} 200")]


def test_the_server_runs_the_app_without_a_proxy_headers_layer() -> None:
    """uvicorn wraps the app in its X-Forwarded-* middleware unless told not to: a layer
    per request (a scan of every header) for a scope's client and scheme nothing reads."""
    from types import SimpleNamespace

    from jacobian_service.metrics import Metrics
    from jacobian_service.server import _uvicorn_config
    from jacobian_service.settings import Settings

    class App:
        service_state = SimpleNamespace(metrics=Metrics())

        async def __call__(self, scope, receive, send) -> None:
            pass

    app = App()
    config = _uvicorn_config(app, Settings())
    config.load()
    assert config.loaded_app is app


@pytest.mark.parametrize("headers", [[], [(b"accept", b"application/x-npy")],
                                     [(b"accept", b"text/html"), (b"host", b"h"), (b"accept", b"application/json;q=0.5")],
                                     [(b"accept", b"caf\xe9/x")], [(b"accept-encoding", b"gzip")]])
def test_accept_is_every_accept_header_joined_without_starlettes_header_map(headers, monkeypatch) -> None:
    """routes._accept reads the scope's header list as Starlette's getlist would, every
    Accept header joined, without making Starlette's ``Headers`` per request."""
    from jacobian_service import routes

    expected = ", ".join(Request({"type": "http", "headers": headers}).headers.getlist("accept"))

    def built(self):
        raise AssertionError("Starlette's Headers made")

    monkeypatch.setattr(Request, "headers", property(built))
    assert routes._accept(Request({"type": "http", "headers": headers})) == expected


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_time_stamps_are_made_once_a_second_and_read_as_before(fmt, monkeypatch) -> None:
    """The service's formatters (an access line per request) write each line's time stamp
    as logging's own formatter (text) and strftime of gmtime (json) write it, the text to
    the second made once per second, not once per line."""
    import json
    import time

    from jacobian_service.logs import configure_logging

    configure_logging(fmt)
    formatter = logging.getLogger("jacobian_service.access").handlers[0].formatter
    made = []
    strftime = time.strftime
    monkeypatch.setattr(time, "strftime", lambda *a: made.append(a) or strftime(*a))
    records = []
    for created in (1_700_000_000.001, 1_700_000_000.5, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.25,
                    1_700_003_600.75):
        record = logging.makeLogRecord({"name": "jacobian_service.access", "msg": "m", "levelno": logging.INFO,
                                        "levelname": "INFO"})
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        records.append((record, formatter.format(record)))
    assert len(made) == 3  # three seconds
    monkeypatch.undo()
    for record, line in records:
        if fmt == "text":
            assert line == logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)
        else:
            assert json.loads(line)["ts"] == (strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                                              + f".{int(record.msecs):03d}Z")
    configure_logging("text")


def test_quick_multiprocess_values_write_the_samples_the_library_writes(tmp_path, monkeypatch) -> None:
    """metrics' multiprocess values write an increment straight into its file (9 per
    computing request): the files then read, merged, as the library's own values'
    files do: counters, histograms, gauges set and incremented, and a series made after
    the first writes grew the file past its first map (the map is then a new one)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
    from prometheus_client.multiprocess import MultiProcessCollector

    from jacobian_service.metrics import _quick_values, process_id

    def served(value_class, folder) -> tuple[bytes, list]:
        folder.mkdir()
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
        monkeypatch.setattr(values, "ValueClass", value_class)
        r = CollectorRegistry()
        counter = Counter("c", "counted", ["l"], registry=r)
        histogram = Histogram("h", "observed", ["p"], buckets=(0.1, 1.0), registry=r)
        gauge = Gauge("g", "gauged", registry=r, multiprocess_mode="livesum")
        for i in range(5):
            counter.labels("a").inc()
            counter.labels("b").inc(2.5)
            histogram.labels("x").observe(0.3 * i)
            gauge.inc(3)
            gauge.dec(1)
        gauge.set(7)
        for i in range(300):  # ~280 bytes a series: past the first 64 KiB of the file
            counter.labels(f"many-{i}-" + "x" * 200).inc(i)
        counter.labels("a").inc(10)
        histogram.labels("x").observe(0.05)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(folder))
        return generate_latest(merged), [counter.labels("a")._value, histogram.labels("x")._sum]

    library, _ = served(values.MultiProcessValue(process_identifier=process_id), tmp_path / "library")
    quick, learnt = served(_quick_values(values.MultiProcessValue(process_identifier=process_id)), tmp_path / "quick")
    assert quick == library and b'c_total{l="a"} 15.0' in quick
    assert all(v._quick is not None for v in learnt)  # (the short way was taken)
    assert max(f.stat().st_size for f in (tmp_path / "quick").iterdir()) > 1 << 16


def test_a_lone_answers_front_end_offers_its_core_once_the_last_bytes_are_handed_over(monkeypatch) -> None:
    """A client woken by its answer on the front end's core waited for the rest of the
    request's end in the front end (~75 us on the loaded VM) before it could read it: a
    front end with one request yields once that request's last body bytes are handed to
    the server; with another request in flight (load), it does not; nor for a body piece
    with more to come."""
    import asyncio

    from jacobian_service import yielding
    from jacobian_service.metrics import Metrics
    from jacobian_service.middleware import AccessMiddleware
    from jacobian_service.routes import ROUTES, Router

    events: list = []
    monkeypatch.setattr(yielding.os, "sched_yield", lambda: events.append("yielded"))

    def scope(who: str) -> dict:
        return {"type": "http", "method": "GET", "path": "/healthz", "raw_path": b"/healthz", "root_path": "",
                "query_string": b"", "http_version": "1.1", "state": {"who": who}, "headers": [(b"host", b"t")]}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    def send_to(who: str):
        async def send(message):
            if message["type"] == "http.response.body":
                events.append((who, message["more_body"]))

        return send

    async def run() -> None:
        release = asyncio.Event()

        async def app(scope, receive, send):
            if scope["state"]["who"] == "second":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            pieces = 2 if scope["state"]["who"] == "lone" else 1
            for i in range(pieces):
                await send({"type": "http.response.body", "body": b"x" * (2 // pieces), "more_body": i < pieces - 1})

        middleware = AccessMiddleware(app, Metrics(), Router(ROUTES))
        await middleware(scope("lone"), receive, send_to("lone"))
        second = asyncio.create_task(middleware(scope("second"), receive, send_to("second")))
        await asyncio.sleep(0)  # the second is in flight, waiting
        await middleware(scope("first"), receive, send_to("first"))  # answered meanwhile: not alone
        release.set()
        await second  # alone by then

    asyncio.run(asyncio.wait_for(run(), 10))
    assert events == [("lone", True), ("lone", False), "yielded", ("first", False), ("second", False), "yielded"], events
