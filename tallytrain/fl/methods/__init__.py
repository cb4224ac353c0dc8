"""Built-in methods, one short module each; importing registers them."""
from . import (local, fedavg, fedprox, feddf, softlabel, softlabel_topk,  # noqa: F401
               tallytrain, bridge)
