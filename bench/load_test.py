"""Load test (issue 5): many clients for a fixed time, mixed valid and invalid requests.

64 asyncio clients (``httpx.AsyncClient``) for 60 s (``--quick``: 16 for 1 s) against
one service subprocess. Each request is drawn from:

* valid requests of several functions, shapes, options and wire formats, each compared
  with its in-process ``torch.func`` result;
* invalid ones (malformed JSON, a bad shape, an unknown function, a bad ``.npy``, an
  unsupported media type, hvp of a non-scalar function or with tangents of the wrong
  shape or dtype), which must get their exact status and problem ``code``;
* valid ones with a short deadline (``X-Request-Timeout: 0.05``): a correct 200 or 504
  ``timeout``;
* valid ones the client abandons mid-flight (the task is cancelled after 0-20 ms).

Half-way through, one request to ``crashes`` (``bench/functions.py``) kills the engine
process: that request must get 500 ``function_error``; the requests the dead engine
held, and those arriving before it is back, get 503 + ``Retry-After``, which the
clients retry as the SDK does (each retry is counted), so every request still ends
with its correct answer.

Counts: sent, answered, correct, wrong (a wrong value, status or code), lost (no answer
and not cancelled by us), server errors (5xx other than an expected 504 or the crash's
500), retries after 503, plus the RSS of all the server's processes after warm-up and
at the end. Goals: 0 lost, 0 wrong, 0 server errors, RSS
growth under 10 %; missing one fails the run.
"""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import httpx
import numpy as np
import torch

from ._common import Context, Report, Target
from ._server import JSON_HEADERS, NPY_HEADERS, Server, json_request, loopback_client, npy_bytes, process_label, status_kib


def _alive(pid: int) -> bool:
    try:
        status_kib(pid, "VmRSS")
        return True
    except (OSError, KeyError):
        return False


def _restarts(server: Server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("jacobian_service_engine_restarts"))

TITLE = "load_test: mixed valid and invalid requests under many clients"


@dataclass
class Case:
    kind: str  # valid | invalid | deadline | disconnect
    label: str
    path: str
    body: bytes
    headers: dict[str, str]
    expect_status: int = 200
    expect_code: str = ""
    check: Callable[[httpx.Response], bool] | None = None


def _leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, (list, tuple)):
        return [leaf for t in tree for leaf in _leaves(t)]
    if isinstance(tree, dict):
        return [leaf for k in sorted(tree) for leaf in _leaves(tree[k])]
    return [np.asarray(tree)]


def _same(got: Any, want: Any) -> bool:
    a, b = _leaves(got), _leaves(want)
    return len(a) == len(b) and all(
        x.shape == y.shape and np.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b)
    )


def _json_check(key: str, want: Any, aux: Any = None, output: Any = None) -> Callable[[httpx.Response], bool]:
    from jacobian_client import wire

    def check(r: httpx.Response) -> bool:
        doc = r.json()
        ok = _same(wire.decode_tree(doc[key]), want)
        if aux is not None:
            ok = ok and _same(wire.decode_tree(doc["aux"]), aux)
        if output is not None:  # return_output
            ok = ok and _same(wire.decode_tree(doc["output"]), output)
        return ok

    return check


def _npy_check(want: np.ndarray) -> Callable[[httpx.Response], bool]:
    return lambda r: _same(np.load(io.BytesIO(r.content), allow_pickle=False), want)


NPZ_IN_NPY_OUT = {"content-type": "application/x-npz", "accept": "application/x-npy"}


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def build_cases(rng: np.random.Generator, per_kind: int) -> dict[str, list[Case]]:
    from jacobian_client import wire
    from jacobian_service import examples as ex

    f = torch.func
    t = torch.from_numpy
    valid: list[Case] = []
    for _ in range(per_kind):
        x = rng.standard_normal(128).astype(np.float32)
        J = f.jacrev(ex.mlp)(t(x)).numpy()
        valid.append(Case("valid", "mlp json", "/v1/functions/mlp/jacobian", json_request(x), JSON_HEADERS,
                          check=_json_check("jacobian", J)))
        valid.append(Case("valid", "mlp npy", "/v1/functions/mlp/jacobian", npy_bytes(x), NPY_HEADERS, check=_npy_check(J)))
        n = int(rng.integers(1, 64))
        s = rng.standard_normal(n).astype(np.float32)
        valid.append(Case("valid", "sin json", "/v1/functions/sin/jacobian", json_request(s), JSON_HEADERS,
                          check=_json_check("jacobian", f.jacrev(ex.sin)(t(s)).numpy())))
        valid.append(Case("valid", "sin_aux json", "/v1/functions/sin_aux/jacobian", json_request(s), JSON_HEADERS,
                          check=_json_check("jacobian", f.jacrev(ex.sin_aux, has_aux=True)(t(s))[0].numpy(), np.sin(s))))
        sm = rng.standard_normal(200).astype(np.float32)
        valid.append(Case("valid", "softmax npy", "/v1/functions/softmax/jacobian", npy_bytes(sm), NPY_HEADERS,
                          check=_npy_check(f.jacrev(ex.softmax)(t(sm)).numpy())))
        a, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
        Ja, Jb = f.jacrev(ex.add_square, argnums=(0, 1))(t(a), t(b))
        valid.append(Case("valid", "add_square argnums json", "/v1/functions/add_square/jacobian",
                          json_request(a, b, argnums=[0, 1]), JSON_HEADERS, check=_json_check("jacobian", (Ja.numpy(), Jb.numpy()))))
        r_, th = rng.random(6).astype(np.float32), rng.random(6).astype(np.float32)
        valid.append(Case("valid", "polar json", "/v1/functions/polar/jacobian", json_request(r_, th), JSON_HEADERS,
                          check=_json_check("jacobian", tuple(j.numpy() for j in f.jacrev(ex.polar)(t(r_), t(th))))))
        h = rng.standard_normal(10).astype(np.float32)
        valid.append(Case("valid", "sum_sin hessian json", "/v1/functions/sum_sin/hessian", json_request(h), JSON_HEADERS,
                          check=_json_check("hessian", f.hessian(ex.sum_sin)(t(h)).numpy())))
        hv = rng.standard_normal((3, 10)).astype(np.float32)
        hvp_ref = f.vmap(lambda v: f.jvp(f.grad(ex.sum_sin), (t(h),), (v,))[1])(t(hv)).numpy()
        valid.append(Case("valid", "sum_sin hvp json", "/v1/functions/sum_sin/hvp",
                          json_request(h, tangents=hv.tolist(), batched_vectors=True), JSON_HEADERS,
                          check=_json_check("hvp", hvp_ref)))
        # hvp, forward over reverse as torch.func composes it: one tangent (with the value,
        # as scipy's hessp-and-fun callers ask), and an .npz body answered as .npy
        rz = rng.standard_normal(6).astype(np.float32)
        rv = rng.standard_normal(6).astype(np.float32)
        rosen_hvp = f.jvp(f.grad(ex.rosenbrock), (t(rz),), (t(rv),))[1].numpy()
        valid.append(Case("valid", "rosenbrock hvp return_output json", "/v1/functions/rosenbrock/hvp",
                          json_request(rz, tangents=wire.encode_tree(rv), return_output=True), JSON_HEADERS,
                          check=_json_check("hvp", rosen_hvp, output=ex.rosenbrock(t(rz)).numpy())))
        valid.append(Case("valid", "rosenbrock hvp npz", "/v1/functions/rosenbrock/hvp", npz_bytes(x=rz, tangents=rv),
                          NPZ_IN_NPY_OUT, check=_npy_check(rosen_hvp)))
        xb = rng.standard_normal((4, 128)).astype(np.float32)
        valid.append(Case("valid", "mlp batched json", "/v1/functions/mlp/jacobian", json_request(xb, batched=True),
                          JSON_HEADERS, check=_json_check("jacobian", f.vmap(f.jacrev(ex.mlp))(t(xb)).numpy())))
        lz = rng.standard_normal(40).astype(np.float32)
        valid.append(Case("valid", "lorenz96 npy", "/v1/functions/lorenz96/jacobian", npy_bytes(lz), NPY_HEADERS,
                          check=_npy_check(f.jacrev(ex.lorenz96)(t(lz)).numpy())))

    bad_npy = b"\x93NUMPY\x01\x00" + b"\x10\x00{'descr': '<f4', 'fortran_order': False, 'shape': (128,), }"[:40]
    invalid = [
        Case("invalid", "malformed json", "/v1/functions/mlp/jacobian", b'{"inputs": [[1, 2', JSON_HEADERS, 400, "malformed_body"),
        Case("invalid", "bad shape", "/v1/functions/mlp/jacobian", json_request(np.zeros(127, np.float32)), JSON_HEADERS,
             422, "invalid_input"),
        Case("invalid", "unknown function", "/v1/functions/no_such_function/jacobian", json_request(np.zeros(3, np.float32)),
             JSON_HEADERS, 404, "function_not_found"),
        Case("invalid", "bad npy", "/v1/functions/sin/jacobian", bad_npy, NPY_HEADERS, 400, "malformed_body"),
        Case("invalid", "unsupported media type", "/v1/functions/sin/jacobian", b"1,2,3",
             {"content-type": "text/csv", "accept": "application/json"}, 415, "unsupported_media_type"),
        Case("invalid", "hvp of a non-scalar function", "/v1/functions/planar_arm/hvp",
             json_request(np.zeros(3, np.float32), tangents=[1.0, 0.0, 0.0]), JSON_HEADERS, 422, "invalid_input"),
        Case("invalid", "hvp tangents of the wrong shape", "/v1/functions/sum_sin/hvp",
             json_request(np.zeros(3, np.float32), tangents=[1.0, 0.0]), JSON_HEADERS, 422, "invalid_input"),
        Case("invalid", "hvp complex tangents", "/v1/functions/sum_sin/hvp",
             npz_bytes(x=np.zeros(2), tangents=np.ones(2, np.complex128)), NPZ_IN_NPY_OUT, 422, "invalid_input"),
    ]
    deadline = [Case("deadline", c.label + " (deadline)", c.path, c.body, {**c.headers, "x-request-timeout": "0.05"},
                     check=c.check) for c in valid if c.label in ("mlp npy", "softmax npy", "mlp batched json",
                                                                    "rosenbrock hvp npz")]
    disconnect = [Case("disconnect", c.label + " (disconnect)", c.path, c.body, c.headers, check=c.check)
                  for c in valid if c.label in ("mlp json", "softmax npy", "lorenz96 npy")]
    return {"valid": valid, "invalid": invalid, "deadline": deadline, "disconnect": disconnect}


class Tally:
    def __init__(self) -> None:
        self.c: Counter[str] = Counter()
        self.wrong_examples: list[str] = []
        self.statuses: Counter[int] = Counter()

    def wrong(self, why: str) -> None:
        self.c["wrong"] += 1
        if len(self.wrong_examples) < 10:
            self.wrong_examples.append(why)


def _judge(case: Case, r: httpx.Response, tally: Tally) -> None:
    tally.c["answered"] += 1
    tally.statuses[r.status_code] += 1
    if r.status_code == 429:
        tally.c["overloaded (429)"] += 1
        return
    if case.kind == "deadline" and r.status_code == 504:
        code = r.json().get("code") if r.headers.get("content-type", "").startswith("application/problem") else None
        if code == "timeout":
            tally.c["correct"] += 1
            tally.c["timed out (504, expected)"] += 1
        else:
            tally.wrong(f"{case.label}: 504 with code {code!r}")
        return
    if r.status_code >= 500:
        tally.c["server errors"] += 1
        tally.wrong(f"{case.label}: {r.status_code} {r.text[:200]}")
        return
    if r.status_code != case.expect_status:
        tally.wrong(f"{case.label}: status {r.status_code}, expected {case.expect_status}: {r.text[:200]}")
        return
    if case.expect_code:
        code = r.json().get("code")
        if code != case.expect_code:
            tally.wrong(f"{case.label}: code {code!r}, expected {case.expect_code!r}")
            return
    elif case.check is not None:
        try:
            good = case.check(r)
        except Exception as exc:  # an unreadable body is a wrong answer
            good = False
            tally.wrong(f"{case.label}: unreadable body ({type(exc).__name__}: {exc})")
            return
        if not good:
            tally.wrong(f"{case.label}: value differs from in-process torch.func")
            return
    tally.c["correct"] += 1


_RETRY_FOR_S = 30.0  # how long a client keeps retrying 503s: an engine restart takes seconds


async def _post(http: httpx.AsyncClient, case: Case, tally: Tally) -> httpx.Response:
    """One request, retried after a 503 with Retry-After (as the SDK retries), for up to
    ``_RETRY_FOR_S``."""
    give_up = time.monotonic() + _RETRY_FOR_S
    while True:
        r = await http.post(case.path, content=case.body, headers=case.headers)
        if r.status_code != 503 or "retry-after" not in r.headers or time.monotonic() > give_up:
            return r
        tally.c["retried after 503"] += 1
        await asyncio.sleep(min(float(r.headers["retry-after"]), 1.0) * random.uniform(0.5, 1.0))


async def _crash(http: httpx.AsyncClient, at: float, tally: Tally) -> None:
    """The injected engine crash, and the check of its own answer."""
    await asyncio.sleep(at)
    body = json_request(np.array([666.0, 1.0]))
    r = await http.post("/v1/functions/crashes/jacobian", content=body, headers=JSON_HEADERS)
    tally.c["crashes injected"] += 1
    code = r.json().get("code") if r.headers.get("content-type", "").startswith("application/problem") else None
    if (r.status_code, code) != (500, "function_error"):
        tally.wrong(f"injected crash: {r.status_code} {code!r}, expected 500 'function_error'")


async def _drive(url: str, cases: dict[str, list[Case]], clients: int, seconds: float, seed: int,
                 crash_at: float | None = None) -> Tally:
    tally = Tally()
    weights = {"valid": 0.55, "invalid": 0.2, "deadline": 0.15, "disconnect": 0.1}
    kinds, probs = list(weights), list(weights.values())
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        end = time.monotonic() + seconds

        async def client(i: int) -> None:
            rng = random.Random(seed + i)
            while time.monotonic() < end:
                case = rng.choice(cases[rng.choices(kinds, probs)[0]])
                tally.c["sent"] += 1
                tally.c[f"sent {case.kind}"] += 1
                task = asyncio.ensure_future(_post(http, case, tally))
                try:
                    if case.kind == "disconnect":
                        done, _ = await asyncio.wait({task}, timeout=rng.uniform(0, 0.02))
                        if not done:
                            task.cancel()
                            try:
                                await task
                            except (asyncio.CancelledError, httpx.HTTPError):
                                pass
                            tally.c["cancelled by us"] += 1
                            continue
                    r = await task
                except httpx.HTTPError as exc:
                    tally.c["lost"] += 1
                    if len(tally.wrong_examples) < 10:
                        tally.wrong_examples.append(f"{case.label}: no answer ({type(exc).__name__}: {exc})")
                    continue
                _judge(case, r, tally)

        crash = [_crash(http, crash_at, tally)] if crash_at is not None else []
        await asyncio.gather(*(client(i) for i in range(clients)), *crash)
    return tally


def run(ctx: Context) -> Report:
    report = Report(TITLE)
    report.gating = True
    clients = ctx.opt("load_clients", 64, 16)
    seconds = ctx.opt("load_seconds", 60.0, 1.0)  # (--quick: 2 s cost ~2 CPU-s more, the crash and its
    # restart the same: the requests it turned away are retried, past the end, until answered)
    report.add(f"## load_test: {clients} clients for {seconds:g} s, mixed valid and invalid requests\n")
    cases = build_cases(np.random.default_rng(4), 2 if ctx.quick else 6)
    server = ctx.pool.service(ctx.service_env, tag="" if ctx.quick else "load test")

    # One pass over every case first: lazy imports, first-call paths and caches settle, so
    # "RSS at start" is the steady state that a leak would grow from.
    warm = asyncio.run(_drive(server.url, {k: v for k, v in cases.items() if k != "disconnect"}, 1, 0.0, 0))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for group in cases.values():
            for case in group:
                _judge(case, http.post(case.path, content=case.body, headers={**case.headers, "x-request-timeout": "30"}),
                       warm)
    if warm.c["wrong"]:
        for why in warm.wrong_examples:
            report.fail("warm-up: " + why)
    def rss() -> int:
        """Every serving process: supervisor, front ends, engine. Not the spare engine: the
        injected crash promotes it and starts a new one, which is a new process's memory,
        not growth of the server's."""
        serving = set(loopback_client().get(server.url + "/v1/info").json().get("engine_pids") or [])
        return sum(status_kib(p, "VmRSS") * 1024 for p in server.pids()
                   if _alive(p) and (not process_label(p).endswith("engine") or p in serving))

    rss_start = rss()
    peak = [rss_start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            try:
                peak[0] = max(peak[0], rss())
            except (OSError, KeyError):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    tracebacks_before = server.tracebacks()
    started = time.monotonic()
    restarts_before = _restarts(server)
    tally = asyncio.run(_drive(server.url, cases, clients, seconds, 1000, crash_at=seconds / 2))
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    time.sleep(0.5)  # let the server finish dropping abandoned work
    rss_end = rss()
    restarts = _restarts(server) - restarts_before
    alive = loopback_client().get(server.url + "/healthz").status_code == 200
    tracebacks = server.tracebacks() - tracebacks_before

    c = tally.c
    growth = rss_end / rss_start - 1
    rows = [
        ["sent", c["sent"]],
        ["  valid / invalid / short deadline / abandoned", f"{c['sent valid']} / {c['sent invalid']} / {c['sent deadline']} / {c['sent disconnect']}"],
        ["answered", c["answered"]],
        ["correct (value, or exact status and code)", c["correct"]],
        ["  of which 504 timeout on a short deadline", c["timed out (504, expected)"]],
        ["cancelled by us mid-flight", c["cancelled by us"]],
        ["wrong", c["wrong"]],
        ["lost (no answer, not cancelled)", c["lost"]],
        ["server errors (5xx, not an expected 504)", c["server errors"]],
        ["overloaded (429)", c["overloaded (429)"]],
        ["engine crashes injected / engine restarts seen", f"{c['crashes injected']} / {restarts:g}"],
        ["retries after 503 + Retry-After (as the SDK does)", c["retried after 503"]],
        ["answers per second", f"{c['answered'] / elapsed:.0f}"],
        ["statuses", ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items()))],
        ["server RSS after warm-up / peak / end (MiB)", f"{rss_start / 2**20:.1f} / {peak[0] / 2**20:.1f} / {rss_end / 2**20:.1f}"],
        ["RSS growth start -> end", f"{growth * 100:+.1f} %"],
        ["tracebacks in the server log / alive after", f"{tracebacks} / {'yes' if alive else 'NO'}"],
    ]
    report.table(["load test", "value"], rows)
    for summary in server.traceback_summaries(skip=tracebacks_before)[:5]:
        report.add(f"- server traceback: {summary}")
    for why in tally.wrong_examples:
        report.add(f"- example: {why}")
    report.target(Target("load: lost", c["lost"], 0, "<=", ""))
    report.target(Target("load: wrong", c["wrong"], 0, "<=", ""))
    report.target(Target("load: server errors", c["server errors"], 0, "<=", ""))
    report.target(Target("load: RSS growth", growth * 100, 10, "<=", " %"))
    if not alive:
        report.fail("the server did not answer /healthz after the load test")
    if restarts != c["crashes injected"]:
        report.fail(f"{c['crashes injected']} crash(es) injected, {restarts:g} engine restart(s) seen")
    if c["answered"] + c["cancelled by us"] + c["lost"] != c["sent"]:
        report.fail(f"bookkeeping: answered + cancelled + lost != sent ({c})")
    report.add()
    return report
