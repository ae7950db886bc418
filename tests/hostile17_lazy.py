"""A module imported by tests/hostile17_functions.py's ``uses_a_lazy_import`` at its
first call, and by nothing else: what an import finder a function left could stand in for."""

SCALE = 1.0
