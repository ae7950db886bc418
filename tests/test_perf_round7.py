"""Round 7 of the performance work: the small ``.npy`` request's front-end CPU.

numpy reads a ``.npy`` header's dict with ``ast.literal_eval``, a compile of the text at
every request: ~230,000 of the ~977,000 instructions the front end spent on bench's small
``mlp`` Jacobian over ``.npy`` (``bench.fe_callgrind``). The header recurs byte for byte,
so ``wire.parse_npy_header`` keeps what it read of small ones: a header seen before must
be read exactly as the first time, and a refused one refused each time.
"""

from __future__ import annotations

import ast
import asyncio
import io

import numpy as np
import pytest
from jacobian_client import wire


def _header(arr: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=version)
    raw = buf.getvalue()
    return raw[:wire.npy_header_length(raw)]


def _uncached(header: bytes, complex_ok: bool = False):
    try:
        return wire._parse_npy_header(header, complex_ok)
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)


def _parsed(header: bytes, complex_ok: bool = False):
    try:
        return wire.parse_npy_header(header, complex_ok)
    except wire.WireError as exc:
        return ("refused", str(exc), exc.code)


_ARRAYS = [
    np.zeros(128, np.float32), np.zeros((3, 4), np.float64), np.zeros((3, 4), np.float64, order="F"),
    np.zeros((), np.int64), np.zeros((0, 5), np.uint8), np.zeros(2, ">f4"), np.zeros(2, np.bool_),
    np.zeros(2, np.complex64), np.zeros((1,) * 16, np.float16), np.zeros(2, "M8[s]"), np.zeros(2, "U3"),
]


@pytest.mark.parametrize("complex_ok", [False, True])
@pytest.mark.parametrize("version", [None, (2, 0)])
@pytest.mark.parametrize("i", range(len(_ARRAYS)))
def test_a_recurring_header_is_read_as_the_first_time(i, version, complex_ok):
    header = _header(_ARRAYS[i], version)
    expected = _uncached(header, complex_ok)
    assert _parsed(header, complex_ok) == expected
    assert _parsed(bytes(header), complex_ok) == expected  # (another bytes object, the same key)
    if expected[0] != "refused":
        assert (expected[0], expected[2]) == (_ARRAYS[i].shape, _ARRAYS[i].dtype)


def test_a_recurring_small_header_is_compiled_once(monkeypatch):
    evals = []
    real = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda text: evals.append(text) or real(text))
    header = _header(np.arange(7, dtype=np.float32).reshape(7, 1))  # (a shape no other test reads)
    for _ in range(3):
        assert wire.parse_npy_header(header) == ((7, 1), False, np.dtype(np.float32))
        arr = wire.read_npy(header + np.arange(7, dtype=np.float32).tobytes())
        assert arr.tolist() == [[float(k)] for k in range(7)]
    assert len(evals) == 1


@pytest.mark.parametrize("text", [
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",  # a negative size
    b"{'descr': '|O', 'fortran_order': False, 'shape': (3,), }",  # a pickle
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }",  # a bool for a size
    b"{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }",  # complex, refused in a request
    b"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } junk",
])
def test_a_refused_header_is_refused_each_time(monkeypatch, text):
    evals = []
    real = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda t: evals.append(t) or real(t))
    header = _written(text)
    first = _parsed(header)
    assert first[0] == "refused"
    once = len(evals)
    assert _parsed(header) == first
    assert len(evals) == 2 * once > 0  # (nothing kept of a refusal: read again, refused again)


def _written(text: bytes) -> bytes:
    """A version 1.0 header of ``text``, padded as numpy pads one."""
    body = text + b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def test_a_large_header_is_not_kept():
    shape = (1000,) * 40  # (a header over 256 bytes)
    header = _written(b"{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % repr(shape).encode())
    assert len(header) > wire._CACHED_NPY_HEADER
    before = wire._parse_small_npy_header.cache_info().currsize
    assert wire.parse_npy_header(header) == (shape, False, np.dtype(np.float32))
    assert wire._parse_small_npy_header.cache_info().currsize == before


# --------------------------------------------------------------------------- the client, named once


def _app_and_calls(tmp_path, monkeypatch, **settings):
    """A front end's app over ``tmp_path`` (as ``bench.fe_callgrind`` builds one: a run
    directory's registry.json, its engines faked behind the real IPC codec) and the
    ``Call`` objects its engines are handed."""
    from bench.fe_callgrind import _registry
    from jacobian_service import ipc
    from jacobian_service.app import create_app
    from jacobian_service.settings import Settings
    from jacobian_service.types import JobInfo, Result

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    (tmp_path / "metrics").mkdir()
    _registry(tmp_path)
    app = create_app(Settings(**settings), run_dir=tmp_path, channel=object())
    jac = np.ones((64, 128), np.float32)
    reply = [bytes(f) for f in ipc.encode_reply(1, Result(value=jac, chunk_size=64, mode="rev"),
                                                JobInfo(device="cpu", batch_size=1, queue_s=1e-4, compute_s=2e-4))]
    calls = []

    async def run(kind, call, **_):
        calls.append(call)
        return ipc.decode_reply(*ipc.parse(reply))

    app.service_state.engines.run = run
    return app, calls


async def _post(app, headers, client=("10.1.2.3", 5555), media=b"application/x-npy", answers=None):
    if media == b"application/json":
        body = wire.dumps({"inputs": [wire.encode_tree(np.zeros(128, np.float32))]})
    else:
        buf = io.BytesIO()
        np.save(buf, np.zeros(128, np.float32))
        body = buf.getvalue()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "server": ("127.0.0.1", 8000),
             "client": client, "scheme": "http", "method": "POST", "root_path": "",
             "path": "/v1/functions/mlp/jacobian", "raw_path": b"/v1/functions/mlp/jacobian", "query_string": b"",
             "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", media),
                         (b"accept", media), (b"content-length", str(len(body)).encode()), *headers]}
    sent = answers if answers is not None else []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"]


@pytest.mark.parametrize("keyed", [False, True])
def test_a_requests_client_is_named_once_and_reaches_the_engine(tmp_path, monkeypatch, keyed):
    from jacobian_service import clients, routes
    from jacobian_service.middleware import _digest

    settings = {"api_keys": "k-one,k-two"} if keyed else {}
    app, calls = _app_and_calls(tmp_path, monkeypatch, max_streams_per_client=2, **settings)
    named = []
    monkeypatch.setattr(routes, "client_of", lambda *a: named.append(a) or clients.client_of(*a))
    admitted = []
    admit = app.service_state.streams.admit
    monkeypatch.setattr(app.service_state.streams, "admit", lambda *a: admitted.append(a[-1]) or admit(*a))
    headers = [(b"authorization", b"Bearer k-two")] if keyed else []
    assert asyncio.run(_post(app, headers)) == 200
    expected = clients.client_of({"client": ("10.1.2.3", 5555), "state": {clients.KEY: _digest(b"k-two")}}
                                 if keyed else {"client": ("10.1.2.3", 5555)})
    assert expected.startswith("key:" if keyed else "addr:10.1.2.3")
    assert [c.client for c in calls] == [expected]  # (the engine's turns go by it)
    assert admitted == [expected]  # (the stream budget's share)
    assert len(named) == 1


def test_a_small_json_answer_says_its_meta_in_headers_once(tmp_path, monkeypatch):
    """Its meta headers are added raw (as a small .npy answer's), not through Starlette's
    ``headers=``: each said once, as meta_headers says it, beside the body's meta."""
    import orjson
    from jacobian_service.responses import meta_headers

    app, _ = _app_and_calls(tmp_path, monkeypatch)
    sent = []
    assert asyncio.run(_post(app, [], media=b"application/json", answers=sent)) == 200
    headers = sent[0]["headers"]
    names = [k for k, _ in headers]
    assert len(names) == len(set(names))
    doc = orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    said = {k.lower().encode(): v.encode() for k, v in meta_headers(doc["meta"]).items()}
    assert len(said) >= 6 and b"server-timing" in said
    assert {k: v for k, v in headers if k in said} == said
    assert dict(headers)[b"content-type"] == b"application/json"
    assert int(dict(headers)[b"content-length"]) == len(b"".join(m.get("body", b"") for m in sent[1:]))
    assert np.asarray(doc["jacobian"]["data"], np.float32).shape == (64, 128)


# --------------------------------------------------------------------------- the text log's line


def _records():
    import logging
    import sys

    yield logging.makeLogRecord({"name": "jacobian_service.access", "levelname": "INFO", "levelno": 20,
                                 "msg": "%s %s %s", "args": ("POST", "/v1/functions/mlp/jacobian", "200"),
                                 "created": 1_765_000_000.0425, "msecs": 42.0})
    yield logging.makeLogRecord({"name": "jacobian_service", "levelname": "WARNING", "levelno": 30,
                                 "msg": "a path %s\nINFO forged\x1b[2J", "args": ("/x\ty",), "created": 5.9999})
    yield logging.makeLogRecord({"name": "n", "levelname": "INFO", "levelno": 20, "msg": 12345, "args": ()})
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        yield logging.makeLogRecord({"name": "n", "levelname": "ERROR", "levelno": 40, "msg": "failed",
                                     "exc_info": sys.exc_info()})
    yield logging.makeLogRecord({"name": "n", "levelname": "INFO", "levelno": 20, "msg": "s", "stack_info": "Stack:\n  x"})
    yield logging.makeLogRecord({"name": "n", "levelname": "INFO", "levelno": 20, "msg": "s", "exc_text": "kept text"})


@pytest.mark.parametrize("i", range(6))
def test_a_text_line_is_the_line_loggings_format_makes(i):
    import logging

    from jacobian_service.logs import LINE, TextFormatter

    fast = list(_records())[i]
    slow = logging.makeLogRecord(dict(vars(fast)))
    formatter = TextFormatter(LINE)
    line = formatter.format(fast)
    assert line == logging.Formatter.format(formatter, slow)  # (the long way, its escapes and time stamp)
    assert {k: v for k, v in vars(fast).items() if k != "exc_info"} == {k: v for k, v in vars(slow).items()
                                                                     if k != "exc_info"}
    if i == 1:
        assert "\n" not in line and "\\x0a" in line and "\\x1b" in line and "\t" in line


def test_an_access_line_takes_the_short_way(monkeypatch):
    import logging

    from jacobian_service.logs import LINE, TextFormatter

    record = next(_records())
    monkeypatch.setattr(logging.PercentStyle, "format", lambda *a: pytest.fail("the long way"))
    assert TextFormatter(LINE).format(record).endswith(" INFO jacobian_service.access: POST /v1/functions/mlp/jacobian 200")
    other = TextFormatter("%(levelname)s %(message)s")  # (another format: the long way, as before)
    monkeypatch.setattr(logging.PercentStyle, "format", lambda style, r: style._format(r))
    assert other.format(next(_records())) == "INFO POST /v1/functions/mlp/jacobian 200"
