"""The ``tallytrain`` command: ``info``, ``run``, ``compare`` and ``pareto``.

Every field of the run configuration (tallytrain/fl/config.py) is an option,
generated from the dataclasses so the CLI and the config cannot drift apart:
``--alpha 0.3``, ``--archs mlp,cnn``, ``--abstain-below none``, ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import List, Optional

from .fl import config as C

HELP = {
    "dataset": "digits (bundled, default), synthetic, mnist, fashion-mnist, cifar10, cifar100, "
               "pytext (next-token prediction on the Python standard library; --archs lm), "
               "glyphs (characters rendered from matplotlib's DejaVu fonts)",
    "data_dir": "folder holding the MNIST idx / CIFAR pickle files (no download)",
    "partition": "iid | dirichlet | classes (k classes per peer) | groups (whole groups per "
                 "peer: pytext modules, glyphs font faces); on pytext dirichlet and classes "
                 "skew over modules",
    "alpha": "Dirichlet concentration (> 0; small = skewed)",
    "num_classes": "classes of the synthetic task (up to 10,000 and more) or of glyphs "
                   "(up to 2,258)",
    "vocab_size": "pytext: BPE vocabulary size = the number of classes (>= 257)",
    "context": "pytext: tokens per window (the lm arch's context)",
    "renders_per_face": "glyphs: jittered renders of each class in each font face",
    "fonts": "glyphs: comma-separated font files (empty: matplotlib's 12 DejaVu faces)",
    "cache_dir": "folder for derived data (tokenizers, token ids, renders); default "
                 "$TALLYTRAIN_CACHE_DIR, else ~/.cache/tallytrain",
    "max_probe_samples": "keep at most this many samples of the public probe pool (0 = all); "
                         "soft-label payloads of a language model grow with the pool",
    "softlabel_topk": "softlabel-topk: classes (k) sent per probe position",
    "archs": "comma-separated architectures given to peers round-robin (mlp, mlp1, cnn; lm "
             "for pytext)",
    "local_steps": "Adam steps per round on the peer's shard",
    "order": "distillation methods: joint | distill-train | train-distill",
    "undertrained_fraction": "share of peers that do only --undertrained-steps local steps",
    "probes_per_round": "probes drawn from the public pool each round",
    "agreement_threshold": "tallytrain: keep probes whose winner share count/total >= this",
    "min_votes": "tallytrain: keep probes whose winner has at least this many votes",
    "abstain_below": "tallytrain: a peer abstains where its top-1 probability < this ('none' = never)",
    "decentralized": "tallytrain: every peer sends its votes to every peer and tallies itself",
    "sharpen_temperature": "softlabel: DS-FL sharpening softmax(avg / T) ('none' = off)",
    "adversarial_fraction": "share of peers that send random or flipped payloads",
    "adversarial_mode": "random | flip",
    "peer_batch": "peers per vectorised training call (0 = every peer of an architecture at once)",
    "merge_period": "fedavg/fedprox/feddf: average every this many rounds; bridge: sparse merge "
                    "every this many rounds (0 = never)",
    "topk_fraction": "bridge: share of its parameters a peer sends per merge (top-k)",
    "param_dtype": "parameter payloads (dense vectors, sparse values): float32 | float16",
}
_SECTIONS = (("data", C.DataConfig), ("model", C.ModelConfig), ("train", C.TrainConfig),
             ("protocol", C.ProtocolConfig))
_TOP = ("peers", "rounds")


def _optional(cast):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "off", "") else cast(text)
    parse.__name__ = cast.__name__
    return parse


def _add_field(group, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = HELP.get(f.name, "")
    t = str(f.type)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = f"{help_text} (default: {','.join(default) if isinstance(default, tuple) else default})".strip()
    # SUPPRESS: an option not given is absent from the namespace, so that an
    # explicit "none" (-> None) is distinguishable from "not given".
    if t == "bool":
        group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=help_text)
        return
    cast = {"int": int, "float": float, "str": str}.get(t.replace("Optional[", "").rstrip("]"))
    if t.startswith("Tuple"):
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar="A,B",
                           type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                           help=help_text)
    elif t.startswith("Optional"):
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=_optional(cast),
                           help=help_text)
    else:
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=cast,
                           help=help_text)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run directory (same options required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds: seed, seed+1, ...")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: results then do not depend on it)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel processes (default 1; results do not depend on it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    top = p.add_argument_group("federation")
    for f in dataclasses.fields(C.RunConfig):
        if f.name in _TOP:
            _add_field(top, f)
    for name, cls in _SECTIONS:
        group = p.add_argument_group(name)
        for f in dataclasses.fields(cls):
            _add_field(group, f)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tallytrain", description="Hard-label federated distillation with packed votes.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which op backend serves, versions")
    info.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    run = sub.add_parser("run", help="one method, one or more seeds, into a run directory")
    run.add_argument("--method", required=True,
                     help="local, fedavg, fedprox, feddf, softlabel, softlabel-topk, "
                          "tallytrain, bridge")
    _common(run)
    cmp_ = sub.add_parser("compare", help="several methods on identical partitions and probes")
    cmp_.add_argument("--methods", default="all", help="comma-separated method names, or 'all'")
    _common(cmp_)
    par = sub.add_parser("pareto", help="accuracy vs bytes: every operating point of FedAvg, "
                                        "FedProx, FedDF, softlabel, tallytrain and bridge")
    par.add_argument("--periods", type=_ints, default=(1, 2, 5, 10),
                     help="merge periods of fedavg/fedprox/feddf (default: 1,2,5,10)")
    par.add_argument("--bridge-fractions", type=_floats, default=(0.001, 0.01, 0.1),
                     help="bridge top-k fractions (default: 0.001,0.01,0.1)")
    par.add_argument("--bridge-periods", type=_ints, default=(1, 5, 10),
                     help="bridge merge periods (default: 1,5,10)")
    par.add_argument("--baselines", default="fedavg,fedprox,feddf",
                     help="parameter-averaging baselines (default: fedavg,fedprox,feddf)")
    _common(par)
    return parser


def _ints(text: str):
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str):
    return tuple(float(x) for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace, methods: List[str]) -> C.CompareConfig:
    sections = {}
    for name, cls in _SECTIONS:
        given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                 if hasattr(args, f.name)}
        sections[name] = cls(**given)
    top = {k: getattr(args, k) for k in _TOP if hasattr(args, k)}
    base = C.RunConfig(method=methods[0], seed=args.seed, **top, **sections)
    count = 1 if args.seeds is None else args.seeds
    if count < 1:
        raise ValueError(f"seeds must be >= 1, got {count}")
    return C.CompareConfig(methods=tuple(methods),
                           seeds=tuple(range(args.seed, args.seed + count)), base=base)


def _info(as_json: bool) -> int:
    from . import ops
    info = ops.backend_info()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"tallytrain backend mode: {info['mode']}")
    print(f"  CPU ops served by:  {info['cpu']}")
    print(f"  CUDA ops served by: {info['cuda']}")
    for op, where in info["ops"].items():
        print(f"    {op:16s} cpu={where['cpu']:9s} cuda={where['cuda']}")
    print(f"  extension: {info['extension'] or 'not loaded'}"
          + (" (built with CUDA)" if info.get("extension_built_with_cuda") else ""))
    if info.get("native_error"):
        print(f"  native load error: {info['native_error']}")
    print(f"  torch {info['torch']}, CUDA {info['torch_cuda'] or 'none'}"
          + (f", device {info['cuda_device']}" if info.get("cuda_device") else ""))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args.json)
    try:
        from . import report
        from .fl.experiment import RunDirError, run_compare
        from .fl.registry import method_names

        options = dict(resume=args.resume, overwrite=args.overwrite,
                       show_progress=not args.quiet, threads=args.threads, jobs=args.jobs)
        if args.command == "pareto":
            from .fl.pareto import pareto_config, pareto_table, run_pareto
            for name in ("merge_period", "topk_fraction"):
                if hasattr(args, name):
                    raise ValueError(f"pareto sets {name} per operating point; use --periods, "
                                     f"--bridge-periods and --bridge-fractions instead of "
                                     f"--{name.replace('_', '-')}")
            base = config_from_args(args, ["tallytrain"])
            cfg = pareto_config(base.base, base.seeds, args.periods, args.bridge_fractions,
                                args.bridge_periods,
                                [b.strip() for b in args.baselines.split(",") if b.strip()])
            result = run_pareto(cfg, args.out, **options)
            print(pareto_table(result), end="")
            print(f"run directory: {os.path.abspath(args.out)}")
            return 0
        if args.command == "run":
            methods = [args.method]
        else:
            methods = method_names() if args.methods.strip() == "all" else \
                [m.strip() for m in args.methods.split(",") if m.strip()]
        cfg = config_from_args(args, methods)
        summary = run_compare(cfg, args.out, **options)
    except (ValueError, FileNotFoundError, RunDirError) as exc:
        print(f"tallytrain: error: {exc}", file=sys.stderr)
        return 2
    print(report.summary_table(summary), end="")
    print(f"run directory: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
