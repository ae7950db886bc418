"""A large dense Jacobian: ``softmax`` at n = 1000 (1000 x 1000 float32, 4 MB) over
``.npy`` (raw httpx and the SDK ``Client``), against in-process ``torch.func.jacrev``
and a bare endpoint answering the same 4 MB (``bench/_floor.py``), interleaved call by
call. Targets: service / in-process <= 1.5 (issue 4); service / (bare endpoint +
in-process jacrev) <= 1.25 (issue 9: what the service adds besides moving the bytes).
The same server with ``SHARED_MEMORY_BYTES=0`` (results through the engine's socket)
runs beside it, for what the shared-memory segment buys."""

from __future__ import annotations

import io

import httpx
import numpy as np
import torch

from ._common import Context, Report, Target, interleaved, median, ms, service_device
from ._server import NPY_HEADERS, npy_bytes

PATH = "/v1/functions/softmax/jacobian"


def on_socket_env(ctx: Context) -> dict[str, str]:
    """The second server's: results through the engine's socket."""
    return {**ctx.side_env, "JACOBIAN_SERVICE_SHARED_MEMORY_BYTES": "0"}


def run(ctx: Context) -> Report:
    from jacobian_client import Client

    n = ctx.opt("big_n", 1000, 200)
    title = f"big: softmax Jacobian {n} x {n} float32 over .npy"
    report = Report(title)
    report.add(f"## {title}\n")
    rounds = ctx.opt("rounds", 10, 1)
    per_round = 3 if not ctx.quick else 2

    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    device = service_device()  # the reference computes where the service does
    xt = torch.from_numpy(x).to(device)
    softmax = lambda v: torch.softmax(v, dim=-1)  # noqa: E731  (what the built-in computes)
    jacrev = torch.func.jacrev(softmax)
    J = jacrev(xt).cpu().numpy()
    service = ctx.pool.service(ctx.service_env)
    # The same server with results on the socket: what the shared-memory segment buys.
    # --quick only checks that this runs: one server plays both parts (no second start-up).
    on_socket = ctx.pool.service(on_socket_env(ctx)) if not ctx.quick else service
    floor_server = ctx.pool.floor({"softmax": {"application/x-npy": npy_bytes(J)}})
    body = npy_bytes(x)
    with httpx.Client(base_url=service.url, timeout=120) as sc, Client(service.url, timeout=120) as sdk, \
            httpx.Client(base_url=floor_server.url, timeout=120) as fc, \
            httpx.Client(base_url=on_socket.url, timeout=120) as oc:
        def bare() -> bytes:
            r = fc.post(PATH, content=body, headers=NPY_HEADERS)
            if r.status_code != 200 or len(r.content) != len(npy_bytes(J)):
                raise RuntimeError(f"floor: {r.status_code}")
            return r.content

        def post(client: httpx.Client = sc) -> bytes:
            r = client.post(PATH, content=body, headers=NPY_HEADERS)
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code} {r.text[:200]}")
            return r.content

        for label, got in (("httpx", np.load(io.BytesIO(post()))), ("sdk", sdk.jacobian("softmax", x)),
                           ("socket", np.load(io.BytesIO(post(oc))))):
            if got.shape != J.shape or not np.allclose(got, J, rtol=1e-4, atol=1e-6):
                report.fail(f"service ({label}) answer differs from in-process jacrev")
        samples = interleaved({
            "in-process jacrev": lambda: jacrev(xt).cpu(),  # on the host, as the service answers
            "in-process jacrev + .npy bytes": lambda: npy_bytes(jacrev(xt).cpu().numpy()),
            "bare endpoint, same 4 MB (.npy)": bare,
            "service .npy (httpx, bytes)": post,
            "service .npy (httpx, np.load)": lambda: np.load(io.BytesIO(post())),
            "service .npy (SDK Client)": lambda: sdk.jacobian("softmax", x),
            "service .npy, results on the socket": lambda: post(oc),
        }, rounds, per_round, warmup=2)
    med = {k: median(v) for k, v in samples.items()}
    floor = med["in-process jacrev"]
    report.add(f"{rounds} rounds x {per_round} calls per variant, interleaved; Jacobian {J.nbytes / 2**20:.1f} MiB; "
               f"in-process jacrev on {device}, its result on the host.\n")
    report.table(["variant", "median ms", "/ in-process jacrev"],
                 [[k, ms(v), f"{v / floor:.2f}"] for k, v in med.items()])
    report.target(Target(f"big ({n}x{n} softmax): service .npy / in-process jacrev", med["service .npy (httpx, bytes)"] / floor, 1.5, "<="))
    both = med["bare endpoint, same 4 MB (.npy)"] + floor
    report.add(f"bare endpoint + in-process jacrev: {ms(both):.2f} ms\n")
    report.target(Target(f"big ({n}x{n} softmax): service .npy / (bare endpoint + jacrev)",
                         med["service .npy (httpx, bytes)"] / both, 1.25, "<="))
    report.add(f"shared memory / socket for the result (SHARED_MEMORY_BYTES default / 0): "
               f"{med['service .npy (httpx, bytes)'] / med['service .npy, results on the socket']:.2f}x\n")
    report.add()
    return report
