"""What ``GET /v1/functions`` describes, as small frozen dataclasses.

Parsed leniently (unknown keys kept in ``raw``, missing ones defaulted) so that a server
that adds fields never breaks an older SDK.
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
        shape = doc.get("shape")
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
        return cls(
            name=str(doc.get("name", "")),
            description=str(doc.get("description") or ""),
            inputs=tuple(InputInfo.from_json(i) for i in doc.get("inputs") or ()),
            has_aux=bool(doc.get("has_aux", False)),
            raw=dict(doc),
        )
