"""The ClientApp: one tallytrain peer per SuperNode (its partition-id)."""
from tallytrain.flower.client import app

__all__ = ["app"]
