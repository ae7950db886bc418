"""Side-by-side benchmarks of jacobian-service: ``python -m bench [--quick] [--only NAME]``.

Modules: :mod:`bench.latency`, :mod:`bench.throughput`, :mod:`bench.big`,
:mod:`bench.modes`, :mod:`bench.load_test`, :mod:`bench.remote`; :mod:`bench.stream_bench` (a 2 GB streamed
Jacobian) runs on its own: ``python bench/stream_bench.py``. Servers run as subprocesses on
loopback (:mod:`bench._server`); :mod:`bench.functions` adds the ``tall`` and ``wide``
functions the modes benchmark serves.
"""
