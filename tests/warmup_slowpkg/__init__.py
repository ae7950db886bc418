"""A package that takes 4.5 s to import (``imports_slowly`` in warmup_hang_functions).

It takes its submodule with a plain ``import``, as torch's packages do: the import
system sets ``part`` on this package only when ``part`` itself is first loaded. An
import cut during the sleep (by an exception raised into it) drops this package from
``sys.modules`` but keeps ``part`` there; the next import runs this file again, finds
``part`` loaded, and the new package never gets its ``part``: AttributeError for
every later call. That is how an in-engine warm-up cut broke torch itself."""

import time

import tests.warmup_slowpkg.part  # noqa: F401

time.sleep(4.5)  # past the warm-up test's WARMUP_TIMEOUT_S (2.5 s) by more than a late supervisor tick
