"""Round 5 of a lone request's latency: ``python -m bench.stages``, which cuts each request
at its system calls across the client, the front end and the engine (``perf record``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # (the benchmarks live beside the service, not in it)
    sys.path.insert(0, str(ROOT))

import bench.stages as stages_module  # noqa: E402

CL, FE, EN = 100, 200, 300


def _call(pid: int, t: float, kind: str, number: int) -> str:
    args = "= 0" if kind == "sys_exit" else "(0, 0, 0, 0, 0, 0)"
    return f"          {pid}/{pid} [000] {t:.6f}: raw_syscalls:{kind}: NR {number} {args}"


def _switch(t: float, prev: int, state: str, nxt: int) -> str:
    return (f"          {prev}/{prev} [000] {t:.6f}: sched:sched_switch: prev_comm=python prev_pid={prev} "
            f"prev_prio=120 prev_state={state} ==> next_comm=python next_pid={nxt} next_prio=120")


def test_a_lone_requests_stages_are_cut_at_its_system_calls_net_of_preemption():
    """One request, each hop at a known time: every stage is the time between its two
    system calls; a process preempted (switched out runnable) inside its stage has that
    time taken off the stage's net figure, and one that sleeps (switched out S) has not;
    a stage waits for the right process's call (the engine's own sends and the client's
    own calls between are not the front end's)."""
    lines = [
        _call(CL, 1.000000, "sys_enter", 44), _call(CL, 1.000010, "sys_exit", 44),  # the client's sendto
        _call(FE, 1.000060, "sys_exit", 281),  # the front end wakes
        _call(FE, 1.000070, "sys_enter", 0), _call(FE, 1.000080, "sys_exit", 0),  # reads the request
        _switch(1.000100, FE, "R", 999), _switch(1.000140, 999, "S", FE),  # preempted 40 us
        _call(FE, 1.000310, "sys_enter", 1),  # writes the job
        _call(FE, 1.000320, "sys_enter", 281), _switch(1.000321, FE, "S", 0),  # sleeps: not preemption
        _call(EN, 1.000350, "sys_exit", 232),  # the engine wakes
        _call(EN, 1.000400, "sys_enter", 0), _call(EN, 1.000410, "sys_exit", 0),
        _call(EN, 1.001350, "sys_enter", 46),  # its reply
        _call(EN, 1.001360, "sys_exit", 46), _call(EN, 1.001370, "sys_enter", 24),  # (its yield)
        _switch(1.001380, 999, "S", FE),
        _call(FE, 1.001400, "sys_exit", 281),  # the front end wakes
        _call(FE, 1.001600, "sys_enter", 20),  # writev of the answer
        _call(CL, 1.001650, "sys_exit", 45),  # the client has it
        _call(FE, 1.001700, "sys_enter", 281),  # the front end sleeps
        _call(EN, 1.001900, "sys_enter", 232),  # the engine sleeps, after its tidying
    ]
    trace = stages_module.Trace("\n".join(lines), {"CL": CL, "FE": FE, "EN": EN})
    (row,) = stages_module.stages(trace, [(0.9999, 1.00166, {"queue_ms": 0.05, "compute_ms": 0.9})])
    us = {key: round(value * 1e6) for key, value in row.items()}
    names = [name for name, _, _ in stages_module.STAGES]
    assert [us[n] for n in names] == [50, 250, 40, 1000, 50, 200, 50]
    assert [us[n + " [net]"] for n in names] == [50, 210, 40, 1000, 50, 200, 50]
    assert us["send -> the client has it"] == 1640
    assert us["(off the path) the engine works on after its reply [net]"] == 550
    assert us["(off the path) the front end works on after its answer [net]"] == 100
    assert us["meta.compute_ms"] == 900 and us["meta.queue_ms"] == 50


def test_a_request_whose_events_perf_lost_is_left_out():
    """A loaded machine's perf loses events: a request missing one of its hops (here the
    engine's reply) gives no row rather than a stage measured to the next request's call."""
    lines = [
        _call(CL, 1.0, "sys_exit", 44), _call(FE, 1.00005, "sys_exit", 281), _call(FE, 1.0003, "sys_enter", 1),
        _call(EN, 1.00035, "sys_exit", 232),
        _call(FE, 1.0014, "sys_exit", 281), _call(FE, 1.0016, "sys_enter", 20), _call(CL, 1.00165, "sys_exit", 45),
    ]
    trace = stages_module.Trace("\n".join(lines), {"CL": CL, "FE": FE, "EN": EN})
    assert stages_module.stages(trace, [(0.9999, 1.00166, None)]) == []
