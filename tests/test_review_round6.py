"""Review round 6 (2abba97..981dd9b): the meta headers every derivative answer now sends
(browser round 15) were made on the hot path of a small .npy Jacobian through a dict,
its merge with the attachment's and Starlette's lower-casing and encoding of each,
every value formatted twice (the header, then Server-Timing): measured, 14.5 us a
request added to an encode of 10 us (load ~13, in-process). They are now added as raw
headers, each value formatted once, from the same table (~10 us); these tests hold the
headers to what they were: the dict form, the raw form, and a live server's answers."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from jacobian_client import wire
from jacobian_service.responses import (
    META_HEADERS,
    encode,
    meta_headers,
    meta_raw_headers,
)
from jacobian_service.routes import _common_meta, _meta
from jacobian_service.types import JobInfo, Result

from tests._client_support import real_app, serve

_TIMING = (("queue_ms", "queue"), ("compute_ms", "compute"))


def _reference(meta: dict) -> dict[str, str]:
    """meta_headers as browser round 15 wrote it (the behaviour kept), with round 16's
    per-output flags (lists: each true / false, comma-separated)."""
    said = lambda v: ", ".join(str(b).lower() for b in v) if isinstance(v, list) else str(v)
    headers = {header: said(meta[key]) for key, header in META_HEADERS.items() if meta.get(key) is not None}
    timing = [f"{name};dur={meta[key]}" for key, name in _TIMING if meta.get(key) is not None]
    if timing:
        headers["Server-Timing"] = ", ".join(timing)
    return headers


METAS = [
    {"device": "cpu", "chunk_size": None, "batch_size": 1, "mode": "rev", "queue_ms": 0.123, "compute_ms": 0.877},
    {"device": "cuda:0", "chunk_size": 8, "batch_size": 3, "mode": "fwd", "queue_ms": 0.0, "compute_ms": 12345.679},
    {"device": "cpu", "chunk_size": 64, "batch_size": 1, "queue_ms": 1.5},  # a stream's head
    {"device": "cpu", "compute_ms": 2.0},  # compute only
    {"device": None, "mode": None},  # nothing timed
    {},
    {"device": "cpu", "batch_size": 1, "bfloat16": [True, False], "unbatched": [False, True]},  # an evaluate's flags
]


@pytest.mark.parametrize("meta", METAS)
def test_meta_headers_and_their_raw_form_say_what_they_said(meta: dict) -> None:
    said = meta_headers(meta)
    assert said == _reference(meta)
    assert list(said) == list(_reference(meta))  # (the same order too)
    assert meta_raw_headers(meta) == [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in said.items()]


def test_a_small_npy_answer_has_the_headers_it_had() -> None:
    """encode's small .npy, made with raw headers, against the way it was made at 981dd9b
    (_meta's whole dict through headers=); _meta unchanged. (Its meta headers: the common
    entries and, since browser round 16, an evaluate's flags; a sparse result's entries
    are no headers.)"""
    from jacobian_service.responses import attachment
    from starlette.responses import Response

    result = Result(np.arange(4, dtype=np.float32).reshape(2, 2), chunk_size=2, mode="rev",
                    sparse_meta={"sparsity": "auto", "nnz": 2}, batch_meta={"unbatched": [False]})
    info = JobInfo(device="cpu", batch_size=2, queue_s=0.000123456, compute_s=0.0041)
    meta = _meta(info, result)
    assert meta == {"device": "cpu", "chunk_size": 2, "batch_size": 2, "mode": "rev", "queue_ms": 0.123,
                    "compute_ms": 4.1, "sparsity": "auto", "nnz": 2, "unbatched": [False]}
    assert list(meta)[:6] == list(_common_meta(info, result))
    old = Response(b"".join(wire.write_npy(result.value)), media_type=wire.NPY,
                   headers={**attachment("sin", "jacobian", wire.NPY), **_reference(meta)})
    new = encode(wire.NPY, "sin", "jacobian", result, _meta(info, result))
    assert new.body == old.body
    assert sorted(new.raw_headers) == sorted(old.raw_headers)
    assert len({k for k, _ in new.raw_headers}) == len(new.raw_headers)  # each once


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app = real_app(functions="jacobian_service.examples", workers=1, engine_standby=False)
    with serve(app, ready_path="/readyz") as url:
        yield url


@pytest.mark.parametrize("extra", [{}, {"sparsity": "auto", "sparse_format": "dense"}])
def test_a_live_npy_answer_says_its_meta_as_json_does(url: str, extra: dict) -> None:
    """sin's Jacobian as .npy: its headers say what the same call's JSON meta says
    (device, chunk, batch, mode), its times as X- headers and as Server-Timing, each
    header once; the array is the JSON answer's."""
    body = {"inputs": [[0.5, 1.0, 1.5]], **extra}
    with httpx.Client(base_url=url, timeout=30) as c:
        npy = c.post("/v1/functions/sin/jacobian", json=body, headers={"Accept": wire.NPY})
        js = c.post("/v1/functions/sin/jacobian", json=body, headers={"Accept": wire.JSON})
    assert npy.status_code == 200 and js.status_code == 200, (npy.text[:300], js.text[:300])
    meta = js.json()["meta"]
    got = wire.read_npy(npy.content, wire.Limits())
    np.testing.assert_array_equal(got, wire.decode_json_array(js.json()["jacobian"])[0])
    np.testing.assert_allclose(got, np.diag(np.cos([0.5, 1.0, 1.5])), rtol=1e-6)
    for key in ("device", "chunk_size", "batch_size", "mode"):
        header = META_HEADERS[key]
        assert npy.headers.get(header) == (None if meta.get(key) is None else str(meta[key])), header
    q, t = npy.headers["x-queue-ms"], npy.headers["x-compute-ms"]
    assert float(q) >= 0 and float(t) >= 0
    assert npy.headers["server-timing"] == f"queue;dur={q}, compute;dur={t}"
    names = [k for k, _ in npy.headers.raw]
    assert len(names) == len({k.lower() for k in names})


def test_a_page_may_read_server_timing_as_it_reads_the_other_meta_headers() -> None:
    """Server-Timing is sent with every derivative answer, as the X- meta headers are,
    but was not in Access-Control-Expose-Headers: a page of CORS_ORIGINS read
    ``r.headers.get('Server-Timing')`` as null, every X- one as its value."""
    page = "http://page.example"
    app = real_app(functions="jacobian_service.examples", api_keys="k1", cors_origins=page, workers=1,
                   engine_standby=False)
    with serve(app, ready_path="/readyz") as api, httpx.Client(base_url=api, timeout=30) as c:
        for accept in (wire.NPY, wire.JSON):
            r = c.post("/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]},
                       headers={"Origin": page, "Authorization": "Bearer k1", "Accept": accept})
            assert r.status_code == 200, r.text
            assert r.headers["access-control-allow-origin"] == page
            exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
            sent = {h for h in r.headers if h.startswith("x-") and h not in ("x-request-id", "x-content-type-options")}
            assert {"x-device", "x-mode", "x-queue-ms", "x-compute-ms"} <= sent <= {h.lower() for h in META_HEADERS.values()}
            assert "server-timing" in r.headers
            assert sent | {"server-timing"} <= exposed, accept
