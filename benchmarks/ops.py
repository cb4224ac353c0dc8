"""``python -m benchmarks.ops``: the op benchmarks, from a checkout. The code
lives in tallytrain/bench/ops.py, so that ``tallytrain bench`` (the same
options, the same table) runs after any install; this module keeps the
checkout's command and imports working."""

from tallytrain.bench.ops import *  # noqa: F401,F403
from tallytrain.bench.ops import main

if __name__ == "__main__":
    main(prog="python -m benchmarks.ops")
