"""The transformer language model (arch "lm") used as the engine uses models:
a meta-device template, parameters from init_params, functional_call, and
vmap over peers' stacked parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from tallytrain.fl.peer import make_group
from tallytrain.models import ARCHS, build_model, causal_attention, init_params, num_params

V, T, WIDTH = 97, 8, 32


def _stacked(template, peers: int):
    inits = [init_params(template, torch.Generator().manual_seed(i)) for i in range(peers)]
    return inits, {k: torch.stack([p[k] for p in inits]) for k in inits[0]}


def test_template_is_on_meta_and_init_is_seeded():
    model = build_model("lm", (T,), V, WIDTH)
    assert "lm" in ARCHS and all(p.device.type == "meta" for p in model.parameters())
    a = init_params(model, torch.Generator().manual_seed(0))
    b = init_params(model, torch.Generator().manual_seed(0))
    c = init_params(model, torch.Generator().manual_seed(1))
    assert a.keys() == b.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["token.weight"], c["token.weight"])
    assert torch.equal(a["norm.weight"], torch.ones(WIDTH)) and not a["blocks.0.qkv.bias"].any()
    # tied output projection: the embedding is the only V x width matrix
    per_block = 12 * WIDTH * WIDTH + 13 * WIDTH
    assert num_params(model) == V * WIDTH + T * WIDTH + 2 * per_block + 2 * WIDTH
    assert sum(v.numel() for v in a.values()) == num_params(model)


def test_logits_are_causal_and_shaped():
    model = build_model("lm", (T,), V, WIDTH)
    params = init_params(model, torch.Generator().manual_seed(0))
    x = torch.randint(V, (5, T), generator=torch.Generator().manual_seed(1))
    logits = functional_call(model, params, (x,))
    assert logits.shape == (5, T, V) and logits.dtype == torch.float32
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % V
    other = functional_call(model, params, (changed,))
    assert torch.equal(other[:, :5], logits[:, :5])  # the past does not see the future
    assert not torch.allclose(other[:, 5:], logits[:, 5:])
    # a shorter window uses the first positions
    assert torch.allclose(functional_call(model, params, (x[:, :3],)), logits[:, :3], atol=1e-6)


def test_attention_matches_torch_sdpa():
    q, k, v = torch.randn(3, 2, 4, T, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(causal_attention(q, k, v), expected, atol=1e-6)


@pytest.mark.parametrize("shared_input", [True, False])
def test_vmap_over_peers_equals_separate_calls_and_gradients_flow(shared_input):
    model = build_model("lm", (T,), V, WIDTH)
    inits, stacked = _stacked(model, 3)
    gen = torch.Generator().manual_seed(2)
    x = (
        torch.randint(V, (4, T), generator=gen)
        if shared_input
        else torch.randint(V, (3, 4, T), generator=gen)
    )
    y = torch.randint(-1, V, (3, 4, T), generator=gen)  # -1: padding, ignored
    call = vmap(
        lambda p, xs: functional_call(model, p, (xs,)), in_dims=(0, None if shared_input else 0)
    )
    leaves = {k: v.clone().requires_grad_(True) for k, v in stacked.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no slow per-peer fallback
        logits = call(leaves, x)
    separate = [functional_call(model, inits[i], (x if shared_input else x[i],)) for i in range(3)]
    assert torch.allclose(logits, torch.stack(separate), atol=1e-5)
    # the sum of per-peer losses gives each peer its own gradient
    losses = [
        F.cross_entropy(logits[i].flatten(0, 1), y[i].flatten(), ignore_index=-1) for i in range(3)
    ]
    sum(losses).backward()
    for i in range(3):
        own = {k: v.clone().requires_grad_(True) for k, v in inits[i].items()}
        out = functional_call(model, own, (x if shared_input else x[i],))
        F.cross_entropy(out.flatten(0, 1), y[i].flatten(), ignore_index=-1).backward()
        for k in own:
            assert own[k].grad is not None and own[k].grad.abs().sum() > 0, k
            assert torch.allclose(leaves[k].grad[i], own[k].grad, atol=1e-5, rtol=1e-4), k


def test_bfloat16_autocast_runs_forward_and_backward():
    model = build_model("lm", (T,), V, WIDTH)
    _, stacked = _stacked(model, 2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in stacked.items()}
    x = torch.randint(V, (4, T), generator=torch.Generator().manual_seed(3))
    call = vmap(lambda p, xs: functional_call(model, p, (xs,)), in_dims=(0, None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = call(leaves, x)
    assert logits.dtype == torch.bfloat16
    assert torch.allclose(logits.float(), call(stacked, x), atol=0.05)
    logits.float().logsumexp(-1).sum().backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in leaves.values())


def test_peer_group_predicts_token_logits():
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    group = make_group("lm", [0, 1, 2], (T,), V, WIDTH, gens)
    x = torch.randint(V, (6, T), generator=torch.Generator().manual_seed(4))
    logits = group.predict(x)
    assert logits.shape == (3, 6, T, V)
    assert torch.allclose(logits[1], group.predict_one(x, 1), atol=1e-5)


@pytest.mark.parametrize(
    "shape, hidden, match",
    [
        ((1, 20, 20), WIDTH, "arch 'lm' needs token windows of shape \\(context,\\)"),
        ((0,), WIDTH, "arch 'lm' needs token windows"),
        ((T,), 30, r"hidden \(30\) must be a multiple of its 4 attention heads"),
    ],
)
def test_bad_shapes_and_widths_are_refused(shape, hidden, match):
    with pytest.raises(ValueError, match=match):
        build_model("lm", shape, V, hidden)
