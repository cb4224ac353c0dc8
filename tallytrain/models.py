"""Small models for CPU-sized federated runs.

Models are ordinary ``nn.Module``s used as *templates*: the engine keeps every
peer's parameters itself (stacked per architecture, see fl/peer.py) and calls
the template through ``torch.func.functional_call``. Parameters are created by
:func:`init_params` from an explicit ``torch.Generator`` (never the global
RNG), with PyTorch's default initialisation rules.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Flatten, then ``depth`` hidden ReLU layers of ``hidden`` units, then logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, depth: int):
        super().__init__()
        layers: List[nn.Module] = [nn.Flatten()]
        width = in_features
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
            nn.Conv2d(channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
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
            f"input shape {tuple(input_shape)}; use an MLP arch for this dataset"
        )
    return CNN(input_shape[0], num_classes, hidden)


ARCHS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp(2),  # two hidden layers
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
    a = sqrt(5), biases uniform in +-1/sqrt(fan_in). A model with its own
    rule (``initial_params(generator)``, e.g. the transformer LM) uses it."""
    own_rule = getattr(model, "initial_params", None)
    if callable(own_rule):
        return own_rule(generator)
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
                -bound, bound, generator=generator
            )
    missing = set(dict(model.named_parameters())) - set(params)
    if missing:
        raise TypeError(f"init_params does not know how to initialise {sorted(missing)}")
    return params


def output_positions(model: nn.Module) -> int:
    """Predictions per input sample: 1 for a classifier, T for a language
    model's window of T tokens (the engine sizes inference chunks by it)."""
    return int(getattr(model, "positions_per_sample", 1))


#: Architectures whose inputs are token windows and whose labels are per
#: position (the sequence tasks need one of them, and they need a sequence task).
SEQUENCE_ARCHS = ("lm",)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- #
# a small causal transformer language model (arch "lm")
# --------------------------------------------------------------------------- #
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), masked to earlier positions) v over [..., T, d].

    Written out rather than F.scaled_dot_product_attention: on CPU, SDPA has
    no vmap batching rule (torch 2.14), so under the engine's vmap over peers
    it falls back to a loop over peers with a performance warning. At context
    64 both measured the same (docs/datasets.md); this way batches over
    peers at any context. The softmax runs in float32 under autocast."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    t = scores.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool, device=scores.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).float().softmax(-1)
    return weights.to(v.dtype) @ v


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x GELU MLP,
    each added to the residual stream. No dropout: the engine's runs are
    deterministic, and random masks would need per-peer generators under vmap."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # [..., T, 3 * width] -> q, k, v [..., heads, T, head width]; any
        # leading dimensions, so that vmap over peers needs no reshaping here.
        qkv = self.qkv(self.norm1(h)).unflatten(-1, (3, self.heads, -1))
        q, k, v = (qkv.select(-3, i).transpose(-3, -2) for i in range(3))
        h = h + self.proj(causal_attention(q, k, v).transpose(-3, -2).flatten(-2))
        return h + self.out(F.gelu(self.fc(self.norm2(h))))


class TransformerLM(nn.Module):
    """Causal transformer over token ids [..., T] -> next-token logits
    [..., T, vocab_size]: token plus learned positional embeddings, ``layers``
    pre-norm blocks, a final LayerNorm, and the output projection tied to the
    token embedding (it halves the parameters at V = 4,096 and width 128, and
    every parameter is shipped by the parameter-averaging baselines)."""

    def __init__(
        self, vocab_size: int, context: int, width: int = 128, layers: int = 2, heads: int = 4
    ):
        super().__init__()
        if width % heads:
            raise ValueError(
                f"arch 'lm': hidden ({width}) must be a multiple of its {heads} attention heads"
            )
        self.layers = layers
        self.positions_per_sample = context  # one next-token prediction per input token
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Parameter(torch.empty(context, width))
        self.blocks = nn.ModuleList(CausalBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.token(tokens) + self.position[: tokens.shape[-1]]
        for block in self.blocks:
            h = block(h)
        return F.linear(self.norm(h), self.token.weight)

    @torch.no_grad()
    def initial_params(self, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """GPT-2's initialisation, drawn from ``generator`` in parameter order:
        weights and embeddings N(0, 0.02), the projections that write into the
        residual stream N(0, 0.02 / sqrt(2 * layers)) so that its variance
        does not grow with depth, biases 0, LayerNorm gains 1."""
        residual_std = 0.02 / math.sqrt(2 * self.layers)
        residual = {
            f"{n}.weight"
            for n, m in self.named_modules()
            if isinstance(m, CausalBlock)
            for n in (f"{n}.proj", f"{n}.out")
        }
        gains = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.LayerNorm)}
        params = {}
        for name, p in self.named_parameters():
            if name in residual:
                value = torch.empty(p.shape).normal_(0.0, residual_std, generator=generator)
            elif name in gains:
                value = torch.ones(p.shape)
            elif name.endswith(".bias"):
                value = torch.zeros(p.shape)
            else:  # linear weights, token and position embeddings
                value = torch.empty(p.shape).normal_(0.0, 0.02, generator=generator)
            params[name] = value
        return params


LM_LAYERS, LM_HEADS = 2, 4


def _lm(input_shape: Tuple[int, ...], num_classes: int, hidden: int) -> nn.Module:
    if len(input_shape) != 1 or input_shape[0] < 1:
        raise ValueError(
            f"arch 'lm' needs token windows of shape (context,), got input shape "
            f"{tuple(input_shape)}; use it with a text dataset (pytext)"
        )
    return TransformerLM(num_classes, input_shape[0], hidden, LM_LAYERS, LM_HEADS)


ARCHS["lm"] = _lm
