"""A user's module whose attribute tests/parity37_functions.py steps (``S.N += 1``): state
kept behind a module attribute, which the engine's kept-state walk did not look into."""

N = 0
