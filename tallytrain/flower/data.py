"""What each party of a Flower run holds: a node its own peer's shard and
model, everyone the shared probe pool and test set.

:class:`SharedData` is the shared probe source: the public probe pool (the
inputs peers vote on; labels, if given, stay on the server and only score
the consensus) and a test set every peer measures its accuracy on. A node's
own data comes from a user callable ``load(node_config) -> (model,
train_data)``, read on that node alone. Data and models follow the
conventions of ``tallytrain.simulate`` and ``--plugin``
(tallytrain/app/plugins.py): data is ``(x, y)`` tensors, a
``torch.utils.data.Dataset`` of ``(x, y)`` pairs with integer labels, or a
function of no arguments returning either; a model is a factory
``(num_classes) -> nn.Module``, a module (its parameters are the peer's
initial ones), or the name of an architecture (bundled or registered).

Without them, the bundled datasets are split from the run config as the
simulator splits them (:func:`bundled_node`, :func:`bundled_shared`): every
node derives its own shard, which is what makes a Flower run comparable with
the simulator bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..app.plugins import _as_tensors, _inputs_and_labels, register_model
from ..data import FederatedData, Split, prepare
from ..fl.config import RunConfig

NodeLoader = Callable[..., tuple]


def accepts_run_config(fn: Callable) -> bool:
    """Whether ``fn`` takes a second positional argument (the run config)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


def resolve_shared(probes: Any, run_config: Mapping[str, Any], what: str) -> "SharedData":
    """``probes`` as a SharedData: itself, or a function of the Flower run
    config returning one (so that a path in the run config reaches the
    server and every node alike)."""
    if isinstance(probes, SharedData):
        return probes
    if callable(probes):
        try:
            shared = probes(dict(run_config))
        except Exception as exc:  # noqa: BLE001 - foreign code: report it in one line
            raise ValueError(
                f"{what}: probes(run_config) failed: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(shared, SharedData):
            return shared
        raise ValueError(
            f"{what}: probes(run_config) must return a tallytrain.flower.SharedData,"
            f" got {type(shared).__name__}"
        )
    raise ValueError(
        f"{what}: probes= must be a tallytrain.flower.SharedData or a function "
        f"(run_config) -> SharedData, got {type(probes).__name__}"
    )


@dataclass
class Shared:
    """The shared part, as tensors: probe inputs (and their hidden labels,
    or None), the test set, the number of classes."""

    x_probe: torch.Tensor
    y_probe: Optional[torch.Tensor]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


class SharedData:
    """The shared probe source of a Flower run with private data, given to
    both the ServerApp (``TallyTrainStrategy(..., probes=)``) and the
    ClientApp (``client_app(load, probes=)``), so that every party reads the
    same probe pool in the same order.

    probes: the probe pool: inputs ``x`` alone (unlabelled, as public data
    usually is), or ``(x, y)`` / a Dataset of pairs, whose labels only score
    the consensus (``consensus_acc``; None without them) and never reach a
    peer's training. test: ``(x, y)``, the test set every peer and the
    global model are measured on. Either may be a function of no arguments
    returning the data, called when first needed. num_classes: default the
    largest label of the test set and labelled probes, plus one."""

    def __init__(self, probes: Any, test: Any, *, num_classes: Optional[int] = None):
        if probes is None or test is None:
            raise ValueError(
                "SharedData needs both probes= (the probe pool) and test= (the "
                "test set every peer is measured on)"
            )
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
            raise ValueError(f"SharedData num_classes must be an integer >= 2, got {num_classes!r}")
        self.probes, self.test, self.num_classes = probes, test, num_classes
        self._built: Optional[Shared] = None

    def build(self) -> Shared:
        if self._built is None:
            self._built = self._build()
        return self._built

    def _build(self) -> Shared:
        source = self.probes
        if callable(source) and not isinstance(source, (torch.utils.data.Dataset, nn.Module)):
            source = source()
        if isinstance(source, (torch.Tensor, np.ndarray)):
            x_probe = torch.as_tensor(source)
            y_probe = None
            if x_probe.dim() < 2 or len(x_probe) == 0:
                raise ValueError(
                    f"SharedData probes: inputs must be [N, ...] with N >= 1, got "
                    f"shape {tuple(x_probe.shape)}"
                )
            x_probe = x_probe.float() if x_probe.dtype.is_floating_point else x_probe.long()
        else:
            x_probe, y_probe = _inputs_and_labels(
                *_as_tensors(source, "SharedData probes"), "SharedData probes"
            )
        x_test, y_test = _inputs_and_labels(
            *_as_tensors(self.test, "SharedData test"), "SharedData test"
        )
        if x_test.shape[1:] != x_probe.shape[1:]:
            raise ValueError(
                f"SharedData: test inputs are {tuple(x_test.shape[1:])}, probe "
                f"inputs {tuple(x_probe.shape[1:])}"
            )
        labels = y_test if y_probe is None else torch.cat([y_test, y_probe])
        num_classes = int(labels.max()) + 1 if self.num_classes is None else int(self.num_classes)
        if num_classes < 2:
            raise ValueError(f"SharedData: needs at least 2 classes, got {num_classes}")
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"SharedData: labels must lie in 0..{num_classes - 1}, got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        return Shared(x_probe.contiguous(), y_probe, x_test, y_test, num_classes)


def federated_data(
    cfg: RunConfig,
    shared: Shared,
    peer: Optional[int] = None,
    train: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> FederatedData:
    """The FederatedData of one party: the shared part, plus (on a node)
    ``peer``'s own training data as its shard; every other shard is empty,
    because no party holds another peer's data. Probes without labels get
    label 0 everywhere: peers never train on probe labels, and the server
    reports no consensus accuracy for them (server.py)."""
    x_shape = tuple(shared.x_probe.shape[1:])
    if train is None:
        x_train = shared.x_probe.new_empty((0,) + x_shape)
        y_train = torch.empty(0, dtype=torch.int64)
    else:
        x_train, y_train = train
    shards = [
        np.arange(len(y_train)) if q == peer else np.empty(0, dtype=np.int64)
        for q in range(cfg.peers)
    ]
    y_probe = (
        shared.y_probe
        if shared.y_probe is not None
        else torch.zeros(len(shared.x_probe), dtype=torch.int64)
    )
    split = Split(
        np.arange(len(y_train)),
        np.arange(len(y_probe)),
        np.arange(len(shared.y_test)),
        official_test=True,
        official_probe=True,
    )
    return FederatedData(
        x_train,
        y_train,
        shards,
        shared.x_probe,
        y_probe,
        shared.x_test,
        shared.y_test,
        shared.num_classes,
        x_shape,
        split,
        info={"source": "flower"},
    )


# ---- a node's own data ------------------------------------------------------------
def node_arch(peer: int) -> str:
    """The architecture name a node registers its own model under."""
    return f"flower-peer-{peer}"


def as_arch(model: Any, name: str, what: str) -> str:
    """An architecture name for ``model``: a name as given, or a factory or
    module registered under ``name`` (a module's own parameters become the
    initial ones: the factory hands out copies of it)."""
    if isinstance(model, str):
        return model
    if isinstance(model, nn.Module):
        module = model
        model = lambda num_classes: copy.deepcopy(module)  # noqa: E731
    if not callable(model):
        raise ValueError(
            f"{what}: the model must be an nn.Module, a factory (num_classes) -> "
            f"nn.Module or an architecture name, got {type(model).__name__}"
        )
    register_model(name, model, replace=True)
    return name


def load_node(
    load: NodeLoader,
    node_config: Mapping[str, Any],
    peer: int,
    cfg: RunConfig,
    shared: Shared,
    run_config: Optional[Mapping[str, Any]] = None,
) -> Tuple[RunConfig, FederatedData]:
    """(the node's RunConfig, its FederatedData) from the user's
    ``load(node_config)`` (or ``load(node_config, run_config)``). Any
    failure is one ValueError line that says what to fix."""
    try:
        if accepts_run_config(load):
            loaded = load(dict(node_config), dict(run_config or {}))
        else:
            loaded = load(dict(node_config))
    except Exception as exc:  # noqa: BLE001 - foreign code: report it in one line
        raise ValueError(
            f"load(node_config) failed on the node of peer {peer}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise ValueError(
            f"load(node_config) must return (model, train_data), got {type(loaded).__name__}"
        )
    model, train = loaded
    what = f"load(node_config) of peer {peer}"
    x, y = _inputs_and_labels(*_as_tensors(train, what + " train_data"), what + " train_data")
    if x.shape[1:] != shared.x_probe.shape[1:]:
        raise ValueError(
            f"{what}: training inputs are {tuple(x.shape[1:])}, the shared probes "
            f"{tuple(shared.x_probe.shape[1:])}"
        )
    if int(y.min()) < 0 or int(y.max()) >= shared.num_classes:
        raise ValueError(
            f"{what}: labels must lie in 0..{shared.num_classes - 1} (the shared "
            f"data's classes), got {int(y.min())}..{int(y.max())}"
        )
    arch = as_arch(model, node_arch(peer), what)
    node_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, archs=(arch,)))
    return node_cfg, federated_data(node_cfg, shared, peer, (x, y))


# ---- the bundled datasets, split as the simulator splits them ---------------------
def bundled_shared(data: FederatedData) -> Shared:
    return Shared(data.x_probe, data.y_probe, data.x_test, data.y_test, data.num_classes)


def bundled_node(cfg: RunConfig, peer: int) -> FederatedData:
    """Peer ``peer``'s view of the bundled dataset: the simulator's split and
    partition for the run's seed, of which the node keeps its own shard."""
    data = prepare(cfg.data, cfg.peers, cfg.seed)
    shard = torch.from_numpy(data.shards[peer].astype(np.int64))
    own = (data.x_train[shard].clone(), data.y_train[shard].clone())
    node = federated_data(cfg, bundled_shared(data), peer, own)
    return dataclasses.replace(node, input_shape=data.input_shape)


def server_view(cfg: RunConfig, data: FederatedData) -> FederatedData:
    """``data`` without its training split: the server holds the shared part
    only, and learns the shard sizes from the nodes."""
    return dataclasses.replace(
        federated_data(cfg, bundled_shared(data)), input_shape=data.input_shape
    )
