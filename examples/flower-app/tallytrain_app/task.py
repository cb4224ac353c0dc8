"""What this app brings of its own: the peers' model, how a node reads its
own data file, and the shared probe pool every party reads.

Each SuperNode reads only its own file (``data-file`` in its node config,
or ``<app.data-dir>/node<partition-id>.pt``); the ServerApp and every node
read the shared probes and test set from ``<app.data-dir>/shared.pt``.
``python -m tallytrain_app.make_data DIR`` writes such files from the
bundled digits dataset, split exactly as ``tallytrain run`` splits it, so
the example runs anywhere (and a Flower run can be checked against the
simulator); with your own data, write the same two kinds of file.

File formats (``torch.save`` of a dict of tensors):
- a node's file: ``x`` [n, ...] float inputs, ``y`` [n] integer labels;
- ``shared.pt``: ``x_probe`` [N, ...] (and optionally ``y_probe`` [N],
  hidden labels that only score the consensus on the server), ``x_test``,
  ``y_test`` (the test set every peer is measured on).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from tallytrain.flower import SharedData

IN_FEATURES = 64  # digits: 8 x 8 images
HIDDEN = 64


def make_model(num_classes: int) -> nn.Module:
    """Every peer's model (a factory, as for tallytrain.simulate)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(IN_FEATURES, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, num_classes),
    )


def _read(path: str, keys, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{what} {path!r} lacks {', '.join(missing)}")
    return data


def _data_dir(run_config: Mapping[str, Any]) -> str:
    path = str(run_config.get("app.data-dir", ""))
    if not path:
        raise ValueError(
            "run config app.data-dir is empty: write the files with "
            "`python -m tallytrain_app.make_data DIR` and pass "
            "--run-config 'app.data-dir=\"DIR\"'"
        )
    return path


def load_node(node_config: Mapping[str, Any], run_config: Mapping[str, Any]):
    """On a SuperNode: (model, this node's own training data)."""
    path = node_config.get("data-file") or os.path.join(
        _data_dir(run_config), f"node{node_config['partition-id']}.pt"
    )
    data = _read(str(path), ("x", "y"), "the node's data file")
    return make_model, (data["x"], data["y"])


def shared(run_config: Mapping[str, Any]) -> SharedData:
    """The probe pool and test set, the same for the server and every node."""
    path = os.path.join(_data_dir(run_config), "shared.pt")

    def probes():
        data = _read(path, ("x_probe",), "shared probe file")
        return (data["x_probe"], data["y_probe"]) if "y_probe" in data else data["x_probe"]

    def test():
        data = _read(path, ("x_test", "y_test"), "shared probe file")
        return data["x_test"], data["y_test"]

    return SharedData(probes, test)
