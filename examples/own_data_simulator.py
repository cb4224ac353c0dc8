"""The simulator on your own data and model: every method of `tallytrain
compare`, on identical partitions, probes and seeds, into a run directory.

The data is a torch Dataset of 2-D points on three noisy concentric rings
(class = ring); the model is a small MLP with LayerNorm, initialised by its
own layers' rules. Both are plain PyTorch: nothing here knows tallytrain
except the last lines of main().

    python examples/own_data_simulator.py [--out runs/rings] [--rounds 8] [--jobs 1]

The same file is a plugin for the command line, which registers the dataset
as "rings" and the model as "ringnet":

    tallytrain compare --plugin examples/own_data_simulator.py --dataset rings \\
        --archs ringnet --out runs/rings-cli
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from tallytrain.app import register_dataset, register_model, simulate
from tallytrain.report import summary_table


class Rings(torch.utils.data.Dataset):
    """``samples`` points (x, y) on three concentric rings of radii 1, 2, 3,
    with Gaussian noise; the label is the ring. Seeded: the same points
    every time."""

    def __init__(self, samples: int = 1500, noise: float = 0.25, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (samples,), generator=g)
        angle = torch.rand(samples, generator=g) * 2 * math.pi
        radius = (self.labels + 1).float() + noise * torch.randn(samples, generator=g)
        self.points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.points[i], int(self.labels[i])


def ring_net(num_classes: int) -> nn.Module:
    """The model factory: (num_classes) -> a fresh module."""
    return nn.Sequential(
        nn.Linear(2, 32),
        nn.LayerNorm(32),
        nn.GELU(),
        nn.Linear(32, 32),
        nn.GELU(),
        nn.Linear(32, num_classes),
    )


# As a plugin (--plugin examples/own_data_simulator.py), these two lines are
# all that runs; the data is built when a run first needs it.
register_dataset("rings", Rings, replace=True)
register_model("ringnet", ring_net, replace=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rings")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    summary = simulate(
        Rings(),
        ring_net,
        args.out,
        methods=["local", "fedavg", "softlabel", "tallytrain"],
        seeds=[0, 1],
        peers=5,
        rounds=args.rounds,
        alpha=0.3,
        local_steps=20,
        batch_size=16,
        probes_per_round=200,
        min_shard_size=5,
        overwrite=True,
        jobs=args.jobs,
    )
    print(summary_table(summary), end="")
    print(f"run directory: {args.out}")


if __name__ == "__main__":
    main()
