"""Built-in methods, one short module each; importing registers them."""
from . import local, fedavg, fedprox, feddf, softlabel, tallytrain, bridge  # noqa: F401
