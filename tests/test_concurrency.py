"""64 concurrent clients, mixed functions, shapes, options and formats: each gets its own answer."""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from jacobian_client import wire

from .conftest import assert_tree_close, live_server, npz_bytes
from jacobian_service.registry import Registry


def make_case(rng: random.Random, registry: Registry) -> dict[str, Any]:
    name = rng.choice(["sin", "softmax", "add_square", "polar", "mlp", "lorenz96", "planar_arm", "sum_sin"])
    n = 128 if name == "mlp" else rng.choice([3, 4, 7])
    arity = len(registry.get(name).inputs)
    dtype = "float32" if name == "mlp" else rng.choice(["float32", "float64"])
    inputs = [np.asarray(np.random.default_rng(rng.randrange(1 << 30)).standard_normal(n), dtype=dtype) for _ in range(arity)]
    endpoint = rng.choice(["jacobian", "jacobian", "jacobian", "hessian", "evaluate"])
    argnums: Any = rng.choice([0, [0]] + ([1, [0, 1]] if arity == 2 else []))
    options = {"argnums": argnums, "chunk_size": rng.choice([None, 1, 2])} if endpoint != "evaluate" else {}
    return {"name": name, "inputs": inputs, "endpoint": endpoint, "options": options, "format": rng.choice(["json", "npz"])}


def reference(case: dict[str, Any], registry: Registry) -> Any:
    fn = registry.get(case["name"]).fn
    args = [torch.from_numpy(a) for a in case["inputs"]]
    if case["endpoint"] == "evaluate":
        return fn(*args)
    argnums = case["options"]["argnums"]
    argnums = tuple(argnums) if isinstance(argnums, list) else argnums
    transform = torch.func.hessian if case["endpoint"] == "hessian" else torch.func.jacrev
    return transform(fn, argnums=argnums)(*args)


async def send(client: httpx.AsyncClient, url: str, case: dict[str, Any]) -> Any:
    path = f"{url}/v1/functions/{case['name']}/{case['endpoint']}"
    key = "output" if case["endpoint"] == "evaluate" else case["endpoint"]
    if case["format"] == "json":
        body = {"inputs": [wire.encode_tree(a) for a in case["inputs"]], **case["options"]}
        r = await client.post(path, content=wire.dumps(body), headers={"content-type": wire.JSON})
        assert r.status_code == 200, r.text
        return wire.decode_tree(r.json()[key]), r.json()["meta"]
    # a trailing comma keeps a one-item list a tuple: argnums=0, is (0,)
    params = {k: (",".join(map(str, v)) + "," if isinstance(v, list) else str(v)) for k, v in case["options"].items() if v is not None}
    body = npz_bytes(**{str(i): a for i, a in enumerate(case["inputs"])})
    r = await client.post(path, content=body, params=params, headers={"content-type": wire.NPZ, "accept": wire.NPZ})
    assert r.status_code == 200, r.text
    trees, meta = wire.read_result_npz(r.content)
    return trees[key], meta


@pytest.mark.parametrize("batch_size", [1, 16])
def test_64_concurrent_clients_mixed(builtins, batch_size):
    rng = random.Random(batch_size)
    cases = [make_case(rng, builtins) for _ in range(128)]  # two waves of 64

    async def main(url: str) -> list[Any]:
        limits = httpx.Limits(max_connections=64)
        sem = asyncio.Semaphore(64)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def one(case: dict[str, Any]) -> Any:
                async with sem:
                    return await send(client, url, case)

            return await asyncio.gather(*(one(c) for c in cases))

    # The built-ins only (13 functions, the 8 sent among them), not the tests' 68: the
    # engines warm each registered function at start, ~4 CPU-s per server for functions
    # no case sends. Front ends stay at the default: answers crossing them is the point.
    with live_server(FUNCTIONS="jacobian_service.examples", MAX_BATCH_SIZE=batch_size, MAX_BATCH_WAIT_MS=2,
                     ENGINE_STANDBY="false") as (url, _):
        results = asyncio.run(main(url))
    batched = 0
    for case, (got, meta) in zip(cases, results):
        tol = dict(rtol=2e-4, atol=2e-5) if case["inputs"][0].dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
        assert_tree_close(got, reference(case, builtins), **tol)
        batched += meta["batch_size"] > 1
    if batch_size == 1:
        assert batched == 0


# ---------------------------------------------------------------- the in-process driver's two threads
# In the in-process layout (serve --in-process, the tests' app) the event loop submits
# jobs and counts the queue while the engine's thread takes and runs them. Both races
# below answered 500 under wrk (python -m bench --only layout); each test fails within
# a fraction of a second without its fix, thread switches forced every microsecond.


@pytest.fixture
def frequent_switches():
    import sys

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_queue_depth_is_counted_while_the_worker_takes_jobs(frequent_switches):
    import time

    from jacobian_service.scheduler import Job, ThreadedWorker, Worker

    class Engine:
        device = "cpu"

    settled = []
    threaded = ThreadedWorker(Worker(Engine(), max_queue=10**6), "test-worker")
    threaded.start()
    try:
        for _ in range(2000):
            for _ in range(5):  # stream chunks of no stream: each settles at once, with an error
                threaded.submit(Job("stream_next", None, lambda *a: settled.append(a), deadline=time.monotonic() + 60,
                                    stream_id=1))
            assert threaded.depth() >= 0  # raised "deque mutated during iteration" before
    finally:
        threaded.stop()
    assert len(settled) == 10_000


def test_a_batchs_answers_leave_before_the_engine_puts_its_settings_back():
    """The engine process sends replies from ``on_settled``: the settings' check and
    tidying that follow a batch (~80 us) are not the caller's wait."""
    import time

    from jacobian_service.scheduler import Job, Worker

    order = []

    class Engine:
        device = "cpu"

        def restore_settings(self, function):
            order.append("restored")

    worker = Worker(Engine(), max_queue=10, on_settled=lambda: order.append("sent"))
    worker.submit(Job("stream_next", None, lambda *a: order.append("settled"), deadline=time.monotonic() + 60,
                      stream_id=1))
    worker.run(worker.take(lambda s: None))
    assert order == ["settled", "sent", "restored"]


def test_the_engine_offers_its_core_between_a_batchs_answers_and_its_tidying(monkeypatch):
    """A front end woken by a reply on the engine's core waited for the engine's tidying
    after the batch (0.3 ms a request on the loaded VM): the engine yields once a lone
    answer is sent, before putting its settings back; with nothing sent, or a batch's
    several answers (under load), it does not."""
    import time

    from jacobian_service.engine import process
    from jacobian_service.scheduler import Job, Worker

    order = []
    monkeypatch.setattr(process.os, "sched_yield", lambda: order.append("yielded"))

    class Engine:
        device = "cpu"

        def restore_settings(self, function):
            order.append("restored")

    class Listener:
        def send(self, peer, messages):
            order.append(("sent", peer, len(messages)))

    server = process.EngineServer.__new__(process.EngineServer)  # its replies' path alone
    server._outbox, server.listener = {}, Listener()
    worker = Worker(Engine(), max_queue=10, on_settled=server.flush)
    for _ in range(2):  # a batch's answers to one front end: one send, one yield
        worker.submit(Job("stream_next", None, lambda *a: server._send("front end", [b"reply"]),
                          deadline=time.monotonic() + 60, stream_id=1))
        worker.run(worker.take(lambda s: None))
    assert order == [("sent", "front end", 1), "yielded", "restored"] * 2
    order.clear()
    server.flush()
    assert order == []
    server._send("front end", [b"a"]), server._send("front end", [b"b"])
    server.flush()
    server._send("front end", [b"a"]), server._send("another", [b"b"])
    server.flush()
    assert order == [("sent", "front end", 2), ("sent", "front end", 1), ("sent", "another", 1)]


def test_profile_tables_are_read_while_the_engine_writes_them(frequent_switches):
    import threading
    import time

    from jacobian_service.engine.profile import _LRU

    table: _LRU[int, int] = _LRU(size=4)  # every write evicts the oldest key
    stop = threading.Event()

    def engine() -> None:
        i = 0
        while not stop.is_set():
            table[i] = i
            i += 1

    writer = threading.Thread(target=engine)
    writer.start()
    try:
        until = time.monotonic() + 1.0
        reads = 0
        while time.monotonic() < until:
            for key in list(table._d):
                value = table.get(key)  # raised KeyError when evicted between its two steps
                assert value is None or value == key
                reads += 1
    finally:
        stop.set()
        writer.join()
    assert reads > 1000
    assert len(table) <= 4


def test_a_job_finished_as_its_caller_leaves_settles_quietly():
    """In-process engines: the engine's thread may settle a job just as its request
    leaves (deadline, disconnect), after the request dropped its future (a failed future
    must not be kept by the frames its exception passes). The settle keeps its own."""
    import asyncio

    from jacobian_service.engine_client import _settler
    from jacobian_service.types import JobInfo

    async def main() -> list:
        loop = asyncio.get_running_loop()
        problems: list = []
        loop.set_exception_handler(lambda _, context: problems.append(context))
        fut = loop.create_future()
        settle = _settler(fut)
        del fut  # the request has gone
        settle("value", None, JobInfo())
        settle(None, RuntimeError("late"), JobInfo())  # a second word changes nothing
        await asyncio.sleep(0.01)
        return problems

    assert asyncio.run(main()) == []


def test_an_aux_over_the_result_limit_is_refused_before_it_leaves_the_engine():
    """Found by a red team: a function's 1 GB aux was sent to the front end (a second of
    the engine, a gigabyte of the front end, other requests past their deadlines) before
    the front end refused it. The worker checks a result whole, aux and output included."""
    import time

    from jacobian_service.errors import ResultTooLarge
    from jacobian_service.scheduler import Job, Worker
    from jacobian_service.types import Call, Result

    spec = Registry.from_modules(["jacobian_service.examples"]).get("sin")

    class Engine:
        device = "cpu"

        def evaluate(self, call: Call) -> Result:
            size = 10_000 if float(call.args[0][0]) > 0 else 10  # the first element says how large an aux
            return Result(np.zeros((2, 2), np.float32), {"blob": "x" * size}, True)

    settled: list[tuple[Any, Any]] = []
    worker = Worker(Engine(), max_queue=10, max_batch=1)
    for first in (1.0, -1.0):
        call = Call(spec, [np.array([first, 0.5], np.float32)], ["float32"], deadline=time.monotonic() + 60,
                    max_result_bytes=4096)
        worker.submit(Job("evaluate", call, lambda result, error, info: settled.append((result, error)),
                          deadline=time.monotonic() + 60))
        worker.run(worker.take(lambda s: None))
    assert isinstance(settled[0][1], ResultTooLarge) and "bytes with its aux and output" in str(settled[0][1]) and settled[0][0] is None
    assert settled[1][1] is None and settled[1][0].aux == {"blob": "x" * 10}


def test_an_in_process_answer_leaves_once_the_engines_context_is_exited():
    """The in-process layout: an answer settled inside the engine's ``computing()``
    context (which raises torch.func's JVP_NESTING, shared by every thread) let the
    caller's next torch.func.jvp / jacfwd run while it was raised, and fail 'no level
    exists'. Answers now leave once the group has run, as an engine process sends them."""
    import threading
    import time

    from jacobian_service.scheduler import Job, ThreadedWorker, Worker

    class Engine:
        device = "cpu"
        inside = False

        @contextlib.contextmanager
        def computing(self):
            Engine.inside = True
            try:
                yield
            finally:
                Engine.inside = False

    seen, done = [], threading.Event()

    def settle(*args):
        seen.append(Engine.inside)
        done.set()

    threaded = ThreadedWorker(Worker(Engine(), max_queue=10), "test-worker")
    threaded.start()
    try:  # a stream chunk of no stream: settled with an error inside the run
        threaded.submit(Job("stream_next", None, settle, deadline=time.monotonic() + 60, stream_id=1))
        assert done.wait(30)
    finally:
        threaded.stop()
    assert seen == [False]


def test_the_queue_bound_counts_the_live_requests_exactly():
    """The bound on queued requests (429) counts only what still waits: the queue's
    length is read first (a walk of the whole queue per request was O(queue) under load),
    and the jobs are counted only once it reaches the bound, so a cancelled job in the
    middle of the queue, or a stream's next chunk, still leaves room."""
    import time

    from jacobian_service.errors import Overloaded
    from jacobian_service.scheduler import Job, Worker
    from jacobian_service.types import Call

    spec = Registry.from_modules(["jacobian_service.examples"]).get("sin")

    class Engine:
        device = "cpu"

    def job(kind: str = "evaluate") -> Job:
        call = Call(spec, [np.zeros(2, np.float32)], ["float32"]) if kind != "stream_next" else None
        return Job(kind, call, lambda result, error, info: None, deadline=time.monotonic() + 60, stream_id=1)

    worker = Worker(Engine(), max_queue=2)
    first, second = job(), job()
    worker.submit(first)
    worker.submit(second)
    with pytest.raises(Overloaded, match="holds 2 requests"):
        worker.submit(job())
    second.done = True  # cancelled while queued, behind a live job: not popped
    worker.submit(job())  # one live request: room for this one
    worker.submit(job("stream_next"))  # a stream's chunk is not bounded, nor counted
    with pytest.raises(Overloaded, match="holds 2 requests"):
        worker.submit(job())
    assert len(worker.jobs) == 4
