"""``fedprox``: FedAvg whose local objective adds mu/2 * ||w - w_global||^2."""

from .fedavg import FedAvg
from .base import register


@register
class FedProx(FedAvg):
    name = "fedprox"

    def prox_mu(self) -> float:
        return self.fed.cfg.protocol.prox_mu
