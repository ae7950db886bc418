"""Red team, round forty-three: hostile clients against a real server's memory (what a
client that leaves mid-answer leaves behind in a front end).

Each case names what a user saw before. One real server for the file (one front end, no
spare, no warm-up), whose stream threshold of 64 KiB streams a small Jacobian; its
engine's results of 4 MiB and more come to the front end in sealed memfds, mapped there
(``channel.SealedFrames``), so what a front end still holds of them is counted from its
``/proc/PID/maps``.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from .conftest import _metric, live_server


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    with live_server(WORKERS=1, STREAM_THRESHOLD_BYTES=64 << 10, ENGINE_STANDBY="false", WARMUP="false") as served:
        yield served


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # (gone meanwhile)
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _mapped_results(proc: subprocess.Popen) -> int:
    """The engines' result memfds mapped in serve's processes (the front end maps each
    as it sends it; the engine writes them unmapped)."""
    count = 0
    for pid in {proc.pid, *_descendants(proc.pid)}:
        try:
            count += Path(f"/proc/{pid}/maps").read_text().count("memfd:jacobian-result")
        except OSError:
            continue
    return count


def _settled(proc: subprocess.Popen, url: str) -> int:
    """What stays mapped once the answers left are over (their room given back)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _mapped_results(proc) == 0 and _metric(url, "jacobian_service_stream_bytes_held") == 0:
            break
        time.sleep(0.1)
    return _mapped_results(proc)


def _leave_after(url: str, path: str, body: bytes, accept: str, nbytes: int = 100_000) -> bytes:
    """POST ``body`` as .npy, read the first ``nbytes`` of the answer, and leave."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-npy\r\nAccept: {accept}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while len(got) < nbytes:
            piece = s.recv(min(1 << 16, nbytes - len(got)))
            if not piece:
                break
            got += piece
    return got


def test_a_large_json_answer_left_mid_body_is_not_kept_by_the_front_end(server: tuple[str, subprocess.Popen]) -> None:
    """A gathered JSON answer of 1 MiB or more (a Hessian, which never streams) is written
    piece by piece as it is sent; a client that left after its first 100 kB had Starlette
    cancel the sending task, and anyio kept that cancellation in a reference cycle whose
    frames held the whole answer (mapped from the engine's memfd) until the front end's
    collector ran, rarely. The stream budget had its room back at once. Measured: 50
    clients that each left a 5.3 MB softmax Hessian (n = 110) grew two idle front ends
    from 64 MB to 491 and 605 MB (50 results still mapped, ``stream_bytes_held`` 0); 100
    of 13.5 MB, one to 1.44 GB, with a stream budget of 512 MiB. Now they go with the
    request, and the answer whole is still torch's."""
    url, proc = server
    x = np.linspace(-1, 1, 110, dtype=np.float32)
    for _ in range(3):
        head = _leave_after(url, "/v1/functions/softmax/hessian", _npy(x), "application/json")
        assert head.startswith(b"HTTP/1.1 200 ")
    assert _settled(proc, url) == 0  # (before: 3, ~16 MB)
    r = httpx.post(f"{url}/v1/functions/softmax/hessian", json={"inputs": [x.tolist()]}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    got = np.array(r.json()["hessian"]["data"], dtype=np.float32)
    want = torch.func.hessian(lambda t: torch.softmax(t, -1))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert _settled(proc, url) == 0


def test_a_streamed_jacobian_left_mid_stream_is_not_kept_by_the_front_end(
        server: tuple[str, subprocess.Popen]) -> None:
    """The same for a streamed Jacobian, .npy or JSON: the row chunk last sent (Starlette's
    ``chunk``, the stream's ``arr``) stayed mapped in the cancellation's cycle. Measured:
    6 clients each leaving a 2000-input softmax in chunks of 600 rows (4.8 MB each) left
    3 chunks mapped (.npy), 6 more left 4 (JSON), in an idle front end."""
    url, proc = server
    x = np.linspace(-1, 1, 2000, dtype=np.float32)
    path = "/v1/functions/softmax/jacobian?chunk_size=600"
    for accept in ("application/x-npy", "application/json") * 3:
        assert _leave_after(url, path, _npy(x), accept).startswith(b"HTTP/1.1 200 ")
    assert _settled(proc, url) == 0  # (before: 3 to 7, of 4.8 MB each)
    r = httpx.post(f"{url}{path}", content=_npy(x), timeout=60,
                   headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert r.status_code == 200, r.text[:300]
    want = torch.func.jacrev(lambda t: torch.softmax(t, -1))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(io.BytesIO(r.content)), want, rtol=1e-5, atol=1e-8)
    assert _settled(proc, url) == 0


def _peak_mb() -> int:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) // 1024


def test_a_batch_of_hessians_keeps_to_the_memory_budget() -> None:
    """Per-example Hessians (``batched=true``, or single ones batched across requests)
    run reverse over reverse under vmap, whose outer pullback took an identity of
    (outputs x inputs)^2 entries per example at once, past any memory budget: one
    ``batched=true`` Hessian of 32 examples of ``sin`` on 63 inputs (8 KB in, a 32 MB
    answer) held its engine at 6.1 GB (peak RSS, from 0.3 GB) for 14 s, its budget
    256 MiB; 400 clients' single ones of that size, batched, took it to 4.9 GB and kept
    another client's 10 ms request waiting 26 s. Now that pullback goes in row chunks
    that fit the budget (6.1 GB -> 0.48 GB). Here (engines on threads of this process)
    a budget of 2 MiB and 2 examples of 40 inputs: the peak grew 51 MB, now 1-2, and
    the answer is still torch's, example by example."""
    from .conftest import ready_app_with

    x = np.random.default_rng(43).uniform(-2, 2, (2, 40)).astype(np.float32)
    with ready_app_with("jacobian_service.examples", memory_budget_bytes=2 << 20) as client:
        warm = client.post("/v1/functions/sin/hessian?batched=true", json={"inputs": [x[:, :4].tolist()]})
        assert warm.status_code == 200, warm.text[:300]  # (torch's first vmap calls, out of the measure)
        Path("/proc/self/clear_refs").write_text("5")  # (the peak RSS from now)
        before = _peak_mb()
        r = client.post("/v1/functions/sin/hessian?batched=true", json={"inputs": [x.tolist()]})
        grown = _peak_mb() - before
    assert r.status_code == 200, r.text[:300]
    got = np.array(r.json()["hessian"]["data"], dtype=np.float32)
    want = np.stack([torch.func.hessian(torch.sin)(torch.from_numpy(e)).numpy() for e in x])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert grown < 12, grown  # (before: 51 MB, the outer pullback's 2 x 1600^2 basis and its products; now 1-2)
