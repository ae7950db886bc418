"""A first-day user's own functions (tests/test_newuser_round2.py): a simulator step with
parameters, a robot's kinematics over a pytree input, a small ``nn.Module`` with its
weights as a pytree, aux, integer and boolean side inputs, and one with integer inputs
only."""

import torch

from jacobian_service import Array, Input, register


@register(inputs=[Input("state", shape=("n",)), Input("dt", shape=()), Input("k", shape=("n",))],
          description="One explicit Euler step of a spring chain.")
def sim_step(state, dt, k):
    return state + dt * (-k * state + torch.roll(state, 1) - state)


@register(inputs=[Input("q", tree={"shoulder": Array(()), "elbow": Array(()), "links": Array((2,))})])
def robot_fk(q):
    a, b, links = q["shoulder"], q["elbow"], q["links"]
    return torch.stack([links[0] * torch.cos(a) + links[1] * torch.cos(a + b),
                        links[0] * torch.sin(a) + links[1] * torch.sin(a + b)])


torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


@register(inputs=[Input("params", tree={k: Array(tuple(v.shape)) for k, v in net.named_parameters()}),
                  Input("x", shape=(3,))])
def small_net(params, x):
    return torch.func.functional_call(net, params, (x,))


# An nn.Module instance registered as it is (its description must not be torch.nn's).
register(torch.nn.Linear(3, 2), name="linear", inputs=[Input("x", shape=(3,))])


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def with_aux(x):
    y = x ** 2
    return y, {"norm": y.sum()}


@register(inputs=[Input("x", shape=("n",)), Input("steps", shape=(), dtype="int64"),
                  Input("flip", shape=(), dtype="bool")])
def int_bool(x, steps, flip):
    y = x
    for _ in range(int(steps)):  # a scalar side input read as a Python number
        y = torch.sin(y)
    return torch.where(flip, -y, y)


@register(inputs=[Input("i", shape=("n",), dtype="int64")])
def ints_only(i):
    return i * 2


@register(inputs=[Input("x", shape=("n",))])
def aux_undeclared(x):  # aux returned, has_aux=True forgotten
    return x * 2, {"note": "hi"}


@register(inputs=[Input("x", shape=("n",))], has_aux=True)
def aux_forgotten(x):  # has_aux=True declared, aux not returned
    return x * 2
