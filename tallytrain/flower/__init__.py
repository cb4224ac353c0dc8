"""Deployment on Flower (flwr): tallytrain peers on Flower SuperNodes, the
tallytrain server in a Flower ServerApp. See docs/flower.md.

- :mod:`tallytrain.flower.server`: :func:`server_app`, ``app`` (the default
  ServerApp) and :class:`TallyTrainStrategy`, a Flower ``Strategy`` running
  the simulator's round loop over a Flower Grid;
- :mod:`tallytrain.flower.client`: :func:`client_app`, ``app`` (the default
  ClientApp): one peer per node, holding only its own data and state;
- :mod:`tallytrain.flower.data`: :class:`SharedData`, the shared probe
  source, and how a node's own data and model are read;
- :mod:`tallytrain.flower.config`: the Flower run config -> RunConfig;
- :mod:`tallytrain.flower.records`: tallytrain messages inside Flower records.

Needs the optional dependency: ``pip install "tallytrain[flower]"``.
"""

try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'tallytrain.flower needs Flower; install it with pip install "tallytrain[flower]"'
    ) from exc

from .client import client_app
from .config import FlowerOptions, parse_run_config
from .data import SharedData
from .server import TallyTrainStrategy, server_app

__all__ = [
    "FlowerOptions",
    "SharedData",
    "TallyTrainStrategy",
    "client_app",
    "parse_run_config",
    "server_app",
]
