"""Benchmarks of tallytrain's ops against the plain-PyTorch way (docs/kernels.md).

Run ``tallytrain bench --help`` (or, in a checkout, ``python -m benchmarks.ops
--help``: the code lives in tallytrain/bench); ``python -m pytest benchmarks/``
runs the pytest-benchmark microbenchmarks. Neither is part of the default test
run.
"""
