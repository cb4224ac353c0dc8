"""``fedprox``: FedAvg whose local objective adds mu/2 * ||w - w_global||^2."""
from ..registry import register
from .fedavg import FedAvg


@register
class FedProx(FedAvg):
    name = "fedprox"

    def prox_mu(self) -> float:
        return self.fed.cfg.protocol.prox_mu
