"""What an adversarial peer sends instead of its honest payload.

Two behaviours (``adversarial_mode``):
- ``random``: uninformative noise of the right shape: uniformly random votes,
  Dirichlet(1) soft labels, or Gaussian parameters with the honest vector's
  mean and standard deviation.
- ``flip``: targeted sabotage: votes for class ``C-1-c`` instead of ``c``;
  soft labels with the class axis reversed (the same mapping); parameters
  ``2 * w_global - w``, i.e. the honest update reversed.
Pure functions of their inputs and an explicit generator.
"""

from __future__ import annotations

import torch


def corrupt_labels(
    labels: torch.Tensor, num_classes: int, mode: str, generator: torch.Generator
) -> torch.Tensor:
    if mode == "random":
        return torch.randint(num_classes, labels.shape, generator=generator)
    if mode == "flip":
        return (num_classes - 1) - labels
    raise ValueError(f"unknown adversarial mode {mode!r}")


def corrupt_probs(probs: torch.Tensor, mode: str, generator: torch.Generator) -> torch.Tensor:
    if mode == "random":
        e = -torch.log(torch.rand(probs.shape, generator=generator).clamp_min(1e-12))
        return (e / e.sum(-1, keepdim=True)).to(probs.dtype)  # Dirichlet(1) rows
    if mode == "flip":
        return probs.flip(-1)
    raise ValueError(f"unknown adversarial mode {mode!r}")


def corrupt_params(
    vector: torch.Tensor, reference: torch.Tensor, mode: str, generator: torch.Generator
) -> torch.Tensor:
    if mode == "random":
        noise = torch.randn(vector.shape, generator=generator, dtype=vector.dtype)
        spread = vector.std() if vector.numel() > 1 else vector.new_zeros(())  # no NaN at 1
        return vector.mean() + spread * noise
    if mode == "flip":
        return 2 * reference - vector
    raise ValueError(f"unknown adversarial mode {mode!r}")
