"""The simulator on your own data and model, from Python: what
``tallytrain compare`` does, with a dataset and a model factory instead of
the names of bundled ones (see docs/api.md, "Your own data and model")."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from ..fl.registry import method_names
from .experiment import compare_config, run_compare
from .plugins import ModelFactory, register_dataset, register_model


def simulate(
    data: Any,
    model: Optional[ModelFactory],
    out: str,
    *,
    methods: Union[str, Sequence[str]] = "all",
    seeds: Sequence[int] = (0,),
    test: Any = None,
    num_classes: Optional[int] = None,
    dataset_name: str = "own",
    model_name: str = "own",
    resume: bool = False,
    overwrite: bool = False,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
    **options: Any,
) -> dict:
    """Run ``methods`` for every seed on ``data`` into the run directory
    ``out``; returns summary.json's dict.

    data: ``(x, y)`` tensors, a ``torch.utils.data.Dataset`` of ``(x, y)``
    pairs with integer labels, or a function returning either; ``test`` the
    same for an official test split (else ``test_fraction`` of ``data``).
    model: ``(num_classes) -> nn.Module``, or None to use the bundled
    architectures of ``archs``. They are registered as ``dataset_name`` and
    ``model_name`` (tallytrain/app/plugins.py), replacing an earlier
    registration of those names; config.json records the names, so a run
    directory is resumed by calling simulate again with the same data.
    methods: "all" or method names. options: the run configuration's fields
    by name, as ``tallytrain compare`` takes them (``peers=5, rounds=10,
    alpha=0.3, local_steps=10``, ...); ``archs`` defaults to the model alone.
    resume, overwrite, jobs, threads: as for ``tallytrain compare``; with
    ``jobs > 1`` the data and the factory must be picklable (the factory
    defined at the top level of a module).
    """
    register_dataset(dataset_name, data, test=test, num_classes=num_classes, replace=True)
    if model is not None:
        register_model(model_name, model, replace=True)
        options.setdefault("archs", (model_name,))
    names = (
        method_names()
        if methods == "all"
        else (
            [m.strip() for m in methods.split(",") if m.strip()]
            if isinstance(methods, str)
            else list(methods)
        )
    )
    cfg = compare_config(names, seeds, dataset=dataset_name, **options)
    return run_compare(
        cfg,
        out,
        resume=resume,
        overwrite=overwrite,
        show_progress=progress,
        threads=threads,
        jobs=jobs,
    )
