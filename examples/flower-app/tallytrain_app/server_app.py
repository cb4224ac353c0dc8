"""The ServerApp: tallytrain's server (tally, consensus back to the peers)."""
from tallytrain.flower.server import app

__all__ = ["app"]
