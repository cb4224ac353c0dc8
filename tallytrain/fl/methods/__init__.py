"""Built-in methods, one short module each; importing registers them."""

from . import (  # noqa: F401
    local,
    fedavg,
    fedprox,
    feddf,
    softlabel,
    softlabel_topk,
    tallytrain,
    bridge,
)
