"""Functions that never return, on any input, the warm-up's included: a deadlock in
native code, which no signal handler reaches (the supervisor tells a hang by the time
alone: a sleep or a busy loop is the same case, and cost the suite ~12 s more); and one
whose first call takes longer than the warm-up limit (an import), which must not be left
broken by the warm-up's end.
Loaded only by the warm-up test (any other server with them would wait
WARMUP_TIMEOUT_S for each)."""

from __future__ import annotations

import ctypes

import torch

from jacobian_service import Input, register


@register(inputs=[Input("x", shape=("n",))], description="Locks a mutex it holds: a deadlock in C.")
def deadlocks_natively(x: torch.Tensor) -> torch.Tensor:
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # a pthread_mutex_t (40 bytes on x86-64 glibc)
    libc.pthread_mutex_init(mutex, None)
    libc.pthread_mutex_lock(mutex)
    libc.pthread_mutex_lock(mutex)  # a default mutex locked again by its owner: it waits for ever
    return x.sin()


@register(inputs=[Input("x", shape=("n",))], description="sin, from a package that takes 4.5 s to import.")
def imports_slowly(x: torch.Tensor) -> torch.Tensor:
    import tests.warmup_slowpkg as pkg

    return pkg.part.sin(x)
