"""``local``: every peer trains on its own shard only; nothing is sent.
The lower bound every collaborative method has to beat."""
from ..registry import register
from .base import Method


@register
class Local(Method):
    name = "local"
