"""Benchmarks of tallytrain's ops against the plain-PyTorch way (KERNELS.md).

Run ``python -m benchmarks.ops --help``; ``python -m pytest benchmarks/`` runs
the pytest-benchmark microbenchmarks. Neither is part of the default test run.
"""
