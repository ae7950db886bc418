"""Mend round 9: four small defects a review of the day's merges left.

1. The gateway's own error pages (deploy/nginx.conf.template: 413, 503, 504 as
   problem+json) echoed ANY page's Origin in Access-Control-Allow-Origin, and while no
   replica answered a preflight from any origin passed. Now only the origins the
   replicas' JACOBIAN_SERVICE_CORS_ORIGINS allows read them (a map on $http_origin
   against the same list, rendered in by the nginx image's envsubst), as the service
   itself decides (Settings' normalization: case, a trailing "/", a default port).
2. Too many ``tangents`` got a 413 whose advice was the vjp's (raise MAX_NPZ_MEMBERS
   for an output of more arrays), which applies to cotangents only.
3. The SDK's sparse-result reader refused a complex matrix ("inputs and tangents are
   real") though it reads complex dense arrays: ``limits.complex`` ignored.
4. A sparse Jacobian / Hessian of a bfloat16 function went as float32 unflagged; now
   ``meta.bfloat16`` / ``X-Bfloat16`` as a dense answer's.
"""

from __future__ import annotations

import io
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.settings import Settings

from ._client_support import free_port
from .conftest import assert_problem

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "nginx.conf.template"


# --------------------------------------------------------------- 1. the gateway's CORS

def _nginx_binary() -> str:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("no nginx (apt-get install nginx-light)")
    return binary


def _gateway_parts(cors_origins: str) -> tuple[str, str]:
    """The template's http-level maps and its error pages, as they are, with the CORS
    list rendered in as the image's envsubst renders it."""
    template = TEMPLATE.read_text().replace("${JACOBIAN_SERVICE_CORS_ORIGINS}", cors_origins)
    maps = re.search(r"^( *map .*?)^ *upstream jacobian_replicas", template, re.S | re.M)
    pages = re.search(r"^( *error_page .*?)^ *# The gateway's own liveness", template, re.S | re.M)
    assert pages, "the template's error pages moved: update this test"
    return maps.group(1) if maps else "", pages.group(1)


@pytest.fixture
def silent() -> Iterator[int]:
    """A replica that takes connections and never answers (the 504; its backlog holds
    one test's)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


def _gateway(cors_origins: str, folder: Path, silent: int) -> tuple[subprocess.Popen, str]:
    maps, pages = _gateway_parts(cors_origins)
    port = free_port()
    temp = "".join(f"{kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (folder / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log crit;
events {{ worker_connections 64; }}
http {{
  access_log off; {temp}
{maps}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 1k;
{pages}
    location /down/ {{ proxy_pass http://127.0.0.1:{free_port()}/; }}
    location /silent/ {{ proxy_pass http://127.0.0.1:{silent}/; proxy_read_timeout 200ms; }}
    location = /up {{ return 200 "up"; }}
  }}
}}""")
    proc = subprocess.Popen([_nginx_binary(), "-p", str(folder), "-e", f"{folder}/error.log", "-c",
                             str(folder / "nginx.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while True:
        try:
            httpx.get(url + "/up", timeout=1)
            return proc, url
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
            time.sleep(0.05)


ORIGINS = ["https://app.example.org", "http://localhost:5173", "http://localhost:51730", "http://localhost",
           "https://app.example.org.evil.example", "https://evil.example", "http://app.example.org", "null",
           "https://other.example:8443", "https://other.example"]


@pytest.mark.parametrize("cors_origins", [
    # as an operator writes them: spaces, a trailing "/", case, a default port
    " HTTPS://App.Example.org:443/ ,http://localhost:5173, https://other.example:8443",
    "*",
    "*, http://localhost:5173",  # (any origin; credentials for the one named: round 18)
    "",
])
def test_the_gateways_own_refusals_answer_only_the_allowed_origins(cors_origins, silent, tmp_path):
    """The gateway's 413 / 503 / 504 and its preflight while no replica answers give an
    Origin its Access-Control-Allow-Origin exactly where the service's own settings
    (the same CORS_ORIGINS) allow it: any Origin was echoed, and any origin's preflight
    passed (a page of any site read the gateway's refusals and got its preflights
    through). Allowed origins keep all of it."""
    allowed = set(Settings(cors_origins=cors_origins).cors_origin_list)
    proc, url = _gateway(cors_origins, tmp_path, silent)
    try:
        with httpx.Client(timeout=5) as client:
            for origin in ORIGINS:
                ok = "*" in allowed or origin in allowed
                # credentials for an origin named, as the service answers it (round 18)
                credentials = "true" if origin in allowed - {"*"} else None
                answers = {
                    "large": client.post(url + "/down/v1/functions/sin/jacobian", content=b"x" * 4096,
                                         headers={"Origin": origin}),
                    "down": client.get(url + "/down/v1/functions", headers={"Origin": origin}),
                    "silent": client.get(url + "/silent/v1/functions", headers={"Origin": origin}),
                }
                for what, r in answers.items():
                    status = {"large": 413, "down": 503, "silent": 504}[what]
                    assert r.status_code == status and r.headers["content-type"] == "application/problem+json", (
                        what, origin, r.status_code)
                    assert r.headers.get("access-control-allow-origin") == (origin if ok else None), (what, origin)
                    assert r.headers["vary"] == "Origin", (what, origin)
                    assert r.headers.get("access-control-allow-credentials") == credentials, (what, origin)
                # (the 504's preflight too, browser round 19; Private Network Access granted
                # where the origin is, as the service grants it)
                for path, refused in (("/down/", 503), ("/silent/", 504)):
                    preflight = client.options(url + path + "v1/functions/sin/jacobian", headers={
                        "Origin": origin, "Access-Control-Request-Method": "POST",
                        "Access-Control-Request-Headers": "authorization, content-type",
                        "Access-Control-Request-Private-Network": "true"})
                    if ok:
                        assert preflight.status_code == 204, (path, origin, preflight.status_code)
                        assert (preflight.headers["access-control-allow-origin"],
                                preflight.headers["access-control-allow-methods"],
                                preflight.headers["access-control-allow-headers"],
                                preflight.headers["access-control-allow-private-network"]) == (
                            origin, "POST", "authorization, content-type", "true"), path
                        assert preflight.headers.get("access-control-allow-credentials") == credentials, origin
                    else:  # refused as the service refuses another origin's preflight: nothing for the page
                        assert preflight.status_code == refused, (path, origin, preflight.status_code)
                        assert not {"access-control-allow-origin", "access-control-allow-methods",
                                    "access-control-allow-private-network"} & set(preflight.headers), (path, origin)
            # No Origin (not a page): the problem as before, no CORS header
            r = client.get(url + "/down/v1/functions")
            assert r.status_code == 503 and "access-control-allow-origin" not in r.headers
            assert r.json()["code"] == "unavailable" and r.headers["retry-after"] == "1"
    finally:
        proc.terminate()
        proc.wait(10)
    if cors_origins.startswith(" HTTPS"):  # (the cases above are each's: the list was read)
        assert allowed == {"https://app.example.org", "http://localhost:5173", "https://other.example:8443"}


def test_the_whole_template_rendered_with_a_cors_list_passes_nginx_t(tmp_path):
    """`nginx -t` of the whole template as Compose renders it (the replica names and
    `resolve` swapped for what this nginx can check, as test_deploy does)."""
    text = TEMPLATE.read_text()
    text = re.sub(r"\sresolve\s", " ", text)
    text = re.sub(r"server\s+jacobian[\w-]*:(\d+)", r"server 127.0.0.1:\1", text)
    text = text.replace("${NGINX_LOCAL_RESOLVERS}", "127.0.0.1")
    assert "${JACOBIAN_SERVICE_CORS_ORIGINS}" in text
    for value in ("https://a.example, http://localhost:5173/", "*", ""):
        conf = tmp_path / "nginx.conf"
        conf.write_text(text.replace("${JACOBIAN_SERVICE_CORS_ORIGINS}", value)
                        .replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;"))
        (tmp_path / "logs").mkdir(exist_ok=True)
        proc = subprocess.run([_nginx_binary(), "-t", "-q", "-p", str(tmp_path), "-c", str(conf), "-e", "stderr"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, (value, proc.stderr)


# --------------------------------------------------------------- 2, 4: in-process service

@pytest.fixture(scope="module")
def c() -> Iterator[TestClient]:
    settings = Settings(warmup=False, functions="tests.wire5_functions,tests.mend9_functions",
                        max_npz_members=4, stream_threshold_bytes=64)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        while client.get("/readyz").status_code != 200:
            pass
        yield client


def test_too_many_tangents_are_told_the_tangents_advice(c):
    """Tangents are shaped like the inputs: past their room (MAX_NPZ_MEMBERS, or the
    function's input arrays where more) they are more than the function has, and
    raising MAX_NPZ_MEMBERS is no remedy. The 413 said the vjp's advice ("an output with
    more arrays than that needs MAX_NPZ_MEMBERS raised for its vjp"); JSON and .npz."""
    x = [0.5, 1.0, 1.5]
    arrays = [{"shape": [3], "data": x}] * 5  # (a list of arrays: [x] * 5 is one 5 x 3 array)
    r = c.post("/v1/functions/sin/jvp", json={"inputs": [x], "tangents": arrays})
    detail = assert_problem(r, 413, "payload_too_large")["detail"]
    assert detail.startswith("tangents hold more than 4 arrays"), detail
    assert "tangents are shaped like the inputs, one array for each of the function's 1 input array" in detail
    assert "vjp" not in detail and "cotangents" not in detail and "raised" not in detail, detail
    assert (r.json()["field"], r.json()["limit"]) == ("tangents", 4)
    buf = io.BytesIO()
    np.savez(buf, x=np.array(x), **{f"tangents/{i}": np.array(x) for i in range(5)})
    r = c.post("/v1/functions/sin/jvp", content=buf.getvalue(), headers={"content-type": wire.NPZ})
    detail = assert_problem(r, 413, "payload_too_large")["detail"]
    assert "tangents are shaped like the inputs" in detail and "vjp" not in detail, detail
    # the cotangents keep theirs: shaped like the output
    r = c.post("/v1/functions/sin/vjp", json={"inputs": [x], "cotangents": arrays})
    detail = assert_problem(r, 413, "payload_too_large")["detail"]
    assert detail.startswith("cotangents hold more than 4 arrays"), detail
    assert "cotangents are shaped like the output" in detail and "needs MAX_NPZ_MEMBERS raised" in detail, detail
    assert "tangents are shaped like the inputs" not in detail


BF = {"dtype": "bfloat16", "shape": [3], "data": [0.5, 1.0, 1.5]}
XB = torch.tensor([0.5, 1.0, 1.5], dtype=torch.bfloat16)


@pytest.mark.parametrize("name,kind,want", [
    ("sin", "jacobian", lambda: torch.func.jacrev(torch.sin)(XB)),
    ("sum_sin", "hessian", lambda: torch.func.hessian(lambda x: torch.sin(x).sum())(XB))])
@pytest.mark.parametrize("media", [wire.JSON, wire.NPZ])
def test_a_sparse_result_of_bfloat16_says_so(c, name, kind, want, media):
    """A sparse Jacobian / Hessian of a bfloat16 function goes as float32 (scipy.sparse
    holds no bfloat16) and was unflagged: now meta.bfloat16 and X-Bfloat16 say it, as a
    dense answer's do; its values are torch.func's in bfloat16. A float32 call says nothing."""
    r = c.post(f"/v1/functions/{name}/{kind}", json={"inputs": [BF], "sparsity": "auto", "return_output": True},
               headers={"accept": media})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-bfloat16") == "true"
    if media == wire.JSON:
        doc = r.json()
        matrix, meta = wire.decode_sparse_json(doc[kind]), doc["meta"]
    else:
        matrix, _, meta = wire.read_sparse_result_npz(r.content)
    assert {k: v for k, v in meta.items() if k.endswith("bfloat16")} == {"bfloat16": [True], "output_bfloat16": [True]}, meta
    dense = matrix.toarray()
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense, want().float().numpy())
    # dense form (sparse_format=dense, gathered) alike
    r = c.post(f"/v1/functions/{name}/{kind}", json={"inputs": [BF], "sparsity": "auto", "sparse_format": "dense"},
               headers={"accept": wire.NPY})
    assert r.status_code == 200, r.text
    assert r.headers.get("x-bfloat16") == "true"
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), want().float().numpy())
    if kind == "jacobian":  # streamed (8 x 8 float32 past the 64 bytes of STREAM_THRESHOLD_BYTES): said too
        x8 = torch.linspace(-1, 1, 8).bfloat16()
        r = c.post(f"/v1/functions/{name}/{kind}", headers={"accept": wire.NPY}, json={
            "inputs": [{"dtype": "bfloat16", "shape": [8], "data": x8.float().tolist()}], "sparsity": "auto",
            "sparse_format": "dense"})
        assert r.status_code == 200 and r.headers.get("x-bfloat16") == "true", (r.status_code, r.headers)
        np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), torch.func.jacrev(torch.sin)(x8).float().numpy())
    r = c.post(f"/v1/functions/{name}/{kind}", json={"inputs": [[0.5, 1.0, 1.5]], "sparsity": "auto"})
    assert r.status_code == 200 and "x-bfloat16" not in r.headers
    assert not [k for k in r.json()["meta"] if k.endswith("bfloat16")]


# --------------------------------------------------------------- 3. complex sparse results

def test_the_sdks_sparse_reader_reads_complex_where_its_limits_allow():
    """A complex sparse matrix as the service writes one (encode_sparse_json: [real, imag]
    pairs, as a dense complex array's data) is read by the SDK's limits (complex=True);
    it was refused as "inputs and tangents are real". A reader that takes no complex
    (the service's own, of requests) still refuses it."""
    scipy_sparse = pytest.importorskip("scipy.sparse")
    dense = np.array([[1 + 2j, 0, 0], [0, 0, 3.5 - 1j]], dtype=np.complex64)
    for fmt in ("csr", "csc", "coo"):
        matrix = getattr(scipy_sparse, f"{fmt}_array")(dense)
        doc = wire.loads(wire.dumps(wire.encode_sparse_json(matrix)))
        assert doc["dtype"] == "complex64" and doc["data"][0] == [1.0, 2.0], doc
        got = wire.decode_sparse_json(doc, wire.Limits(complex=True))
        assert got.dtype == np.complex64 and got.format == fmt
        np.testing.assert_array_equal(got.toarray(), dense)
        with pytest.raises(wire.WireError, match="unsupported dtype complex64 here"):
            wire.decode_sparse_json(doc)
    # as a result tree's member, through the reader the SDK's protocol uses
    doc = {"format": "coo", "shape": [2, 2], "dtype": "complex128", "row": [1], "col": [0], "data": [[0.5, -2.0]]}
    got = wire.decode_tree(doc, limits=wire.Limits(complex=True))
    np.testing.assert_array_equal(got.toarray(), np.array([[0, 0], [0.5 - 2j, 0]]))
    with pytest.raises(wire.WireError, match="'dtype' must be a string"):
        wire.decode_sparse_json({**doc, "dtype": ["complex128"]}, wire.Limits(complex=True))
