"""The application around the engine: run directories, worker processes,
progress and the pareto study. The ``tallytrain`` command
(tallytrain/cli.py) is a thin layer over it; the engine (tallytrain/fl,
tallytrain/data) knows nothing of files."""
