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
    time.sleep(0.2)  # the middle process has exited: the daemon is this process's now
    own = {engine.pid}
    assert adopted(own) == [daemon], (adopted(own), daemon)
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
