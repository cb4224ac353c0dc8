"""The benchmark harness, from a checkout: it lives in tallytrain/bench/harness.py."""

from tallytrain.bench.harness import *  # noqa: F401,F403
