"""Imported by tests/hostile21_functions.py's ``imports_lazily`` at its first call with
x[1] == 0, and by nothing else: what a function's planted ``sys.modules`` entry could
stand in for."""

SCALE = 1.0
