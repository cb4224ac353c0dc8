"""Deployment on Flower (flwr): tallytrain peers on Flower SuperNodes, the
tallytrain server in a Flower ServerApp. See docs/flower.md.

- :mod:`tallytrain.flower.server`: ``app`` (the ServerApp) and
  :class:`TallyTrainStrategy`, the server side over a Flower Grid;
- :mod:`tallytrain.flower.client`: ``app`` (the ClientApp), one peer per node;
- :mod:`tallytrain.flower.config`: the Flower run config -> RunConfig;
- :mod:`tallytrain.flower.records`: tallytrain messages inside Flower records.

Needs the optional dependency: ``pip install "tallytrain[flower]"``.
"""
try:
    import flwr  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('tallytrain.flower needs Flower; install it with '
                      'pip install "tallytrain[flower]"') from exc

from .config import FlowerOptions, parse_run_config
from .server import TallyTrainStrategy

__all__ = ["FlowerOptions", "TallyTrainStrategy", "parse_run_config"]
