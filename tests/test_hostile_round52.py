"""Red team, round fifty-two: hostile functions against the disk, through the temporary
files they leave while their engine lives (its own ``TMPDIR`` goes only as it ends), and
against the machine's memory, through SysV shared memory segments that outlive them.

Each case names what a user saw before. One real server for the file (one front end, a
spare); the functions are in tests/hostile52_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how. The watch itself
(``engine.disk_watch``) is tested in process first, no server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from jacobian_service import ipc
from jacobian_service.engine.disk_watch import DiskWatch
from jacobian_service.engine.memory_watch import shared_beyond_resident
from jacobian_service.orphans import remove_segments
from jacobian_service.procfs import sysv_queues, sysv_segments, sysv_semaphores
from jacobian_service.supervisor import _disk_filler

from ._fault_support import _log_saying
from .conftest import assert_problem, live_server
from .hostile52_functions import (KEEP_BYTES, QUEUED_BYTES, SYSV_BYTES, _keep_sysv_queue, _keep_sysv_segment,
                                  _keep_sysv_semaphores)
from .test_hostile_round11 import _armed, _engine_pid, _replaced

FUNCTIONS = "jacobian_service.examples,tests.hostile52_functions"
LIMIT = 4 * KEEP_BYTES  # ENGINE_MAX_TMP_BYTES: the fifth armed call passes it


# ------------------------------------------------------------ the watch, in process

def test_the_watch_counts_named_and_unnamed_temporary_files_and_charges_who_took_them(tmp_path) -> None:
    """Files under the directory (nested too) and unnamed ones the process holds open
    (``TemporaryFile``'s ``O_TMPFILE``) count, by their blocks; past the bound the check
    says so, naming the function whose batches took the space."""
    watch = DiskWatch(str(tmp_path), limit=3 << 20, every_s=0.0)
    watch.start()
    assert watch.check(time.monotonic()) is None
    (tmp_path / "a" / "b").mkdir(parents=True)
    with open(tmp_path / "a" / "b" / "kept", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 2 << 20)
    watch.after_run("leaky")
    assert watch.check(time.monotonic()) is None  # 2 MiB: under 3
    unnamed = tempfile.TemporaryFile(dir=tmp_path)
    try:
        os.posix_fallocate(unnamed.fileno(), 0, 2 << 20)
        watch.after_run("leaky")
        watch.after_run("innocent")
        over = watch.check(time.monotonic())
        assert over is not None and over["held"] >= 4 << 20 and over["limit"] == 3 << 20, over
        assert over["grown"][0][0] == "leaky", over
        assert "temporary files took 4 MiB of disk" in ipc.recycle_reason({"disk": over})
        # Struck for it (``Supervisor._died``) only where one function took half the bound or more.
        assert _disk_filler({"disk": over}) == "leaky"
        assert _disk_filler({"disk": {**over, "grown": [["leaky", 1 << 20], ["innocent", 1 << 20]]}}) is None
    finally:
        unnamed.close()


def test_files_written_outside_count_but_not_the_engine_s_own_pattern_cache(tmp_path) -> None:
    """A file the process opens for writing outside the directory counts by what it grew
    (followed through a rename); one in the directories the engine's own code writes to
    (``shared``: the sparsity pattern cache, ``EngineServer``'s) does not: counted, the
    patterns clients' shapes had the engine write recycled it and struck the function."""
    own, out, cache = (tmp_path / n for n in ("own", "out", "cache"))
    for d in (own, out, cache):
        d.mkdir()
    watch = DiskWatch(str(own), limit=3 << 20, every_s=0.0, shared=(cache, None))
    watch.start()
    for d in (out, cache):
        with open(d / "f.part", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 2 << 20)
        os.replace(d / "f.part", d / "f")
    watch.after_run("writer")
    assert (2 << 20) <= watch.held()[0] < (4 << 20)
    assert watch.check(time.monotonic()) is None  # (2 MiB of 3: with the cache's, 4, over)


def test_a_directory_of_too_many_files_is_over_by_itself(tmp_path) -> None:
    """A million empty files take no blocks, yet each costs the walk: past
    ``max_entries`` the walk stops and the engine is over the bound."""
    watch = DiskWatch(str(tmp_path), limit=1 << 30, every_s=0.0, max_entries=50)
    watch.start()
    for i in range(60):
        (tmp_path / f"f{i}").touch()
    watch.after_run("many")
    over = watch.check(time.monotonic())
    assert over is not None and over["entries"] > 50, over


def test_a_batch_that_takes_the_room_left_has_the_count_made_at_once(tmp_path) -> None:
    """Counted once a second, 20 calls of 8 MiB in 0.1 s took 160 MiB past a 64 MiB
    bound before the count; the free space read after each batch brings it forward."""
    watch = DiskWatch(str(tmp_path), limit=1 << 20, every_s=3600.0)
    watch.start()
    watch._last = time.monotonic()  # (counted just now: the next is an hour away)
    with open(tmp_path / "big", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 4 << 20)
    watch.after_run("fast")
    assert watch.check(time.monotonic()) is not None


def test_a_file_c_code_holds_open_for_writing_outside_the_directory_counts_what_it_grows_by(tmp_path) -> None:
    """A file C code opened (``fopen`` through ctypes; a C++ writer, a library's log) is
    not seen by the audit hook: 8 MiB a write, flushed, it counted 0 (round 55). Held
    open, it is noted at the next count from the descriptor, and what it grows by counts."""
    import ctypes
    import ctypes.util

    (tmp_path / "run" / "own").mkdir(parents=True)  # (the run directory's own files are the service's)
    watch = DiskWatch(str(tmp_path / "run" / "own"), limit=1 << 40, every_s=0.0)
    watch.start()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_char_p]
    libc.fwrite.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    libc.fflush.argtypes = libc.fclose.argtypes = [ctypes.c_void_p]
    fp = libc.fopen(str(tmp_path / "c.log").encode(), b"ab")
    try:
        held = []
        for _ in range(3):
            assert libc.fwrite(b"x" * (4 << 20), 4 << 20, 1, fp) == 1 and libc.fflush(fp) == 0
            held.append(watch.held()[0])
        assert held[2] - held[0] >= 8 << 20, held
    finally:
        libc.fclose(fp)


def test_a_shared_temporary_directory_is_not_watched(tmp_path) -> None:
    """Only a directory of its own: an engine run without ``serve`` (TMPDIR /tmp, shared
    with everyone) watches nothing."""
    watch = DiskWatch(None)
    watch.start()
    watch.after_run("f")
    assert watch.limit is None and watch.check(time.monotonic()) is None


def test_a_sysv_segment_left_unmapped_is_counted_as_the_engines_memory_and_removed_after() -> None:
    """A SysV segment made, written and unmapped, never removed, is in no resident size,
    no descriptor and no mapping: ``ENGINE_MAX_RSS_BYTES`` never saw it. It is counted
    now as memory the process keeps, and ``remove_segments`` takes it away, with a message
    queue the process was the last to send to (kernel memory, kept the same way)."""
    beyond = shared_beyond_resident()
    since = time.time() - 1
    shmid = _keep_sysv_segment()
    try:
        assert (shmid, SYSV_BYTES, 0) in sysv_segments(os.getpid())
        assert shared_beyond_resident() >= beyond + SYSV_BYTES
        msqid = _keep_sysv_queue()
        assert (msqid, QUEUED_BYTES) in sysv_queues(os.getpid())
        # And semaphore sets (round 53: not removed): one set (the kernel names no maker:
        # its last setter), one private and never touched.
        sems = {_keep_sysv_semaphores(True), _keep_sysv_semaphores(False)}
        assert sems <= _semaphore_sets()
    finally:
        assert remove_segments(os.getpid(), since) == (4, SYSV_BYTES + QUEUED_BYTES)
    assert sysv_segments(os.getpid()) == [] and sysv_queues(os.getpid()) == [] and not sems & _semaphore_sets()


_UNREADABLE_SET = """import ctypes, os, sys, time
from jacobian_service.orphans import remove_segments
libc = ctypes.CDLL(None, use_errno=True)
since = time.time() - 1
semid = libc.semget(0, 2, 0o1000)  # IPC_PRIVATE, IPC_CREAT, no mode bits: its maker may not read it
assert semid >= 0 and libc.semctl(semid, 0, 11) == -1  # GETPID refused
removed = remove_segments(os.getpid() + 1, since)  # (a dead engine's pid: not this process)
if removed[0] == 0:
    libc.semctl(semid, 0, 0)
print(removed[0])
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="made as another user: root, setpriv")
def test_a_private_semaphore_set_its_maker_cannot_read_goes_too() -> None:
    """Made with no mode bits (a C ``semget(IPC_PRIVATE, n, IPC_CREAT)``), a set's
    ``GETPID`` is refused to any user but root: run as one, the private, never operated
    on set a function left was kept, one of the machine's ``SEMMNI``."""
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                          _UNREADABLE_SET], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0 and out.stdout.split() == ["1"], (out.stdout, out.stderr[-2000:])


def _semaphore_sets() -> set[int]:
    return {semid for semid, *_ in sysv_semaphores(os.getuid())}


# ------------------------------------------------------------ a real server

@pytest.fixture(scope="module")
def temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve-tmp")


@pytest.fixture(scope="module")
def server(temp_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    with pytest.MonkeyPatch.context() as mp:  # only while it starts: the server keeps its environment
        mp.setenv("TMPDIR", str(temp_dir))
        (temp_dir / "outside").mkdir()
        mp.setenv("HOSTILE52_OUTSIDE", str(temp_dir / "outside"))
        with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", QUARANTINE_AFTER=3,
                         ENGINE_MAX_TMP_BYTES=LIMIT) as served:
            mp.undo()
            yield served


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def _engine_dirs(temp_dir: Path) -> set[Path]:
    return set(temp_dir.glob("jacobian-service-*/tmp-engine-*"))


def test_temporary_files_a_function_leaves_recycle_its_engine_past_the_bound(server, http, temp_dir) -> None:
    """A function that left a temporary file at each call (``mkstemp``; a ``TemporaryFile``
    kept open, in no listing) filled the disk for as long as its engine lived (measured,
    8 MiB a call: 60 calls, 480 MiB kept, the same engine, nothing logged). Now each
    call is answered, another client's ``sin`` too, and past ``ENGINE_MAX_TMP_BYTES`` the
    engine is recycled, the log naming the function, and its directory goes with it.
    And the function is struck for it, as for a crash: one that filled the bound again
    and again cost an engine restart each time, never quarantined (round 53, measured:
    20 calls, 4 restarts, still served); here, the third time (``QUARANTINE_AFTER=3``).
    Files it writes outside its engine's own directory (3: ``/tmp`` named outright, the
    home directory) were not watched at all (round 53: 12 calls, 96 MiB past a 32 MiB
    bound, nothing said); now they count too (they stay: not the engine's directory)."""
    url, proc = server
    for case, how in [(1, "kept"), (2, "unnamed, held open"), (3, "outside its directory")]:
        pid, start = _engine_pid(http, url), len(proc.read_log())
        before = _engine_dirs(temp_dir)
        for _ in range(5):  # (the fifth passes the bound: the engine leaves after it)
            r = _armed(http, url, "tmpleak52", case)
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, case, 0.0]), rtol=1e-12)
            v = http.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5, 1.0]]})
            assert v.status_code == 200, v.text
            np.testing.assert_allclose(np.diag(v.json()["jacobian"]["data"]), np.cos([0.5, 1.0]), rtol=1e-6)
        _replaced(http, url, pid, 60, f"the engine that held {how} temporary files was not recycled")
        log = _log_saying(proc, "tmpleak52 struck (its files alone took half the bound or more)", start=start)
        assert "over ENGINE_MAX_TMP_BYTES (32 MiB" in log and "grown most by tmpleak52" in log, log[-3000:]
        deadline = time.monotonic() + 20  # (the supervisor removes it as it sees the engine end)
        while all(d.exists() for d in before) or list(temp_dir.glob("jacobian-service-*/tmp-engine-*/hostile52-*")):
            assert time.monotonic() < deadline, f"the recycled engine's files stayed: {_engine_dirs(temp_dir)}"
            time.sleep(0.1)
        v = http.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5]]})
        assert v.status_code == 200, v.text
    # A function that made 20,001 empty files had its engine recycled (more than 20,000
    # files: over by itself) and was never struck, at 0 bytes grown ("grown most by no
    # function seen", round 55). Now the files it made count as the bytes do.
    pid, start = _engine_pid(http, url), len(proc.read_log())
    r = _armed(http, url, "files52", 1)
    assert r.status_code == 200, r.text
    _replaced(http, url, pid, 60, "the engine that held 20,001 files was not recycled")
    log = _log_saying(proc, "files52 struck (its files alone took half the bound or more)", start=start)
    assert "files (made most by files52 +" in log and "files52 struck" in log, log[-3000:]
    r = _armed(http, url, "tmpleak52", 1)
    body = assert_problem(r, 503, "function_quarantined")
    assert "tmpleak52 is quarantined" in body["detail"] and int(r.headers["retry-after"]) > 0, body
    assert "Traceback" not in r.text
    v = http.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5]]})
    assert v.status_code == 200, v.text


def test_sysv_segments_a_function_leaves_go_with_its_engine(server, http) -> None:
    """A function that made a SysV shared memory segment and never removed it left its
    memory to the kernel for good: measured, five of 16 MiB, all still there (80 MiB
    resident) after its engine was replaced, and after ``serve`` stopped; so did a
    message queue's messages. Now the supervisor removes the segments a dead engine made,
    and the queues it last sent to, and says so."""
    url, proc = server
    pid, start = _engine_pid(http, url), len(proc.read_log())
    sets = _semaphore_sets()
    for case in (3, 3, 3, 5, 6, 7):
        r = _armed(http, url, "sysvleak52", case)
        assert r.status_code == 200, r.text
    assert len(sysv_segments(pid)) == 3 and len(sysv_queues(pid)) == 1
    made = _semaphore_sets() - sets
    assert len(made) == 2, made
    r = _armed(http, url, "sysvleak52", 4)  # its engine ends (SIGKILL): its own 500
    assert r.status_code == 500, r.text
    _replaced(http, url, pid, 60, "the engine was not replaced")
    log = _log_saying(proc, "removed 6 SysV shared memory segment(s), message queue(s) or semaphore set(s) (48 MiB)",
                      start=start)
    assert f"left by the functions of pid {pid}" in log, log[-3000:]
    assert sysv_segments(pid) == [] and sysv_queues(pid) == [] and not made & _semaphore_sets()
    v = http.post(f"{url}/v1/functions/sin/jacobian", json={"inputs": [[0.5]]})
    assert v.status_code == 200, v.text
