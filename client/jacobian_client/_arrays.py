"""Caller values -> what goes on the wire, without ever importing torch.

An input is one of:

* an *array*: a numpy array or scalar, or a torch tensor when torch is already imported
  by the caller (found through ``sys.modules``, so the SDK never pays torch's import cost
  or needs it installed). Arrays keep their dtype, so float64 callers get float64
  Jacobians;
* *plain numbers*: a Python number or (nested) list. These carry no dtype, so they travel
  as JSON numbers and take the dtype the function declares (SPEC 3.1), exactly as with
  ``transport="json"``. Converting them to numpy here would silently make them float64.

bfloat16 has no numpy dtype of its own: torch bfloat16 tensors, and numpy arrays of
ml_dtypes' ``bfloat16`` (what JAX hands out), travel as 2-byte base64 with ``dtype:
"bfloat16"`` (wire.py decodes that on the server). Those numpy arrays are recognised by
their dtype's name, so neither ml_dtypes nor jax is ever imported here.

Masked numpy arrays are refused unless nothing is masked: the server would compute on
the hidden values as if they were data.
"""

from __future__ import annotations

import base64
import collections.abc
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire

__all__ = ["Bfloat16", "Plain", "as_plain_node", "as_wire_value", "is_torch_tensor", "json_array"]


@dataclass(frozen=True)
class Plain:
    """Numbers without a dtype (a Python number or nested list)."""

    value: Any


@dataclass(frozen=True)
class Bfloat16:
    """A bfloat16 tensor's raw little-endian 16-bit words and shape."""

    words: np.ndarray  # uint16

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.words.shape)


def as_plain_node(value: Any) -> Any:
    """A caller's container as the plain one a pytree parameter is read from: any mapping
    (``collections.abc.Mapping``: ``types.MappingProxyType``, flax's ``FrozenDict``) and
    torch's ``nn.ParameterDict`` as a dict of its items, torch's ``nn.ParameterList`` as a
    tuple of its parameters (a tuple is a tree node whatever it holds, as the list is to
    the function that indexes it); anything else as it is. The function is called with
    a dict and a list, which these stand for: a module keeping its weights in a
    ParameterDict, called in-process, works; remote, only ``isinstance(x, dict)`` was a
    tree, and the ParameterDict was refused as an array ("cannot send a ParameterDict as
    an input"). The leaves stay the caller's (Parameters: autograd fills their ``.grad``)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, collections.abc.Mapping):
        return dict(value.items())
    torch = sys.modules.get("torch")
    nn = getattr(torch, "nn", None) if torch is not None else None
    if nn is not None and isinstance(value, nn.ParameterDict):
        return dict(value.items())
    if nn is not None and isinstance(value, nn.ParameterList):
        return tuple(value)
    return value


def is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")
    tensor_type = getattr(torch, "Tensor", None) if torch is not None else None
    return tensor_type is not None and isinstance(value, tensor_type)


def _from_torch(tensor: Any) -> np.ndarray | Bfloat16:
    torch = sys.modules["torch"]
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    # torch's lazy conjugate and negation bits (``z.conj()``, ``z.conj().imag``): numpy
    # cannot read such a view (nor can a dtype-changing view), so they are resolved first
    t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return Bfloat16(t.contiguous().view(torch.int16).numpy().view(np.uint16).copy())
    return t.numpy()


def _unmasked(arr: np.ndarray) -> np.ndarray:
    """A masked array's data when nothing is masked; else a ValueError (the mask would be
    silently dropped). numpy.ma is looked up, not imported: unimported, nothing is masked."""
    ma = sys.modules.get("numpy.ma")
    if ma is None or not isinstance(arr, ma.MaskedArray):
        return arr
    mask = ma.getmaskarray(arr)
    if mask.any():
        raise ValueError(
            f"cannot send a masked array with {int(mask.sum())} masked element(s): the server would compute "
            "on the values under the mask; pass arr.filled(value) or arr.compressed() instead")
    return np.asarray(arr.data)


def _is_bfloat16(arr: np.ndarray) -> bool:
    """An array of ml_dtypes' bfloat16 (numpy kind 'V', name 'bfloat16'), e.g. from JAX."""
    return arr.dtype.kind == "V" and arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2


def _from_numpy(arr: np.ndarray) -> np.ndarray | Bfloat16:
    arr = _unmasked(arr)
    if _is_bfloat16(arr):
        # np.array, not np.ascontiguousarray: that turns 0-d arrays into shape (1,)
        return Bfloat16(np.array(arr, order="C").view(np.uint16))
    return arr


def as_wire_value(value: Any) -> np.ndarray | Plain | Bfloat16:
    """One caller input -> an array, plain numbers, or bfloat16 words."""
    if isinstance(value, np.ndarray):
        return _from_numpy(value)
    if isinstance(value, np.generic):
        return _from_numpy(np.asarray(value))
    if is_torch_tensor(value):
        return _from_torch(value)
    if isinstance(value, complex):
        # (a Python complex, for an input declared complex: the complex128 array it is,
        # its dtype named, which a real input refuses as it refuses a numpy one; it was
        # "cannot send a complex ... pass a ... number")
        return np.asarray(value)
    if isinstance(value, (bool, int, float, list, tuple)):
        try:
            return Plain(_plain(value))
        except _HoldsComplex:
            # Complex numbers in a list ([1+2j, 3j], numpy's or a complex tensor's): plain
            # JSON has no complex number (orjson's "Type is not JSON serializable: complex"
            # escaped), and pairs without a dtype would be a real input's numbers. Sent as
            # the complex128 array they make, as a numpy one is.
            return _from_numpy(np.asarray(_plain(value, complex_ok=True)))
    if hasattr(value, "__array__"):  # jax, cupy.get(), pandas, xarray ...
        return _from_numpy(np.asarray(value))
    raise TypeError(f"cannot send a {type(value).__name__} as an input; pass a numpy array, list or number")


class _HoldsComplex(Exception):
    """A plain list holds a complex number (``_plain``): it is sent as an array instead."""


def _plain(value: Any, complex_ok: bool = False) -> Any:
    """Tuples -> lists and numpy/torch scalars (or arrays) inside lists -> Python numbers.
    A complex number among them raises _HoldsComplex unless ``complex_ok``."""
    if isinstance(value, (list, tuple)):
        return [_plain(v, complex_ok) for v in value]
    if isinstance(value, np.generic):
        _check_real(value.dtype.kind == "c", complex_ok)
        return value.item()
    if is_torch_tensor(value):
        _check_real(value.is_complex(), complex_ok)
        return value.detach().cpu().tolist()  # torch's own: numpy has no bfloat16 to go through
    if isinstance(value, np.ndarray):
        _check_real(value.dtype.kind == "c", complex_ok)
        return _unmasked(value).tolist()  # before any np.asarray, which drops the mask
    if hasattr(value, "__array__"):
        arr = np.asarray(value)
        _check_real(arr.dtype.kind == "c", complex_ok)
        return arr.tolist()
    if value.__class__ is complex and not complex_ok:  # (inline: once a number of a plain list)
        raise _HoldsComplex
    return value


def _check_real(is_complex: bool, complex_ok: bool) -> None:
    if is_complex and not complex_ok:
        raise _HoldsComplex


def json_array(value: np.ndarray | Plain | Bfloat16, *, binary: bool) -> Any:
    """A wire value as a JSON array: base64 when ``binary`` (exact and compact), nested
    ``data`` otherwise (readable; for ``transport="json"``)."""
    if isinstance(value, Plain):
        return wire.encode_tree(value.value)  # NaN and infinities spelled: a float's own would be null
    if isinstance(value, Bfloat16):
        raw = value.words.astype("<u2", copy=False).tobytes()
        return {"dtype": "bfloat16", "shape": list(value.shape), "base64": base64.b64encode(raw).decode("ascii")}
    arr = np.asarray(value)  # not np.ascontiguousarray: it turns 0-d arrays into shape (1,)
    if arr.dtype.kind not in "biuf" and arr.dtype.name not in wire.COMPLEX_DTYPES:
        # (complex: a complex output's cotangents, which the service takes, as the
        # binary transport's .npz sent them; the JSON transport refused them here)
        raise TypeError(f"cannot send an array of dtype {arr.dtype}; send bool, integer, float or complex arrays")
    if binary:
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        return {"dtype": arr.dtype.name, "shape": list(arr.shape), "base64": base64.b64encode(raw).decode("ascii")}
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": wire.json_data(arr)}
