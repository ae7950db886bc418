"""Shared fixtures: an in-process app (TestClient) and helpers to compare with torch.func."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
from hypothesis import settings as hypothesis_settings

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

from jacobian_client import wire
from jacobian_service import create_app
from jacobian_service.procfs import cpu_seconds, descendants
from jacobian_service.registry import Registry
from jacobian_service.settings import Settings


# Every httpx.get/post (and each httpx.Client) made an SSL context from certifi's bundle,
# ~26 ms of CPU against ~2 ms for the request itself, though every URL the suite asks is
# plain http on loopback: its polling loops (/readyz, /v1/info every 50-100 ms while a
# server starts or an engine restarts) spent most of their CPU there. One default context,
# made once, serves every client that asks for the default (no test speaks TLS).
_DEFAULT_SSL_CONTEXT = httpx.create_ssl_context()


def _ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
    if verify is True and cert is None and not (trust_env and ("SSL_CERT_FILE" in os.environ or "SSL_CERT_DIR" in os.environ)):
        return _DEFAULT_SSL_CONTEXT
    return httpx.create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)


httpx._transports.default.create_ssl_context = _ssl_context  # type: ignore[attr-defined]


# CI explores the same examples every run (a red CI must be reproducible); local runs
# keep exploring new ones.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "default")


# What a server started with DEVICE unset (auto) serves on: every visible GPU, else the
# CPU. The suite runs on a GPU host too (scripts/device-check), where that is CUDA.
DEFAULT_DEVICES = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]


@pytest.fixture(scope="session")
def builtins() -> Registry:
    return Registry.from_modules()


@pytest.fixture(scope="session")
def client() -> Iterator[TestClient]:
    """One in-process app for the read-only tests (warm-up off: tests warm what they use)."""
    with TestClient(create_app(Settings(warmup=False, functions="jacobian_service.examples,tests.user_functions"))) as c:
        yield c


@contextlib.contextmanager
def ready_app(functions: str, *, warmup: bool = False) -> Iterator[TestClient]:
    """An in-process app serving ``functions``, for a module's tests, once ``/readyz``
    says its engine is up (server exceptions not raised: a test reads a 500 as a client
    does). The parity rounds' modules each hold one."""
    with TestClient(create_app(Settings(warmup=warmup, functions=functions)), raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 120
        while c.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, c.get("/readyz").text
            time.sleep(0.05)
        yield c


@contextlib.contextmanager
def sdk_over(app: TestClient) -> Iterator[Any]:
    """A :class:`jacobian_client.Client` whose requests go to the in-process ``app`` (no
    socket, no retries): the SDK and its adapters against a module's ``ready_app``."""
    from jacobian_client import Client

    def forward(request: httpx.Request) -> httpx.Response:
        r = app.request(request.method, str(request.url.copy_with(scheme="http", host="testserver", port=None)),
                        content=request.content, headers=dict(request.headers))
        headers = {k: v for k, v in r.headers.items() if k.lower() not in ("content-encoding", "transfer-encoding")}
        return httpx.Response(r.status_code, headers=headers, content=r.content)

    with Client("http://sdk.test", http_transport=httpx.MockTransport(forward), max_retries=0) as client:
        yield client


@contextlib.contextmanager
def ready_app_with(functions: str, **settings: Any) -> Iterator[TestClient]:
    """``ready_app`` under these settings, given as an operator would
    (``JACOBIAN_SERVICE_<NAME>`` in the environment, for the app's life only)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in settings.items():
            mp.setenv(f"JACOBIAN_SERVICE_{key.upper()}", str(value))
        with ready_app(functions) as c:
            yield c


@pytest.fixture
def make_client(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh app configured through the environment, as an operator would."""
    opened: list[TestClient] = []

    def make(**env: Any) -> TestClient:
        env.setdefault("warmup", "false")
        env.setdefault("functions", "jacobian_service.examples,tests.user_functions")
        for key, value in env.items():
            monkeypatch.setenv(f"JACOBIAN_SERVICE_{key.upper()}", str(value))
        c = TestClient(create_app(Settings()), raise_server_exceptions=False)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(response: Any, key: str = "jacobian") -> tuple[Any, dict[str, Any]]:
    """A 200 response in any of the three formats -> (tree under key, whole document)."""
    assert response.status_code == 200, response.text
    media = response.headers["content-type"].split(";")[0]
    if media == wire.NPY:
        return wire.read_npy(response.content), {}
    if media == wire.NPZ:
        trees, meta = wire.read_result_npz(response.content)
        return trees[key], {**trees, "meta": meta}
    doc = response.json()
    return wire.decode_tree(doc[key]), doc


def torch_tree(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.detach().numpy() if isinstance(t, torch.Tensor) else t, tree)


def assert_tree_close(got: Any, want: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    if isinstance(want, torch.Tensor):
        want = want.detach().numpy()
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"expected an array, got {type(got).__name__}"
        assert got.shape == want.shape, (got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    elif isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), (type(got), got)
        for g, w in zip(got, want):
            assert_tree_close(g, w, rtol, atol)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want)
        for k in want:
            assert_tree_close(got[k], want[k], rtol, atol)
    else:
        assert got == want


def assert_problem(response: Any, status: int, code: str) -> dict[str, Any]:
    """An error: exact status and code, problem+json, and no traceback anywhere."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(wire.PROBLEM)
    body = response.json()
    # SPEC's members, and those of an array refused for its shape all together, or a
    # function's lack of a forward-mode rule, or vectors of too many arrays, or inputs left
    # out, or a result no .npy carries, or none
    extensions = set(body) - {"type", "title", "status", "detail", "code", "request_id"}
    assert extensions in (set(), {"field", "path", "expected_shape", "got_shape"}, {"unsupported"},
                          {"field", "limit"}, {"missing", "inputs"}, {"not_one_array", "reason"}), body
    assert len(body) == 6 + len(extensions), body
    assert body["status"] == status and body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


ROOT = Path(__file__).resolve().parents[1]
# For servers the tests spawn: this checkout first, then whatever PYTHONPATH the test run
# had (a scratch worktree run with PYTHONPATH=<wt>/service:... then serves its own code,
# not the editable install's).
CHILD_PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(*, wrapper: Sequence[str] = (), **settings: Any) -> Iterator[tuple[str, subprocess.Popen]]:
    """``jacobian-service serve`` in a subprocess on a loopback port, ready when yielded
    (run by ``wrapper``, a command that execs its arguments, when given)."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": CHILD_PYTHONPATH,
        "JACOBIAN_SERVICE_FUNCTIONS": "jacobian_service.examples,tests.user_functions",
        **{f"JACOBIAN_SERVICE_{k.upper()}": str(v) for k, v in settings.items()},
    }
    # The log goes to a file, not a pipe: nobody reads a pipe while the test runs, and a
    # full pipe would block the server's logging mid-test.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [*wrapper, sys.executable, "-m", "jacobian_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.read_log = lambda: _read(log)  # type: ignore[attr-defined]
    url = f"http://127.0.0.1:{port}"
    # Ready once THIS serve has said it listens on the port, then /readyz says 200: the
    # port, free when picked, may have been taken meanwhile by another test's server
    # (xdist workers pick at once), whose 200 was taken for this one's, its 404s for the
    # functions of this one (this serve failing to bind, later).
    bound = f" functions on {url} with "
    try:
        starting = _Starting(proc.pid)
        while True:
            try:
                if bound in _read(log, still_s=0.0) and httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or starting.stuck():
                raise RuntimeError(f"the server did not become ready ({starting}):\n{_read(log)}")
            time.sleep(0.05)  # each start waits for this poll: ~60 starts in the suite
        try:
            yield url, proc
        except BaseException:
            print(_read(log)[-20000:])  # the server's side of a failed test, shown by pytest
            raise
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        log.close()


class _Starting:
    """A server on its way to ready, given up on once its processes have used no CPU for
    ``STILL_S`` (stuck), or after ``MOST_S`` in all. Not a fixed 120 s of wall time: on a
    loaded machine a start that was progressing (the zygote's torch import alone took
    100 s at a load of 20) was failed just as it said it was ready."""

    STILL_S, MOST_S = 60.0, 600.0

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.began = self.moved = time.monotonic()
        self.cpu = 0.0

    def stuck(self) -> bool:
        now = time.monotonic()
        cpu = sum(c for p in (self.pid, *descendants(self.pid)) if (c := cpu_seconds(p)) is not None)
        if cpu > self.cpu:
            self.cpu, self.moved = cpu, now
        return now - self.moved > self.STILL_S or now - self.began > self.MOST_S

    def __str__(self) -> str:
        now = time.monotonic()
        return f"{now - self.began:.0f} s, {self.cpu:.1f} s of CPU, the last {now - self.moved:.0f} s ago"


class Served:
    """A shared server as one test sees it: its log from the test's start on (from the
    server's own start, for the test it was started for)."""

    def __init__(self, url: str, proc: subprocess.Popen, pidfile: Path, fresh: bool) -> None:
        self.url, self.proc, self.pidfile = url, proc, pidfile
        self._mark = 0 if fresh else len(proc.read_log())  # type: ignore[attr-defined]

    def log(self) -> str:
        return self.proc.read_log()[self._mark:]  # type: ignore[attr-defined]


class SharedServer:
    """One ``live_server`` for a group of tests (a class: ``pytest.fixture(scope="class")``),
    each of which would otherwise start its own: a start (torch imported and warmed up in
    the engine, then again in its spare) costs more than most of these tests.

    Each test gets it as a fresh one would be once its spare is warm: up, with a warm
    spare (``ENGINE_STANDBY``), nothing quarantined (strikes below the threshold stay:
    a group's tests crash different functions, or set ``QUARANTINE_AFTER`` out of reach),
    and ``pidfile`` (its ``$FAULT_FORK_PIDFILE``) removed. Counts (restarts) carry over:
    tests assert on their change. A server that a test left down or stuck is replaced, so
    that one failure does not fail the rest of the group."""

    def __init__(self, tmp: Path, **settings: Any) -> None:
        self.settings = settings
        self.standby = str(settings.get("ENGINE_STANDBY", "true")).lower() != "false"
        self.pidfile = tmp / "child.pid"
        self._stack = contextlib.ExitStack()
        self._proc: subprocess.Popen | None = None
        self._url = ""
        self._quarantines = 0.0  # the server's count of quarantines when last released

    def serve(self, spare: bool = True) -> Served:
        """The server, settled for the next test (``spare=False``: without waiting for a
        spare that is still warming up, for a test that neither needs one nor minds one
        starting beside it)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                return self._settled(spare, fresh=False)
            except (AssertionError, httpx.HTTPError) as exc:
                print(f"shared server replaced: {exc}\n{self._proc.read_log()[-5000:]}")  # type: ignore[attr-defined]
        self.close()
        with pytest.MonkeyPatch.context() as mp:  # only while it starts: the server keeps its environment
            mp.setenv("FAULT_FORK_PIDFILE", str(self.pidfile))
            self._url, self._proc = self._stack.enter_context(live_server(**self.settings))
        return self._settled(spare, fresh=True)

    def _settled(self, spare: bool, fresh: bool) -> Served:
        url, deadline = self._url, time.monotonic() + 60
        while True:  # (a test may leave just after a restart: a new spare warms up)
            info = httpx.get(f"{url}/v1/info", timeout=5).json()
            up = httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            if up and (not spare or info["spares"] == [self.standby] * len(info["spares"])):
                break
            assert time.monotonic() < deadline, f"not ready with a warm spare within 60 s: {info}"
            time.sleep(0.1)
        released: list[str] = []
        quarantines = _metric(url, "jacobian_service_quarantines")
        if quarantines > self._quarantines:  # some since the last look: find and release them
            released = [f["name"] for f in httpx.get(f"{url}/v1/functions", timeout=5).json()
                        if httpx.delete(f"{url}/v1/functions/{f['name']}/quarantine", timeout=5).json()["released"]]
            self._quarantines = quarantines
        while released:  # until the supervisor's word reaches the front ends
            assert time.monotonic() < deadline, f"still quarantined: {released}"
            time.sleep(0.05)
            released = [n for n in released
                        if httpx.delete(f"{url}/v1/functions/{n}/quarantine", timeout=5).json()["released"]]
        self.pidfile.unlink(missing_ok=True)
        return Served(url, self._proc, self.pidfile, fresh)  # type: ignore[arg-type]

    def close(self) -> None:
        self._stack.close()
        self._proc = None
        self._quarantines = 0.0


def _metric(url: str, name: str) -> float:
    """A metric without labels, as ``/metrics`` has it."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"{name} ")), 0.0)


@pytest.fixture(scope="class")
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedServer]:
    """The class's ``SharedServer``, with the settings in its ``SERVER`` attribute; it
    stops when the class's last test is done."""
    server = SharedServer(tmp_path_factory.mktemp("shared"), **request.cls.SERVER)
    yield server
    server.close()


@pytest.fixture
def served(shared_server: SharedServer) -> Served:
    """The class's shared server, settled for this test (``SharedServer``)."""
    return shared_server.serve()


@pytest.fixture
def served_up(shared_server: SharedServer) -> Served:
    """``served``, without waiting for a spare still warming up (``SharedServer.serve``)."""
    return shared_server.serve(spare=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Any:
    """A failed test on a shared server (a ``served`` fixture) shows that server's side
    of it, as ``live_server`` does for a test that owns its server."""
    report = yield
    if report.when == "call" and report.failed:
        for served in getattr(item, "funcargs", {}).values():
            if isinstance(served, Served):
                report.sections.append(("server log (this test's part)", served.log()[-20000:]))
    return report



@pytest.fixture(autouse=True)
def _inputs_of_its_own(request: pytest.FixtureRequest) -> None:
    """A test's draws from a module's ``RNG`` (its own, or one borrowed from another round
    it imports) come from a generator seeded by the test's id. Drawn from one shared
    generator, a test's inputs depended on which tests ran before it in its worker
    (xdist deals them out anew each run): a float32 Hessian refused on one sample (a kink
    within the finite-difference step) failed in one run and not the next, and not
    alone. Now a failure comes back on every run, and when the test runs alone."""
    seed = zlib.crc32(request.node.nodeid.encode())
    module = request.module
    for holder in (module, *(v for v in vars(module).values() if isinstance(v, types.ModuleType))):
        if isinstance(getattr(holder, "RNG", None), np.random.Generator):
            holder.RNG = np.random.default_rng(seed)

# The service's settings in the environment as the session began (an operator's, such as
# DEVICE on a GPU host); a module's own (ready_app_with, make_client) hold for its app only.
_SESSION_SETTINGS = {k: v for k, v in os.environ.items() if k.startswith("JACOBIAN_SERVICE_")}


@pytest.fixture(scope="session")
def remote_server() -> Iterator[str]:
    """One ``jacobian-service serve`` (supervisor, front ends, engine process) for every
    adapter test module in the session: test_remote_torch/jax/scipy use it through
    tests/_remote_support.py, which holds its settings. Started under the session's
    environment: first asked for by a module whose app had set its own settings (a 1 MiB
    result limit), it inherited them, for every later module of that worker."""
    from ._remote_support import SERVER_SETTINGS

    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as mp:  # only while it starts: the server keeps its environment
            for key in [k for k in os.environ if k.startswith("JACOBIAN_SERVICE_")]:
                mp.delenv(key)
            for key, value in _SESSION_SETTINGS.items():
                mp.setenv(key, value)
            url, _ = stack.enter_context(live_server(**SERVER_SETTINGS))
        yield url


def _read(log: Any, still_s: float = 0.1, within_s: float = 1.0) -> str:
    """Serve's log so far, once it has not grown for ``still_s`` (at most ``within_s``):
    what an engine logs reaches it through serve's output relay (``output_relay``), a
    moment after the engine wrote it, and the settings pass that names a function runs
    after its answer is sent. Read at an offset (``pread``), not by seek and read: serve
    writes through the same open file, whose offset a seek moved."""
    fd = log.fileno()
    size = os.fstat(fd).st_size
    still = start = time.monotonic()
    while (now := time.monotonic()) - still < still_s and now - start < within_s:
        time.sleep(0.02)
        if (grown := os.fstat(fd).st_size) != size:
            size, still = grown, time.monotonic()
    return os.pread(fd, size, 0).decode(errors="replace")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Files longest first (``_longest_first``); ``gpu`` tests run only where CUDA is
    (they are the same checks, on the device)."""
    _longest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _longest_first(items: list[Any]) -> None:
    """Test files in order of their measured seconds (``file_seconds.json``, written by
    ``scripts/file_seconds.py``), longest first; a file's own tests keep their order.

    xdist (``--dist loadfile``, with ``--no-loadscope-reorder``) hands whole files to its
    workers in this order. Its own order, files with the most tests first, left files
    of few tests and several server starts to the end, where one ran alone on one core
    while the other workers had nothing left. Longest first, the end is short files."""
    path = ROOT / "tests" / "file_seconds.json"
    seconds: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
    if not seconds:
        return
    median = sorted(seconds.values())[len(seconds) // 2]  # (a new file: a median one)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.path, i)

    def key(item: Any) -> tuple[float, int]:
        name = item.path.relative_to(ROOT).as_posix() if item.path.is_relative_to(ROOT) else str(item.path)
        return -seconds.get(name, median), first[item.path]

    items.sort(key=key)
