"""The ``tallytrain`` command: ``info``, ``run``, ``compare``, ``pareto`` and
``bench``.

Every field of the run configuration (tallytrain/fl/config.py) is an option,
generated from the dataclasses so that the CLI and the config cannot drift
apart (``--alpha 0.3``, ``--archs mlp,cnn``, ``--abstain-below none``, ...);
its help is in :data:`HELP` below, and tests/api/test_cli.py fails when a field
has none. Bad input is one line on stderr naming the option, and exit
status 2; Ctrl-C stops a run, keeps what it finished, and says how to
resume it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import __version__

# The help of every config field, by field name: what it means and the
# values it takes (its default is appended). Lists of names that others
# extend (datasets, partitions, archs, methods) are filled in when the
# parser is built, from the tables themselves.
HELP: Dict[str, str] = {
    # federation
    "peers": "number of peers (each gets one shard of the training split)",
    "rounds": "federated rounds per run",
    # data
    "dataset": "dataset: {datasets} (mnist, fashion-mnist and cifar* are read from --data-dir; "
    "a --plugin adds more)",
    "data_dir": "folder holding the MNIST idx / CIFAR pickle files (nothing is downloaded)",
    "partition": "how the training split is dealt to peers: {partitions} (dirichlet: class "
    "shares drawn per class with --alpha; classes: --classes-per-peer classes "
    "each)",
    "alpha": "Dirichlet concentration of --partition dirichlet (> 0; small = skewed, "
    "e.g. 0.1; large = near IID)",
    "classes_per_peer": "--partition classes: how many classes each peer holds",
    "min_shard_size": "fewest training samples a peer may get (partitions are redrawn until "
    "every peer has this many)",
    "max_retries": "Dirichlet redraws before giving up on --min-shard-size",
    "test_fraction": "share of the samples held out as the test set, for datasets without an "
    "official test split",
    "probe_fraction": "share of the samples that form the public, unlabeled probe pool",
    "max_samples": "use at most this many samples of the dataset, drawn at random "
    "(0 = all of them), for quick runs",
    "max_test_samples": "evaluate on at most this many test samples (0 = the whole test set)",
    "num_classes": "classes of --dataset synthetic (and glyphs); other datasets have their own",
    "synthetic_dim": "--dataset synthetic: input dimensions",
    "samples_per_class": "--dataset synthetic: samples of each class",
    "synthetic_noise": "--dataset synthetic: standard deviation of the noise around each class "
    "prototype",
    "synthetic_seed": "--dataset synthetic: seed of the task itself (prototypes and noise; the "
    "same for every run seed)",
    "max_probe_samples": "keep at most this many samples of the public probe pool, drawn at "
    "random (0 = all); soft-label payloads of a language model grow with "
    "the pool",
    "vocab_size": "--dataset pytext: BPE vocabulary size = the number of classes (>= 257)",
    "context": "--dataset pytext: tokens per window (the lm arch's context)",
    "renders_per_face": "--dataset glyphs: jittered renders of each class in each font face",
    "fonts": "--dataset glyphs: comma-separated font files (empty: matplotlib's 12 DejaVu faces)",
    "cache_dir": "folder for derived data (tokenizers, token ids, glyph renders); default "
    "$TALLYTRAIN_CACHE_DIR, else ~/.cache/tallytrain",
    # model
    "archs": "comma-separated architectures dealt to peers round-robin: {archs} (a --plugin adds "
    "more)",
    "hidden": "width of the bundled architectures (hidden units; the CNN's channels derive from "
    "it)",
    # train
    "local_steps": "Adam steps per round on the peer's own shard",
    "batch_size": "minibatch size of local training",
    "lr": "Adam learning rate of every peer (its state is reset every round)",
    "distill_steps": "distillation steps per round on the probes (sequential --order only)",
    "distill_batch_size": "smallest distillation minibatch",
    "distill_epochs": "passes over the distillation targets per round; the batch grows up to "
    "--distill-batch-max to make them (0 = a fixed batch)",
    "distill_batch_max": "largest distillation minibatch",
    "temperature": "softlabel and feddf: distillation temperature",
    "undertrained_fraction": "share of peers that do only --undertrained-steps local steps",
    "undertrained_steps": "local steps per round of the under-trained peers",
    "peer_batch": "peers per vectorised training call (0 = every peer of an architecture at "
    "once; lower it to bound memory)",
    "order": "distillation methods: {orders} (joint: every step sums the shard loss and the "
    "consensus loss)",
    "distill_weight": "--order joint: weight of the consensus loss",
    # protocol
    "probes_per_round": "probes drawn from the public pool each round",
    "participation": "share of peers selected each round (1 = all)",
    "agreement_threshold": "tallytrain: keep probes whose winner's share count/total is at least "
    "this",
    "min_votes": "tallytrain: keep probes whose winner has at least this many votes, a vote "
    "counting as its peer's reputation (1 = fully trusted)",
    "abstain_below": "tallytrain: a peer also abstains where its top-1 probability is below "
    "this ('none' = never, the default)",
    "support_min": "tallytrain: a peer also abstains on classes its shard holds fewer samples "
    "of than this (0 = off)",
    "memory_max_age": "tallytrain: peers keep consensus labels this many rounds (0 = until "
    "replaced or dropped; 1 = no memory)",
    "support_radius": "tallytrain: a peer also abstains where the probe is farther from every "
    "shard sample of the predicted class than this quantile of the shard's "
    "nearest-same-class distances (float inputs; 'none' = off)",
    "votes_from": "tallytrain: the model a peer votes with: local (trained on its shard only), "
    "local-first (that, and the distilled model where it abstains), distilled",
    "softlabel_memory": "softlabel: keep past rounds' soft labels like tallytrain's memory "
    "(off: measured slower)",
    "reputation": "tallytrain: weigh votes by each peer's past agreement with the consensus",
    "decentralized": "tallytrain: every peer sends its votes to every peer and tallies itself",
    "prox_mu": "fedprox: weight mu of the proximal term mu/2 * ||w - w_global||^2",
    "softlabel_dtype": "softlabel: dtype of the soft labels on the wire: {dtypes}",
    "softlabel_topk": "softlabel-topk: classes (k) sent per probe position, with their "
    "probabilities as float16",
    "sharpen_temperature": "softlabel: DS-FL sharpening softmax(average / T) ('none' = off)",
    "server_distill_steps": "feddf: the server's distillation steps per round",
    "server_lr": "feddf: Adam learning rate of the server model",
    "param_dtype": "dtype of parameter payloads (dense vectors, sparse values): {dtypes}",
    "merge_period": "fedavg/fedprox/feddf: average every this many rounds; bridge: sparse "
    "merge every this many rounds (0 = never)",
    "topk_fraction": "bridge: share of its parameters a peer sends per merge (top-k)",
    "adversarial_fraction": "share of peers that send random or flipped payloads",
    "adversarial_mode": "what adversarial peers send: {adversaries}",
}

# Options that are not config fields, by the name their errors use.
_CLI_NAMES = (
    "method",
    "methods",
    "seed",
    "seeds",
    "threads",
    "jobs",
    "out",
    "plugin",
    "periods",
    "bridge_fractions",
    "bridge_periods",
    "baselines",
)


class _Parser(argparse.ArgumentParser):
    """Errors in one line (``tallytrain: error: ...``) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"tallytrain: error: {message} (see {self.prog} --help)\n")


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _optional(cast: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.strip().lower() in ("none", "off", "") else cast(text)

    return parse


def _names(text: str) -> tuple:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _list_of(cast: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(cast(x) for x in _names(text))

    return parse


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def _help_values() -> Dict[str, str]:
    from .data import DATASETS
    from .fl import config as C
    from .models import ARCHS

    return {
        "datasets": ", ".join(DATASETS),
        "partitions": " | ".join(C.PARTITIONS),
        "archs": ", ".join(ARCHS),
        "orders": " | ".join(C.PEER_ORDERS),
        "dtypes": " | ".join(C.PAYLOAD_DTYPES),
        "adversaries": " | ".join(C.ADVERSARIAL_MODES),
    }


def _add_field(group, f: dataclasses.Field, values: Dict[str, str]) -> None:
    flag = "--" + f.name.replace("_", "-")
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    help_text = f"{HELP.get(f.name, '').format(**values)} (default: {_show(default)})".strip()
    # SUPPRESS: an option not given is absent from the namespace, so that an
    # explicit "none" (-> None) is distinguishable from "not given".
    t = str(f.type)
    if t == "bool":
        group.add_argument(
            flag,
            dest=f.name,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=help_text,
        )
        return
    if t.startswith("Tuple"):
        group.add_argument(
            flag, dest=f.name, default=argparse.SUPPRESS, metavar="A,B", type=_names, help=help_text
        )
        return
    parsers: Dict[str, Callable[[str], Any]] = {"int": _integer, "float": _finite, "str": str}
    cast = parsers[t.replace("Optional[", "").rstrip("]")]
    if t.startswith("Optional"):
        group.add_argument(
            flag, dest=f.name, default=argparse.SUPPRESS, type=_optional(cast), help=help_text
        )
    else:
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=cast, help=help_text)


def _common(p: argparse.ArgumentParser, values: Dict[str, str]) -> None:
    from .app.experiment import option_fields

    p.add_argument("--out", required=True, help="run directory to create (or resume)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run directory (same options required)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run directory (only a run directory)",
    )
    p.add_argument(
        "--seed",
        type=_integer,
        default=0,
        help="seed of the first run; --seeds counts up from it (default: 0)",
    )
    p.add_argument(
        "--seeds",
        type=_integer,
        default=1,
        help="number of seeds: --seed, --seed + 1, ... (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=_integer,
        default=1,
        help="torch CPU threads per run (default: 1; results do not depend on it)",
    )
    p.add_argument(
        "--jobs",
        type=_integer,
        default=1,
        help="runs in parallel processes (default: 1; results do not depend on it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (mypkg.myplugin) or .py file that registers datasets "
        "and models by name (docs/api.md); repeatable",
    )
    groups: Dict[Optional[str], Any] = {}
    for section, f in option_fields().values():
        title = section or "federation"
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        _add_field(groups[title], f, values)


def build_parser() -> argparse.ArgumentParser:
    from .fl.registry import method_names

    values = _help_values()
    methods = ", ".join(method_names())
    parser = _Parser(
        prog="tallytrain", description="Hard-label federated distillation with packed votes."
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    info = sub.add_parser("info", help="which op backend serves each device, and versions")
    info.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    run = sub.add_parser("run", help="one method, one or more seeds, into a run directory")
    run.add_argument("--method", required=True, help=f"the method: {methods}")
    _common(run, values)
    cmp_ = sub.add_parser("compare", help="several methods on identical partitions and probes")
    cmp_.add_argument(
        "--methods",
        default="all",
        help=f"comma-separated methods, or 'all'; softlabel-matched is "
        f"softlabel in float16 on as few probes as fit in tallytrain's "
        f"uplink bytes (default: all = {methods}, softlabel-matched)",
    )
    _common(cmp_, values)
    from .app.pareto import BRIDGE_FRACTIONS, BRIDGE_PERIODS, PARAMETER_BASELINES, PERIODS

    par = sub.add_parser(
        "pareto",
        help="accuracy vs bytes: every operating point of FedAvg, "
        "FedProx, FedDF, softlabel, tallytrain and bridge",
    )
    par.add_argument(
        "--periods",
        type=_list_of(_integer),
        default=None,
        help=f"merge periods of the parameter-averaging baselines, each at most "
        f"--rounds (default: {_show(PERIODS)}, those within --rounds)",
    )
    par.add_argument(
        "--bridge-fractions",
        type=_list_of(_finite),
        default=BRIDGE_FRACTIONS,
        help=f"bridge top-k fractions (default: {_show(BRIDGE_FRACTIONS)})",
    )
    par.add_argument(
        "--bridge-periods",
        type=_list_of(_integer),
        default=None,
        help=f"bridge merge periods, each at most --rounds (default: "
        f"{_show(BRIDGE_PERIODS)}, those within --rounds)",
    )
    par.add_argument(
        "--baselines",
        type=_names,
        default=PARAMETER_BASELINES,
        help=f"parameter-averaging baselines (default: {_show(PARAMETER_BASELINES)})",
    )
    _common(par, values)
    abl = sub.add_parser(
        "ablate",
        help="tallytrain's default recipe and one row per mechanism "
        "turned off, with softlabel, on identical partitions",
    )
    _common(abl, values)
    from .bench import ops as bench_ops

    bench = sub.add_parser(
        "bench",
        help="every op against the plain-PyTorch way, as ratios and fractions of the memory "
        "bandwidth",
        description=bench_ops.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_ops.add_arguments(bench)
    return parser


def _version() -> str:
    import numpy
    import torch

    return f"tallytrain {__version__} (torch {torch.__version__}, numpy {numpy.__version__})"


def config_from_args(args: argparse.Namespace, methods: Sequence[str]):
    from .app.experiment import compare_config, option_fields

    if args.seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {args.seeds}")
    options = {name: getattr(args, name) for name in option_fields() if hasattr(args, name)}
    return compare_config(methods, range(args.seed, args.seed + args.seeds), **options)


def _flags(message: str) -> str:
    """``message`` with config field names spelled as the options that set
    them: ``abstain_below must be ...`` -> ``--abstain-below must be ...``,
    ``data.alpha: 0.5 != 0.7`` -> ``--alpha: 0.5 != 0.7``."""
    from .app.experiment import option_fields

    fields = option_fields()
    names = set(fields) | set(_CLI_NAMES)
    sections = sorted({s for s, _ in fields.values() if s})

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    # dotted config paths (a resumed directory's differences)
    message = re.sub(
        r"\b(?:base\.)?(?:%s)\.(\w+)\b" % "|".join(sections),
        lambda m: flag(m.group(1)) if m.group(1) in names else m.group(0),
        message,
    )
    # names with an underscore are names wherever they appear
    message = re.sub(
        r"(?<![\w.\-'])([a-z]+(?:_[a-z0-9]+)+)\b",
        lambda m: flag(m.group(1)) if m.group(1) in names else m.group(0),
        message,
    )
    # a one-word name is one where it begins the message ("alpha must be > 0")
    first = re.match(r"([a-z]+)\b(?=[ :(=])", message)
    if first and first.group(1) in names:
        message = flag(first.group(1)) + message[first.end() :]
    return message


def _info(as_json: bool) -> int:
    from . import ops

    info = ops.backend_info()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    cuda_usable = info["cuda"] != "unavailable"
    print(f"tallytrain {__version__}, backend mode: {info['mode']}")
    print(f"  CPU ops served by:  {info['cpu']}")
    if cuda_usable:
        print(f"  CUDA ops served by: {info['cuda']}")
    else:
        print(
            "  CUDA ops served by: none (no usable CUDA device); the CUDA kernels below "
            "are registered, not in use"
        )
    cuda_column = "serves on CUDA" if cuda_usable else "CUDA kernel"
    print(f"    {'op':16s} {'serves on CPU':14s} {cuda_column}")
    for op, where in info["ops"].items():
        if cuda_usable:
            cuda = where["cuda"]
        else:
            cuda = "registered" if where["cuda_kernel"] == "registered" else "none (reference)"
        print(f"    {op:16s} {where['cpu']:14s} {cuda}")
    print(
        f"  extension: {info['extension'] or 'not loaded'}"
        + (" (built with CUDA)" if info.get("extension_built_with_cuda") else "")
    )
    if info.get("native_error"):
        print(f"  native load error: {info['native_error']}")
    print(
        f"  torch {info['torch']}, CUDA {info['torch_cuda'] or 'none'}"
        + (f", device {info['cuda_device']}" if info.get("cuda_device") else "")
    )
    return 0


def _bench(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .bench import ops as bench_ops

    try:
        bench_ops.run(args, "tallytrain", argv)
    except SystemExit as exc:  # bad options, found once the run starts
        if isinstance(exc.code, str):
            print(f"tallytrain: error: {exc.code}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("tallytrain: stopped", file=sys.stderr)
        return 130
    return 0


def _resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this one: the same options, with
    --resume instead of --overwrite."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["tallytrain"] + args)


def _stopped(args: argparse.Namespace, cfg, argv: Sequence[str]) -> int:
    """Ctrl-C: one line saying what is kept and how to continue."""
    path = os.path.join(args.out, "config.json")
    resumable = False
    if cfg is not None and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                resumable = json.load(f) == cfg.to_dict()
        except (OSError, ValueError):
            resumable = False
    if resumable:
        print(
            f"tallytrain: stopped; the finished rounds are saved in {args.out}. Continue "
            f"with: {_resume_command(argv)}",
            file=sys.stderr,
        )
    else:
        print(
            f"tallytrain: stopped before the run started; nothing was written to {args.out}",
            file=sys.stderr,
        )
    return 130


def _methods(text: str) -> List[str]:
    from .app.experiment import BYTE_MATCHED
    from .fl.registry import method_names

    if text.strip() == "all":
        return method_names() + [BYTE_MATCHED]
    names = list(_names(text))
    if not names:
        raise ValueError(
            f"methods names no method (got {text!r}); give comma-separated names "
            f"of {', '.join(method_names())}, or 'all'"
        )
    return names


def _within_rounds(values: tuple, rounds: int) -> tuple:
    """The default merge periods a run of ``rounds`` rounds can tell apart
    (every period of ``rounds`` or more merges only in the last round)."""
    return tuple(v for v in values if v <= rounds)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (printed already)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "info":
        return _info(args.json)
    if args.command == "bench":
        return _bench(args, argv)
    from . import report
    from .app import plugins
    from .app.experiment import RunDirError, run_compare

    cfg = None
    try:
        for spec in args.plugin:
            plugins.load_plugin(spec)
        options = dict(
            resume=args.resume,
            overwrite=args.overwrite,
            show_progress=not args.quiet,
            threads=args.threads,
            jobs=args.jobs,
        )
        if args.command == "pareto":
            from .app.pareto import BRIDGE_PERIODS, PERIODS, pareto_config, pareto_table, run_pareto

            for name in ("merge_period", "topk_fraction"):
                if hasattr(args, name):
                    raise ValueError(
                        f"pareto sets {name} per operating point; use --periods, "
                        f"--bridge-periods and --bridge-fractions instead"
                    )
            base = config_from_args(args, ["tallytrain"])
            rounds = base.base.rounds
            cfg = pareto_config(
                base.base,
                base.seeds,
                args.periods or _within_rounds(PERIODS, rounds),
                args.bridge_fractions,
                args.bridge_periods or _within_rounds(BRIDGE_PERIODS, rounds),
                args.baselines,
            )
            result = run_pareto(cfg, args.out, **options)
            print(pareto_table(result), end="")
            print(f"run directory: {os.path.abspath(args.out)}")
            return 0
        if args.command == "ablate":
            from .app.ablate import ablate_config, ablation_table, run_ablate

            base = config_from_args(args, ["tallytrain"])
            cfg = ablate_config(base.base, base.seeds)
            print(ablation_table(run_ablate(cfg, args.out, **options)), end="")
            print(f"run directory: {os.path.abspath(args.out)}")
            return 0
        methods = [args.method] if args.command == "run" else _methods(args.methods)
        cfg = config_from_args(args, methods)
        summary = run_compare(cfg, args.out, **options)
    except KeyboardInterrupt:
        return _stopped(args, cfg, argv)
    except (ValueError, OSError, RunDirError) as exc:
        message = str(exc).replace(f"run directory {args.out}", f"--out {args.out}")
        for spec in args.plugin:
            message = message.replace(f"plugin {spec!r}", f"--plugin {spec}")
        print(f"tallytrain: error: {_flags(message)}", file=sys.stderr)
        return 2
    print(report.summary_table(summary), end="")
    print(f"run directory: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
