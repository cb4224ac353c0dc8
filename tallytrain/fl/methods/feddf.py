"""``feddf``: FedAvg, then the server distills the averaged model on the
round's probes towards softmax(mean of the peers' logits / T), as in FedDF
(the server runs each received model on the probes itself; peers send only
parameters)."""

from __future__ import annotations

import torch

from ...streams import SERVER_STREAM
from ..aggregate import labels_accuracy, share_agreeing
from ..peer import soft_label_loss
from .base import RoundStats, register
from .fedavg import FedAvg


@register
class FedDF(FedAvg):
    name = "feddf"

    def after_average(self, r, vectors):
        fed = self.fed
        t = fed.cfg.train
        idx = fed.probe_indices(r)
        x = fed.data.x_probe[idx]
        mask = fed.data.probe_mask(idx)
        with fed.timer("distillation"):
            logits = self.server.predict(x, vectors)
            targets = torch.softmax(logits.mean(0) / t.temperature, dim=-1)
            if mask is not None:  # an all-zero target: padding is never distilled on
                targets = targets * mask.unsqueeze(-1)
            steps = fed.cfg.protocol.server_distill_steps
            self.server.distill(
                x,
                targets,
                steps,
                fed.distill_batch(len(x), steps),
                soft_label_loss(t.temperature),
                fed.cfg.protocol.server_lr,
                fed.generator(SERVER_STREAM, r),
            )
        consensus = targets.argmax(-1)
        truth = fed.data.y_probe[idx]
        real = truth >= 0  # sequence tasks: padding is no position
        return RoundStats(
            consensus_acc=labels_accuracy(consensus, truth, real),
            agreement=share_agreeing(logits.argmax(-1), consensus, real),
        )
