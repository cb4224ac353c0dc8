"""Small models for CPU-sized federated runs.

Models are ordinary ``nn.Module``s used as *templates*: the engine keeps every
peer's parameters itself (stacked per architecture, see fl/peer.py) and calls
the template through ``torch.func.functional_call``. Parameters are created by
:func:`init_params` from an explicit ``torch.Generator`` (never the global
RNG), with PyTorch's default initialisation rules.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of ``hidden`` units, then logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, depth: int):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Two 3x3 conv blocks (ReLU, 2x2 max-pool after the first), global 2x2
    average pooling, then a linear head. No batch norm: its running statistics
    do not average meaningfully across peers and do not batch under vmap."""

    def __init__(self, channels: int, num_classes: int, hidden: int):
        super().__init__()
        c1, c2 = max(hidden // 4, 4), max(hidden // 2, 8)
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(4 * c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _mlp(depth: int) -> Callable[..., nn.Module]:
    def make(input_shape: Tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
        return MLP(math.prod(input_shape), num_classes, hidden, depth)
    return make


def _cnn(input_shape: Tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
    if len(input_shape) != 3 or min(input_shape[1:]) < 2:
        raise ValueError(
            f"arch 'cnn' needs image inputs [channels, height, width] of at least 2x2, got "
            f"input shape {tuple(input_shape)}; use an MLP arch for this dataset")
    return CNN(input_shape[0], num_classes, hidden)


ARCHS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp(2),   # two hidden layers
    "mlp1": _mlp(1),  # one hidden layer: a weaker peer for mixed populations
    "cnn": _cnn,
}


def build_model(arch: str, input_shape: Sequence[int], num_classes: int, hidden: int) -> nn.Module:
    """The template module for ``arch``, on the meta device (it holds no data)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known archs: {', '.join(ARCHS)}")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    with torch.device("meta"):
        return ARCHS[arch](tuple(input_shape), num_classes, hidden)


@torch.no_grad()
def init_params(model: nn.Module, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Fresh CPU parameters for ``model`` drawn from ``generator``.

    Same rule as PyTorch's Linear/Conv defaults: weights kaiming-uniform with
    a = sqrt(5), biases uniform in +-1/sqrt(fan_in)."""
    params = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        w = torch.empty(mod.weight.shape)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        fan_in = w[0].numel()
        params[f"{mod_name}.weight"] = w
        if mod.bias is not None:
            bound = 1.0 / math.sqrt(fan_in)
            params[f"{mod_name}.bias"] = torch.empty(mod.bias.shape).uniform_(
                -bound, bound, generator=generator)
    missing = set(dict(model.named_parameters())) - set(params)
    if missing:
        raise TypeError(f"init_params does not know how to initialise {sorted(missing)}")
    return params


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
