"""Functions for tests/test_parity_round41.py: test_eager_transforms.py's cases of code
that counts on a differentiating transform (TestComposability's retain_grad, saved tensor
hooks, autograd.functional and a Function without setup_context inside a transform; a
gradient hook; ``assert x.requires_grad``), a HigherOrderOperator with its own vmap and
grad rules (TestHigherOrderOperatorInteraction), out= ops and views of unbind mutated
(TestFunctionalize), ``tolist`` and ``repr`` of wrapped tensors (TestGradTrackingTensorToList,
test_tensor_print), and an nn.Module's forward and full backward hooks."""

from __future__ import annotations

import torch
from jacobian_service import Input, register

X3 = [Input("x", shape=(3,), dtype="float64")]


@register(inputs=X3)
def saved_hooks_sum(x):
    # test_transforms_dont_support_saved_tensor_hooks / test_jvp_supports_saved_tensor_hooks
    with torch.autograd.graph.save_on_cpu():
        return (torch.sin(x) * x).sum()


@register(inputs=X3)
def retain(x):
    # test_retain_grad_inside_transform
    y = x.sin()
    y.retain_grad()
    return y.sum()


class _OldSin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        return gy * x.cos()


@register(inputs=X3)
def no_setup_context(x):
    # test_autograd_function_no_setup_context
    return _OldSin.apply(x)


@register(inputs=X3)
def tolist_inside(x):
    # TestGradTrackingTensorToList
    s = sum(x.tolist())
    return (x ** 2).sum() * s


@register(inputs=[Input("x", shape=(4,), dtype="float32")])
def out_op(x):
    # test_functionalize_fx_out_op
    out = torch.empty((), dtype=torch.float32)
    torch.add(x, x, out=out)
    out.view(4).add_(1)
    return out


@register(inputs=[Input("x", shape=(2, 3), dtype="float64")])
def unbind_view_mutated(x):
    # test_multioutput_view_preserves_autograd_metadata
    base = x.clone()
    out = base.unbind(0)[0]
    base.add_(1)
    out.mul_(2)
    return out


@register(inputs=[Input("x", shape=(3,), dtype="float64")])
def autograd_functional_inside(x):
    # test_autograd_functional_jacrev_inside_transform
    return torch.autograd.functional.jacobian(lambda x: (x.sin() * x).sum(), x)


@register(inputs=X3)
def hooked(x):
    # a gradient hook: torch.func's reverse mode runs it, a plain call refuses it
    y = x.sin()
    y.register_hook(lambda g: g * 2)
    return (y * x).sum()


@register(inputs=X3)
def needs_grad(x):
    # code that takes a differentiating transform for granted
    assert x.requires_grad, "x.requires_grad"
    return (x.sin() * x).sum()


def _sum_hop():
    # TestHigherOrderOperatorInteraction's construct_sum_pyop: a HigherOrderOperator with
    # its own vmap and grad rules
    from torch._C._functorch import TransformType
    from torch._functorch.utils import enable_single_level_autograd_function
    from torch._ops import HigherOrderOperator

    class MySum(HigherOrderOperator):
        def __init__(self):
            super().__init__("parity41_mysum")

        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    mysum = MySum()

    @mysum.py_impl(TransformType.Vmap)
    def _vmap(interpreter, x, dim):
        if not torch._C._functorch.is_batchedtensor(x):
            with interpreter.lower():
                return mysum(x, dim)
        bdim = torch._C._functorch.maybe_get_bdim(x)
        value = torch._C._functorch.get_unwrapped(x)
        with interpreter.lower():
            result = mysum(value.movedim(bdim, 0), dim + 1)
        return torch._C._functorch._add_batch_dim(result, 0, interpreter.level())

    @mysum.py_impl(TransformType.Grad)
    def _grad(interpreter, x, dim):
        level = interpreter.level()

        class Fn(torch.autograd.function._SingleLevelFunction):
            @staticmethod
            def forward(ctx, x, dim):
                ctx.x_shape, ctx.dim = x.shape, dim
                x = torch._C._functorch._unwrap_for_grad(x, level)
                with torch.enable_grad(), interpreter.lower():
                    y = mysum(x, dim)
                return torch._C._functorch._wrap_for_grad(y, level)

            @staticmethod
            def backward(ctx, gy):
                return gy.unsqueeze(ctx.dim).expand(ctx.x_shape), None

        with enable_single_level_autograd_function():
            return Fn.apply(x, dim)

    @mysum.py_impl(torch._C.DispatchKey.AutogradCPU)
    def _cpu(x, dim):
        return torch.sum(x, dim)

    return mysum


SUM_HOP = _sum_hop()


@register(inputs=[Input("x", shape=(3,), dtype="float64")])
def hop_sum_scalar(x):
    return SUM_HOP(x.sin() * x, 0)


@register(inputs=X3)
def printed(x):
    # test_tensor_print: repr of a wrapped tensor inside the transforms
    text = repr(x) + repr(x.sin())
    return x.sin() * (1.0 + 0.0 * len(text))


def _linear(hook: str) -> torch.nn.Linear:
    lin = torch.nn.Linear(3, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -0.5], [0.25, 0.0, 1.0]], dtype=torch.float64))
        lin.bias.fill_(0.1)
    if hook == "backward":
        lin.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))
    else:
        lin.register_forward_hook(lambda m, i, o: o * 3)
    return lin


BACKWARD_HOOKED, FORWARD_HOOKED = _linear("backward"), _linear("forward")


@register(inputs=X3)
def module_backward_hook(x):
    # a module's full backward hook: a BackwardHookFunction, an autograd.Function
    # without setup_context, which torch.func's reverse mode refuses
    return BACKWARD_HOOKED(x).sin().sum()


@register(inputs=X3)
def module_forward_hook(x):
    return FORWARD_HOOKED(x).sin().sum()
