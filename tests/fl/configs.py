"""The run configuration the engine's tests share: a federation of tiny MLPs
on digits that runs in seconds. A module whose cases need other defaults
binds them with functools.partial."""

from __future__ import annotations

from typing import Optional, Sequence

from tallytrain.fl.config import DataConfig, ModelConfig, ProtocolConfig, RunConfig, TrainConfig

TRAIN = TrainConfig(local_steps=3, distill_steps=2, batch_size=16, distill_batch_size=16)


def tiny(
    method: str,
    *,
    peers: int = 4,
    rounds: int = 3,
    seed: int = 0,
    archs: Sequence[str] = ("mlp",),
    train: Optional[TrainConfig] = None,
    **protocol,
) -> RunConfig:
    """``method`` on ``peers`` peers for ``rounds`` rounds (digits, alpha 0.5,
    MLPs of 16 hidden units); ``protocol`` sets ProtocolConfig's fields over
    40 probes per round and 2 server distillation steps."""
    protocol = {"probes_per_round": 40, "server_distill_steps": 2, **protocol}
    return RunConfig(
        method=method,
        seed=seed,
        peers=peers,
        rounds=rounds,
        data=DataConfig(alpha=0.5, min_shard_size=5),
        model=ModelConfig(archs=archs, hidden=16),
        train=train or TRAIN,
        protocol=ProtocolConfig(**protocol),
    )
