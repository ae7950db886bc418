"""``orphans``: a subreaper takes in what its children's children left running, and
tells it apart from its own children (here in a process of its own, which becomes the
subreaper: the test runner must not)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os, subprocess, sys, time
    from jacobian_service.orphans import adopted, become_subreaper, kill_adopted
    from jacobian_service.procfs import start_ticks

    assert become_subreaper()
    # Its own: a child in this session (a front end's kind) and one leading a session of
    # its own (an engine's kind), which starts a daemon the classic way and then dies.
    front = subprocess.Popen(["sleep", "60"])
    engine = subprocess.Popen([sys.executable, "-c", """
    import os, sys, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            print(os.getpid(), flush=True)
            time.sleep(60)
        os._exit(0)
    time.sleep(60)
    """], start_new_session=True, stdout=subprocess.PIPE, text=True)
    daemon = int(engine.stdout.readline())
    own = {engine.pid}
    # Once the middle process has exited the daemon is this process's: waited for, not a
    # fixed 0.2 s (under load the middle one may not have run its exit yet).
    deadline = time.monotonic() + 30
    while adopted(own) != [daemon]:
        assert time.monotonic() < deadline, (adopted(own), daemon)
        time.sleep(0.01)
    engine_ticks = start_ticks(engine.pid)
    # Started before an engine that died: not that engine's, kept.
    assert kill_adopted(own, after=start_ticks(daemon) + 1) == 0 and adopted(own) == [daemon]
    engine.kill(); engine.wait()
    assert kill_adopted(set(), after=engine_ticks, group=engine.pid) == 1
    assert adopted(set()) == [] and front.poll() is None  # collected; its own child untouched
    front.kill()
    print("ok")
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's child subreaper")
def test_a_subreaper_takes_in_an_orphaned_daemon_and_kills_it_after_its_engine_dies():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


DETACHED = textwrap.dedent('''
    import os, subprocess, sys, time
    from jacobian_service.orphans import become_subreaper, kill_descendants, kill_detached, reap_detached
    from jacobian_service.procfs import children, descendants, session

    assert become_subreaper()
    # Forked here, one in this session and one leading its own: both ended, and their
    # status is their Popen's to take.
    mine = [subprocess.Popen(["sh", "-c", "exit 3"]), subprocess.Popen(["sh", "-c", "exit 4"], start_new_session=True)]
    # Taken in: a daemon (fork, setsid, fork) that ended, one that runs.
    daemons = subprocess.run([sys.executable, "-c", """
    import os, time
    for life in (0, 60):
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode().ljust(16)); os.close(w)
                null = os.open(os.devnull, os.O_WRONLY); os.dup2(null, 1); os.dup2(null, 2)  # run's pipes close
                time.sleep(life); os._exit(0)
            os._exit(0)
        print(int(os.read(r, 16)), flush=True)
    """], capture_output=True, text=True, check=True).stdout.split()
    ended, running = int(daemons[0]), int(daemons[1])
    deadline = time.monotonic() + 10
    while any(session(p)[1] is False for p in (mine[0].pid, mine[1].pid, ended)):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert reap_detached() == 1 and session(ended) is None, "the ended daemon is collected"
    assert [p.wait() for p in mine] == [3, 4], "what was forked here keeps its status"
    assert kill_detached() == 1
    deadline = time.monotonic() + 10
    while reap_detached() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert session(running) is None
    # Everything below this process goes, the taken in included.
    again = subprocess.Popen([sys.executable, "-c", "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n"
                              "    if os.fork() == 0: time.sleep(60)\\n    os._exit(0)\\ntime.sleep(60)"])
    deadline = time.monotonic() + 10
    while not [p for p in children(os.getpid()) if p != again.pid and session(p)[0] not in (os.getsid(0), p)]:
        assert time.monotonic() < deadline  # until the daemon is this process's
        time.sleep(0.01)
    assert kill_descendants() == 2
    assert all(session(p)[1] for p in descendants(os.getpid()))
    print("ok")
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's child subreaper")
def test_a_subreaper_collects_and_kills_only_what_it_surely_took_in():
    """An engine is the subreaper of what its functions detach: it collects the daemons
    that ended and may kill those running, never touching a child a function forked (a
    ``Popen`` whose status the function may still wait for), and kills it all as it
    stops with its parent."""
    out = subprocess.run([sys.executable, "-c", DETACHED], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
