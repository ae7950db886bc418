"""Imported by tests/hostile21_functions.py's ``imports_lazily`` at its first call with
x[1] == 1, and by nothing else: what a finder a function put in
``sys.path_importer_cache`` could stand in for."""

SCALE = 1.0
