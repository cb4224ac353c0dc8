"""tallytrain on a tiny causal language model: votes per token, padding masked.

The "language" is a walk along a hidden cycle through 480 of the 4,096
tokens of the vocabulary: each token is followed by its successor on the
cycle. Each of three peers has private sequences from its own third of the
cycle only, so alone it can predict a third of the successors. Every round
each peer predicts the next token at every position of shared, unlabeled
probe sequences of different lengths (padded, the padding masked out of the
votes), abstaining where it is unsure; the votes are tallied position by
position, and each peer distills on the consensus. All forward passes run
under bfloat16 autocast on the CPU.

    python examples/language_model.py [--rounds 2] [--seed 0]
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch
from torch import nn

import tallytrain

VOCAB, WORDS, MAX_LEN, PEERS, PAD = 4096, 480, 16, 3, 0
PROBES, BATCH = 64, 16


class TinyLM(nn.Module):
    """Token and position embeddings, two causal Transformer layers, a vocabulary head."""

    def __init__(self, dim: int = 64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(torch.zeros(MAX_LEN, dim))
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True
        )
        self.layers = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.layers(self.embed(tokens) + self.position[:t], mask=causal, is_causal=True)
        return self.head(h)  # logits [B, T, VOCAB]


def make_batch(cycle: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor):
    """Walks along ``cycle`` of the given lengths, padded to MAX_LEN + 1 tokens.

    Returns the inputs [B, MAX_LEN], the next-token targets [B, MAX_LEN] and
    the mask [B, MAX_LEN] that is False on padding."""
    steps = torch.arange(MAX_LEN + 1)
    walk = cycle[(starts[:, None] + steps) % len(cycle)]
    real = steps < lengths[:, None]
    walk = torch.where(real, walk, PAD)
    return walk[:, :-1], walk[:, 1:], real[:, 1:]


def peer_starts(peer: int, count: int, g: torch.Generator) -> torch.Tensor:
    """Start points inside the peer's own third of the cycle, so that its walks
    stay there (a walk covers at most MAX_LEN steps)."""
    span = WORDS // PEERS
    return peer * span + torch.randint(span - MAX_LEN, (count,), generator=g)


def next_token_accuracy(model: nn.Module, batch) -> float:
    inputs, targets, mask = batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        guess = model(inputs).argmax(-1)
    return float((guess == targets)[mask].float().mean())


def run(
    rounds: int = 2,
    seed: int = 0,
    local_steps: int = 20,
    distill_steps: int = 10,
    verbose: bool = True,
) -> Dict[str, List[float]]:
    """Train the peers; return per-round mean probe accuracy, consensus accuracy
    and kept fraction of the real (unpadded) positions."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cycle = torch.randperm(VOCAB - 1, generator=g)[:WORDS] + 1  # token 0 is padding
    models = [TinyLM() for _ in range(PEERS)]
    optims = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    lengths = torch.randint(4, MAX_LEN + 2, (PROBES,), generator=g)  # 3..MAX_LEN real targets
    probes = make_batch(cycle, torch.randint(WORDS, (PROBES,), generator=g), lengths)
    inputs, truth, real = probes
    stats: Dict[str, List[float]] = {"accuracy": [], "consensus_accuracy": [], "kept": []}
    consensus = None
    for r in range(rounds):
        for p, (model, optim) in enumerate(zip(models, optims)):
            for _ in range(local_steps):  # next-token cross-entropy on private walks
                batch = make_batch(
                    cycle,
                    peer_starts(p, BATCH, g),
                    torch.randint(4, MAX_LEN + 2, (BATCH,), generator=g),
                )
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = model(batch[0])
                loss = nn.functional.cross_entropy(logits[batch[2]].float(), batch[1][batch[2]])
                optim.zero_grad()
                loss.backward()
                optim.step()
            for _ in range(distill_steps if consensus is not None else 0):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = tallytrain.consensus_loss(model(inputs), consensus)
                optim.zero_grad()
                loss.backward()
                optim.step()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            votes = [tallytrain.vote(m(inputs), mask=real, abstain_below=0.5) for m in models]
        consensus = tallytrain.tally(votes)
        # Padding abstains in every peer's votes, so it is never kept.
        assert not bool((consensus.keep & ~real).any())
        kept = consensus.keep
        stats["consensus_accuracy"].append(
            float((consensus.labels == truth)[kept].float().mean()) if bool(kept.any()) else 0.0
        )
        stats["kept"].append(float(kept[real].float().mean()))
        stats["accuracy"].append(sum(next_token_accuracy(m, probes) for m in models) / PEERS)
        if verbose:
            print(
                f"round {r}: peers' next-token accuracy {stats['accuracy'][-1]:.3f}, "
                f"consensus keeps {stats['kept'][-1]:.0%} of the real positions, "
                f"{stats['consensus_accuracy'][-1]:.3f} of them right"
            )
    return stats


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(args.rounds, args.seed)


if __name__ == "__main__":
    main()
