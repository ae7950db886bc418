"""Limits, deadlines, backpressure, cancellation, drain, logs and odd values."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import numpy as np
import pytest

import jacobian_client as jc
from jacobian_client import wire

from ._fault_support import MARKS, _log_complete
from .conftest import assert_problem, decode, live_server, npy_bytes

SLOW = "/v1/functions/slow_rows/jacobian"


def test_deadline_is_enforced_between_chunks(make_client):
    c = make_client()
    assert c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]}).status_code == 200  # warm
    t0 = time.monotonic()
    body = assert_problem(
        c.post(SLOW, json={"inputs": [[0.0] * 100], "chunk_size": 1}, headers={"x-request-timeout": "0.3"}), 504, "timeout"
    )
    # (the bounds: below the 5 s of sleeps the whole Jacobian would take, however loaded
    # the machine, with seconds to spare for a loaded machine's slow request)
    assert time.monotonic() - t0 < 3.0  # not the 5 s the whole Jacobian would take
    assert "deadline" in body["detail"]
    # the worker stopped too: the next request is not stuck behind 100 slow rows (4.6 s left)
    t0 = time.monotonic()
    assert c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]}).status_code == 200
    assert time.monotonic() - t0 < 2.5


def test_server_timeout_setting_and_bad_header(make_client):
    c = make_client(request_timeout_s=0.2)
    assert_problem(c.post(SLOW, json={"inputs": [[0.0] * 40], "chunk_size": 1}), 504, "timeout")
    for bad in ("soon", "-1", "nan", "0"):
        assert_problem(c.post(SLOW, json={"inputs": [[0.0]]}, headers={"x-request-timeout": bad}), 422, "invalid_input")


def test_full_queue_answers_429_with_retry_after(make_client):
    c = make_client(max_queue=1, max_batch_size=1)
    slow = threading.Thread(target=lambda: c.post(SLOW, json={"inputs": [[0.0] * 30], "chunk_size": 1}))
    slow.start()
    try:
        deadline = time.monotonic() + 5
        while "jacobian_service_queue_depth 1.0" not in c.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        response = c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]})
        assert_problem(response, 429, "overloaded")
        assert response.headers["retry-after"] == "1"
    finally:
        slow.join()
    assert c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0]]}).status_code == 200


def test_json_nesting_and_sizes_limits(make_client):
    c = make_client(max_json_depth=8, max_array_elements=100, max_array_rank=3)
    deep = {"inputs": [[1.0]], "x": [[[[[[[[[[1]]]]]]]]]]}
    assert "deeper" in assert_problem(c.post("/v1/functions/sin/jacobian", json=deep), 400, "malformed_body")["detail"]
    # behind a number: a list was judged by its first item (a second red team; 900 levels
    # overflowed a parser further on, a 500 with a traceback)
    nested: dict = {"a": 1}
    for _ in range(900):
        nested = {"a": nested}
    hidden = {"inputs": [[0.1, 0.2]], "cotangents": [1, nested]}
    assert "deeper" in assert_problem(c.post("/v1/functions/sin/vjp", json=hidden), 400, "malformed_body")["detail"]
    assert_problem(c.post("/v1/functions/sin/jacobian", json={"inputs": [[1.0] * 101]}), 413, "payload_too_large")
    assert_problem(c.post("/v1/functions/sin/jacobian", content=npy_bytes(np.zeros(101)), headers={"content-type": wire.NPY}), 413, "payload_too_large")
    assert_problem(c.post("/v1/functions/sin/jacobian", json={"inputs": [[[[[1.0]]]]]}), 422, "invalid_input")
    info = c.get("/v1/info").json()["limits"]
    assert info["max_json_depth"] == 8 and info["max_array_elements"] == 100 and info["max_array_rank"] == 3
    assert {"max_request_bytes", "max_result_bytes", "max_npz_members", "max_queue", "request_timeout_s"} <= set(info)


def test_non_finite_values_travel_exactly(client):
    x = [-1.0, 0.0, 2.0]
    doc = client.post("/v1/functions/log/evaluate", json={"inputs": [x]}).json()
    assert doc["output"]["data"][:2] == ["NaN", "-Infinity"]
    out = wire.decode_tree(doc["output"])
    assert np.isnan(out[0]) and out[1] == -np.inf and out[2] == np.float32(np.log(2.0))
    got, doc = decode(client.post("/v1/functions/log/jacobian", json={"inputs": [x]}))
    assert got[1, 1] == np.inf and np.isclose(got[2, 2], 0.5)
    # and NaN / Infinity are accepted on the way in
    doc = client.post("/v1/functions/sin/evaluate", json={"inputs": [["NaN", "Infinity", 0.5]]}).json()
    assert doc["output"]["data"][:2] == ["NaN", "NaN"]


def test_api_keys_from_a_file(make_client, tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# operators\nkey-from-file\n\n")
    c = make_client(api_keys="inline", api_keys_file=keyfile)
    for key in ("inline", "key-from-file"):
        assert c.get("/v1/functions", headers={"authorization": f"Bearer {key}"}).status_code == 200
    assert_problem(c.get("/v1/functions", headers={"authorization": "Bearer # operators"}), 403, "forbidden")


def test_disconnect_cancels_running_work_and_drain_on_sigterm():
    with live_server(DRAIN_DELAY_S=1.5, DRAIN_GRACE_S=10, LOG_FORMAT="json") as (url, proc):
        # A client that gives up after 0.3 s of a 5 s Jacobian frees the worker.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{SLOW}", json={"inputs": [[0.0] * 100], "chunk_size": 1}, timeout=0.3)
        t0 = time.monotonic()
        assert httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[1.0]]}, timeout=10).status_code == 200
        # (4.7 s of the Jacobian's sleeps left, had it kept the worker; a loaded machine's
        # request through serve takes well under 3 s)
        assert time.monotonic() - t0 < 3.0, "the abandoned Jacobian kept the worker busy"

        # Logs are JSON lines with the request id, and never the array data.
        r = httpx.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.123456789]]}, headers={"x-request-id": "log-me"})
        assert r.status_code == 200

        # SIGTERM: /readyz turns 503 while an in-flight request still finishes.
        result = {}
        inflight = threading.Thread(target=lambda: result.update(r=httpx.post(f"{url}{SLOW}", json={"inputs": [[0.0] * 30], "chunk_size": 1}, timeout=30)))
        inflight.start()
        time.sleep(0.3)  # (sent by then, or within DRAIN_DELAY_S after the SIGTERM: still taken)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.5  # DRAIN_DELAY_S: /readyz says 503 while the port is still open
        while (ready := httpx.get(f"{url}/readyz")).status_code == 200:
            assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
            time.sleep(0.02)
        assert_problem(ready, 503, "unavailable")
        assert httpx.get(f"{url}/healthz").status_code == 200
        inflight.join()
        assert result["r"].status_code == 200
        np.testing.assert_allclose(wire.decode_tree(result["r"].json()["jacobian"]), np.eye(30))
        assert proc.wait(timeout=20) == 0
        out = proc.read_log()
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("request_id") == "log-me"]
    assert access and access[0]["status"] == 200 and access[0]["path"] == "/v1/functions/sin/jacobian"
    assert "0.123456" not in out and "Traceback" not in out


def test_access_lines_are_written_a_batch_at_a_time() -> None:
    """The access log's handler writes the lines made in one stretch together, within its
    delay (or at once past its line limit), and a line at once when there is no event
    loop to come back and flush it; what is left goes out on flush (as at exit)."""
    import asyncio
    import io
    import logging

    from jacobian_service.logs import BatchedStreamHandler

    class Stream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = Stream()
    handler = BatchedStreamHandler(delay_s=0.05, max_lines=4)
    handler.setStream(stream)
    logger = logging.Logger("access-test")
    logger.addHandler(handler)

    logger.info("outside a loop")  # nothing would flush it later: written now
    assert stream.getvalue() == "outside a loop\n" and stream.writes == 1

    async def burst() -> None:
        for i in range(3):
            logger.info("line %d", i)
        assert stream.writes == 1  # held
        await asyncio.sleep(0.1)
        assert stream.writes == 2 and stream.getvalue().endswith("line 0\nline 1\nline 2\n")
        for i in range(4):  # max_lines: written without waiting
            logger.info("more %d", i)
        assert stream.writes == 3 and stream.getvalue().endswith("more 3\n")
        logger.info("last")

    asyncio.run(burst())
    handler.flush()  # what logging.shutdown does at exit
    assert stream.getvalue().endswith("more 3\nlast\n") and stream.writes == 4


def test_access_lines_are_formatted_with_their_batch_not_as_each_response_leaves() -> None:
    """An access line is emitted just before its response's last bytes leave: formatting
    it there (a time stamp, its message) made every response wait for it. It is
    formatted when its batch is written, with what the request said (the time it was
    made, not the time it is written)."""
    import asyncio
    import io
    import logging

    from jacobian_service.logs import BatchedStreamHandler

    formatted: list[str] = []

    class Counting(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            formatted.append(record.getMessage())
            return super().format(record)

    stream = io.StringIO()
    handler = BatchedStreamHandler(delay_s=0.05, max_lines=100)
    handler.setStream(stream)
    handler.setFormatter(Counting("%(created)f %(message)s"))
    logger = logging.Logger("access-format-test")
    logger.addHandler(handler)
    made: list[tuple[float, float]] = []

    async def requests() -> None:
        for i in range(3):
            before = time.time()
            logger.info("POST /x %d", i)
            made.append((before, time.time()))
        assert formatted == [] and stream.getvalue() == ""  # nothing done for them yet
        await asyncio.sleep(0.2)

    asyncio.run(requests())
    assert formatted == ["POST /x 0", "POST /x 1", "POST /x 2"]
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == formatted
    assert all(before - 1e-3 <= float(line.split(" ")[0]) <= after + 1e-3 for line, (before, after) in zip(lines, made))


MiB = 1 << 20


@pytest.fixture(scope="module")
def limited():
    """One server for the two tests below, each of whose limits the other does not feel:
    a 2048-byte result limit (the aux's), and a 64 MiB request limit on a 96 MiB body
    budget (the .npz bombs', each refused by its Jacobian's size either way). One front
    end, whose RSS the bombs' test reads; no spare: nothing here ends an engine."""
    with live_server(WORKERS=1, ENGINE_STANDBY="false", MAX_RESULT_BYTES=2048, MAX_REQUEST_BYTES=64 * MiB,
                     BODY_BUDGET_BYTES=96 * MiB, FUNCTIONS=f"jacobian_service.examples,tests.user_functions,{MARKS}") as served:
        yield served


def test_an_aux_that_cannot_travel_is_the_functions_error_and_the_engine_goes_on(limited):
    """A list that held itself, or the same list nested in itself 40 times over (2**40
    items), kept the engine in our own walk of aux, growing, until it was killed as a
    hang (504, every other request held up); a sparse or complex tensor in aux was our
    500 internal_error (JSON) after the work was done; a string in aux counted for
    nothing against MAX_RESULT_BYTES."""
    cases = {
        1: (500, "function_error", "aux is nested more than 64 levels deep (or holds itself)"),
        2: (500, "function_error", "aux holds more than 1,000,000 items"),
        3: (500, "function_error", "aux holds a tensor of layout torch.sparse_coo"),
        5: (413, "result_too_large", "the limit is 2048"),
        6: (500, "function_error", "aux holds a string that is not valid UTF-8"),
        8: (500, "function_error", "aux holds a dict key that is not valid UTF-8"),
    }
    path = "/v1/functions/odd_aux/jacobian"
    url, proc = limited
    with httpx.Client(base_url=url, timeout=30) as client:
        for kind, (status, code, words) in cases.items():
            for accept in (wire.JSON, wire.NPZ):
                r = client.post(path, json={"inputs": [[0.5, 1.0], kind]},
                                headers={"Accept": accept, "X-Request-Timeout": "5"})
                assert words in assert_problem(r, status, code)["detail"], (kind, accept)
        r = client.post(path, json={"inputs": [[0.5, 1.0], 0]})
        assert r.status_code == 200, r.text
        assert r.json()["aux"]["total"]["data"] == pytest.approx(1.5)
        # a complex aux travels since round 27 (tests/test_parity_round27.py), as torch.func answers it
        complex_ok = wire.Limits(complex=True)
        for accept in (wire.JSON, wire.NPZ):
            r = client.post(path, json={"inputs": [[0.5, 1.0], 4]}, headers={"Accept": accept, "X-Request-Timeout": "5"})
            assert r.status_code == 200, r.text
            aux = (wire.read_result_npz(r.content, complex_ok)[0]["aux"] if accept == wire.NPZ
                   else wire.decode_tree(r.json()["aux"], limits=complex_ok))
            np.testing.assert_array_equal(aux["z"], np.array([0.5j, 1j], np.complex64))
        # numpy's scalars and subclasses of float and str: Python's own values (before, the
        # engine could not encode its answer and dropped it: a 504 at the deadline, no log)
        for accept in (wire.JSON, wire.NPZ):
            r = client.post(path, json={"inputs": [[0.5, 1.0], 7]}, headers={"Accept": accept, "X-Request-Timeout": "5"})
            _, doc = decode(r)
            assert doc["aux"] == {"loss": 0.25, "n": 3, "ok": True, "f": 1.5, "s": "x"}, doc["aux"]
            r = client.post(path, json={"inputs": [[0.5, 1.0], 9]}, headers={"Accept": accept, "X-Request-Timeout": "5"})
            _, doc = decode(r)
            assert doc["aux"] == {"k": 1}, doc["aux"]
            # non-finite plain numbers are spelled as arrays spell theirs (they were null:
            # None to the SDK, like a real None), and the SDK reads them back as floats
            r = client.post(path, json={"inputs": [[0.5, 1.0], 10]}, headers={"Accept": accept, "X-Request-Timeout": "5"})
            _, doc = decode(r)
            if accept == wire.JSON:
                assert doc["aux"] == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity"}, doc["aux"]
            else:
                assert np.isnan(doc["aux"]["nan"]) and doc["aux"]["inf"] == np.inf and doc["aux"]["ninf"] == -np.inf
            # A tensor subclass whose detach or numpy raises, in aux or as the output: our 500
            # internal_error (and a logged traceback) as the engine copied it to the host.
            r = client.post(path, json={"inputs": [[0.5, 1.0], 11]}, headers={"Accept": accept, "X-Request-Timeout": "5"})
            _, doc = decode(r)
            data = (lambda v: v["data"] if isinstance(v, dict) else v)  # a JSON array, or .npz's
            np.testing.assert_allclose(data(doc["aux"]["t"]), np.cos([0.5, 1.0]), rtol=1e-6)
            for kind, body in (("evaluate", {}), ("jacobian", {}), ("vjp", {"cotangents": [1.0, 1.0]}),
                               ("jvp", {"tangents": [1.0, 1.0]}), ("jacobian", {"batched": True})):
                x = [[0.5, 1.0]] if not body.get("batched") else [[[0.5, 1.0]]]
                r = client.post(f"/v1/functions/stubborn_sin/{kind}", json={"inputs": x, **body},
                                headers={"Accept": accept, "X-Request-Timeout": "5"})
                assert r.status_code == 200, (kind, body, r.text)
            out, _ = decode(client.post("/v1/functions/stubborn_sin/evaluate", json={"inputs": [[0.5, 1.0]]},
                                        headers={"Accept": accept}), "output")
            np.testing.assert_allclose(out, np.sin([0.5, 1.0]), rtol=1e-6)
        with jc.Client(url) as sdk:
            _, aux = sdk.jacobian("odd_aux", np.array([0.5, 1.0], np.float32), np.array(10))
            assert np.isnan(aux["nan"]) and aux["inf"] == np.inf and aux["ninf"] == -np.inf, aux
        # an error whose message is not UTF-8, or whose __str__ raises SystemExit: the function's 500
        for kind, words in ((0, "cannot read /data/run-\\udcff.bin"), (1, "its __str__ raised")):
            r = client.post("/v1/functions/raises_oddly/jacobian", json={"inputs": [[0.5, 1.0, 2.0], kind]},
                            headers={"X-Request-Timeout": "5"})
            assert words in assert_problem(r, 500, "function_error")["detail"], r.text
        assert "Traceback" not in _log_complete(proc, url)  # (an engine's would be on its way through the relay)


def test_concurrent_npz_bombs_expand_one_budget_at_a_time(limited):
    """Eight concurrent deflated .npz bodies of 58 KB that each expand to 60 MB of
    zeros (under max_request_bytes, so only the Jacobian's size refuses them). Each was
    charged its 58 KB: all eight were inflated at once and sent on to the engine, and
    the front end's resident set rose by 531 MiB here. Their expanded sizes are now
    charged to the 96 MiB body budget before they are inflated, so one is expanded at a
    time and the others are refused, retryable. The bound: the one admitted holds its
    60 MB as arrays and, for a moment, once more as it hands them to the engine (shared
    memory or the socket): ~115 MiB measured; 200 MiB leaves room for that and for
    allocator slack, and is under half of what all eight took."""
    import io

    from ._rss import front_end_pid, peak_growth

    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros(15_000_000, np.float32))
    bomb = buf.getvalue()
    assert len(bomb) < 100_000
    path = "/v1/functions/sin/jacobian"
    url, proc = limited
    answers: list[httpx.Response] = []

    def one() -> None:
        answers.append(httpx.post(f"{url}{path}", content=bomb, headers={"content-type": wire.NPZ}, timeout=60))

    def all_at_once() -> None:
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    grew, _ = peak_growth(front_end_pid(proc.pid), all_at_once)
    codes = sorted((r.status_code, r.json()["code"]) for r in answers)
    assert len(codes) == 8 and set(codes) <= {(413, "result_too_large"), (503, "unavailable")}, codes
    assert (413, "result_too_large") in codes, codes  # the one that fitted was expanded and refused by size
    assert all(r.headers["retry-after"] == "1" for r in answers if r.status_code == 503)
    assert grew < 200 * MiB, f"8 concurrent .npz bombs grew the front end by {grew / MiB:.0f} MiB"
    r = httpx.post(f"{url}{path}", json={"inputs": [[0.5]]}, timeout=10)
    assert r.status_code == 200, r.text
    assert "jacobian_service_body_bytes_in_flight 0.0" in httpx.get(f"{url}/metrics", timeout=10).text


def test_a_results_size_counts_what_json_will_write():
    """Found by a second red team: only arrays and characters counted against the result
    limit, so 900,000 plain floats, a 16 MB dict key or 4 MB of control characters (6
    bytes each as JSON) passed it, and their JSON was then encoded on the event loop."""
    from jacobian_service.types import Result

    value = np.zeros(2, np.float32)
    assert Result(value, {"n": [0.5] * 900_000}, True).nbytes() >= 900_000 * 18  # "0.5" is short; 1/3 is not
    assert Result(value, {"k" * (16 << 20): 1}, True).nbytes() >= 16 << 20
    assert Result(value, {"c": "\x01" * (4 << 20)}, True).nbytes() >= 6 * (4 << 20)
    assert Result(value, {"e": "é" * 1000}, True).nbytes() >= 2000  # UTF-8's bytes
    # A lone array (most results: counted without the walk) counts as the walk counts it,
    # its empty lists' brackets and commas included.
    for array in (np.zeros((64, 128), np.float32), np.zeros((1 << 20, 0), np.float32), np.float64(2.0) * np.ones(())):
        walked = Result([array]).nbytes()  # a list of it: walked, with the list's own 0
        assert Result(array).nbytes() == walked >= array.nbytes
    assert Result(np.zeros((1 << 20, 0), np.float32)).nbytes() > 3 << 20  # "[[],[],...]": 3 bytes a list
