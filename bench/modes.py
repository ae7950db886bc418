"""Forward against reverse mode on a tall (4 -> m) and a wide (m -> 4) function
(:mod:`bench.functions`): the service with ``mode=fwd``, ``rev`` and ``auto`` (SDK
``Client``, binary) next to in-process ``jacfwd`` and ``jacrev``, interleaved. Forward mode
needs one JVP per input, reverse one VJP per output, so ``fwd`` should win on ``tall`` and
``rev`` on ``wide``; ``auto`` should pick the winner."""

from __future__ import annotations

import numpy as np
import torch

from ._common import Context, Report, interleaved, median, ms


def run(ctx: Context) -> Report:
    from jacobian_client import Client

    from .functions import tall, wide

    m = ctx.opt("modes_n", 4096, 512)
    title = f"modes: forward vs reverse on tall (4 -> {m}) and wide ({m} -> 4)"
    report = Report(title)
    report.add(f"## {title}\n")
    rounds = ctx.opt("rounds", 5, 1)
    rng = np.random.default_rng(3)
    x4 = np.array([1.3, 0.2, 0.05, 0.5], np.float32)
    t = np.linspace(0, 10, m, dtype=np.float32)
    xm = rng.standard_normal(m).astype(np.float32)
    args = {"tall": (torch.from_numpy(x4), torch.from_numpy(t)), "wide": (torch.from_numpy(xm),)}
    wire_args = {"tall": (x4, t), "wide": (xm,)}
    fns = {"tall": tall, "wide": wide}
    service = ctx.pool.service(ctx.service_env)
    rows = []
    with Client(service.url, timeout=300) as sdk:
        for name in ("tall", "wide"):
            f, a, w = fns[name], args[name], wire_args[name]
            want = torch.func.jacrev(f)(*a).numpy()
            for mode in ("fwd", "rev", "auto"):
                got = sdk.jacobian(name, *w, mode=mode)
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-5):
                    report.fail(f"{name} mode={mode}: service answer differs from in-process jacrev")
            samples = interleaved({
                "in-process jacfwd": lambda: torch.func.jacfwd(f)(*a),
                "in-process jacrev": lambda: torch.func.jacrev(f)(*a),
                "service fwd": lambda: sdk.jacobian(name, *w, mode="fwd"),
                "service rev": lambda: sdk.jacobian(name, *w, mode="rev"),
                "service auto": lambda: sdk.jacobian(name, *w, mode="auto"),
            }, rounds, 2, warmup=1)
            med = {k: median(v) for k, v in samples.items()}
            best_in = min(med["in-process jacfwd"], med["in-process jacrev"])
            for k, v in med.items():
                rows.append([name, k, ms(v), f"{v / best_in:.2f}"])
            report.add(f"- {name}: in-process jacrev / jacfwd = {med['in-process jacrev'] / med['in-process jacfwd']:.3g}; "
                       f"service rev / fwd = {med['service rev'] / med['service fwd']:.3g}; "
                       f"service auto / best service mode = {med['service auto'] / min(med['service fwd'], med['service rev']):.2f}")
    report.add(f"\n{rounds} rounds x 2 calls per variant, interleaved.\n")
    report.table(["function", "variant", "median ms", "/ best in-process"], rows)
    return report
