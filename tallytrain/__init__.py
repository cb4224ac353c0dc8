"""tallytrain: hard-label federated distillation with packed votes.

Each peer predicts on a shared unlabeled probe set and sends only its argmax
class per probe, packed into ``ceil(log2 C)`` bits; the votes are tallied
into a consensus, and peers distill on it. The public API (docs/api.md):

* :func:`vote` -- logits ``[..., C]`` to one peer's packed :class:`Votes`;
* :func:`tally` -- several peers' votes to a :class:`Consensus` (the
  plurality label per position and which positions to keep);
* :func:`consensus_loss` -- cross-entropy on the kept positions;
* :class:`ConsensusMemory` -- the consensus labels a peer holds over a public
  probe pool across rounds.

The ops underneath are in :mod:`tallytrain.ops`, the message bytes in
:mod:`tallytrain.wire`. :func:`simulate` runs the federated simulator (every
method of ``tallytrain compare``) on your own data and model.
"""

from . import ops
from .consensus import Consensus, consensus_loss, tally
from .memory import ConsensusMemory
from .votes import Votes, vote

__version__ = "0.1.0"

__all__ = [
    "vote",
    "Votes",
    "tally",
    "Consensus",
    "consensus_loss",
    "ConsensusMemory",
    "ops",
    "simulate",
    "__version__",
]


def __getattr__(name: str):
    # The simulator brings the application (run directories, plots): imported
    # when first asked for, so that `import tallytrain` stays light.
    if name == "simulate":
        from .app.simulate import simulate

        return simulate
    raise AttributeError(f"module 'tallytrain' has no attribute {name!r}")
