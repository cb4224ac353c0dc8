"""The application around the engine: run directories, worker processes,
progress, the pareto study, and the simulator on your own data and model.
The ``tallytrain`` command (tallytrain/cli.py) is a thin layer over it; the
engine (tallytrain/fl, tallytrain/data) knows nothing of files."""

from .experiment import RunDirError, compare_config, run_compare
from .plugins import load_plugin, register_dataset, register_model
from .simulate import simulate

__all__ = [
    "RunDirError",
    "compare_config",
    "load_plugin",
    "register_dataset",
    "register_model",
    "run_compare",
    "simulate",
]
