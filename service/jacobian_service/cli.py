"""``jacobian-service serve | functions | call``.

``serve`` and ``functions`` need the server extra; ``call`` needs only the SDK, so the
server stack is imported inside the commands that use it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

__all__ = ["main"]


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in {"host": args.host, "port": args.port, "functions": args.functions, "device": args.device}.items() if v is not None}


def _serve(args: argparse.Namespace) -> int:
    from .server import serve, serve_in_process
    from .settings import Settings, unknown_variables

    # Flags win over the environment; they go into it so that the engine and front-end
    # processes read the same settings.
    for key, value in _overrides(args).items():
        os.environ[f"JACOBIAN_SERVICE_{key.upper()}"] = str(value)
    if args.workers is not None:
        os.environ["JACOBIAN_SERVICE_WORKERS"] = str(args.workers)
    settings = Settings()
    for line in unknown_variables(os.environ, Settings.model_fields):
        _say(logging.WARNING, line)
    settings.load_api_keys()  # fail closed before anything starts, the reason in one line
    settings.load_admin_keys()
    return serve_in_process(settings) if args.in_process else serve(settings)


def _functions(args: argparse.Namespace) -> int:
    from .registry import Registry, format_shape
    from .settings import Settings

    settings = Settings(**_overrides(args))
    for spec in Registry.from_modules(settings.function_modules):
        inputs = ", ".join(
            f"{leaf.name}: {format_shape(leaf.shape)} {leaf.dtype}" for i in spec.inputs for leaf in i.leaves()
        )
        aux = "  [has_aux]" if spec.has_aux else ""
        print(f"{spec.name}({inputs}){aux}\n    {spec.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, where a reader gone is caught, not at exit
        return code
    except BrokenPipeError:
        # `jacobian-service functions | head`, `call --pattern | less` quit early: a reader
        # that stopped reading is no error to print a traceback for. Python's own recipe:
        # stdout goes to devnull, so the flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str]) -> int:
    if argv and argv[0] == "call":  # the SDK's own parser
        from jacobian_client._cli_call import call_main

        return call_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="jacobian-service",
        description="Jacobians as a service: serve registered PyTorch functions, list them, or call a running server. "
                    "Every setting is also an environment variable JACOBIAN_SERVICE_<NAME> (README: Settings).")
    sub = parser.add_subparsers(dest="command", required=True)
    # `functions` loads the modules here and asks no server: it took --host, --port and
    # --device and ignored them, so `functions --port 9000` listed the built-in examples,
    # not what the server on 9000 serves. Those are serve's alone now (an unknown option).
    for name, help_text in (("serve", "serve the registered functions over HTTP"),
                            ("functions", "list the functions the modules register (loaded here, no server "
                                          "asked: a running server lists its own at GET /v1/functions)")):
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        p.add_argument("--functions", help="comma-separated modules to load (default: the built-in examples, "
                                           "jacobian_service.examples; $JACOBIAN_SERVICE_FUNCTIONS)")
        if name == "serve":
            p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
            p.add_argument("--host", help="address to listen on (default: 127.0.0.1, this machine only; "
                                          "0.0.0.0: every interface)")
            p.add_argument("--port", type=int, help="port to listen on (default: 8000)")
            p.add_argument("--workers", type=int, help="HTTP front-end processes (default: the core count, at most 4)")
            p.add_argument("--in-process", action="store_true", help="one process, engines on threads (debugging)")
    sub.add_parser("call", help="call a running server (see: jacobian-service call --help)")
    args = parser.parse_args(argv)
    for missing in ("host", "port", "device"):
        args.__dict__.setdefault(missing, None)
    # Function modules are found where `python -m` finds them, the working directory
    # first, as the engine processes (started with -m) do: without it `serve` found
    # my_functions.py beside the user while `functions` and `serve --in-process` did not.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    from pydantic import ValidationError

    from .registry import FunctionModuleNotFound
    from .settings import SettingsError, describe_invalid

    try:
        return _serve(args) if args.command == "serve" else _functions(args)
    except FunctionModuleNotFound as exc:
        _say(logging.ERROR, str(exc))
        return 1
    except (ValidationError, SettingsError) as exc:  # a setting: the user's to fix, no traceback
        for line in describe_invalid(exc) if isinstance(exc, ValidationError) else [str(exc)]:
            _say(logging.ERROR, line)
        return 2


def _say(level: int, text: str) -> None:
    """A start-up message from before logging is set up, in the log's format all the same
    (the image logs JSON: a collector would take a plain line for garbage). The format is
    read from the environment: the settings may be what failed."""
    if os.environ.get("JACOBIAN_SERVICE_LOG_FORMAT", "").strip().lower() == "json":
        from .logs import JsonFormatter

        print(JsonFormatter().format(logging.LogRecord("jacobian_service", level, __file__, 0, text, None, None)),
              file=sys.stderr)
    else:
        print(f"jacobian-service: {'warning: ' if level == logging.WARNING else ''}{text}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
