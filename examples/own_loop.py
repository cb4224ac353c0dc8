"""tallytrain in your own training loop: five peers, your model, your tensors.

Each peer trains its own MLP on a small private shard of scikit-learn's
bundled digits, skewed towards a few classes (Dirichlet, alpha = 0.3). Every
round each peer votes on 400 probes drawn from a shared unlabeled pool,
abstaining where its top-1 probability is below 0.9; the votes are tallied,
the consensus goes into a ConsensusMemory, and each peer distills on what
the memory holds while it trains. The same loop without the tallytrain lines
is local training, run alongside for comparison.

    python examples/own_loop.py [--rounds 6] [--seed 0]
"""

from __future__ import annotations

import argparse
from typing import List

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

import tallytrain

PEERS, CLASSES = 5, 10


def make_data(seed: int):
    """Features, labels, and index tensors: test set, probe pool, one shard per peer."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    test, pool, train = order[:400], order[400:1400], order[1400:]  # ~80 labels per peer
    share = torch.distributions.Dirichlet(torch.full((PEERS,), 0.3))
    torch.manual_seed(seed)
    owner = torch.empty(len(train), dtype=torch.int64)
    for c in range(CLASSES):  # class c is spread over the peers by a Dirichlet draw
        rows = torch.nonzero(y[train] == c).flatten()
        owner[rows] = torch.multinomial(share.sample(), len(rows), replacement=True)
    return x, y, test, pool, [train[owner == p] for p in range(PEERS)]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def run(
    rounds: int = 6, seed: int = 0, federated: bool = True, steps: int = 40, verbose: bool = True
) -> List[float]:
    """Train the five peers; return their mean test accuracy after each round."""
    x, y, test, pool, shards = make_data(seed)
    torch.manual_seed(seed)
    models = [
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES)) for _ in range(PEERS)
    ]
    optims = [torch.optim.Adam(m.parameters(), lr=3e-3) for m in models]
    memory = tallytrain.ConsensusMemory(len(pool))  # tallytrain
    history = []
    for r in range(rounds):
        held, targets = memory.labels()  # tallytrain
        for model, optim, shard in zip(models, optims, shards):
            for _ in range(steps):
                batch = shard[torch.randint(len(shard), (32,))]
                loss = F.cross_entropy(model(x[batch]), y[batch])
                if federated and len(held):
                    pick = torch.randint(len(held), (64,))
                    logits = model(x[pool[held[pick]]])
                    loss = loss + tallytrain.consensus_loss(logits, targets[pick])  # tallytrain
                optim.zero_grad()
                loss.backward()
                optim.step()
        if federated:
            probes = torch.randperm(len(pool))[:400]
            with torch.no_grad():
                votes = [
                    tallytrain.vote(m(x[pool[probes]]), abstain_below=0.9)  # tallytrain
                    for m in models
                ]
            memory.update(probes, tallytrain.tally(votes), round=r)  # tallytrain
        accs = [accuracy(m, x[test], y[test]) for m in models]
        history.append(sum(accs) / PEERS)
        if verbose:
            held_now = f", memory holds {len(memory)} labels" if federated else ""
            print(
                f"round {r}: mean test accuracy {history[-1]:.3f} "
                f"(peers {' '.join(f'{a:.2f}' for a in accs)}{held_now})"
            )
    return history


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print("tallytrain:")
    fed = run(args.rounds, args.seed, federated=True)
    print("local training only:")
    local = run(args.rounds, args.seed, federated=False)
    print(f"final mean test accuracy: tallytrain {fed[-1]:.3f}, local {local[-1]:.3f}")


if __name__ == "__main__":
    main()
