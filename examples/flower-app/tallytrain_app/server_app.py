"""The ServerApp: tallytrain's server (tally, consensus back to the peers),
with the shared probe pool. ``model`` lets the parameter-averaging methods
(bridge, fedavg, ...) check and average the nodes' model; the hard-label
methods never need it."""

from tallytrain.flower import server_app

from .task import make_model, shared

app = server_app(probes=shared, model=make_model)

__all__ = ["app"]
