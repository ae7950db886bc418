"""jacobian-service: Jacobians of registered PyTorch functions, as a service.

``register``, ``Input`` and ``Array`` (a leaf of a pytree parameter) import without
torch or the server stack (Starlette, uvicorn, pydantic), so a module of functions can
be imported anywhere; ``create_app`` and ``Settings`` load that stack on first use.
"""

from __future__ import annotations

from typing import Any

from .registry import Array, Input, register

__all__ = ["Array", "Input", "Settings", "__version__", "create_app", "register"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)
