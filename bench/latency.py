"""Latency of one small ``mlp`` Jacobian (input 128 float32, Jacobian 64x128).

Side by side, interleaved call by call (then again one variant at a time): in-process ``torch.func.jacrev`` (the compute
floor), the bare Starlette endpoint answering the same bytes (the HTTP floor), and the
service over JSON and over ``.npy`` with a keep-alive ``httpx.Client`` and with the SDK
``Client``. Target (issue 4): service / (HTTP floor + in-process jacrev) <= 1.25.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import torch

from ._common import Context, Report, Target, in_blocks, interleaved, median, mlp_case, ms, service_device
from ._server import JSON_HEADERS, NPY_HEADERS, json_jacobian_bytes, json_request, npy_bytes

TITLE = "latency: one small mlp Jacobian (128 -> 64, float32), 1 client"
PATH = "/v1/functions/mlp/jacobian"
_WARM = ("in-process jacrev", "HTTP floor, JSON", "HTTP floor, .npy", "service, JSON (httpx)", "service, .npy (httpx)")


def run(ctx: Context) -> Report:
    from jacobian_client import Client
    from jacobian_service.examples import mlp

    report = Report(TITLE)
    report.add(f"## {TITLE}\n")
    rounds = ctx.opt("rounds", 15, 2)
    per_round = ctx.opt("per_round", 20, 3)

    x, J = mlp_case()
    device = service_device()  # the reference computes where the service does
    xt = torch.from_numpy(x).to(device)
    jacrev = torch.func.jacrev(mlp)

    floor = ctx.pool.floor({"mlp": {"application/json": json_jacobian_bytes("mlp", J), "application/x-npy": npy_bytes(J)}})
    service = ctx.pool.service(ctx.service_env)
    # The service as shipped (torch's default thread count), when the run pins threads.
    default = ctx.pool.service({}, "default threads") if ctx.service_env and not ctx.quick else None
    json_body, npy_body = json_request(x), npy_bytes(x)

    with httpx.Client(base_url=floor.url, timeout=60) as fc, httpx.Client(base_url=service.url, timeout=60) as sc, \
            Client(service.url, timeout=60) as sdk, Client(service.url, timeout=60, transport="json") as sdk_json, \
            httpx.Client(base_url=(default or service).url, timeout=60) as dc:

        def post(client: httpx.Client, body: bytes, headers: dict[str, str]) -> bytes:
            r = client.post(PATH, content=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"{client.base_url}: {r.status_code} {r.text[:200]}")
            return r.content

        # Correctness first: every path must give jacrev's answer.
        got_json = np.asarray(sc.post(PATH, content=json_body, headers=JSON_HEADERS).json()["jacobian"]["data"], np.float32)
        got_npy = np.load(io.BytesIO(post(sc, npy_body, NPY_HEADERS)))
        for label, got in (("json", got_json), ("npy", got_npy), ("sdk", sdk.jacobian("mlp", x)),
                           ("sdk json", sdk_json.jacobian("mlp", x))):
            if got.shape != J.shape or not np.allclose(got, J, rtol=1e-5, atol=1e-6):
                report.fail(f"service {label} answer differs from in-process jacrev")

        variants = {
            "in-process jacrev": lambda: jacrev(xt).cpu(),  # on the host, as the service answers
            "HTTP floor, JSON": lambda: post(fc, json_body, JSON_HEADERS),
            "HTTP floor, .npy": lambda: post(fc, npy_body, NPY_HEADERS),
            "service, JSON (httpx)": lambda: post(sc, json_body, JSON_HEADERS),
            "service, .npy (httpx)": lambda: post(sc, npy_body, NPY_HEADERS),
            "service, .npy (SDK Client)": lambda: sdk.jacobian("mlp", x),
            "service, JSON (SDK Client)": lambda: sdk_json.jacobian("mlp", x),
        }
        if default is not None:
            variants["service, .npy, server's default torch threads"] = lambda: post(dc, npy_body, NPY_HEADERS)
        samples = interleaved(variants, rounds, per_round)
        # The same, one variant at a time: a client calling in a loop (every process warm).
        warm = in_blocks({k: variants[k] for k in _WARM}, rounds, per_round)
        # Where the service's time goes, from its own meta (untimed calls).
        metas = [sc.post(PATH, content=json_body, headers=JSON_HEADERS).json()["meta"] for _ in range(max(5, per_round))]

    med = {k: median(v) for k, v in samples.items()}
    jac = med["in-process jacrev"]
    floors = {"JSON": med["HTTP floor, JSON"] + jac, ".npy": med["HTTP floor, .npy"] + jac}
    rows = []
    for name, v in samples.items():
        fmt = "JSON" if "JSON" in name else ".npy"
        ratio = med[name] / floors[fmt] if name.startswith("service") else float("nan")
        p90 = float(np.percentile(v, 90))
        rows.append([name, ms(med[name]), ms(p90), len(v), "-" if ratio != ratio else f"{ratio:.2f}"])
    report.add(f"{rounds} rounds x {per_round} calls per variant, interleaved; times in ms; in-process jacrev "
               f"on {device}, its result on the host.\n")
    report.table(["variant", "median ms", "p90 ms", "calls", "/ (floor + jacrev)"], rows)
    report.add(f"floor + jacrev: JSON {ms(floors['JSON']):.3f} ms, .npy {ms(floors['.npy']):.3f} ms; "
               f"service overhead over the HTTP floor: JSON {ms(med['service, JSON (httpx)'] - floors['JSON']):.3f} ms, "
               f".npy {ms(med['service, .npy (httpx)'] - floors['.npy']):.3f} ms\n")
    report.add(f"service meta (JSON, median): queue {median([m['queue_ms'] for m in metas]):.3f} ms, "
               f"compute {median([m['compute_ms'] for m in metas]):.3f} ms; torch threads: bench "
               f"{torch.get_num_threads()}, service {ctx.service_env.get('JACOBIAN_SERVICE_TORCH_THREADS', 'default')}\n")
    report.target(Target("latency .npy: service / (HTTP floor + jacrev)", med["service, .npy (httpx)"] / floors[".npy"], 1.25, "<="))
    report.target(Target("latency JSON: service / (HTTP floor + jacrev)", med["service, JSON (httpx)"] / floors["JSON"], 1.25, "<="))

    wmed = {k: median(v) for k, v in warm.items()}
    wfloors = {f: wmed[f"HTTP floor, {f}"] + wmed["in-process jacrev"] for f in ("JSON", ".npy")}
    report.add(f"\nOne variant at a time ({rounds} rounds of {per_round} calls each, after 3 untimed; a client "
               "calling in a loop):\n")
    report.table(["variant", "median ms", "p90 ms", "/ (floor + jacrev)"],
                 [[k, ms(wmed[k]), ms(float(np.percentile(warm[k], 90))),
                   f"{wmed[k] / wfloors['JSON' if 'JSON' in k else '.npy']:.2f}" if k.startswith("service") else "-"]
                  for k in _WARM])
    for fmt in (".npy", "JSON"):
        report.target(Target(f"latency {fmt}, one variant at a time: service / (HTTP floor + jacrev)",
                             wmed[f"service, {fmt} (httpx)"] / wfloors[fmt], 1.25, "<="))
    report.add()
    return report
