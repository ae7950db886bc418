"""Review, round two: what this session's changes broke for legitimate users, found by
reading them as an outside tester would. Each case names what a user saw before."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from jacobian_service.confinement import confiner

# An engine's function whose torch runs OpenMP with its threads pinned (OMP_PROC_BIND, the
# usual tuning on a many-core host), and which then tries to pin a process outside it (a
# front end, here the test's sibling) to one core.
_PINNED = r"""
import os, sys, threading
import torch
torch.set_num_threads(2)
x = torch.arange(4.0 * 512 * 512, dtype=torch.float64).reshape(4, 512, 512) / 1e6
print("sum", float((x @ x).sum()))
me = threading.get_native_id()
os.sched_setaffinity(me, os.sched_getaffinity(0))  # its own thread, by id: glibc's pthread_setaffinity_np
print("thread", "ok")
sibling = int(sys.argv[1])
os.sched_setaffinity(sibling, {min(os.sched_getaffinity(sibling))})
os.sched_setscheduler(sibling, os.SCHED_IDLE, os.sched_param(0))
print("sibling", "done")
"""


def test_an_engine_whose_openmp_pins_its_threads_still_computes() -> None:
    """The filter that keeps an engine's scheduling calls to itself refused
    ``sched_setaffinity`` on any thread id but the engine's own pid: glibc creates a
    pinned thread (``pthread_attr_setaffinity_np``, what libgomp does under OMP_PROC_BIND,
    OMP_PLACES or GOMP_CPU_AFFINITY) with that call on the new thread's id, so every
    engine ended at its first parallel region ("libgomp: Thread creation failed:
    Operation not permitted", exit 1): the service never answered again. Now a scheduling
    call on another id is answered as done and changes nothing (the filter cannot tell
    the engine's threads from other processes): the engine computes what an unconfined
    process does, and a process outside it keeps its affinity and policy."""
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        before = os.sched_getaffinity(sibling.pid), os.sched_getscheduler(sibling.pid)
        confined = subprocess.run([sys.executable, "-c", _PINNED, str(sibling.pid)], capture_output=True, text=True,
                                  timeout=60, env={**os.environ, "OMP_PROC_BIND": "true"}, start_new_session=True,
                                  preexec_fn=confiner(landlock=False))
        assert confined.returncode == 0, confined.stderr[-2000:]
        x = torch.arange(4.0 * 512 * 512, dtype=torch.float64).reshape(4, 512, 512) / 1e6
        assert float(confined.stdout.split()[1]) == pytest.approx(float((x @ x).sum()), rel=1e-12)
        assert confined.stdout.splitlines()[1:] == ["thread ok", "sibling done"]
        assert (os.sched_getaffinity(sibling.pid), os.sched_getscheduler(sibling.pid)) == before
    finally:
        sibling.kill()
        sibling.wait()


# A process that writes its metrics as the server's processes do (multiprocess mode), on
# a file system whose fallocate fails as argv[2] says (a seccomp filter stands in for the
# file system: EOPNOTSUPP is what NFSv3 or a FUSE file system without it answers; ENOSPC
# a full disk). Its counter gets 600 children: the file grows past its first 64 KiB.
_METRICS = r"""
import ctypes, errno, os, platform, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from jacobian_service import confinement as c
p = c._Program()
p.load(c._NR)
p.if_equal_return({"x86_64": 285, "aarch64": 47}[platform.machine()], c._SECCOMP_RET_ERRNO | int(sys.argv[2]))
p.ret(c._SECCOMP_RET_ALLOW)
code = p.assemble()
buf = ctypes.create_string_buffer(code, len(code))
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(c._PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
assert libc.prctl(c._PR_SET_SECCOMP, c._SECCOMP_MODE_FILTER,
                  ctypes.byref(c._SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))), 0, 0) == 0
from jacobian_service.metrics import Metrics
m = Metrics()
for i in range(600):
    m.requests.labels(f"f{i}", "jacobian", "200", "").inc(i + 1)
sys.stdout.buffer.write(m.render())
"""


@pytest.mark.parametrize("fails", [errno.EOPNOTSUPP, errno.ENOSPC])
def test_metrics_on_a_file_system_without_fallocate_or_room(tmp_path, fails: int) -> None:
    """The sample files are reserved with ``posix_fallocate`` (a full disk is ENOSPC, not a
    SIGBUS). Where the file system has no fallocate, glibc writes each block instead, and
    refuses a file open to append, as the library opens it: EBADF, and every process's
    samples went to memory, out of ``/metrics`` (none of the 600 counted here), with an
    empty file left that every scrape logged as unreadable. Now, without fallocate, every
    sample is in ``/metrics``, from a file that grew past its first size; with no room,
    the samples stay in memory, as said once, and no empty file is left behind."""
    out = subprocess.run([sys.executable, "-c", _METRICS, str(tmp_path), str(fails)], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "does not read" not in out.stderr
    files = {f.name: f.stat().st_size for f in tmp_path.iterdir()}
    if fails == errno.EOPNOTSUPP:
        assert "no room" not in out.stderr, out.stderr
        for i in range(600):
            assert (f'jacobian_service_requests_total{{code="",endpoint="jacobian",function="f{i}",status="200"}} '
                    f"{i + 1}.0") in out.stdout, i
        assert files[f"counter_{_pid_of(files)}.db"] > 1 << 16
    else:
        assert "no room for this process's metrics file" in out.stderr
        assert "jacobian_service_requests_total{" not in out.stdout
        assert all(size > 0 for size in files.values()), files


def _pid_of(files: dict[str, int]) -> str:
    return next(name.split("_")[-1][:-3] for name in files if name.startswith("counter_"))
