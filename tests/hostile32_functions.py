"""Hostile functions for tests/test_hostile_round27.py (loaded by name like a user
module): each misbehaves only when its first input is 666 (round 11's ``_armed``), the
second input picking how; otherwise it is ``sin``. Beside them, the functions they harm."""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import torch
from jacobian_service import register

from tests.hostile17_functions import X, _armed  # the input, and the case it asks for (666 first)

PLANTED = 1e9  # the normal sample planted: no normal draw's


@register(inputs=X, description="sin; armed (666), it sets a generator's state to the one it has, with a normal "
                                "sample of its own (1e9) kept for the next normal draw: case 0 torch's, 1 numpy's, "
                                "2 Python's.")
def plants_a_normal(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case == 0:
        # CPUGeneratorImplState's tail: normal_x, normal_y, normal_rho, normal_is_valid,
        # next_float_normal_sample, is_next_float_normal_sample_valid
        state = bytearray(torch.get_rng_state().numpy().tobytes())
        struct.pack_into("=ddd i f ?", state, len(state) - 40, 0.0, PLANTED, 0.0, 1, PLANTED, True)
        torch.set_rng_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    elif case == 1:
        name, key, pos, _, _ = np.random.get_state()
        np.random.set_state((name, key, pos, 1, PLANTED))
    elif case == 2:
        version, words, _ = random.getstate()
        random.setstate((version, words, PLANTED))
    return torch.sin(x)


@register(inputs=X, description="x + (torch.randn, np.random.standard_normal, random.gauss): one normal draw of each.")
def normal_noise(x: torch.Tensor) -> torch.Tensor:
    drawn = [torch.randn((), dtype=torch.float64).item(), np.random.standard_normal(), random.gauss(0.0, 1.0)]
    return x + torch.tensor(drawn, dtype=x.dtype)


def _uniforms(torch_generator: torch.Generator | None, numpy_generator: Any, python_generator: Any) -> list[float]:
    """One uniform draw of each generator (or module: its global one), as uniform_noise draws them."""
    return [torch.rand((), dtype=torch.float64, generator=torch_generator).item(),
            numpy_generator.random_sample(), python_generator.random()]


@register(inputs=X, description="sin; armed (666), the next uniform draws of torch's, numpy's and Python's global "
                                "generators, as uniform_noise draws them, read from their states (copies drew "
                                "them: the globals moved not at all).")
def reads_the_generators(x: torch.Tensor) -> torch.Tensor:
    if _armed(x) is None:
        return torch.sin(x)
    torch_copy = torch.Generator()
    torch_copy.set_state(torch.get_rng_state())
    numpy_copy = np.random.RandomState()
    numpy_copy.set_state(np.random.get_state())
    python_copy = random.Random()
    python_copy.setstate(random.getstate())
    return torch.tensor(_uniforms(torch_copy, numpy_copy, python_copy), dtype=x.dtype)


@register(inputs=X, description="x + (torch.rand, np.random.random_sample, random.random): one uniform draw of each "
                                "(a Monte Carlo step).")
def uniform_noise(x: torch.Tensor) -> torch.Tensor:
    return x + torch.tensor(_uniforms(None, np.random, random), dtype=x.dtype)


@register(inputs=X, description="sin; armed (666), it rebinds a name the random modules' callers call: case 0 "
                                "random.random, 1 np.random.random_sample, 2 random.Random.random (every generator of "
                                "one's own), each to a function answering 0.25.")
def rebinds_the_draws(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        owner, name, value = _REBOUND[case]
        setattr(owner, name, value)
    return torch.sin(x)


_REBOUND = ((random, "random", lambda: 0.25), (np.random, "random_sample", lambda size=None: 0.25),
            (random.Random, "random", lambda self: 0.25))


SEED = 7  # own_uniform's seed: its draws are known anywhere


@register(inputs=X, description="x + a uniform draw of a random.Random of its own, seeded with 7 (the draws it wants "
                                "to be the same at every call).")
def own_uniform(x: torch.Tensor) -> torch.Tensor:
    return x + random.Random(SEED).random()


@register(inputs=X, description="sin; armed (666), it puts a bit generator of its own, seeded with 7, under np.random "
                                "(np.random.set_bit_generator): case 0 an MT19937, 1 a PCG64 (one no legacy seed "
                                "re-seeds).")
def sets_a_bit_generator(x: torch.Tensor) -> torch.Tensor:
    case = _armed(x)
    if case is not None:
        np.random.set_bit_generator((np.random.MT19937, np.random.PCG64)[case](SEED))
    return torch.sin(x)
