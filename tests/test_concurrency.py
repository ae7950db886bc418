"""64 concurrent clients, mixed functions, shapes, options and formats: each gets its own answer."""

from __future__ import annotations

import asyncio
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
    cases = [make_case(rng, builtins) for _ in range(256)]

    async def main(url: str) -> list[Any]:
        limits = httpx.Limits(max_connections=64)
        sem = asyncio.Semaphore(64)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:

            async def one(case: dict[str, Any]) -> Any:
                async with sem:
                    return await send(client, url, case)

            return await asyncio.gather(*(one(c) for c in cases))

    with live_server(MAX_BATCH_SIZE=batch_size, MAX_BATCH_WAIT_MS=2) as (url, _):
        results = asyncio.run(main(url))
    batched = 0
    for case, (got, meta) in zip(cases, results):
        tol = dict(rtol=2e-4, atol=2e-5) if case["inputs"][0].dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
        assert_tree_close(got, reference(case, builtins), **tol)
        batched += meta["batch_size"] > 1
    if batch_size == 1:
        assert batched == 0
