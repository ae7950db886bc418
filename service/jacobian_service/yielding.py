"""``offer_the_cpu``: let the process a write just woke run before the writer's own work
after it (torch-free: the engines and the front ends both call it).

A socket's wake-up is a "sync" one: the kernel often runs the woken reader on the
writer's core, as if the writer would sleep next. A writer that works on after its
write (an engine tidying after a batch, a front end finishing a request after its
answer) then holds the reader, and whoever waits behind it, for that long: traced on
the 2-core VM (``perf record`` of sched and syscall events, one client, small ``mlp``
Jacobians), a front end woke a median 310-370 us after its engine's reply where both ran
on one core, 23-31 us where they ran on two. A stand-alone pair of processes on one core
(a reply, then 300 us of work): the reader ran a median 308 us after the reply, 9 us
with the writer's ``sched_yield`` between. Where nobody waits for the core, it is one
system call. Callers yield only for a lone answer (a client at a time, the latency
case): under load the woken have work queued anyway, and a yield would hand the core to
whatever else is runnable (the load generator on this VM).
"""

from __future__ import annotations

import os

__all__ = ["offer_the_cpu"]


def offer_the_cpu() -> None:
    try:
        os.sched_yield()
    except OSError:  # (an engine's: refused by a filter a function set; it leaves after this batch)
        pass
