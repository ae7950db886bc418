"""Per-example Hessians through the in-process app: batched=true and N concurrent single ones.

Usage: PYTHONPATH=service:client:. python bench/per_example_hessians.py . [names,concurrent]
"""
import sys, time, statistics, threading
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from tests.conftest import ready_app_with
from jacobian_service import examples as ex

rng = np.random.default_rng(33)
def u(*shape): return rng.uniform(-2, 2, shape).astype(np.float32)
cases = [  # name, inputs (batched), argnums, torch fn
    ("sin", [u(32, 63)], None, ex.sin),
    ("softmax", [u(32, 63)], None, ex.softmax),
    ("sin_aux", [u(16, 40)], None, lambda x: ex.sin_aux(x)[0]),
    ("polar", [u(16, 30), u(16, 30)], [0, 1], ex.polar),
    ("planar_arm", [u(32, 20)], None, ex.planar_arm),
    ("mlp", [u(8, 128)], None, ex.mlp),
    ("lorenz96", [u(16, 40)], None, ex.lorenz96),
]
def want_of(name, xs, argnums, fn):
    t = [torch.from_numpy(x) for x in xs]
    a = tuple(argnums) if argnums else 0
    return torch.func.vmap(torch.func.hessian(fn, argnums=a))(*t)
def flat(tree):
    if isinstance(tree, dict) and "data" in tree: return [np.array(tree["data"], dtype=np.float64)]
    if isinstance(tree, dict): return [l for v in tree.values() for l in flat(v)]
    if isinstance(tree, (list, tuple)) and tree and "{" in repr(tree)[:200]: return [l for v in tree for l in flat(v)]
    return [np.array(tree, dtype=np.float64)]
only = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else None
with ready_app_with("jacobian_service.examples") as c:
    for name, xs, argnums, fn in cases:
        if only and name not in only: continue
        body = {"inputs": [x.tolist() for x in xs]}
        if argnums: body["argnums"] = argnums
        ts = []
        for i in range(4):
            t0 = time.perf_counter(); r = c.post(f"/v1/functions/{name}/hessian?batched=true", json=body); ts.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text[:400]
        doc = r.json()
        want = [w.double().numpy() for w in torch.utils._pytree.tree_leaves(want_of(name, xs, argnums, fn))]
        got = flat(doc["hessian"])
        err = max(float(np.abs(g.reshape(w.shape) - w).max()) for g, w in zip(got, want))
        t0 = time.perf_counter(); want_of(name, xs, argnums, fn); tv = time.perf_counter() - t0
        print(f"{name:12s} {tuple(xs[0].shape)} batched=true first {ts[0]:.3f}s median(3 later) {statistics.median(ts[1:]):.3f}s "
              f"mode={doc['meta'].get('mode')} max|diff vs vmap(hessian)|={err:.2e} (vmap(hessian) in-process {tv:.3f}s)", flush=True)
    if not only or "concurrent" in only:
        # N concurrent single Hessians of sin (request batching stacks them)
        N = 32; xs = u(N, 63)
        for rep in range(3):
            out = [None] * N
            def go(i):
                out[i] = c.post("/v1/functions/sin/hessian", json={"inputs": [xs[i].tolist()]})
            th = [threading.Thread(target=go, args=(i,)) for i in range(N)]
            t0 = time.perf_counter(); [t.start() for t in th]; [t.join() for t in th]; dt = time.perf_counter() - t0
            assert all(r.status_code == 200 for r in out), [r.text[:200] for r in out if r.status_code != 200][:2]
            err = max(float(np.abs(np.array(out[i].json()["hessian"]["data"]) - torch.func.hessian(torch.sin)(torch.from_numpy(xs[i])).numpy()).max()) for i in range(N))
            print(f"concurrent {N} single sin(63) hessians: {dt:.3f}s  modes={sorted(set(r.json()['meta'].get('mode') for r in out))} max diff {err:.1e}", flush=True)
