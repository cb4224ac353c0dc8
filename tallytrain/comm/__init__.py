"""Communication accounting: every message is real bytes, counted by the ledger."""

from .channel import Channel, Envelope
from .ledger import DIRECTIONS, SERVER, Entry, Ledger, direction_of

__all__ = ["Channel", "DIRECTIONS", "Entry", "Envelope", "Ledger", "SERVER", "direction_of"]
