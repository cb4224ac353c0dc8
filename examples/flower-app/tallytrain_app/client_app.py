"""The ClientApp: one tallytrain peer per SuperNode (its partition-id), which
reads only its own data file (task.load_node)."""

from tallytrain.flower import client_app

from .task import load_node, shared

app = client_app(load=load_node, probes=shared)

__all__ = ["app"]
