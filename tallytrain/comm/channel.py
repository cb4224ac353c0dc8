"""Delivering messages: the receiver decodes every message it gets, and the
ledger records its real length.

A delivery fails loudly when a message is not what the protocol expects
(wrong kind, wrong round, a sender field that does not match who sent it):
the simulator must not quietly account for bytes that nobody could use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Optional, Sequence, Tuple

from .. import wire
from .ledger import SERVER, Ledger, Party


@dataclass(frozen=True)
class Envelope:
    sender: Party
    receiver: Party
    data: bytes
    expect: "wire.MessageKind"


def wire_sender(party: Party) -> int:
    """The sender id written in a message header for a party."""
    return wire.SERVER if party == SERVER else int(party)


class Channel:
    def __init__(self, ledger: Ledger, timer: Optional[Callable[[str], ContextManager]] = None):
        self.ledger = ledger
        self._timer = timer or (lambda phase: contextlib.nullcontext())

    def deliver(
        self, round_index: int, envelopes: Sequence[Envelope]
    ) -> List[Tuple[Envelope, "wire.Message"]]:
        out = []
        with self._timer("messaging"):
            for env in envelopes:
                msg = wire.decode(env.data, expect_kind=env.expect)
                if msg.round != round_index:
                    raise wire.WireFormatError(
                        f"{msg.kind.name} message from {env.sender} is for round {msg.round}, "
                        f"expected round {round_index}"
                    )
                if msg.sender != wire_sender(env.sender):
                    raise wire.WireFormatError(
                        f"{msg.kind.name} message from {env.sender} carries sender id {msg.sender}"
                    )
                self.ledger.record(
                    round_index, env.sender, env.receiver, msg.kind.name.lower(), len(env.data)
                )
                out.append((env, msg))
        return out
