"""Imported by tests/hostile21_functions.py's ``imports_lazily`` at its first call with
x[1] == 3, and by nothing else: a module the import system imports beside an alias."""

SCALE = 1.0
