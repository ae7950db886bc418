"""Red team, round forty-nine: a front end's word that a function can keep from coming,
and what a function leaves for the engine's end.

- a function that ends its front end right after its job (or any end of that front end
  then): the front end's ``held`` word, the one witness the engine's status board needs
  for the function to be named (a stray thread, a crash), left through its zmq I/O
  thread after the job had gone, and went with it; it is now in the supervisor's socket
  queue, in the kernel, before the job is written (``supervision.HeldInbox``).
"""

from __future__ import annotations

import subprocess
import sys
import time

# A front end (the product's RemoteEngines, started as serve starts it) that tells the
# supervisor it sends engine 0 a job of ``function`` and is killed at once, as a function
# that ends its front end right after its job has it.
_FRONT_END = """import asyncio, os, signal, sys
from pathlib import Path
from jacobian_service import engine_client
from jacobian_service.engine_client import RemoteEngines
from jacobian_service.settings import Settings
from jacobian_service.supervision import Channel
engine_client._FIRST_STATE_S = 0.01  # (no supervisor ticks here: its state never comes)
events, control, key, run_dir, function = sys.argv[1:]
async def main():
    front_end = RemoteEngines(Settings(), Path(run_dir), Channel(events, control, bytes.fromhex(key)),
                              registry={"functions": [], "devices": ["cpu"]})
    await front_end.start()
    front_end._tell_held((0, function))  # (what _run_once does just before the job's bytes go)
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


def test_a_front_end_killed_just_after_its_job_has_told_the_supervisor_already(tmp_path) -> None:
    """The ``held`` word went on the zmq control socket, written later by the front end's
    zmq I/O thread: a front end killed just after its job took it along (measured here:
    4 of 10 words lost, /tmp/h49/loss.py), and the board's true "stray" (a function that
    left a thread and ended its front end) was read as a lie, the function unnamed and
    unstruck (round 37's note). Now it is in the supervisor's queue before
    ``_tell_held`` returns: six front ends killed so, side by side, all six told."""
    from ._fault_support import supervisor_of_a_dead_engine

    with supervisor_of_a_dead_engine(tmp_path) as (sup, _, _):
        sup.listen_held()  # (as it starts)
        channel = sup.channel
        names = {f"leaves{i}" for i in range(6)}
        procs = [subprocess.Popen([sys.executable, "-c", _FRONT_END, channel.events, channel.control,
                                   channel.key.hex(), str(tmp_path), name], stderr=subprocess.PIPE) for name in names]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == -9, err.decode()
        began = time.monotonic()
        ran = sup._await_held(0, names, 0.5)
        assert ran == names, ran
        assert time.monotonic() - began < 0.3  # there at once, not waited for
