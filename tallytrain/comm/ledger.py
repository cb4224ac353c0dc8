"""The communication ledger: one entry per real message sent.

Each entry is ``len(message)`` of the encoded bytes (never an estimate), with
the round, sender, receiver, direction and message kind. Directions:
``up`` (peer -> server), ``down`` (server -> peer), ``p2p`` (peer -> peer, the
decentralized mode: one entry per link). Byte totals are defined so that a
transmission is counted once: ``uplink`` = what peers send (up + p2p),
``downlink`` = what the server sends, ``total`` = every message.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Union

SERVER = "server"
Party = Union[int, str]  # a peer index, or SERVER
DIRECTIONS = ("up", "down", "p2p")
CSV_FIELDS = ("round", "sender", "receiver", "direction", "kind", "bytes")


@dataclass(frozen=True)
class Entry:
    round: int
    sender: Party
    receiver: Party
    direction: str
    kind: str
    bytes: int


def direction_of(sender: Party, receiver: Party) -> str:
    if sender == SERVER and receiver == SERVER:
        raise ValueError("a message needs a peer at one end at least")
    if sender == SERVER:
        return "down"
    if receiver == SERVER:
        return "up"
    if sender == receiver:
        raise ValueError(f"peer {sender} cannot send a message to itself")
    return "p2p"


class Ledger:
    def __init__(self, entries: Iterable[Entry] = ()):
        self.entries: List[Entry] = list(entries)

    def record(
        self, round_index: int, sender: Party, receiver: Party, kind: str, nbytes: int
    ) -> Entry:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        entry = Entry(
            int(round_index),
            sender,
            receiver,
            direction_of(sender, receiver),
            str(kind),
            int(nbytes),
        )
        self.entries.append(entry)
        return entry

    def totals(self, round_index: Optional[int] = None) -> Dict[str, int]:
        """Bytes by direction plus uplink / downlink / total, for one round or all."""
        out = dict.fromkeys(DIRECTIONS, 0)
        for e in self.entries:
            if round_index is None or e.round == round_index:
                out[e.direction] += e.bytes
        return {
            **out,
            "uplink": out["up"] + out["p2p"],
            "downlink": out["down"],
            "total": out["up"] + out["p2p"] + out["down"],
        }

    def by(self, *keys: str) -> Dict[tuple, int]:
        """Bytes summed over entries grouped by the named Entry fields."""
        out: Dict[tuple, int] = {}
        for e in self.entries:
            k = tuple(getattr(e, key) for key in keys)
            out[k] = out.get(k, 0) + e.bytes
        return out

    def truncate(self, rounds: int) -> None:
        """Forget the entries of rounds >= ``rounds`` (used when resuming)."""
        self.entries = [e for e in self.entries if e.round < rounds]

    # ---- persistence ------------------------------------------------------ #
    def rows(self) -> List[dict]:
        return [
            dict(zip(CSV_FIELDS, (e.round, e.sender, e.receiver, e.direction, e.kind, e.bytes)))
            for e in self.entries
        ]

    def to_csv(self, extra: Optional[Dict[str, object]] = None, header: bool = True) -> str:
        """CSV text; ``extra`` columns (e.g. method, seed) go first on every row."""
        extra = extra or {}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if header:
            writer.writerow(list(extra) + list(CSV_FIELDS))
        for row in self.rows():
            writer.writerow(list(extra.values()) + [row[k] for k in CSV_FIELDS])
        return buf.getvalue()

    def state_dict(self) -> List[list]:
        return [[e.round, e.sender, e.receiver, e.direction, e.kind, e.bytes] for e in self.entries]

    @classmethod
    def from_state(cls, state: List[list]) -> "Ledger":
        return cls(Entry(int(r), s, d, k, kind, int(b)) for r, s, d, k, kind, b in state)
