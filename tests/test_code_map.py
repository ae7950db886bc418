"""The newcomer's map of the code: docs/architecture.md's table names every module of
the service once, and nothing that is not there; the package's own lists agree with it."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "service" / "jacobian_service"


def _table_names() -> Counter[str]:
    """The modules (``x.py``, ``engine/x.py``) and packages (``engine/``) the first column
    of "Where the code is" names, each counted as often as it is named."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Where the code is", 1)[1].split("\n\n", 2)[1]
    names: Counter[str] = Counter()
    for row in table.splitlines()[2:]:  # past the head and its rule
        first = row.split("|")[1]
        names.update(re.findall(r"`([\w/]+(?:\.py|/))`", first))
    return names


def _modules() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "__init__.py":
            continue  # the package itself
        found.add(rel[: -len("__init__.py")] if rel.endswith("/__init__.py") else rel)
    return found


def test_the_architecture_table_names_every_module_once():
    named = _table_names()
    modules = _modules()
    assert sorted(modules - set(named)) == [], "modules docs/architecture.md does not list"
    assert sorted(set(named) - modules) == [], "listed in docs/architecture.md, but no such module"
    assert sorted(name for name, count in named.items() if count > 1) == [], "listed twice"
