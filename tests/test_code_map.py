"""The newcomer's map of the code: docs/architecture.md's table names every module of
the service once, and nothing that is not there; the package's own lists agree with it."""

from __future__ import annotations

import ast
import functools
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "jacobian_service"
CLIENT = ROOT / "client" / "jacobian_client"


def _table_names(after: str | None) -> Counter[str]:
    """The modules (``x.py``, ``engine/x.py``) and packages (``engine/``) the first column
    of the table that follows ``after`` (None: the first) in docs/architecture.md's "Where the code is"
    names, each counted as often as it is named."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("## Where the code is", 1)[1]
    table = (text if after is None else text.split(after, 1)[1]).split("\n\n", 2)[1]
    names: Counter[str] = Counter()
    for row in table.splitlines()[2:]:  # past the head and its rule
        first = row.split("|")[1]
        names.update(re.findall(r"`([\w/]+(?:\.py|/))`", first))
    return names


def _modules(package: Path) -> set[str]:
    found = set()
    for path in package.rglob("*.py"):
        rel = path.relative_to(package).as_posix()
        if rel == "__init__.py" and package == PACKAGE:
            continue  # the service's package itself; the SDK's __init__ holds its public names
        found.add(rel[: -len("__init__.py")] if rel.endswith("/__init__.py") else rel)
    return found


@pytest.mark.parametrize("package, after", [("service", None), ("client", "(httpx and numpy")])
def test_the_architecture_table_names_every_module_once(package, after):
    named = _table_names(after)
    modules = _modules(PACKAGE if package == "service" else CLIENT)
    assert sorted(modules - set(named)) == [], "modules docs/architecture.md does not list"
    assert sorted(set(named) - modules) == [], "listed in docs/architecture.md, but no such module"
    assert sorted(name for name, count in named.items() if count > 1) == [], "listed twice"


# --------------------------------------------------------------------------- __all__


def _package_modules() -> dict[str, Path]:
    found = {}
    for root, package in ((PACKAGE, "jacobian_service"), (CLIENT, "jacobian_client")):
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


@functools.cache
def _parsed() -> dict[str, ast.Module]:
    """Every module of both packages, parsed once for the tests here."""
    return {name: ast.parse(path.read_text()) for name, path in _package_modules().items()}


def _exports(tree: ast.Module) -> set[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return {element.value for element in node.value.elts}  # type: ignore[attr-defined]
    return None


def _taken(modules: dict[str, Path], trees: dict[str, ast.Module]) -> list[tuple[str, str, str]]:
    """(module, name, by whom) for every name a module of the two packages takes from
    another: ``from .m import name`` and ``m.name`` after ``from . import m``."""
    taken = []
    for user, path in modules.items():
        nodes = list(ast.walk(trees[user]))
        package = user.split(".") if path.name == "__init__.py" else user.split(".")[:-1]
        aliases: dict[str, str] = {}
        for node in nodes:
            if not isinstance(node, ast.ImportFrom):
                continue
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif source in modules and source != user:
                    taken.append((source, alias.name, user))
        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                source = aliases[node.value.id]
                if f"{source}.{node.attr}" not in modules and source != user:
                    taken.append((source, node.attr, user))
    return taken


def test_every_name_a_module_takes_from_another_is_in_its_all():
    """``__all__`` says what a module gives the rest of the code: a name another module
    imports is in it (a private ``_name`` imported elsewhere is no longer private), and
    ``from m import *`` gives what the package's own ``__init__`` gives."""
    modules = _package_modules()
    trees = _parsed()
    exports = {name: _exports(tree) for name, tree in trees.items()}
    wrong = sorted({(source, name, user) for source, name, user in _taken(modules, trees)
                    if name not in (exports[source] or ())})
    assert wrong == [], "(module, name not in its __all__, imported by)"
    # A name __all__ lists that the module does not bind fails ``from m import *``; a
    # module with a module-level ``__getattr__`` binds some on first use (lazy imports).
    lazy = {name for name, tree in trees.items()
            if any(isinstance(node, ast.FunctionDef) and node.name == "__getattr__" for node in tree.body)}
    unbound = sorted((name, n) for name, names in exports.items() if name not in lazy and names
                     for bound in [_top_names(trees[name])] for n in names if n not in bound)
    assert unbound == [], "(module, a name its __all__ lists but it does not bind)"


# --------------------------------------------------------------------------- names in prose

# Dotted names that are no module path: a logger's name, an entry-point group.
NOT_MODULES = {"jacobian_service.access", "jacobian_service.functions"}


def _top_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in ast.walk(tree):  # nested too: a name bound in a try or an if at module level
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.setdefault(node.name, node)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.setdefault(node.id, node)
        elif isinstance(node, ast.alias):
            names.setdefault((node.asname or node.name).split(".")[0], node)
    return names


def test_every_module_path_the_code_and_docs_name_exists():
    """A docstring, comment or page that names ``jacobian_service.x.y`` (a module, then a
    name in it) names something that is there: such names outlive renames unseen (parsing
    said it returned ``jacobian_service.engine.Call``, which lives in ``types``)."""
    modules = _package_modules()
    trees = _parsed()
    bound: dict[str, dict[str, ast.AST]] = {}
    texts = [p for p in modules.values()] + [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    wrong = set()
    for path in texts:
        for dotted in re.findall(r"\b((?:jacobian_service|jacobian_client)(?:\.\w+)+)", path.read_text()):
            parts = dotted.split(".")
            k = max(k for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in modules)
            rest = parts[k:]
            if not rest or dotted in NOT_MODULES:
                continue
            module = ".".join(parts[:k])
            if module not in bound:
                bound[module] = _top_names(trees[module])
            if rest[0] not in bound[module]:
                wrong.add((path.relative_to(ROOT).as_posix(), dotted))
    assert sorted(wrong) == []


def test_registering_a_function_imports_no_server_stack():
    """The package's docstring: ``register``, ``Input`` and ``Array`` import without torch
    or the server stack, which ``create_app`` and ``Settings`` load on first use."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from jacobian_service import Array, Input, register\n"
        "stack = ('torch', 'starlette', 'uvicorn', 'pydantic')\n"
        "print(sorted(m for m in stack if m in sys.modules))\n"
        "from jacobian_service import Settings\n"
        "print('pydantic' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "True"]


def test_the_code_cites_no_document_outside_the_repository():
    """A newcomer has the repository only: the design notes the first sessions kept
    beside it (DESIGN.md, with its "Pitfalls") are not in it, so the code says what it
    took from them instead of citing them."""
    cited = sorted(f"{path.relative_to(ROOT)}:{i}" for path in _package_modules().values()
                   for i, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"\bDESIGN\b", line))
    assert cited == []
