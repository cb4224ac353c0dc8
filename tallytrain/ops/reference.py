"""Pure-PyTorch implementations of every op: the specification and the fallback.

Each function here is the definition of its op (docs/design.md §2-§3). The native
CPU and CUDA kernels must return byte-identical integer results and floats
within the tolerances stated in docs/ops.md. Everything is vectorised tensor
code, so the reference also serves on any device when the extension is absent.

Errors: ``TypeError`` for a wrong dtype, ``ValueError`` for everything else, and
every message names the argument at fault (the native kernels use the same
words).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Rows of logits handled per step when computing softmax probabilities, so
# that the reference never holds more than ~64 MiB of float64 temporaries.
_PROB_CHUNK_ELEMS = 1 << 23


# --------------------------------------------------------------------------- #
# bit layout
# --------------------------------------------------------------------------- #
def bits_for(num_symbols: int) -> int:
    """Width in bits of one symbol when a stream holds ``num_symbols`` values."""
    if isinstance(num_symbols, torch.SymInt):  # fake kernels under dynamic shapes
        num_symbols = int(num_symbols)
    if isinstance(num_symbols, bool) or not isinstance(num_symbols, int):
        raise TypeError(f"num_symbols must be an int, got {type(num_symbols).__name__}")
    if num_symbols < 2:
        raise ValueError(f"num_symbols must be >= 2, got {num_symbols}")
    return (num_symbols - 1).bit_length()


def packed_size(n: int, num_symbols: int) -> int:
    """Bytes of a stream of ``n`` symbols: ceil(n * bits_for(num_symbols) / 8)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (n * bits_for(num_symbols) + 7) // 8


def _check_num_symbols(num_symbols: int, name: str = "num_symbols") -> int:
    if num_symbols < 2:
        raise ValueError(f"{name} must be >= 2, got {num_symbols}")
    if num_symbols > (1 << 32):
        raise ValueError(f"{name} must be <= 2**32, got {num_symbols}")
    return bits_for(int(num_symbols))


def _check_stream(packed: torch.Tensor, n: int, num_symbols: int, name: str) -> int:
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name} must be a uint8 tensor, got {packed.dtype}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    b = _check_num_symbols(num_symbols)
    need = (n * b + 7) // 8
    have = packed.shape[-1] if packed.dim() > 0 else 1
    if have != need:
        raise ValueError(
            f"{name} must hold exactly ceil(n*bits/8) = {need} bytes for n={n} "
            f"symbols of {b} bits, got {have}"
        )
    return b


# --------------------------------------------------------------------------- #
# pack / unpack
# --------------------------------------------------------------------------- #
def pack_labels(labels: torch.Tensor, num_symbols: int) -> torch.Tensor:
    if labels.dtype not in INT_DTYPES:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {tuple(labels.shape)}")
    b = _check_num_symbols(num_symbols)
    n = labels.numel()
    lab = labels.to(torch.int64)
    if n and (int(lab.min()) < 0 or int(lab.max()) >= num_symbols):
        bad = int(torch.nonzero((lab < 0) | (lab >= num_symbols))[0])
        raise ValueError(
            f"labels[{bad}] = {int(lab[bad])} is outside 0..{num_symbols - 1} "
            f"(num_symbols={num_symbols})"
        )
    shifts = torch.arange(b, device=labels.device, dtype=torch.int64)
    bits = ((lab[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-bits.numel()) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    weights = 1 << torch.arange(8, device=labels.device, dtype=torch.int32)
    return (bits.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_labels(packed: torch.Tensor, n: int, num_symbols: int) -> torch.Tensor:
    if packed.dim() != 1:
        raise ValueError(f"packed must be 1-D, got shape {tuple(packed.shape)}")
    b = _check_stream(packed, n, num_symbols, "packed")
    labels = _unpack_rows(packed[None], n, b)[0]
    _check_symbols(labels, num_symbols, "packed")
    return labels


def _unpack_rows(packed: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """[R, bytes] uint8 -> [R, n] int64 without range checks."""
    rows = packed.shape[0]
    if rows == 0 or n == 0:
        return torch.zeros(rows, n, dtype=torch.int64, device=packed.device)
    shifts8 = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = ((packed[:, :, None] >> shifts8) & 1).reshape(rows, -1)[:, : n * b]
    weights = 1 << torch.arange(b, device=packed.device, dtype=torch.int64)
    return (bits.reshape(rows, n, b).to(torch.int64) * weights).sum(-1)


def _check_symbols(labels: torch.Tensor, num_symbols: int, name: str) -> None:
    if labels.numel() and int(labels.max()) >= num_symbols:
        flat = labels.reshape(-1)
        pos = int(torch.nonzero(flat >= num_symbols)[0])
        raise ValueError(
            f"{name} holds symbol {int(flat[pos])} at position {pos}, outside 0..{num_symbols - 1}"
        )


# --------------------------------------------------------------------------- #
# argmax + pack
# --------------------------------------------------------------------------- #
def top1_prob(logits: torch.Tensor) -> torch.Tensor:
    """softmax(logits)[argmax] as float32, i.e. 1 / sum_j exp(x_j - max_j x).

    Computed in float64 and rounded once, so that the result is the exact
    probability to float32 precision whatever the CPU or GPU and however
    torch's float32 kernels accumulate (torch.softmax in float32 is off by
    1e-4 relative at C = 1e6 on an AVX2 CPU). NaN where torch.softmax would
    give NaN (a NaN or +inf logit, or a row of all -inf)."""
    n, c = logits.shape
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    step = max(1, _PROB_CHUNK_ELEMS // max(c, 1))
    for r0 in range(0, n, step):
        x = logits[r0 : r0 + step].double()
        m = x.max(dim=-1, keepdim=True).values
        out[r0 : r0 + step] = 1.0 / torch.exp(x - m).sum(-1)
    return out


def check_logits(logits: torch.Tensor) -> None:
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have C >= 2 classes, got C={logits.shape[1]}")
    if logits.shape[1] >= (1 << 32):
        raise ValueError(f"logits must have C < 2**32 classes, got C={logits.shape[1]}")


def pack_argmax(
    logits: torch.Tensor, return_prob: bool = False, abstain_below: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pack each row's argmax; optionally its top-1 probability; optionally
    abstain (symbol C, stream of bits_for(C+1)) unless prob >= abstain_below."""
    check_logits(logits)
    if abstain_below is not None and not (0.0 <= abstain_below <= 1.0):
        raise ValueError(f"abstain_below must be in [0, 1], got {abstain_below}")
    c = logits.shape[1]
    idx = logits.argmax(dim=-1)
    need_prob = return_prob or abstain_below is not None
    prob = top1_prob(logits) if need_prob else logits.new_empty(0, dtype=torch.float32)
    num_symbols = c
    if abstain_below is not None:
        num_symbols = c + 1
        # NaN probabilities (garbage rows) abstain too: the test is prob >= t.
        idx = torch.where(prob >= abstain_below, idx, torch.full_like(idx, c))
    packed = pack_labels(idx, num_symbols)
    if not return_prob:
        prob = logits.new_empty(0, dtype=torch.float32)
    return packed, prob


# --------------------------------------------------------------------------- #
# tally
# --------------------------------------------------------------------------- #
def check_weights(weights: Optional[torch.Tensor], peers: int, device) -> torch.Tensor:
    if weights is None:
        return torch.ones(peers, dtype=torch.int64, device=device)
    if weights.dtype not in INT_DTYPES:
        raise TypeError(f"weights must be an integer tensor, got {weights.dtype}")
    if weights.dim() != 1 or weights.shape[0] != peers:
        raise ValueError(
            f"weights must be 1-D with one entry per peer ({peers}), got shape "
            f"{tuple(weights.shape)}"
        )
    w = weights.to(device=device, dtype=torch.int64)
    if peers and int(w.min()) < 0:
        bad = int(torch.nonzero(w < 0)[0])
        raise ValueError(f"weights must be >= 0, got weights[{bad}] = {int(w[bad])}")
    return w


def tally(
    votes: torch.Tensor,
    n: int,
    num_classes: int,
    weights: Optional[torch.Tensor] = None,
    abstain: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted plurality per probe; ties to the smallest class index.

    A probe with no weighted support (every peer abstained, or every voter has
    weight 0) gets label -1, count 0, runner_up 0 and total = summed weight."""
    if votes.dim() != 2:
        raise ValueError(f"votes must be 2-D [P, bytes], got shape {tuple(votes.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    num_symbols = num_classes + 1 if abstain else num_classes
    b = _check_stream(votes, n, num_symbols, "votes")
    p = votes.shape[0]
    w = check_weights(weights, p, votes.device)
    dev = votes.device
    i64: Dict[str, Any] = dict(dtype=torch.int64, device=dev)
    labels = _unpack_rows(votes, n, b)  # [P, N]
    _check_symbols(labels, num_symbols, "votes")

    valid = labels != num_classes if abstain else torch.ones_like(labels, dtype=torch.bool)
    probe = torch.arange(n, **i64).expand(p, n)[valid]
    cls = labels[valid]
    wv = w[:, None].expand(p, n)[valid]
    total = torch.zeros(n, **i64).index_add_(0, probe, wv)

    label = torch.full((n,), -1, **i64)
    count = torch.zeros(n, **i64)
    runner = torch.zeros(n, **i64)
    if probe.numel():
        key = probe * num_classes + cls
        uniq, inverse = torch.unique(key, sorted=True, return_inverse=True)
        cnt = torch.zeros(uniq.numel(), **i64).index_add_(0, inverse, wv)
        u_probe = uniq // num_classes
        u_cls = uniq % num_classes
        # Order: probe ascending, count descending, class ascending. `uniq` is
        # already class-ascending within a probe; two stable sorts finish it.
        order = torch.sort(-cnt, stable=True).indices
        order = order[torch.sort(u_probe[order], stable=True).indices]
        s_probe, s_cnt, s_cls = u_probe[order], cnt[order], u_cls[order]
        first = torch.ones_like(s_probe, dtype=torch.bool)
        first[1:] = s_probe[1:] != s_probe[:-1]
        second = torch.zeros_like(first)
        second[1:] = ~first[1:] & first[:-1]
        label[s_probe[first]] = s_cls[first]
        count[s_probe[first]] = s_cnt[first]
        runner[s_probe[second]] = s_cnt[second]
        none = total == 0
        label[none] = -1
        count[none] = 0
        runner[none] = 0
    return label, count, total, runner


# --------------------------------------------------------------------------- #
# top-k and merge
# --------------------------------------------------------------------------- #
TOPK_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_topk_input(x: torch.Tensor, k: int, name: str = "x") -> None:
    if x.dtype not in TOPK_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D [M], got shape {tuple(x.shape)}")
    if not 0 <= k <= x.numel():
        raise ValueError(f"k must satisfy 0 <= k <= M = {x.numel()}, got {k}")


def _check_no_nan(x: torch.Tensor, name: str) -> None:
    nan = torch.isnan(x)
    if bool(nan.any()):
        raise ValueError(f"{name} contains NaN (first at index {int(torch.nonzero(nan)[0])})")


def topk_sparse(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k entries of largest |x|, ties to the lower index; indices ascending."""
    check_topk_input(x, k)
    _check_no_nan(x, "x")
    # A stable descending sort keeps equal |x| in index order, so the first k
    # are exactly the set the tie rule picks.
    order = torch.sort(x.abs(), descending=True, stable=True).indices[:k]
    idx = torch.sort(order).values
    return idx, x[idx]


def topk_sparse_ef(
    x: torch.Tensor, residual: torch.Tensor, k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k with error feedback: select on acc = x + residual, send acc at the
    selected indices and leave the rest in ``residual`` (updated in place)."""
    check_topk_input(x, k)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual must match x in shape, dtype and device: x is "
            f"{tuple(x.shape)} {x.dtype} {x.device}, residual is "
            f"{tuple(residual.shape)} {residual.dtype} {residual.device}"
        )
    acc = x + residual
    _check_no_nan(acc, "x + residual")
    idx, values = topk_sparse(acc, k)
    residual.copy_(acc)
    residual[idx] = 0
    return idx, values


def merge_dtype(values: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32


def merge_scales(counts: Optional[torch.Tensor], peers: int) -> List[float]:
    """Per-peer factors: 1 for a sum, counts[p] / sum(counts) for an average."""
    if counts is None:
        return [1.0] * peers
    if counts.dtype not in INT_DTYPES:
        raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
    if counts.dim() != 1 or counts.shape[0] != peers:
        raise ValueError(
            f"counts must be 1-D with one entry per peer ({peers}), got shape {tuple(counts.shape)}"
        )
    c = [int(v) for v in counts.cpu().tolist()]
    for p, v in enumerate(c):
        if v < 0:
            raise ValueError(f"counts must be >= 0, got counts[{p}] = {v}")
    total = sum(c)
    if peers and total <= 0:
        raise ValueError("counts must sum to a positive number")
    return [v / total for v in c]


def check_sparse_peer(idx: torch.Tensor, val: torch.Tensor, size: int, p: int) -> None:
    if idx.dtype != torch.int64:
        raise TypeError(f"indices[{p}] must be int64, got {idx.dtype}")
    if val.dtype not in TOPK_DTYPES:
        raise TypeError(f"values[{p}] must be a floating tensor, got {val.dtype}")
    if idx.dim() != 1 or val.dim() != 1 or idx.shape != val.shape:
        raise ValueError(
            f"indices[{p}] and values[{p}] must be 1-D of equal length, got "
            f"{tuple(idx.shape)} and {tuple(val.shape)}"
        )
    if idx.numel():
        if int(idx[0]) < 0 or int(idx[-1]) >= size:
            raise ValueError(
                f"indices[{p}] must lie in 0..size-1 = {size - 1}, got "
                f"{int(idx.min())}..{int(idx.max())}"
            )
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"indices[{p}] must be strictly increasing")


def sparse_merge(
    indices: List[torch.Tensor],
    values: List[torch.Tensor],
    size: int,
    counts: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum (or counts-weighted average) of sparse vectors, peer 0 first.

    Each peer's contribution is ``values[p] * scale[p]`` rounded to the output
    dtype and added in peer order, so every backend gets the same floats."""
    if len(indices) != len(values):
        raise ValueError(
            f"indices and values must list the same number of peers, got {len(indices)} and "
            f"{len(values)}"
        )
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    peers = len(indices)
    scales = merge_scales(counts, peers)
    dtype = merge_dtype(values)
    device = indices[0].device if peers else torch.device("cpu")
    out = torch.zeros(size, dtype=dtype, device=device)
    for p, (idx, val) in enumerate(zip(indices, values)):
        check_sparse_peer(idx, val, size, p)
        contrib = val.to(dtype) if counts is None else val.to(dtype) * scales[p]
        out.index_add_(0, idx.to(device), contrib.to(device))
    return out
