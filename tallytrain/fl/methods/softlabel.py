"""``softlabel``: peers send softmax vectors on the probes (float32 or float16),
the server averages them (optionally sharpened as in DS-FL), and next round
peers distill on the average with KL at temperature T.

Messages mirror tallytrain's: the server opens round r with a CONTROL message
(round, probe seed, probes per round) and, from round 1 on, a SOFT_LABELS
message holding round r-1's averaged labels (a control message can embed only
a hard-label consensus, so the soft labels travel as their own message)."""
from __future__ import annotations

import torch

from ... import wire
from ...comm import SERVER, Envelope
from ..adversary import corrupt_probs
from ..aggregate import average_probs, labels_accuracy, share_agreeing, sharpen
from ..peer import soft_label_loss
from ..registry import register
from .base import Method, RoundStats


@register
class SoftLabel(Method):
    name = "softlabel"

    def __init__(self, fed):
        super().__init__(fed)
        self.dtype = getattr(torch, fed.cfg.protocol.softlabel_dtype)
        self.previous = None  # float32 [N, C]: the last round's aggregated labels

    def downlink(self, r, selected):
        with self.fed.timer("messaging"):
            ctrl = wire.encode_control(round=r, probe_seed=self.fed.probe_seed,
                                       num_probes=self.fed.cfg.protocol.probes_per_round,
                                       sender=wire.SERVER)
            soft = None
            if self.previous is not None:
                soft = wire.encode_soft_labels(self.previous, dtype=self.dtype, round=r,
                                               sender=wire.SERVER)
        out = []
        for p in selected:
            out.append(Envelope(SERVER, p, ctrl, wire.MessageKind.CONTROL))
            if soft is not None:
                out.append(Envelope(SERVER, p, soft, wire.MessageKind.SOFT_LABELS))
        return out

    def peer_update(self, r, selected, inbox):
        fed = self.fed
        targets = {}
        for p in selected:
            if len(inbox[p]) < 2:  # round 0: control only
                continue
            ctrl, soft = inbox[p]
            x = fed.data.x_probe[fed.probe_indices(r - 1, ctrl.probe_seed)]
            targets[p] = (x, soft.probs.float(), torch.arange(len(x)))
        fed.learn(r, selected, targets, soft_label_loss(fed.cfg.train.temperature))

    def uplink(self, r, selected):
        fed = self.fed
        t = fed.cfg.train.temperature
        probs = fed.consume_probe_logits(r, selected,
                                         lambda p, logits: torch.softmax(logits / t, dim=-1))
        out = []
        for i, p in enumerate(selected):
            payload = probs[i]
            if fed.adversarial[p]:
                payload = corrupt_probs(payload, fed.cfg.protocol.adversarial_mode,
                                        fed.adversary_generator(r, p))
            with fed.timer("messaging"):
                msg = wire.encode_soft_labels(payload, dtype=self.dtype, round=r, sender=p)
            out.append(Envelope(p, SERVER, msg, wire.MessageKind.SOFT_LABELS))
        return out

    def aggregate(self, r, selected, received):
        fed = self.fed
        probs = torch.stack([msg.probs.float() for _, msg in received])
        avg = average_probs(probs)
        if fed.cfg.protocol.sharpen_temperature is not None:
            avg = sharpen(avg, fed.cfg.protocol.sharpen_temperature)
        self.previous = avg
        consensus = avg.argmax(-1)
        truth = fed.data.y_probe[fed.probe_indices(r)]
        return RoundStats(consensus_acc=labels_accuracy(consensus, truth),
                          agreement=share_agreeing(probs.argmax(-1), consensus))

    def state_dict(self):
        return {"previous": self.previous}

    def load_state_dict(self, state):
        self.previous = state["previous"]

