"""Your own datasets and models, by name, for every method of the engine.

:func:`register_dataset` adds a dataset to the names ``--dataset`` (the
``dataset`` field of the config) accepts, :func:`register_model` an
architecture to the names ``--archs`` accepts; :func:`load_plugin` imports a
module (``tallytrain compare --plugin mypkg.myplugin``, or a ``.py`` file)
whose top level calls them. The engine then runs them like its own: every
method, partitioner, the ledger and the run directory are unchanged.

A dataset is ``(x, y)`` tensors (or arrays), or a ``torch.utils.data.Dataset``
whose items are ``(x, y)`` pairs with integer labels ``y``, or a function of
no arguments returning either (called when a run first needs it). Inputs
that are floating point become float32; integer inputs (token ids) int64.

A model is a factory ``(num_classes) -> nn.Module``. The engine keeps every
peer's parameters itself, stacked per architecture (tallytrain/fl/peer.py),
and runs the module as a template through ``torch.func.functional_call``,
under ``vmap`` over peers where the module allows it and one peer per call
where it does not (same results, slower). Each peer's initial parameters are
a fresh ``factory(num_classes)`` built under the global RNG seeded from that
peer's stream (and restored afterwards), so the module's own initialisation
applies. The state of a model is its parameters: a module with persistent
buffers (BatchNorm's running statistics) is refused, because those would not
be trained, averaged, sent or checkpointed per peer.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..data import DATASETS
from ..data.datasets import Dataset
from ..models import ARCHS

ModelFactory = Callable[[int], nn.Module]

# Names the engine brings (never replaced by a registration).
_BUILTIN_DATASETS = frozenset(DATASETS)
_BUILTIN_ARCHS = frozenset(ARCHS)

_plugins: List[str] = []  # plugins loaded, in order (module names or paths)
_loading: List[str] = []  # the plugin being imported, if any
_from_plugins: set = set()  # ("dataset" | "model", name) registered by a plugin


def _check_name(kind: str, name: str, builtin: frozenset) -> None:
    if not isinstance(name, str) or not name.strip() or "," in name:
        raise ValueError(f"a {kind} name must be a non-empty string without commas, got {name!r}")
    if name in builtin:
        raise ValueError(f"{kind} {name!r} is built in; register yours under another name")


# --------------------------------------------------------------------------- #
# datasets
# --------------------------------------------------------------------------- #
def _as_tensors(source: Any, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from tensors, arrays, or a map-style torch Dataset of pairs."""
    if callable(source) and not isinstance(source, torch.utils.data.Dataset):
        source = source()  # a loader, called when a run first needs the data
    if isinstance(source, torch.utils.data.Dataset):
        if not hasattr(source, "__len__"):
            raise ValueError(f"{what}: a torch Dataset needs __len__ (a map-style dataset)")
        xs, ys = [], []
        for i in range(len(source)):
            item = source[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(
                    f"{what}: item {i} must be an (x, y) pair, got {type(item).__name__}"
                )
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        if not xs:
            raise ValueError(f"{what}: the dataset is empty")
        shapes = {tuple(t.shape) for t in xs}
        if len(shapes) > 1:
            raise ValueError(f"{what}: inputs must all have one shape, got {sorted(shapes)[:3]}")
        return torch.stack(xs), torch.stack(ys)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return torch.as_tensor(source[0]), torch.as_tensor(source[1])
    raise ValueError(
        f"{what} must be (x, y) tensors, a torch.utils.data.Dataset of (x, y) "
        f"pairs, or a function returning one; got {type(source).__name__}"
    )


def _inputs_and_labels(
    x: torch.Tensor, y: torch.Tensor, what: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"{what}: inputs must be [N, ...] with N >= 1, got shape {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x):
        raise ValueError(
            f"{what}: labels must be [N] with one label per input ({len(x)}), got shape "
            f"{tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be integers (class ids), got {y.dtype}")
    if x.dtype.is_floating_point:
        x = x.float()
    elif x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{what}: inputs must be floating point or integer, got {x.dtype}")
    else:
        x = x.long()
    return x.contiguous(), y.long().contiguous()


class _OwnDataset:
    """A registered dataset: the engine's loader ``(DataConfig) -> Dataset``.
    Built on first use and kept (the source is converted once)."""

    def __init__(self, name: str, data: Any, test: Any, num_classes: Optional[int]):
        self.name, self.data, self.test, self.num_classes = name, data, test, num_classes
        self._built: Optional[Dataset] = None

    def __getstate__(self):  # workers convert the source themselves
        return {k: v for k, v in self.__dict__.items() if k != "_built"} | {"_built": None}

    def __call__(self, cfg=None) -> Dataset:
        if self._built is None:
            self._built = self.build()
        return self._built

    def build(self) -> Dataset:
        what = f"dataset {self.name!r}"
        x, y = _inputs_and_labels(*_as_tensors(self.data, what), what)
        x_test = y_test = None
        if self.test is not None:
            x_test, y_test = _inputs_and_labels(
                *_as_tensors(self.test, what + " test set"), what + " test set"
            )
            if x_test.shape[1:] != x.shape[1:]:
                raise ValueError(
                    f"{what}: test inputs are {tuple(x_test.shape[1:])}, training inputs "
                    f"{tuple(x.shape[1:])}"
                )
        labels = y if y_test is None else torch.cat([y, y_test])
        low, high = int(labels.min()), int(labels.max())
        num_classes = high + 1 if self.num_classes is None else int(self.num_classes)
        if num_classes < 2:
            raise ValueError(f"{what}: needs at least 2 classes, got {num_classes}")
        if low < 0 or high >= num_classes:
            raise ValueError(f"{what}: labels must lie in 0..{num_classes - 1}, got {low}..{high}")
        return Dataset(
            self.name,
            x,
            y,
            num_classes,
            x_test,
            y_test,
            info={
                "source": "registered",
                "samples": len(y),
                "test_samples": None if y_test is None else len(y_test),
            },
        )


def register_dataset(
    name: str,
    data: Any,
    *,
    test: Any = None,
    num_classes: Optional[int] = None,
    replace: bool = False,
) -> None:
    """Make ``name`` a dataset the engine can run (``--dataset name``).

    data: ``(x, y)``, a torch Dataset of ``(x, y)`` pairs, or a function
    returning either. test: the same, an official test split (else
    ``test_fraction`` of ``data`` is carved out). num_classes: default the
    largest label + 1. replace: replace an earlier registration of ``name``
    (without it, registering a name twice is an error)."""
    _check_name("dataset", name, _BUILTIN_DATASETS)
    if name in DATASETS and not replace:
        raise ValueError(
            f"dataset {name!r} is registered already (pass replace=True to replace it)"
        )
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    DATASETS[name] = _OwnDataset(name, data, test, num_classes)
    _note("dataset", name)


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #
def _build_module(name: str, factory: ModelFactory, num_classes: int) -> nn.Module:
    module = factory(num_classes)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"model {name!r}: the factory returned {type(module).__name__}, not a torch.nn.Module"
        )
    params = dict(module.named_parameters())
    if not params:
        raise ValueError(f"model {name!r} has no parameters to train")
    buffers = [k for k in module.state_dict() if k not in params]
    if buffers:
        raise ValueError(
            f"model {name!r} has persistent buffers ({', '.join(buffers[:3])}"
            f"{', ...' if len(buffers) > 3 else ''}): the engine trains, averages, sends and "
            f"checkpoints parameters only, per peer. Use layers without running statistics "
            f"(LayerNorm or GroupNorm, or BatchNorm(track_running_stats=False)), or register "
            f"constants with register_buffer(..., persistent=False)"
        )
    return module


class OwnModel(nn.Module):
    """A registered model as the engine's template: the user's module (under
    ``net``), and the initialisation rule the engine asks templates for."""

    def __init__(self, name: str, factory: ModelFactory, num_classes: int):
        super().__init__()
        self.arch, self.num_classes = name, num_classes
        self.__dict__["_factory"] = factory  # not a submodule, even if it is a Module
        self.net = _build_module(name, factory, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def initial_params(self, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """A fresh module's parameters: the factory run with the global RNG
        seeded from ``generator`` (and restored afterwards)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(seed)
            fresh = _build_module(self.arch, self.__dict__["_factory"], self.num_classes)
        return {f"net.{k}": v.detach().clone() for k, v in fresh.named_parameters()}


class _OwnArch:
    """A registered model as an entry of models.ARCHS:
    ``(input_shape, num_classes, hidden) -> template`` (``hidden`` is the
    bundled models' width; a registered model has its own)."""

    def __init__(self, name: str, factory: ModelFactory):
        self.name, self.factory = name, factory

    def __call__(self, input_shape, num_classes: int, hidden: int) -> nn.Module:
        # models.build_model asks for templates on the meta device; this one
        # is built on the CPU, so that constant buffers of the module hold data.
        with torch.device("cpu"):
            return OwnModel(self.name, self.factory, num_classes)


def register_model(name: str, factory: ModelFactory, *, replace: bool = False) -> None:
    """Make ``name`` an architecture the engine can run (``--archs name``):
    ``factory(num_classes)`` returns a fresh ``nn.Module`` mapping a batch of
    inputs ``[B, ...]`` to logits ``[B, num_classes]``."""
    _check_name("model", name, _BUILTIN_ARCHS)
    if not callable(factory):
        raise ValueError(
            f"model {name!r}: the factory must be callable (num_classes) -> "
            f"nn.Module, got {type(factory).__name__}"
        )
    if name in ARCHS and not replace:
        raise ValueError(f"model {name!r} is registered already (pass replace=True to replace it)")
    ARCHS[name] = _OwnArch(name, factory)
    _note("model", name)


def _note(kind: str, name: str) -> None:
    if _loading:
        _from_plugins.add((kind, name))
    else:
        _from_plugins.discard((kind, name))


# --------------------------------------------------------------------------- #
# plugins, and what worker processes need
# --------------------------------------------------------------------------- #
def load_plugin(spec: str) -> None:
    """Import a plugin: a module name (``mypkg.myplugin``) or the path of a
    ``.py`` file. Its top level registers datasets and models. Loading the
    same plugin again does nothing."""
    if spec in _plugins:
        return
    _loading.append(spec)
    try:
        if spec.endswith(".py") or os.sep in spec:
            if not os.path.isfile(spec):
                raise ValueError("no such file")
            module_name = "tallytrain_plugin_" + "".join(
                c if c.isalnum() else "_" for c in os.path.abspath(spec)
            )
            loader_spec = importlib.util.spec_from_file_location(module_name, spec)
            if loader_spec is None or loader_spec.loader is None:
                raise ValueError("not a Python source file")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # so that what it defines can be pickled
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        else:
            importlib.import_module(spec)
    except ValueError as exc:
        raise ValueError(f"plugin {spec!r}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code, in one line
        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)  # the plugin's frames,
            if not f.filename.startswith("<")
            and "importlib" not in f.filename
            and os.path.abspath(f.filename) != os.path.abspath(__file__)
        ]  # not ours
        at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        raise ValueError(
            f"plugin {spec!r}: cannot import it ({type(exc).__name__}: {exc}{at})"
        ) from exc
    finally:
        _loading.pop()
    _plugins.append(spec)


def portable(datasets: Iterable[str] = (), models: Iterable[str] = ()) -> Optional[bytes]:
    """What a worker process needs to run ``datasets`` and ``models`` (names):
    the plugins to load, and those of them registered outside plugins,
    pickled. Refuses (ValueError) what cannot be pickled, naming it."""
    own_datasets = {
        k: DATASETS[k]
        for k in dict.fromkeys(datasets)
        if isinstance(DATASETS.get(k), _OwnDataset) and ("dataset", k) not in _from_plugins
    }
    own_models = {
        k: ARCHS[k]
        for k in dict.fromkeys(models)
        if isinstance(ARCHS.get(k), _OwnArch) and ("model", k) not in _from_plugins
    }
    if not (_plugins or own_datasets or own_models):
        return None
    for kind, table in (("dataset", own_datasets), ("model", own_models)):
        for name, entry in table.items():
            try:
                pickle.dumps(entry)
            except Exception as exc:  # noqa: BLE001 - pickling raises many kinds
                raise ValueError(
                    f"{kind} {name!r} cannot be sent to worker processes (jobs > 1): "
                    f"{type(exc).__name__}: {exc}. Define it at the top level of a module "
                    f"(a plugin, --plugin), or run with jobs = 1"
                ) from exc
    return pickle.dumps({"plugins": list(_plugins), "datasets": own_datasets, "models": own_models})


def restore(blob: Optional[bytes]) -> None:
    """In a worker process: load the parent's plugins and registrations."""
    if blob is None:
        return
    state = pickle.loads(blob)
    for spec in state["plugins"]:
        load_plugin(spec)
    for name, entry in state["datasets"].items():
        DATASETS.setdefault(name, entry)
    for name, entry in state["models"].items():
        ARCHS.setdefault(name, entry)
