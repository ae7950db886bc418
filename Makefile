# Set-up is part of every target: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# torch first, pinned: an open range would pull a multi-GB CUDA build on a CPU machine.
# --no-compile: pip byte-compiled all of torch's ~2,300 modules (61 s against 18.5 s for the
# install, loaded 2-core VM); a process compiles the ~1,000 it imports once, on first import.
TORCH ?= torch==2.13.0

.PHONY: serve test bench unasync clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)  ## serve the built-in examples on http://127.0.0.1:8000
	$(BIN)/jacobian-service serve $(ARGS)

# The suite starts dozens of servers (4+ Python processes each) beside its workers. Where
# bytecode is not written (images that set PYTHONDONTWRITEBYTECODE, as this project's
# development machine does), each process compiled the project's modules again: compiled
# once here (~1 CPU-s) instead; pytest's assert-rewritten test modules are kept too.
test: $(STAMP)  ## run the whole test suite
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m compileall -q service client tests bench >/dev/null
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)  ## side-by-side benchmarks (prints ratios)
	$(BIN)/python -m bench $(ARGS)

unasync:  ## rewrite the SDK's sync code from its async code (_sync.py from _async.py; the marked regions of _headwait.py and _decoding.py)
	$(PYTHON) scripts/unasync.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
