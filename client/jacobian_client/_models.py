"""What ``GET /v1/functions`` describes, as small frozen dataclasses.

Parsed leniently (unknown keys kept in ``raw``, missing ones defaulted) so that a server
that adds fields never breaks an older SDK; a field of the wrong JSON type is a
:class:`TypeError` (the clients report it as a :class:`~jacobian_client.TransportError`),
never a half-built description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FunctionInfo", "InputInfo"]


@dataclass(frozen=True)
class InputInfo:
    """One positional parameter: ``shape`` holds ints and symbol names (None: any shape).

    ``tree`` describes a pytree parameter (None for an array): ``{"type": "dict",
    "items": {key: node}}``, ``{"type": "tuple" | "list", "items": [node, ...]}`` or
    ``{"type": "array", "shape", "dtype"}`` at the leaves. Send it as a dict (or tuple)
    of arrays nested the same way."""

    name: str
    shape: tuple[int | str, ...] | None
    dtype: str
    tree: dict[str, Any] | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InputInfo:
        _check_object(doc, "an input's description")
        shape = doc.get("shape")
        if shape is not None and not (isinstance(shape, list) and all(
                isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool)) for d in shape)):
            raise TypeError(f"an input's shape is a list of ints and names, not {_json_kind(shape)}")
        return cls(
            name=str(doc.get("name", "")),
            shape=None if shape is None else tuple(shape),
            dtype=str(doc.get("dtype", "floating")),
            tree=doc.get("tree") if isinstance(doc.get("tree"), dict) else None,
        )


@dataclass(frozen=True)
class FunctionInfo:
    """One registered function as the server describes it."""

    name: str
    description: str
    inputs: tuple[InputInfo, ...]
    has_aux: bool
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FunctionInfo:
        _check_object(doc, "a function's description")
        inputs = doc.get("inputs")
        if inputs is not None and not isinstance(inputs, list):
            raise TypeError(f"a function's inputs are a list, not {_json_kind(inputs)}")
        return cls(
            name=str(doc.get("name", "")),
            description=str(doc.get("description") or ""),
            inputs=tuple(InputInfo.from_json(i) for i in doc.get("inputs") or ()),
            has_aux=bool(doc.get("has_aux", False)),
            raw=dict(doc),
        )


def _json_kind(value: Any) -> str:
    """What a JSON value is, in words (never the value: it may be large)."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _check_object(doc: Any, what: str) -> None:
    if not isinstance(doc, dict):
        raise TypeError(f"{what} is a JSON object, not {_json_kind(doc)}")
