"""An example module of user functions, served from a mounted folder.

    docker run -v "$PWD/deploy/examples/functions:/functions:ro" \
      -e JACOBIAN_SERVICE_FUNCTIONS=jacobian_service.examples,my_functions ...

The folder is on the image's PYTHONPATH, so the module is imported by name. Naming
``jacobian_service.examples`` too keeps the built-in examples beside these.
"""

from __future__ import annotations

import torch

from jacobian_service import Input, register


@register(
    inputs=[Input("x", shape=("n",))],
    description="Rosenbrock function (apart from the built-in rosenbrock): its Jacobian is the gradient.",
)
def my_rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


@register(
    inputs=[Input("theta", shape=()), Input("p", shape=(2,))],
    description="Rotate the point p by the angle theta.",
)
def rotate2d(theta: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([c * p[0] - s * p[1], s * p[0] + c * p[1]])
