"""A real browser as the outside testers use one, round 17: two services behind one
gateway, under two path prefixes of one origin.

One uvicorn serving two apps, each under its own prefix (as a gateway routes
``/jacobian-cpu/`` and ``/jacobian-gpu/`` to two deployments, each with its own API
keys, CORS_ORIGINS naming one page's origin), nginx with deploy/nginx.conf.template's
error pages in front of them, and one headless Chromium for the module:

* the docs pages keep the key a user gives them in the tab's ``sessionStorage``, which
  is the origin's, not the path's: under one name for every prefix, /jacobian-gpu/docs
  read the key given to /jacobian-cpu/docs and sent it to the other service (a 403, the
  key asked again, which then overwrote the first's). Each prefix now keeps its own key:
  the other service never sees it, and each page opens again without asking;
* what the shipped gateway refuses itself (a body past its client_max_body_size, a call
  while no replica answers) was nginx's HTML, without CORS headers: a page of the
  allowed origin read "Failed to fetch" where the service's own 413 and 503 are
  problem+json it reads. The gateway now answers them as the service does.

(What a page of CORS_ORIGINS does with fetch, from this round's probes that found nothing
to fix: .npy bodies built in JS (unpadded headers, big-endian, Float16Array, BigInt64Array,
a Blob with its type), .npz bodies zipped in JS (stored, deflate-raw, data descriptors,
members without ``.npy``), Accept with weights, refusals of large uploads read before
their bodies were sent, aborts of queued, computing, uploading and streamed requests
(the engine stops: its CPU time flat, the stream budget back to 0), through nginx under
a prefix with ``serve``; rounds 2 to 16 hold those.)
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route

from tests._cdp import Chromium, chromium_binary
from tests._client_support import free_port, real_app, serve

CPU, GPU = "/jacobian-cpu", "/jacobian-gpu"
KEYS = {CPU: "cpu-key", GPU: "gpu-key"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    """One headless Chromium for the module (round 5's)."""
    if chromium_binary() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def page() -> Iterator[str]:
    """A page server: another origin (127.0.0.1 on another port), the one CORS_ORIGINS allows."""
    async def blank(request: Any) -> HTMLResponse:
        return HTMLResponse("<!doctype html><html><head><meta charset='utf-8'></head><body>page</body></html>")

    with serve(Starlette(routes=[Route("/", blank)])) as url:
        yield url


@pytest.fixture(scope="module")
def gateway(page: str) -> Iterator[str]:
    """Two services, each with its own key, under CPU and GPU on one origin, CORS_ORIGINS
    naming the page's (their engines are never started: nothing here computes)."""
    apps = {prefix: real_app(functions="jacobian_service.examples", api_keys=key, engine_standby=False,
                             cors_origins=page)
            for prefix, key in KEYS.items()}
    outer = Starlette(routes=[Mount(prefix, app) for prefix, app in apps.items()])

    with serve(outer) as url:
        yield url


_ENTER_KEY = r"""(key => {
  const form = document.getElementById('api-key');
  form.elements.key.value = key;
  form.requestSubmit();
  return true;
})"""

_ASKED = "document.getElementById('api-key') && !document.getElementById('api-key').hidden"
_SHOWN = "document.querySelectorAll('.opblock').length > 10"


def _bearers(chromium: Chromium, url: str) -> set[str]:
    """The Authorization headers the pages sent to ``url``'s paths so far."""
    chromium.eval("true")  # (the events sent meanwhile, read)
    return {next((v for k, v in e["params"]["request"]["headers"].items() if k.lower() == "authorization"), "")
            for e in chromium.events if e["method"] == "Network.requestWillBeSent"
            and e["params"]["request"]["url"].startswith(url)} - {""}


def test_each_prefixs_docs_keep_their_own_key(gateway, browser):
    """A user gives /jacobian-cpu/docs its key, then opens /jacobian-gpu/docs in the same
    tab: that page asks for its own key (it sent the CPU service's key to the GPU
    service, was refused, and said "That key was refused"); given it, the page opens.
    Back on /jacobian-cpu/docs (and its /redoc) the page opens without asking,
    with its key (the GPU one had overwritten it: refused, asked again)."""
    browser.goto("about:blank")
    browser.events.clear()
    browser.goto(gateway + CPU + "/docs")
    browser.wait_for(_ASKED)
    browser.eval(f"{_ENTER_KEY}({json.dumps(KEYS[CPU])})")
    browser.wait_for(_SHOWN)

    browser.goto(gateway + GPU + "/docs")
    browser.wait_for(_ASKED)
    message = browser.eval("document.getElementById('api-key-message').textContent")
    assert message == "", message  # asked as a first visit is, not told a key was refused
    assert _bearers(browser, gateway + GPU) == set(), "the CPU service's key went to the GPU service"
    browser.eval(f"{_ENTER_KEY}({json.dumps(KEYS[GPU])})")
    browser.wait_for(_SHOWN)
    assert _bearers(browser, gateway + GPU) == {f"Bearer {KEYS[GPU]}"}

    browser.events.clear()
    for page in ("/docs", "/redoc"):
        browser.goto(gateway + CPU + page)
        browser.wait_for(_SHOWN if page == "/docs" else "document.querySelectorAll('.http-verb').length > 10",
                         timeout_s=60)
        assert not browser.eval(_ASKED), page
    assert _bearers(browser, gateway + CPU) == {f"Bearer {KEYS[CPU]}"}
    assert _bearers(browser, gateway + GPU) == set()
    browser.goto("about:blank")


# ---------------------------------------------------------------- the shipped gateway's own refusals

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf.template"


@pytest.fixture(scope="module")
def nginx(gateway: str, page: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx with deploy/nginx.conf.template's error pages, as they are (its upstream
    block wants nginx 1.27.3's ``resolve``): CPU's prefix passed to the services,
    ``/down/`` to a port nothing listens on (every replica gone), and a body limit of
    1 MiB (the template's 256m, small enough to send), ``/silent/`` to one that never
    answers (its read timeout 1 s)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        pytest.skip("no nginx (apt-get install nginx-light)")
    # (CORS_ORIGINS rendered in as the nginx image's envsubst does: the page's origin)
    template = TEMPLATE.read_text().replace("${JACOBIAN_SERVICE_CORS_ORIGINS}", page)
    # (its error pages and their locations: the lines before its own liveness location;
    # the maps of the origins they answer, before its upstream)
    own = re.search(r"^( *error_page .*?)^ *# The gateway's own liveness", template, re.S | re.M)
    own = own.group(1) if own else ""
    maps = re.search(r"^( *map .*?)^ *upstream jacobian_replicas", template, re.S | re.M)
    maps = maps.group(1) if maps else ""
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    silent = socket.socket()  # a replica that takes the connection and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # (round 19 adds preflights: a full backlog drops SYNs, a 60 s connect wait)
    temp = "".join(f"{kind}_temp_path {folder}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (folder / "nginx.conf").write_text(f"""
daemon off; worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log crit;
events {{ worker_connections 64; }}
http {{
  access_log off; {temp}
{maps}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 1m;
{own}
    location {CPU}/ {{
      proxy_pass {gateway}{CPU}/;
      proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;
    }}
    location /down/ {{
      proxy_pass http://127.0.0.1:{free_port()}/;
    }}
    location /silent/ {{
      proxy_pass http://127.0.0.1:{silent.getsockname()[1]}/; proxy_read_timeout 1s;
    }}
  }}
}}""")
    proc = subprocess.Popen([binary, "-p", str(folder), "-e", f"{folder}/error.log", "-c", str(folder / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(url + CPU + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "error.log").read_text()
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        silent.close()


_THROUGH_THE_GATEWAY = r"""(async () => {
  const API = %(api)s;
  const read = async r => ({status: r.status, type: r.headers.get('content-type'), id: r.headers.get('x-request-id'),
                            retry: r.headers.get('retry-after'), body: await r.json()});
  const out = {};
  out.large = await fetch(API + %(cpu)s + '/v1/functions/sin/jacobian', {method: 'POST', body: new Uint8Array(2 << 20),
    headers: {'Content-Type': 'application/x-npy', Authorization: 'Bearer cpu-key'}}).then(read, e => String(e));
  out.down = await fetch(API + '/down/v1/functions').then(read, e => String(e));
  out.downKeyed = await fetch(API + '/down/v1/functions/sin/jacobian', {method: 'POST',  // (preflighted)
    headers: {'Content-Type': 'application/json', Authorization: 'Bearer cpu-key'}, body: '{"inputs": [[0.5]]}'})
    .then(read, e => String(e));
  out.silent = await fetch(API + '/silent/v1/functions').then(read, e => String(e));
  return out;
})()"""


def test_a_page_reads_what_the_shipped_gateway_refuses_itself(nginx, page, browser):
    """A page of the allowed origin behind deploy/nginx.conf.template: an upload past the
    gateway's client_max_body_size, and a call while no replica answers, read "Failed to
    fetch" (nginx's HTML 413, 502 and 504 carry no CORS headers; the console blamed the
    origin) where the service's own 413 and 503 are problem+json the page reads. The
    gateway now answers them as the service would: problem+json, ``code``
    payload_too_large, unavailable (Retry-After: 1) and timeout, its request id, for the page;
    while no replica answers, a preflight too, so that a call with a key reads its 503."""
    browser.goto(page + "/")
    browser.wait_for("document.body && document.body.textContent === 'page'")
    got = browser.eval(_THROUGH_THE_GATEWAY % {"api": json.dumps(nginx), "cpu": json.dumps(CPU)}, timeout_s=60)
    large, down, keyed = got["large"], got["down"], got["downKeyed"]
    assert isinstance(large, dict) and isinstance(down, dict) and isinstance(keyed, dict), got
    assert (keyed["status"], keyed["body"]["code"], keyed["retry"]) == (503, "unavailable", "1"), keyed
    assert (large["status"], large["type"], large["body"]["code"]) == (413, "application/problem+json",
                                                                        "payload_too_large"), large
    assert (down["status"], down["type"], down["body"]["code"], down["retry"]) == (
        503, "application/problem+json", "unavailable", "1"), down
    silent = got["silent"]
    assert (silent["status"], silent["type"], silent["body"]["code"]) == (504, "application/problem+json", "timeout"), got
    for problem in (large, down, keyed, silent):
        assert problem["body"]["status"] == problem["status"] and problem["body"]["request_id"] == problem["id"]
        assert re.fullmatch(r"[0-9a-f]{32}", problem["id"]), problem
    # Only its own refusals: a replica's answers pass as they are (the service's 401).
    r = httpx.get(nginx + CPU + "/v1/functions", headers={"Origin": page}, timeout=10)
    assert (r.status_code, r.json()["code"], r.headers["access-control-allow-credentials"]) == (
        401, "unauthorized", "true"), r.text
    browser.goto("about:blank")
