"""Imported by tests/hostile21_functions.py's ``imports_lazily`` at its first call with
x[1] == 3, and by nothing else: what a function plants in ``sys.modules`` while a finder
of its own, cached for this directory, would say no module is there."""

SCALE = 1.0
