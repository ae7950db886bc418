"""Red team, round twenty-seven: hostile functions against the global random generators
every later function of the engine draws from (torch's, numpy's, Python's): a normal
sample planted where the state's fingerprint did not look; a state read, not moved,
which told the next function's draws in advance.

Each case names what a user saw before. One real server for the file (one engine, no
spare); the functions are in tests/hostile32_functions.py, each misbehaving only on the
input 666 (round 11's ``_armed``), the second input picking how.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest

from .conftest import live_server
from .hostile32_functions import PLANTED, SEED
from .test_hostile_round11 import _armed, _engine_pid
from .test_hostile_round15 import _log_until
from .test_hostile_round17 import client  # noqa: F401  (its module's httpx client)
from .test_hostile_round21 import _evaluated

FUNCTIONS = "tests.hostile32_functions"
GENERATORS = ("torch", "numpy", "Python")  # the second input's cases, in order


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen]]:
    # One engine, no spare: a function's batches and the next one's meet the same
    # generators (each case checks it is the same engine).
    with live_server(FUNCTIONS=FUNCTIONS, WORKERS=1, WARMUP="false", ENGINE_STANDBY="false",
                     REQUEST_TIMEOUT_S=20) as served:
        yield served


@pytest.mark.parametrize("case", range(3), ids=GENERATORS)
def test_a_normal_sample_a_function_plants_is_not_the_next_draw(server, client, case: int) -> None:
    """Each generator keeps the second of the pair of normal samples it draws for its
    next normal draw (torch's CPU generator in its state's tail, numpy's
    ``RandomState`` as ``has_gauss``/``gauss``, Python's ``Random`` as
    ``gauss_next``). A function that set the state it found, with a sample of its own
    there (``torch.set_rng_state``, ``np.random.set_state``, ``random.setstate``),
    moved none of the words the engine read after its batch, and was not seen:
    another client's ``x + torch.randn(())`` (``np.random.standard_normal()``,
    ``random.gauss(0, 1)``) answered 1e9, with a 200, at each of its calls. Now the
    fingerprints read the kept sample too, and a state with one of its own is
    re-seeded from the OS's entropy (a seed clears the sample)."""
    url, proc = server
    pid, start = _engine_pid(client, url), len(proc.read_log())
    r = _armed(client, url, "plants_a_normal", case)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, case, 0.0]), rtol=1e-12)
    drawn = _evaluated(client, url, "normal_noise", [0.0, 0.0, 0.0])
    assert (np.abs(drawn) < 10).all(), drawn  # (a normal draw past 10 sigma: 1e-23)
    assert drawn[case] != PLANTED
    log = _log_until(proc, start, "plants_a_normal changed")
    assert re.search(rf"plants_a_normal changed the state of {GENERATORS[case]}'s (global )?random generator "
                     r"\([^)]+\) \(to [^)]+\) and left it so; put back to a seed drawn afresh", log), log[-3000:]
    assert _engine_pid(client, url) == pid


def test_a_state_a_function_reads_does_not_tell_the_next_functions_draws(server, client) -> None:
    """A function that read the generators' states (``torch.get_rng_state()``,
    ``np.random.get_state()``, ``random.getstate()``) into copies of its own and drew
    there moved nothing of the globals, and nothing was re-seeded: the next
    function's ``x + (torch.rand, np.random.random_sample, random.random)`` (another
    client's Monte Carlo step) answered exactly the draws the reader had answered
    before it, each of the three, to the last digit. Now a batch of another function
    than the last batch's meets generators re-seeded from the OS's entropy: what a
    function reads is no other function's to draw."""
    url, proc = server
    pid = _engine_pid(client, url)
    for _ in range(2):
        r = _armed(client, url, "reads_the_generators", 0)
        assert r.status_code == 200, r.text
        told = np.array(r.json()["output"]["data"])
        assert ((0 <= told) & (told < 1)).all(), told
        drawn = _evaluated(client, url, "uniform_noise", [0.0, 0.0, 0.0])
        assert ((0 <= drawn) & (drawn < 1)).all(), drawn
        assert all(t != d for t, d in zip(told, drawn)), (told, drawn)
    # Within one function's batches nothing is re-seeded (its own code drew them anyway:
    # a service of one hot function pays one comparison a batch): the reader, asked
    # again at once, reads the state it read.
    told = [_armed(client, url, "reads_the_generators", 0).json()["output"]["data"] for _ in range(2)]
    assert told[0] == told[1], told
    assert _engine_pid(client, url) == pid


@pytest.mark.parametrize("case", range(3), ids=["random.random", "np.random.random_sample", "random.Random.random"])
def test_a_draw_a_function_rebinds_in_the_random_modules_is_put_back(server, client, case: int) -> None:
    """The random modules were no namespace the engine guarded: a function that rebound
    ``random.random`` (``np.random.random_sample``) to answer 0.25 made another client's
    ``x + (torch.rand, np.random.random_sample, random.random)`` draw 0.25 there, with a
    200, at each call for the engine's life; one that set ``random.Random.random`` (over
    the C method of its base) made every ``random.Random`` of every later function answer
    0.25, a generator of one's own seeded with 7 too. Now ``random``, ``numpy.random``
    (and ``mtrand``, whose functions it re-exports) are guarded as ``math`` is, and
    ``random.Random`` as ``torch.Tensor`` is: put back after the batch, the function named."""
    url, proc = server
    pid, start = _engine_pid(client, url), len(proc.read_log())
    r = _armed(client, url, "rebinds_the_draws", case)
    assert r.status_code == 200, r.text  # (its own answer goes through none of them: not refused)
    np.testing.assert_allclose(r.json()["output"]["data"], np.sin([666.0, case, 0.0]), rtol=1e-12)
    drawn = _evaluated(client, url, "uniform_noise", [0.0, 0.0, 0.0])
    assert ((0 <= drawn) & (drawn < 1)).all() and 0.25 not in drawn, drawn
    own = _evaluated(client, url, "own_uniform", [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(own, [random.Random(SEED).random()] * 3)
    where, name = [("random", "random"), ("numpy.random", "random_sample"), ("random.Random", "random")][case]
    log = _log_until(proc, start, "rebinds_the_draws rebound")
    assert f"rebinds_the_draws rebound or deleted names in {where} ({name}) and left them so; put back for the " \
        "other functions" in log, log[-3000:]
    assert _engine_pid(client, url) == pid


@pytest.mark.parametrize("case", range(2), ids=["MT19937", "PCG64"])
def test_a_bit_generator_a_function_puts_under_np_random_is_taken_away(server, client, case: int) -> None:
    """``np.random.set_bit_generator(MT19937(7))`` (``PCG64(7)``) put a seeded generator
    of the function's own under ``np.random``; the engine read the words of the one it
    started with, which no longer moved: another client's ``np.random.random_sample()``
    answered the seed's draws (0.6250... first for PCG64), with a 200, and the function
    was named nowhere. (Re-seeded at the next function's batch, the PCG64 refused the
    legacy seed, "TypeError: can only re-seed a MT19937 BitGenerator": the engine died,
    and the other client's request was a 503.) Now whether ``np.random`` draws from the
    engine's own generator is part of its fingerprint, and the engine's is put back
    under it, re-seeded from the OS's entropy, the function named."""
    url, proc = server
    pid = _engine_pid(client, url)
    known = np.random.RandomState((np.random.MT19937, np.random.PCG64)[case](SEED)).random_sample()
    for _ in range(2):
        r = _armed(client, url, "sets_a_bit_generator", case)
        assert r.status_code == 200, r.text
        drawn = _evaluated(client, url, "uniform_noise", [0.0, 0.0, 0.0])
        assert ((0 <= drawn) & (drawn < 1)).all() and drawn[1] != known, (drawn, known)
    log = _log_until(proc, 0, "sets_a_bit_generator changed")  # (named once: the first case's line)
    assert "sets_a_bit_generator changed the state of numpy's global random generator (np.random.seed, set_state, " \
        "set_bit_generator, or draws) (to one of its own) and left it so; put back to a seed drawn afresh" in log, \
        log[-3000:]
    assert _engine_pid(client, url) == pid
