"""The hooks a method implements. The round loop (fl/loop.py) calls them in
this order every round, for the peers selected that round:

1. ``downlink``   -> envelopes the server sends (delivered, decoded, counted)
2. ``peer_update``   each selected peer digests what it received and trains
3. ``uplink``     -> envelopes the peers send (delivered, decoded, counted)
4. ``aggregate``     the server (or, decentralized, each peer) combines them
5. ``reply``      -> envelopes the server sends back within the round (delivered,
                     decoded, counted), then ``apply_reply`` on the peers: for a
                     result peers must hold before the round is evaluated

The defaults describe a peer that only trains on its own shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch

from ... import wire
from ...comm import Envelope


@dataclass(frozen=True)
class RoundStats:
    """What the aggregation step measured (None where it does not apply)."""

    consensus_acc: Optional[float] = None  # consensus labels vs hidden probe labels
    agreement: Optional[float] = None  # mean share of peers backing the consensus
    kept_fraction: Optional[float] = None  # share of probes kept for distillation
    classes_covered: Optional[float] = None  # share of classes among the kept labels
    memory_fraction: Optional[float] = None  # share of the pool peers hold a target for
    memory_acc: Optional[float] = None  # held targets vs hidden probe labels
    abstained: Optional[float] = None  # share of votes that abstained


class Method:
    name: ClassVar[str] = ""
    #: averages parameters, so every peer must share one architecture
    averages_parameters: ClassVar[bool] = False
    #: keys of state_dict() that hold peers' state (deployed: each peer keeps
    #: its own part on its own node, see peer_state); the rest is the server's
    peer_state_keys: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, fed):
        self.fed = fed

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse (ValueError) a RunConfig this method cannot run, before
        anything is built (fl/loop.py's validate calls it)."""

    def selection_round(self, r: int) -> int:
        """The round whose draw picks round r's peers (participation < 1). A
        method whose peers work across several rounds between exchanges keeps
        the same peers for all of them by returning the first such round."""
        return r

    def downlink(self, r: int, selected: Sequence[int]) -> List[Envelope]:
        return []

    def peer_update(self, r: int, selected: Sequence[int], inbox: Dict[int, list]) -> None:
        self.fed.train_local(r, selected)

    def uplink(self, r: int, selected: Sequence[int]) -> List[Envelope]:
        return []

    def aggregate(
        self, r: int, selected: Sequence[int], received: List[Tuple[Envelope, wire.Message]]
    ) -> RoundStats:
        return RoundStats()

    def reply(self, r: int, selected: Sequence[int]) -> List[Envelope]:
        return []

    def apply_reply(self, r: int, inbox: Dict[int, list]) -> None:
        raise NotImplementedError(f"method {self.name!r} sends no replies")

    def global_params(self) -> Optional[torch.Tensor]:
        """The flat global model, for methods that have one."""
        return None

    def state_dict(self) -> dict:
        """Everything, every held peer's state included (simulator checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, the checkpoint has some")

    # ---- one peer's state (a deployed peer saves it on its own node) ----------
    def peer_state(self, peer: int) -> dict:
        """What ``peer`` keeps between rounds besides its model: its own
        tensors only (never another peer's rows), so that a Flower node
        saves and restores exactly its own peer. Server state is not in it."""
        return {}

    def load_peer_state(self, peer: int, state: dict) -> None:
        """Restore what :meth:`peer_state` returned for ``peer``."""
        if state:
            raise ValueError(f"method {self.name!r} keeps no peer state, got {sorted(state)}")


def bytes_to_tensor(data: Optional[bytes]) -> Optional[torch.Tensor]:
    """Checkpoints hold tensors, not raw bytes (torch.load(weights_only=True))."""
    return None if data is None else torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_to_bytes(t: Optional[torch.Tensor]) -> Optional[bytes]:
    return None if t is None else t.numpy().tobytes()


# The method table, by name. Each method module registers its class here;
# tallytrain/fl/registry.py imports them all and looks names up. It lives in
# this module, which imports no method, so that registering does not import
# the registry and the package import graph has no cycle.
METHODS: Dict[str, Type[Method]] = {}


def register(cls: Type[Method]) -> Type[Method]:
    name = cls.name
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is registered twice")
    METHODS[name] = cls
    return cls
