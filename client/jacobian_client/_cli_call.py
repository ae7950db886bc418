"""``jacobian-service call``: call a running server from the shell, through the SDK only.

::

    jacobian-service call softmax --url http://localhost:8000 --input x.npy --out J.npy
    jacobian-service call add_square --input x.npy --input y.npy --argnums 0,1 --out J.npz
    jacobian-service call lorenz96 --input x.npy --sparsity band --pattern --out J.npz

Why here and not in the server package: it must run where only the SDK is installed
(no torch). With ``--out FILE.npy`` a single-array result is streamed into the file and
never held in memory; several arrays (tuple ``argnums``, aux) need ``--out FILE.npz``.
Without ``--out`` the result is printed as JSON. Exit status: 0 on success, 1 when the
call fails (the error is printed on stderr), 2 for a bad command line.

``--sparsity auto`` (or a declared pattern's name) asks for a sparse result; ``--out
FILE.npz`` then writes the members ``scipy.sparse.save_npz`` writes (``load_npz`` reads
it). ``--pattern`` prints the result's sparsity pattern in braille characters (also for
a dense result) in place of the JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

from . import wire
from ._errors import InvalidInput, JacobianServiceError, NotAcceptable
from ._sync import Client

__all__ = ["build_parser", "call_main"]

_METHODS = ("jacobian", "hessian", "evaluate")


def build_parser(prog: str = "jacobian-service call") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Call a function on a running jacobian-service server.")
    p.add_argument("function", help="registered function name")
    p.add_argument("--url", default=os.environ.get("JACOBIAN_SERVICE_URL", "http://localhost:8000"),
                   help="server base URL (default: $JACOBIAN_SERVICE_URL or http://localhost:8000)")
    p.add_argument("--input", "-i", action="append", default=[], metavar="FILE.npy", dest="inputs",
                   help="one positional input per --input, as a .npy file (repeat in order); a .npz file is "
                        "one pytree (dict) input, a member per leaf: q.npz holding shoulder, elbow, links for "
                        "q={'shoulder': ..., 'elbow': ..., 'links': ...}")
    p.add_argument("--method", choices=_METHODS, default="jacobian", help="what to compute (default: jacobian)")
    p.add_argument("--argnums", default="0", help="input index or name, or a comma-separated list (e.g. 0,1)")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per vmap (default: the server chooses)")
    p.add_argument("--batched", action="store_true", help="per-example results over the leading dimension")
    p.add_argument("--rows", default=None, metavar="START:STOP", help="only these rows of the flattened output")
    p.add_argument("--out", "-o", default=None, metavar="FILE",
                   help="write the result to FILE (.npy streamed, or .npz)")
    p.add_argument("--api-key", default=os.environ.get("JACOBIAN_SERVICE_API_KEY"),
                   help="API key (default: $JACOBIAN_SERVICE_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the answer, then for each MiB of it (default: 600)")
    p.add_argument("--progress", action="store_true", help="show a progress bar while streaming")
    p.add_argument("--sparsity", default=None, metavar="NAME",
                   help="jacobian/hessian: auto (detected) or a declared pattern's name: a sparse result")
    p.add_argument("--sparse-format", choices=(*wire.SPARSE_FIELDS, "dense"), default=None,
                   help="with --sparsity: the result as CSR (default), CSC, COO, or a dense 2-D array")
    p.add_argument("--pattern", action="store_true",
                   help="print the result's sparsity pattern (braille) instead of the JSON result")
    p.add_argument("--pattern-width", type=int, default=60, metavar="CHARS",
                   help="widest the --pattern picture may be (default: 60 characters)")
    return p


def _argnums(text: str) -> int | str | tuple[int | str, ...]:
    def one(item: str) -> int | str:
        item = item.strip()
        return int(item) if item.lstrip("-").isascii() and item.lstrip("-").isdigit() else item

    if "," in text:
        return tuple(one(t) for t in text.split(",") if t.strip())
    return one(text)


def _rows(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    if not sep:
        raise ValueError(f"--rows is START:STOP, not {text!r}")
    return int(start), int(stop)


def _flatten(prefix: str, tree: Any, into: dict[str, np.ndarray]) -> None:
    if isinstance(tree, np.ndarray):
        into[prefix] = np.asarray(tree)
    elif isinstance(tree, (tuple, list)):
        for i, t in enumerate(tree):
            _flatten(f"{prefix}/{i}", t, into)
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(f"{prefix}/{k}", v, into)
    else:
        into[prefix] = np.asarray(tree)


def _load(path: str) -> Any:
    """An --input file: a .npy is one array; a .npz one dict of its members (a pytree
    parameter's leaves). numpy's lazy ``NpzFile`` was sent as it came, its file left open
    and nothing said about what the .npz stood for."""
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    return loaded


def call_main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on errors (2)
        return int(exc.code or 0)
    try:
        inputs = [_load(path) for path in args.inputs]
        argnums = _argnums(args.argnums)
        rows = _rows(args.rows)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stream_to = args.out if args.out and not args.out.endswith(".npz") else None
    sparse = args.sparsity not in (None, "dense") and args.sparse_format != "dense"
    if args.sparsity is not None and args.method == "evaluate":
        print("error: --sparsity applies to jacobian and hessian", file=sys.stderr)
        return 2
    if args.sparse_format not in (None, "csr") and args.sparsity in (None, "dense"):
        # (it shapes a sparse result: left off, it was dropped and the dense array printed;
        # the server refuses it alone too)
        print("error: --sparse-format applies to a sparse result: add --sparsity auto (or a declared "
              "pattern's name)", file=sys.stderr)
        return 2
    if sparse and stream_to is not None:
        print("error: a sparse result goes to --out FILE.npz (scipy.sparse.load_npz reads it)", file=sys.stderr)
        return 2
    sparse_options = {"sparsity": args.sparsity, "sparse_format": args.sparse_format} if args.sparsity else {}
    if stream_to is not None and isinstance(argnums, tuple) and len(argnums) != 1:
        # (one in a tuple, "0,", streams: the SDK asks for the one array and wraps it back)
        print("error: several Jacobians (tuple --argnums) need --out FILE.npz", file=sys.stderr)
        return 2
    try:  # a key no header can carry, or credentials in --url beside it: one line, not a traceback
        client = Client(args.url, api_key=args.api_key, timeout=args.timeout)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with client:
            if args.method == "jacobian":
                result = client.jacobian(args.function, *inputs, argnums=argnums, chunk_size=args.chunk_size,
                                         batched=args.batched, rows=rows, out=stream_to, progress=args.progress,
                                         **sparse_options)
            elif args.method == "hessian":
                result = client.hessian(args.function, *inputs, argnums=argnums, chunk_size=args.chunk_size,
                                        batched=args.batched, out=stream_to, progress=args.progress, **sparse_options)
            else:
                if stream_to is not None:
                    # evaluate has no streamed form; the output is small enough to hold
                    out = client.evaluate(args.function, *inputs, batched=args.batched)
                    if not isinstance(out, np.ndarray):
                        print("error: this output has several arrays; use --out FILE.npz", file=sys.stderr)
                        return 2
                    np.save(stream_to, out, allow_pickle=False)
                    result = out
                else:
                    result = client.evaluate(args.function, *inputs, batched=args.batched)
    except JacobianServiceError as exc:
        if isinstance(exc, NotAcceptable) and stream_to is not None:
            # The server's 406 says "ask for application/x-npz", which a shell user
            # cannot: said in this command's own terms.
            print(f"error: {args.function}'s result is more than one array (several outputs, or aux): "
                  f"use --out FILE.npz", file=sys.stderr)
            return 2
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, InvalidInput) and inputs and "missing input" in str(exc):
            # (the server's "send them all as application/x-npz or JSON" is no option here)
            print(f"each --input is one of {args.function}'s inputs, in order ({len(inputs)} given); an .npz file "
                  f"is one dict-valued (pytree) input, not several inputs", file=sys.stderr)
        if isinstance(exc, InvalidInput) and not inputs:
            # (the server's words are about a request's 'inputs', which this command writes)
            print("no --input was given: give each of the function's inputs as --input FILE.npy, in order "
                  "(jacobian-service functions, or GET /v1/functions/NAME, lists them)", file=sys.stderr)
        return 1
    matrix = result[0] if isinstance(result, tuple) and args.method != "evaluate" else result
    if args.pattern:
        from .sparse import pattern_string

        print(pattern_string(matrix if wire.is_sparse(matrix) else np.asarray(matrix).reshape(_rows_cols(matrix)),
                             max_width=args.pattern_width))
    if args.out is None:
        if not args.pattern:
            sys.stdout.buffer.write(wire.dumps(wire.encode_tree(result)) + b"\n")
    elif wire.is_sparse(matrix):
        trees = {"aux": result[1]} if isinstance(result, tuple) and len(result) > 1 else None
        with open(args.out, "wb") as fp:
            fp.write(wire.write_sparse_npz(matrix, {"function": args.function, "method": args.method}, trees))
        print(f"wrote {args.out}: sparse {matrix.shape[0]} x {matrix.shape[1]}, {matrix.nnz} stored entries",
              file=sys.stderr)
    elif stream_to is None:
        arrays: dict[str, np.ndarray] = {}
        _flatten(args.method, result, arrays)
        np.savez(args.out, **arrays)
        print(f"wrote {args.out}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}", file=sys.stderr)
    else:
        streamed = result
        while isinstance(streamed, tuple):  # argnums "0,": jacrev's tuple (a Hessian's of a tuple)
            streamed = streamed[0]
        print(f"wrote {stream_to}: {streamed.dtype} {streamed.shape}", file=sys.stderr)
    return 0


def _rows_cols(arr: Any) -> tuple[int, int]:
    """A Jacobian drawn as (output elements) x (input elements): jacrev's shape is the
    output's then the input's; without more to go on, the first axis is the output."""
    a = np.asarray(arr)
    if a.ndim == 2:
        return a.shape  # type: ignore[return-value]
    if a.ndim < 2:
        return (1, a.size)
    return (a.shape[0], int(np.prod(a.shape[1:])))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(call_main(sys.argv[1:]))
