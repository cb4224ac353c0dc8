"""``local``: every peer trains on its own shard only; nothing is sent.
The lower bound every collaborative method has to beat."""

from .base import Method, register


@register
class Local(Method):
    name = "local"
