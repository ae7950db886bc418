"""Functions for tests/test_browser_round8.py: names a browser saves answers under (letters
of another script, characters no file name of the server's holds), each with a JSON
answer /docs offers as a file (more values than Swagger UI can draw in good time)."""

from __future__ import annotations

import torch

from jacobian_service import Input, register

N = 120  # softmax's Jacobian at N: 14,400 numbers
NAMES = ["größe", 'a;b%20"c" é']  # (letters beyond ASCII; separators, a space, a quote, a percent)


def softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, 0)


for _name in NAMES:
    register(name=_name, inputs=[Input("x", shape=(N,))], description="softmax, under a name a file must carry")(softmax)
