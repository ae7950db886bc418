"""A function that changes process-wide settings changes them for its own calls only:
the engine puts them back after each batch (engine/process_settings.py).

Before, ``torch.set_default_dtype(torch.float64)`` in one function made every later
``evaluate`` of another, which builds ``torch.ones``, answer float64 instead of float32;
and ``warnings.simplefilter("error")`` in one function made every other function that
warns on its way (as much user code does) fail with 500, in the same engine process for
as long as it lived. ``signal.alarm`` in one function killed the engine (SIGALRM) a
while later, under whichever request ran then.
"""

from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import sys
import threading
import time
import warnings
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import torch

from jacobian_service.examples import mlp

from ._fault_support import _log_saying
from .conftest import assert_problem, live_server

FUNCTIONS = "jacobian_service.examples,tests.settings_functions"
ARMED = {"inputs": [[666.0, 1.0, 2.0]]}
X = {"inputs": [[0.5, 1.0, 2.0]]}


def _output_dtype(post) -> str:
    r = post("/v1/functions/scaled_by_ones/evaluate", json=X)
    assert r.status_code == 200, r.text
    return r.json()["output"]["dtype"]


def _sin_ok(post, name: str) -> None:
    r = post(f"/v1/functions/{name}/jacobian", json=X)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X["inputs"][0])), rtol=1e-6)


def _settings() -> tuple:
    from jacobian_service.engine.process_settings import _float32_precision

    return (torch.get_default_dtype(), torch.is_anomaly_enabled(), torch.get_num_threads(),
            _float32_precision(), [f for f in warnings.filters if f[0] == "error"], gc.isenabled(),
            gc.get_threshold(), gc.get_debug(), np.geterr(), sys.getrecursionlimit(), sys.get_int_max_str_digits(),
            torch._C._len_torch_function_stack(), torch._C._len_torch_dispatch_stack(), torch.backends.mkldnn.enabled,
            torch.backends.cudnn.enabled, torch.backends.cudnn.deterministic, list(gc.callbacks),
            sys.getdlopenflags(), torch.is_warn_always_enabled())


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def kept():
    """This process's settings as they were, whatever the test leaves (it shares them
    with the in-process engine)."""
    from jacobian_service.engine.process_settings import ProcessSettings

    settings = ProcessSettings()
    yield
    settings.restore("the test")


@pytest.fixture
def engine_log():
    handler = _Lines()
    logger = logging.getLogger("jacobian_service.engine")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


CHANGERS = {  # function -> the settings it changes
    "sets_float64_default": 1, "turns_on_anomaly_detection": 1, "sets_threads_and_tf32": 5,
    "sets_warnings_to_errors": 1, "disables_gc_and_raises_on_numpy_errors": 4, "lowers_recursion_limit": 2,
    "adds_a_gc_callback": 1,
    # The engine's thread has its own profile function. Signal handlers, timers, limits
    # and the niceness are the whole process's: an engine process's alone to put back
    # (below); here pytest's (pytest-timeout's SIGALRM timer).
    "sets_a_profile_function": 1,
    "leaves_torch_modes_entered": 2,
    # torch's legacy getter raised on the mix, in the engine's check after the batch.
    "sets_fp32_precision_per_backend": 1,
    "sets_dlopen_flags_and_warn_always": 2,
}


def test_settings_a_function_changes_are_put_back_in_process(make_client, engine_log, kept):
    """The in-process layout, whose engine threads share this test's settings."""
    before = _settings()
    c = make_client(functions=FUNCTIONS)
    assert _output_dtype(c.post) == "float32"
    for name in CHANGERS:
        _sin_ok(c.post, name)
        # Put back after the batch's answers have gone: a moment after the response.
        deadline = time.monotonic() + 2
        while _settings() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _settings() == before, name
        assert _output_dtype(c.post) == "float32"
    _sin_ok(c.post, "sets_float64_default")  # again: logged once per function and setting
    named = [line for line in engine_log if "put back" in line]
    assert len(named) == sum(CHANGERS.values()), named
    assert any(line.startswith("sets_float64_default changed torch's default dtype (to torch.float64)")
               for line in named), named


@pytest.fixture(scope="module")
def engine_server() -> Any:
    """One server (no spare: an engine's death fails a request) for the two tests whose
    settings are put back in the engine that served them; the second ends it (it times
    the engine's SIGTERM), so it comes after the first. They read serve's whole log: the
    engine names each function and setting once in its life (``ProcessSettings``), and
    the warm-up runs the functions that change a setting on any input, so those are named
    as it warms up, not at a test's own call (the same on a server of the test's own)."""
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, ENGINE_STANDBY="false") as (url, proc):
        yield url, proc


def test_what_one_function_changes_does_not_reach_others_in_an_engine_process(engine_server):
    url, proc = engine_server
    with httpx.Client(base_url=url, timeout=30) as client:
        assert _output_dtype(client.post) == "float32"
        _sin_ok(client.post, "sets_float64_default")
        assert _output_dtype(client.post) == "float32"
        # A function that warns on its way, after another made warnings errors.
        _sin_ok(client.post, "warns_and_works")
        _sin_ok(client.post, "sets_warnings_to_errors")
        _sin_ok(client.post, "warns_and_works")
        # A torch function mode left entered (doubling every sin) answered sin's
        # Jacobian doubled; a dual level left entered failed every forward-mode
        # Jacobian with 500 "Nested forward mode AD is not supported".
        _sin_ok(client.post, "leaves_torch_modes_entered")
        _sin_ok(client.post, "leaves_a_dual_level_entered")
        _sin_ok(client.post, "sin")
        r = client.post("/v1/functions/sin/jacobian", json={**X, "mode": "fwd"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X["inputs"][0])), rtol=1e-6)
        # PATH pointed nowhere failed every later function that ran a program; a time
        # zone set moved every later function's local time (and the engine's log).
        offset = client.post("/v1/functions/time_zone_offset/evaluate", json=X).json()["output"]["data"][0]
        _sin_ok(client.post, "finds_a_shell")
        r = client.post("/v1/functions/changes_path_and_time_zone/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        _sin_ok(client.post, "finds_a_shell")
        r = client.post("/v1/functions/time_zone_offset/evaluate", json=X)
        assert r.json()["output"]["data"][0] == offset != -9 * 3600
        # Autocast left entered ran every later function's matmuls in bfloat16 (an mlp
        # Jacobian 1e-3 off); flushed denormals made every later tiny value zero; a
        # small thread stack size reached every later function's threads, and a default
        # socket timeout every later function's connections.
        # float32 precision set through torch 2.9+'s per-backend API made torch's
        # legacy getter raise: the engine's check after the batch ended the engine.
        # gc.unfreeze() put the heap the engine froze once started back in every full
        # collection (~0.2 s each, under whichever request it fell in).
        assert client.post("/v1/functions/heap_frozen/evaluate", json=X).json()["output"]["data"][0] == 1.0
        # gc.set_debug(gc.DEBUG_SAVEALL) kept every later function's collected cycles
        # in gc.garbage, for as long as the engine lived.
        for name in ("leaves_autocast_on", "flushes_denormals", "shrinks_thread_stacks", "sets_a_socket_timeout",
                     "switches_attention_off", "sets_fp32_precision_per_backend", "unfreezes_the_heap",
                     "keeps_all_garbage"):
            r = client.post(f"/v1/functions/{name}/jacobian", json=ARMED)
            assert r.status_code == 200, r.text
        r = client.post("/v1/functions/garbage_kept/evaluate", json=X)
        assert r.json()["output"]["data"][0] == 0.0, r.text
        x = np.random.default_rng(0).standard_normal(128).astype(np.float32)
        r = client.post("/v1/functions/mlp/jacobian", json={"inputs": [x.tolist()]})
        assert r.status_code == 200, r.text
        expected = torch.func.jacrev(mlp)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(r.json()["jacobian"]["data"], expected, rtol=1e-5, atol=1e-6)
        r = client.post("/v1/functions/denormal/evaluate", json=X)
        assert r.json()["output"]["data"][0] != 0.0, r.text
        r = client.post("/v1/functions/thread_stack_size/evaluate", json=X)
        assert r.json()["output"]["data"][0] == 0.0, r.text
        r = client.post("/v1/functions/socket_timeout/evaluate", json=X)
        assert r.json()["output"]["data"][0] == -1.0, r.text
        r = client.post("/v1/functions/attends/jacobian", json=X)  # failed: "No viable backend"
        assert r.status_code == 200, r.text
        assert client.post("/v1/functions/heap_frozen/evaluate", json=X).json()["output"]["data"][0] == 1.0
        # An engine writes no core file (one is as large as its heap: 536 MB into its
        # working directory), and a function that raises the limit is put back; SIGCHLD
        # ignored through libc made every later subprocess.run say 0 for a failure.
        assert client.post("/v1/functions/core_limit/evaluate", json=X).json()["output"]["data"][0] == 0.0
        for name in ("raises_the_core_limit", "ignores_sigchld_in_c"):
            r = client.post(f"/v1/functions/{name}/jacobian", json=ARMED)
            assert r.status_code == 200, r.text
        assert client.post("/v1/functions/core_limit/evaluate", json=X).json()["output"]["data"][0] == 0.0
        assert client.post("/v1/functions/status_of_false/evaluate", json=X).json()["output"]["data"][0] == 1.0
        # A global nn.Module forward hook doubled every later module's output (an
        # identity layer's Jacobian 2I, silently); a 30 s timer slack made the idle
        # engine oversleep its heartbeat, killed as hung, blaming nothing.
        r = client.post("/v1/functions/hooks_every_module/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        r = client.post("/v1/functions/linear_module/jacobian", json={"inputs": [[0.5, 1.0]]})
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.eye(2))
        # a tensor without values is the function's error, not the service's
        r = client.post("/v1/functions/returns_meta/evaluate", json=X)
        assert r.status_code == 500 and r.json()["code"] == "function_error", r.text
    # (the engine's own lines, relayed: on their own time, after the answers)
    changed = [("leaves_autocast_on", "autocast (entered, not exited)"),
               ("flushes_denormals", "flushing denormals to zero"),
               ("shrinks_thread_stacks", "the stack size of new threads"),
               ("sets_a_socket_timeout", "the default socket timeout"),
               ("switches_attention_off", "scaled-dot-product attention's backends"),
               ("sets_fp32_precision_per_backend", "torch's float32 precision"),
               ("ignores_sigchld_in_c", "signals ignored outside Python (SigIgn)"),
               ("hooks_every_module", "torch.nn's global module hooks"),
               ("unfreezes_the_heap", "the garbage collector's frozen objects (gc.unfreeze)"),
               ("keeps_all_garbage", "the garbage collector's debug flags (gc.set_debug)"),
               ("hooks_every_module", "the timer slack (prctl PR_SET_TIMERSLACK)"),
               # (a hard limit of 0 leaves nothing to raise)
               *([("raises_the_core_limit", "resource limits")]
                 if resource.getrlimit(resource.RLIMIT_CORE)[1] != 0 else [])]
    log = _log_saying(proc, "sets_float64_default changed torch's default dtype",
                      "sets_warnings_to_errors changed the warning filters",
                      "changes_path_and_time_zone changed the time zone (TZ, time.tzset)",
                      *(f"{function} changed {setting}" for function, setting in changed))
    assert "died" not in log and "Traceback" not in log, log[-3000:]
    assert "sets_float64_default changed torch's default dtype" in log
    # (frozen objects freed by reference counting, as some are by any request, are no unfreeze)
    assert log.count("changed the garbage collector's frozen objects") == 1, log[-3000:]
    assert "sets_warnings_to_errors changed the warning filters" in log
    assert "changes_path_and_time_zone changed environment variables (to other values of PATH) and left it so; " \
           "put back to the values the engine started with" in log
    assert "changes_path_and_time_zone changed the time zone (TZ, time.tzset)" in log
    assert "/nonexistent" not in log  # names, never values: a value may be a secret
    for function, setting in changed:
        assert f"{function} changed {setting}" in log, (function, setting)
    # Last (the engine restarts): a thread one function left waiting changed a setting in
    # the middle of another function's batch (torch's default dtype, which rebinds
    # torch.Storage: the engine's put-back rebinds it again). Which of the two made the
    # change cannot be told, and the batch ran under it: a retryable 503, and the engine
    # restarts, taking the thread with it (round 53; before, a 200 and the setting put back
    # after the batch). The retry is answered as in-process.
    with httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/functions/leaves_a_waiting_thread/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        r = client.post("/v1/functions/releases_the_waiting_thread/jacobian", json=ARMED)
        assert_problem(r, 503, "unavailable")
        assert r.headers["retry-after"] == "1" and "while a thread another function left ran" in r.json()["detail"]
        deadline = time.monotonic() + 120
        while (r := client.post("/v1/functions/releases_the_waiting_thread/jacobian", json=X)).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["jacobian"]["data"], np.diag(np.cos(X["inputs"][0])), rtol=1e-6)
        assert _output_dtype(client.post) == "float32"
    # the log names both, and the restart (the next test's engine is the one started here)
    restarted = ("the engine restarts: a thread or process left by one of leaves_a_waiting_thread names in torch "
                 "rebound and put back during a batch of releases_the_waiting_thread")
    log = _log_saying(proc, "releases_the_waiting_thread (or a thread left running by leaves_a_waiting_thread) "
                            "changed torch's default dtype", restarted, "engine 0 died")
    assert restarted in log and "exited with status 75" in log, log[-3000:]
    proc.settled_at = len(log)  # type: ignore[attr-defined]  (where the next test's log begins)


def test_signals_timers_hooks_and_limits_a_function_leaves_are_put_back_in_an_engine_process(engine_server):
    """A timer armed by one function used to kill the engine with SIGALRM a second later,
    under whatever ran then (a faulthandler watchdog the same, by its own thread); SIGTERM ignored kept it from stopping when told; a profile
    function slowed every later call. All are put back after the batch, and the engine
    lives on (no spare here: a death would fail the requests)."""
    url, proc = engine_server
    with httpx.Client(base_url=url, timeout=30) as client:
        for name in ("limits_cpu_time", "sets_a_profile_function", "ignores_sigterm_and_sets_umask",
                     "arms_an_alarm", "arms_a_faulthandler_watchdog"):
            _sin_ok(client.post, name)
        until = time.monotonic() + 2.0  # past the alarm's and the watchdog's second
        while time.monotonic() < until:
            assert _output_dtype(client.post) == "float32"
        # The CPU-time limit is the engine's own again (not only not yet reached).
        engine = client.get("/v1/info").json()["engine_pids"][0]
        assert resource.prlimit(engine, resource.RLIMIT_CPU) == resource.getrlimit(resource.RLIMIT_CPU)
        # The engine's log still reaches the server's output after a function sent its
        # stdout and stderr to /dev/null: the next setting put back is logged.
        for name in ("redirects_stdout_and_stderr", "sets_switch_interval", "stops_being_a_subreaper",
                     "configures_logging", "exits_on_unraisable", "hooks_every_fork"):
            r = client.post(f"/v1/functions/{name}/jacobian", json=ARMED)
            assert r.status_code == 200, r.text
        # A fork hook (after_in_child: exit 7) ran in every later function's fork.
        assert client.post("/v1/functions/forks_a_child/evaluate", json=X).json()["output"]["data"][0] == 0.0
        # An unraisable hook that ends the process ended the engine under the next
        # function whose __del__ raised, which took the blame.
        r = client.post("/v1/functions/raises_in_del/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        # SCHED_IDLE left every later request of every function to run only when the
        # CPU had nothing else to do; pinned to one CPU, on that one alone.
        engine = client.get("/v1/info").json()["engine_pids"][0]
        policy, cpus = os.sched_getscheduler(engine), os.sched_getaffinity(engine)
        r = client.post("/v1/functions/idles_and_pins_itself/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        _sin_ok(client.post, "sin")  # the next batch starts after the last one's settings were put back
        assert (os.sched_getscheduler(engine), os.sched_getaffinity(engine)) == (policy, cpus)
        # mlockall(MCL_FUTURE) locked every mapping made after it: unprivileged, every later
        # allocation past RLIMIT_MEMLOCK (8 MiB) of every function failed (a 500
        # MemoryError); as root, each was faulted in whole at once.
        def locked() -> float:
            r = client.post("/v1/functions/locked_with_a_new_mapping/evaluate", json=X)
            assert r.status_code == 200, r.text
            return r.json()["output"]["data"][0]

        unlocked = locked()
        r = client.post("/v1/functions/locks_every_later_mapping/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        assert locked() == unlocked
        # personality(UNAME26): every later function's os.uname() named kernel 2.6.
        r = client.post("/v1/functions/changes_its_personality/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        _sin_ok(client.post, "sin")
        with open(f"/proc/{engine}/personality") as personality:
            assert int(personality.read(), 16) == 0
        # An engine run as root: unshare(CLONE_NEWNET) left every later function's network
        # unreachable, CLONE_NEWUTS and sethostname every later gethostname the function's,
        # chroot every later import of a module not yet loaded refused (the engine left
        # after, by chance: its socket file was out of its sight). Put back, the same engine.
        engine = client.get("/v1/info").json()["engine_pids"][0]
        for how in (1.0, 2.0):
            r = client.post("/v1/functions/enters_namespaces/jacobian", json={"inputs": [[666.0, how, 0.0]]})
            assert r.status_code == 200, r.text
            _sin_ok(client.post, "sin")
            assert client.get("/v1/info").json()["engine_pids"][0] == engine, how
            for name in ("net", "uts", "mnt"):
                assert os.stat(f"/proc/{engine}/task/{engine}/ns/{name}").st_ino == os.stat(f"/proc/self/ns/{name}").st_ino
            assert os.readlink(f"/proc/{engine}/root") == "/"
        # An engine started as root that a function switched to nobody ran every later
        # function as nobody (its files, caches and devices refused).
        r = client.post("/v1/functions/switches_to_nobody/jacobian", json=ARMED)
        assert r.status_code == 200, r.text
        r = client.post("/v1/functions/effective_user/evaluate", json=X)
        assert r.json()["output"]["data"][0] == os.geteuid(), r.text
    stopped = time.monotonic()
    proc.terminate()
    proc.wait(timeout=30)
    assert time.monotonic() - stopped < 10  # the engine took its SIGTERM
    log = proc.read_log()
    assert "died" not in log[getattr(proc, "settled_at", 0):], log[-3000:]  # (the last test's restart before)
    for function, setting in (
        ("limits_cpu_time", "resource limits"),
        ("sets_a_profile_function", "the profile function"),
        ("ignores_sigterm_and_sets_umask", "signal handlers"),
        ("ignores_sigterm_and_sets_umask", "the signal mask"),
        ("ignores_sigterm_and_sets_umask", "the umask"),
        ("arms_an_alarm", "an interval timer"),
        ("redirects_stdout_and_stderr", "descriptors 0-2"),
        ("sets_switch_interval", "the thread switch interval"),
        ("idles_and_pins_itself", "the scheduling policy"),
        # (what its functions detach would go to serve, and outlive it killed outright)
        ("stops_being_a_subreaper", "the child subreaper flag"),
        ("exits_on_unraisable", "the exception hooks"),
        ("locks_every_later_mapping", "locked memory"),
        ("changes_its_personality", "the execution domain"),
        *([("enters_namespaces", "the root directory or namespaces")] if os.geteuid() == 0 else []),
        ("hooks_every_fork", "the fork hooks (os.register_at_fork)"),
        # dictConfig disabled every logger made before it: the engine's lines, this
        # one (the dtype it changed) among them, went nowhere from then on.
        ("configures_logging", "the service's own loggers"),
        ("configures_logging", "torch's default dtype"),
        *([("idles_and_pins_itself", "the CPU affinity")] if len(os.sched_getaffinity(0)) > 1 else []),
        *([("switches_to_nobody", "the user, groups or capabilities")] if os.geteuid() == 0 else []),
    ):
        assert f"{function} changed {setting}" in log, (function, setting)


def test_a_functions_module_that_configures_logging_as_it_is_imported_leaves_the_engines_log_on():
    """``logging.config.dictConfig`` at a module's import disabled the service's loggers
    in the engine before it served: it never said it was ready, nor what a function
    changed, nor any error, for as long as it lived."""
    with live_server(FUNCTIONS="jacobian_service.examples,tests.logging_config_functions", WORKERS=1,
                     ENGINE_STANDBY="false") as (url, proc):
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/v1/functions/sets_float64_default_too/jacobian", json={"inputs": [[0.5, 1.0]]})
            assert r.status_code == 200, r.text
            _sin_ok(client.post, "sin")  # after the last batch's settings were put back, and said so
        log = _log_saying(proc, "engine 0 ready on cpu", "sets_float64_default_too changed torch's default dtype")
        assert "engine 0 ready on cpu" in log, log[-3000:]
        assert "sets_float64_default_too changed torch's default dtype" in log, log[-3000:]


# Runs ``serve`` without CAP_SYS_NICE (dropped from the bounding set, as a container's
# runtime drops it): an engine cannot lower its niceness again once a function raised it.
_NO_SYS_NICE = [
    sys.executable, "-c",
    "import ctypes, os, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(24, 23, 0, 0, 0); "  # PR_CAPBSET_DROP, CAP_SYS_NICE (root only)
    "os.execv(sys.argv[1], sys.argv[1:])",
]


@pytest.fixture(scope="class")
def waiting(tmp_path_factory):
    """The file ``filters_system_calls`` creates once running, named in the server's
    environment (asked for before ``served``, which starts the server)."""
    path = tmp_path_factory.mktemp("settings") / "waiting"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SETTINGS_WAITING", str(path))
        yield path


class TestReplaced:
    """One server, its engine with a warm spare, for the settings that cannot be put back:
    the engine leaves, naming the function, and the spare serves. Run without CAP_SYS_NICE
    (``_NO_SYS_NICE``; nothing else here needs it), and with ``$SETTINGS_WAITING`` set for
    ``filters_system_calls`` (each test asks for ``waiting`` before ``served``: whichever
    starts the server). The niceness test comes first: the sockets test then runs on a
    promoted spare, as it does run alone (it replaces the first engine itself)."""

    SERVER: ClassVar[dict[str, Any]] = {"wrapper": _NO_SYS_NICE, "FUNCTIONS": FUNCTIONS, "WORKERS": 1}

    def test_an_engine_left_with_a_setting_it_cannot_put_back_is_replaced(self, waiting, served):
        """A function raised the engine's niceness: without the privilege to lower it again,
        every later request of every function would have run at that priority. The engine
        leaves between batches, the supervisor names the function, and its spare serves."""
        url, proc = served.url, served.proc
        with httpx.Client(base_url=url, timeout=30) as client:
            r = client.post("/v1/functions/raises_its_niceness/jacobian", json={"inputs": [[666.0, 1.0]]})
            assert r.status_code == 200, r.text
            # The supervisor's line, and the engine's own, which comes through the engine's
            # relayed output on its own time: on a loaded machine it was not in the log yet
            # when the spare already served. Both are waited for.
            _replaced_naming(client, proc, "raises_its_niceness left the niceness changed, which cannot be put back",
                             "raises_its_niceness changed the niceness (to 5), which cannot be put back")

    def test_an_engine_left_with_a_seccomp_filter_or_its_sockets_closed_is_replaced(self, waiting, served):
        """A function installed a seccomp filter (through ctypes) that fails ``uname`` with
        EPERM. No process can lift one: every later function's ``os.uname()`` failed in that
        engine for as long as it lived (a filter that kills would end it under another
        function's request). The engine leaves between batches, the supervisor names the
        function, and the spare, without the filter, serves. It leaves at once: a request
        queued behind the function ran first, under the filter (``can_uname`` answered 0,
        a 200), for up to 2 s of requests of every function.

        A function closed the engine's sockets: with its listening socket closed the engine
        served on through the front ends' open connections, but a front end started again
        (or a new one) could never connect, and each of its requests waited for its deadline
        (504), /readyz 200, for as long as the engine lived. It leaves too, naming the
        function. The culprit's answer went with its connection: its request is its 500, not
        sent again to the spare to close that one's too (each time, on to the deadline).
        (Each descriptor alone: test_channel.)

        On an engine that had replaced another (a promoted spare: its descriptors 0-2 are
        sockets too), the change to those was found first, and the engine left naming no
        request: the culprit's request was sent on to the next engine, which it closed too,
        and the next, until its 503 "engines left one after another" (measured: the
        niceness test first). Now the engine names the requests whose answers it could
        not send, and says the connection first: the same 500, one engine gone."""
        url, proc = served.url, served.proc
        with httpx.Client(base_url=url, timeout=30) as client:
            if "engine 0 died: " not in proc.read_log():  # (run alone) on a replaced engine, as after the niceness test
                assert client.post("/v1/functions/raises_its_niceness/jacobian", json={"inputs": [[666.0, 1.0]]}
                                   ).status_code == 200
                _replaced_naming(client, proc, "engine 0 died: raises_its_niceness")
            r = client.post("/v1/functions/closes_the_engines_sockets/jacobian", json=ARMED)
            body = assert_problem(r, 500, "function_error")
            assert body["detail"] == ("closes_the_engines_sockets left the engine's connection to a front end closed; "
                                      "engines skip its warm-up while running this request; the engine was restarted")
            _replaced_naming(client, proc, "closes_the_engines_sockets closed the engine's connection to a front end")
            assert served.log().count("engine 0 died: closes_the_engines_sockets") == 1, proc.read_log()[-3000:]
            answers: list[httpx.Response] = []
            culprit = threading.Thread(target=lambda: answers.append(httpx.post(
                f"{url}/v1/functions/filters_system_calls/jacobian", json={"inputs": [[667.0, 1.0, 2.0]]}, timeout=30)))
            culprit.start()  # it waits, once running, until a request waits behind it
            deadline = time.monotonic() + 20
            while not waiting.exists():
                assert time.monotonic() < deadline, proc.read_log()[-3000:]
                time.sleep(0.02)
            while (r := client.post("/v1/functions/can_uname/evaluate", json=X)).status_code == 503:
                assert time.monotonic() < deadline + 40  # sent on: no engine up for a moment
                time.sleep(0.1)
            assert r.status_code == 200, r.text
            assert r.json()["output"]["data"] == [1.0, 1.0, 1.0]
            culprit.join()
            assert answers[0].status_code == 200, answers[0].text
            setting = "the system-call filter (seccomp), no_new_privs or memory-deny-write-execute (prctl)"
            _replaced_naming(client, proc, f"filters_system_calls left {setting} changed, which cannot be put back")
            said = f"filters_system_calls changed {setting} (to "
            assert said in _log_saying(proc, said), proc.read_log()[-3000:]


def _replaced_naming(client: httpx.Client, proc, *said: str) -> None:
    """Until the log says every line of ``said`` and another engine serves."""
    deadline = time.monotonic() + 30
    while not all(line in proc.read_log() for line in said):
        assert time.monotonic() < deadline, proc.read_log()[-3000:]
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while (r := client.post("/v1/functions/scaled_by_ones/evaluate", json=X)).status_code == 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_a_function_that_closes_the_engines_descriptors_on_its_warm_up_is_named_and_skipped(monkeypatch):
    """``os.closerange`` on the warm-up's call closed the engine's sockets. The engine
    died once it served, naming no function (it was running none). Without a spare,
    every engine after it warmed the function up again and died the same way: the server
    never became ready. (A spare opens its sockets after its warm-up, so it survived,
    but the function was never named.) Now the engine sees after that warm-up that its
    descriptors are gone and leaves naming the function, whose warm-up the next engines
    skip."""
    monkeypatch.setenv("SETTINGS_CLOSE_AT_WARM_UP", "1")
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, ENGINE_STANDBY="false") as (url, proc):
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 60
            while (r := client.post("/v1/functions/scaled_by_ones/evaluate", json=X)).status_code == 503:
                assert time.monotonic() < deadline, proc.read_log()[-3000:]
                time.sleep(0.2)
            assert r.status_code == 200, r.text
            assert _output_dtype(client.post) == "float32"
        said = ("closes_descriptors_at_warm_up left descriptors 0-2 (stdin, stdout, stderr), the engine's log pipe, "
                "or the engine's own changed, which cannot be put back")
        assert said in _log_saying(proc, said), proc.read_log()[-3000:]


def test_an_engine_on_a_second_gpu_makes_it_the_current_device_of_its_thread(monkeypatch, caplog):
    """CUDA's current device is per thread and 0 until set: an engine on cuda:1 left it so,
    and its functions' ``device="cuda"`` tensors (and its pinned memory's context) went to
    GPU 0. The thread that runs its batches now sets it first, and it is put back after a
    batch whose function set another. CUDA's calls are stood in for: this needs two GPUs."""
    from jacobian_service.engine.core import Engine
    from jacobian_service.scheduler import ThreadedWorker, Worker

    current: dict[int, int] = {}  # thread -> its current device, as CUDA keeps it
    import threading

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.__setitem__(threading.get_ident(), torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current.get(threading.get_ident(), 0))
    engine = Engine(torch.device("cuda", 1), 1 << 20)
    worker = ThreadedWorker(Worker(engine, max_queue=1), "test-worker")
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while worker.thread.ident not in current:
            assert time.monotonic() < deadline, "the worker thread did not set its device"
            time.sleep(0.01)
        assert current[worker.thread.ident] == 1
    finally:
        worker.stop()
    current[threading.get_ident()] = 0  # a function set GPU 0 in the thread that runs batches
    with caplog.at_level(logging.WARNING):
        engine.restore_settings("moves_device")
        engine.restore_settings("moves_device")
    assert current[threading.get_ident()] == 1
    assert caplog.text.count("moves_device changed the current CUDA device and left it so; put back to cuda:1") == 1


def test_the_status_file_is_read_whole_through_its_descriptor(monkeypatch):
    """/proc/self/status is read after every batch (the ignored signals, seccomp, the
    capabilities): through a descriptor and os.read alone, not a buffered file object
    (four more system calls and two objects a batch). Fields read as the kernel says;
    no descriptor free is "unknown this pass", not a change."""
    import builtins
    import errno as errno_module

    from jacobian_service.engine import process_settings as ps

    def no_file_objects(*args, **kwargs):
        raise AssertionError("a buffered file object was opened")

    monkeypatch.setattr(ps, "_STATUS_FD", [])  # none kept (an engine process keeps one: below)
    monkeypatch.setattr(builtins, "open", no_file_objects)
    ps._STATUS.clear()
    text = ps._read_file(f"/proc/{os.getpid()}/status")
    ps._STATUS.clear()
    assert ps._status(b"Name") == text.split(b"Name:", 1)[1].split(b"\n", 1)[0].strip()
    assert ps._status_number(b"NoNewPrivs") in (0, 1) and ps._ignored() == int(ps._status(b"SigIgn"), 16)
    monkeypatch.undo()

    def emfile(*args, **kwargs):
        raise OSError(errno_module.EMFILE, "Too many open files")

    # none kept here either: undo() put back the module's own list, which holds one once an
    # in-process engine of an earlier test (same pytest worker) has kept it
    monkeypatch.setattr(ps, "_STATUS_FD", [])
    monkeypatch.setattr(ps.os, "open", emfile)
    ps._STATUS.clear()
    with pytest.raises(ps._NoDescriptor):
        ps._status(b"SigIgn")
    monkeypatch.undo()
    ps._STATUS.clear()


def test_the_status_file_is_read_again_through_a_kept_descriptor_that_is_still_its_own(monkeypatch, tmp_path):
    """An engine process keeps /proc/self/status open and reads it again from its start
    at each pass (one system call where opening it again took three more): no
    descriptor is needed then, even with none free. A function may close that descriptor
    or put another file at its number: what is read there is used only while it names
    this process, else the file is opened afresh."""
    from jacobian_service.engine import process_settings as ps

    monkeypatch.setattr(ps, "_STATUS_FD", [])
    ps.keep_status_open()
    kept = ps._STATUS_FD[0]
    real = b"\n" + ps._read_file("/proc/self/status")
    field = lambda text, name: text.split(b"\n" + name + b":", 1)[1].split(b"\n", 1)[0].strip()  # noqa: E731

    def emfile(*args, **kwargs):
        raise OSError(24, "Too many open files")

    opened = []
    try:
        with monkeypatch.context() as m:
            m.setattr(ps.os, "open", emfile)  # no descriptor free: the kept one serves
            ps._STATUS.clear()
            assert ps._status(b"SigIgn") == field(real, b"SigIgn")
            assert ps._status(b"Name") == field(real, b"Name")
        # Another file at its number, a status that names another process: not used.
        fake = tmp_path / "status"
        fake.write_bytes(b"Name:\tx\nPid:\t1\nSigIgn:\tffffffffffffffff\nSeccomp:\t2\n")
        other = os.open(fake, os.O_RDONLY)
        opened.append(other)
        os.dup2(other, kept)
        ps._STATUS.clear()
        assert ps._status(b"SigIgn") == field(real, b"SigIgn") and ps._status(b"Seccomp") == field(real, b"Seccomp")
        assert ps._STATUS_FD and ps._STATUS_FD[0] != kept  # its own again, at a new number
        opened.append(ps._STATUS_FD[0])
        # Closed under it: opened afresh.
        os.close(ps._STATUS_FD[0])
        opened.pop()
        ps._STATUS.clear()
        assert ps._status(b"SigIgn") == field(real, b"SigIgn")
        opened.append(ps._STATUS_FD[0])
    finally:
        for fd in {kept, *opened}:
            try:
                os.close(fd)
            except OSError:
                pass
        ps._STATUS.clear()


class EqualToEverything:
    """A hook (a handler, a profile function, a stream) whose ``__eq__`` says equal to
    anything, None included: only an identity test sees it replace another."""

    def __eq__(self, other: object) -> bool:
        return True

    def __ne__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __call__(self, *args: object) -> None:
        return None

    def write(self, text: str) -> int:
        return len(text)


def test_a_hook_equal_to_everything_is_still_taken_for_a_change():
    """The pass that finds nothing changed compares the settings tested by value in one
    step (``ProcessSettings._unchanged``); a hook is tested by identity, never by ``==``:
    a profile function whose ``__eq__`` says equal to anything (None included) is still
    seen, and put back."""
    from jacobian_service.engine.process_settings import ProcessSettings

    before = sys.getprofile()
    settings = ProcessSettings()
    try:
        sys.setprofile(EqualToEverything())
        settings.restore("equal_hook")
        assert sys.getprofile() is before
    finally:
        sys.setprofile(before)


# ----------------------------------------------------------------- the pass that finds nothing changed
# In this process, as an engine process takes them (``own_process``): what each test
# changes is put back by the pass itself, and each test checks that it was.


def _own_settings():
    from jacobian_service.engine.process_settings import ProcessSettings

    return ProcessSettings(own_process=True)  # in the test's body: pytest changes the environment between phases


def test_the_pass_that_finds_nothing_changed_reads_what_the_status_text_tells_from_it(monkeypatch):
    """/proc/self/status, read at each pass for the ignored signals, seccomp and the
    capabilities, tells the ids, the groups, the signal mask and the umask too: the pass
    that finds nothing changed (nearly every one) compares those lines, where it made a
    system call or two for each (and prctl through ctypes for no_new_privs)."""
    if threading.get_native_id() != os.getpid():
        pytest.skip("the status text is the main thread's")
    from jacobian_service.engine import process_settings as ps

    monkeypatch.setattr(ps, "_TIMERS", ())  # pytest-timeout's timer, counting down: a change at each pass
    own_settings = _own_settings()
    calls: list[str] = []

    def counted(name, real):
        def call(*args):
            calls.append(name)
            return real(*args)
        return call

    for module, name in ((os, "getresuid"), (os, "getresgid"), (os, "getgroups"), (os, "umask"),
                         (ps.signal, "pthread_sigmask")):
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    own_settings.restore("changes_nothing")
    own_settings.restore("changes_nothing")
    assert calls == [] and own_settings.unrestorable is None


def test_what_the_status_text_tells_is_still_put_back_and_named(engine_log):
    """The status lines stand for the ids, the mask, the umask and the affinity only while
    they are the same: a function that changes one is seen there, and the full pass puts
    it back and names it."""
    own_settings = _own_settings()
    umask = os.umask(0o077)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    cpus = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {min(cpus)})
    try:
        own_settings.restore("changes_what_the_status_tells")
        assert os.umask(umask) == umask
        assert signal.pthread_sigmask(signal.SIG_BLOCK, ()) == mask
        assert os.sched_getaffinity(0) == cpus
    finally:
        os.umask(umask)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.sched_setaffinity(0, cpus)
    said = " ".join(engine_log)
    for setting in ("the umask", "the signal mask", *(["the CPU affinity"] if len(cpus) > 1 else [])):
        assert f"changes_what_the_status_tells changed {setting}" in said, (setting, engine_log)


def test_a_global_module_hook_put_in_place_of_another_under_its_key_is_put_back(engine_log):
    """torch.nn's global hooks are counted, not copied, where the engine started with none;
    with hooks of its own, a hook put in place of one of them under the same key (the
    dict's own assignment: same keys, same length) doubled every later module's output,
    and was kept: the full pass compared the keys alone. Hooks are told by identity."""
    from torch.nn.modules import module as nn_module

    from jacobian_service.engine.process_settings import ProcessSettings

    linear = torch.nn.Linear(2, 2, bias=False)
    x = torch.ones(2)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(2))
    handle = nn_module.register_module_forward_hook(lambda module, args, out: out)  # the engine's own
    try:
        settings = ProcessSettings(own_process=True)
        key = next(iter(nn_module._global_forward_hooks))
        nn_module._global_forward_hooks[key] = lambda module, args, out: out * 2  # what the function does
        assert torch.equal(linear(x), 2 * x)
        settings.restore("swaps_a_module_hook")
        assert torch.equal(linear(x), x)
        handle.remove()
        fresh = ProcessSettings(own_process=True)  # none of its own: counted
        nn_module.register_module_forward_hook(lambda module, args, out: out * 2)
        fresh.restore("adds_a_module_hook")
        assert torch.equal(linear(x), x) and not nn_module._global_forward_hooks
    finally:
        handle.remove()
        nn_module._global_forward_hooks.clear()
    said = " ".join(engine_log)
    for function in ("swaps_a_module_hook", "adds_a_module_hook"):
        assert f"{function} changed torch.nn's global module hooks" in said, engine_log


def test_handlers_hooks_and_streams_equal_to_everything_are_still_taken_for_a_change():
    """Signal handlers, exception hooks and sys.stdout are compared by their ids in the
    pass that finds nothing changed: one whose ``__eq__`` says equal to anything is
    still seen, and put back."""

    own_settings = _own_settings()
    before = (signal.getsignal(signal.SIGUSR1), sys.unraisablehook, sys.stdout)
    try:
        signal.signal(signal.SIGUSR1, EqualToEverything())
        sys.unraisablehook = EqualToEverything()
        sys.stdout = EqualToEverything()
        own_settings.restore("sets_equal_hooks")
        assert (signal.getsignal(signal.SIGUSR1), sys.unraisablehook, sys.stdout) == before
        assert all(a is b for a, b in zip((signal.getsignal(signal.SIGUSR1), sys.unraisablehook, sys.stdout), before))
    finally:
        signal.signal(signal.SIGUSR1, before[0])
        sys.unraisablehook, sys.stdout = before[1], before[2]


def test_a_change_let_be_is_compared_with_from_then_on(monkeypatch):
    """An environment variable added (torch adds TORCHINDUCTOR_CACHE_DIR at its first
    compile) or an "ignore" warning filter (a library imported lazily) is let be, as
    harmless: every pass after it then differed from the values taken and ran the full
    pass, at twice the cost, for as long as the engine lived. The pass that lets a
    change be now compares the next ones with it, and a change after it is still seen."""
    from jacobian_service.engine import process_settings as ps

    monkeypatch.setattr(ps, "_TIMERS", ())  # pytest-timeout's timer, counting down: a change at each pass
    settings = _own_settings()
    monkeypatch.setenv("JACOBIAN_SERVICE_TEST_ADDED", "1")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="a library's own")
        settings.restore("adds_harmless_things")
        ps._STATUS.clear()
        assert settings._unchanged()
        assert os.environ["JACOBIAN_SERVICE_TEST_ADDED"] == "1"
        monkeypatch.setenv("JACOBIAN_SERVICE_TEST_ADDED", "2")  # an added variable changed again: let be too
        settings.restore("changes_it_again")
        ps._STATUS.clear()
        assert settings._unchanged()
        let_be = list(warnings.filters)
        warnings.simplefilter("error")  # harmful: still put back
        ps._STATUS.clear()
        assert not settings._unchanged()
        settings.restore("makes_warnings_errors")
        assert warnings.filters == let_be
        ps._STATUS.clear()
        assert settings._unchanged()


def test_every_function_a_setting_was_put_back_for_is_named_past_the_logs_repeat_limit(kept):
    """The engine names each function and setting it put back once in its life, and its
    log's ``RepeatFilter`` says at most 100 distinct lines from one place in 10 s: a
    warm-up of a module with more changers than that (the same setting, each function
    its own line) lost the rest to a count ("... N more times: <the first's line>"),
    and, named already, they were never said again: an operator could not learn which
    functions changed what. The naming line is bounded by the registry (a line per
    function and setting), never by a client: it passes the filter."""
    from jacobian_service.engine.process_settings import ProcessSettings
    from jacobian_service.logs import RepeatFilter

    handler = _Lines()
    handler.addFilter(RepeatFilter())  # as the engine's handler has it (logs.configure_logging)
    logger = logging.getLogger("jacobian_service.engine")
    logger.addHandler(handler)
    try:
        settings = ProcessSettings()
        for i in range(120):
            torch.set_default_dtype(torch.float64)
            settings.restore(f"changer_{i}")
            assert torch.get_default_dtype() == torch.float32
    finally:
        logger.removeHandler(handler)
    named = {line.split(" ", 1)[0] for line in handler.lines if "changed torch's default dtype" in line}
    assert named == {f"changer_{i}" for i in range(120)}, sorted(handler.lines)[-3:]


def test_an_execution_domain_that_cannot_be_put_back_says_so(monkeypatch):
    """personality(2) refused (-1: a filter, a domain the kernel does not know): the put
    raises, and the engine names it as a setting it cannot put back, not as put back."""
    from jacobian_service.engine import process_settings as ps

    class Refusing:
        @staticmethod
        def personality(persona: int) -> int:
            return -1

    monkeypatch.setattr(ps, "_libc_calls", lambda: Refusing)
    with pytest.raises(OSError, match="personality"):
        ps._put_personality(0)
