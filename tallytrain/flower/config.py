"""The Flower run config, read into a tallytrain :class:`RunConfig` plus the
adapter's own options.

A Flower app's ``[tool.flwr.app.config]`` is a flat mapping (Flower joins
nested TOML tables with dots). Every field of the run configuration is a key,
named as in ``tallytrain run`` without the dashes in front: ``peers``,
``rounds``, ``seed``, ``method`` at the top, the others under their section
(``train.local-steps``, ``protocol.abstain-below``, ``data.alpha``, ...).
Keys under ``flower.`` belong to the adapter (:class:`FlowerOptions`), keys
under ``app.`` to the user's app (e.g. where its data lies): tallytrain
leaves them alone, and a ClientApp's ``load`` or a shared probe source can
read them from the run config.
Values are TOML scalars; ``"none"`` means None and tuples are comma-separated
strings, as on the command line. An unknown key is an error that names it,
so a typo cannot silently run the defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Tuple

import torch

from ..fl.config import RunConfig

_SECTIONS = ("data", "model", "train", "protocol")
_TOP = ("method", "seed", "peers", "rounds")


@dataclass(frozen=True)
class FlowerOptions:
    """How the adapter drives a run over Flower (not part of the protocol)."""

    round_timeout: float = 120.0  # seconds the server waits for a round's replies
    node_timeout: float = 120.0  # seconds the server waits for the peers' nodes to connect
    threads: int = 1  # torch CPU threads in the ServerApp and each ClientApp
    report: str = ""  # absolute path of the ServerApp's JSON report ("" = none)

    def __post_init__(self):
        for name in ("round_timeout", "node_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"flower.{name.replace('_', '-')} must be > 0 seconds, got "
                    f"{getattr(self, name)}"
                )
        if self.threads < 1:
            raise ValueError(f"flower.threads must be >= 1, got {self.threads}")
        if self.report and not os.path.isabs(self.report):
            raise ValueError(
                f"flower.report must be an absolute path (the ServerApp runs in "
                f"a directory of Flower's choosing), got {self.report!r}"
            )


def _convert(value: Any, annotation: str, key: str) -> Any:
    """A TOML scalar as the dataclass field typed ``annotation`` expects it."""
    if (
        annotation.startswith("Optional[")
        and isinstance(value, str)
        and value.strip().lower() in ("none", "off", "")
    ):
        return None
    if annotation.startswith("Tuple"):
        if not isinstance(value, str):
            raise ValueError(
                f"run config key {key!r} takes a comma-separated string, got {value!r}"
            )
        return tuple(part.strip() for part in value.split(",") if part.strip())
    base = annotation.replace("Optional[", "").rstrip("]")
    if base == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = {"int": int, "float": float, "str": str, "bool": bool}.get(base)
    if expected is not None and (
        not isinstance(value, expected) or (expected is int and isinstance(value, bool))
    ):
        raise ValueError(f"run config key {key!r} takes a {base}, got {value!r}")
    return value


def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def parse_run_config(user_config: Mapping[str, Any]) -> Tuple[RunConfig, FlowerOptions]:
    """(RunConfig, FlowerOptions) from a Flower ``context.run_config``; keys
    not given keep the defaults of tallytrain.fl.config."""
    run = RunConfig().to_dict()
    options: Dict[str, Any] = {}
    section_types = {name: type(getattr(RunConfig(), name)) for name in _SECTIONS}
    top_fields = _fields(RunConfig)
    unknown = []
    for key, value in user_config.items():
        section, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        if section == "" and name in _TOP:
            run[name] = _convert(value, str(top_fields[name].type), key)
        elif section in section_types and name in _fields(section_types[section]):
            field = _fields(section_types[section])[name]
            run[section][name] = _convert(value, str(field.type), key)
        elif section == "flower" and name in _fields(FlowerOptions):
            options[name] = _convert(value, str(_fields(FlowerOptions)[name].type), key)
        elif key.startswith("app."):
            continue  # the user's app's own keys
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"unknown run config keys: {', '.join(sorted(unknown))}; keys are {', '.join(_TOP)}, "
            f"<section>.<field> for the sections {', '.join(_SECTIONS)} (fields as in "
            f"`tallytrain run --help`), flower.<option> for "
            f"{', '.join(f.replace('_', '-') for f in _fields(FlowerOptions))}, and app.<key> "
            f"for the app's own settings"
        )
    return RunConfig.from_dict(run), FlowerOptions(**options)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block on ``count`` torch CPU threads, then restore the previous
    count. One thread by default, as ``tallytrain run``: the results then do
    not depend on the machine, which the simulator parity relies on."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
